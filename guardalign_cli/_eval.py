"""``guardalign eval``: compare methods on benchmarks with one model; resumable, re-judgeable."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Any

from ._options import check_checkpoint_folder, check_device

_EPILOG = """\
benchmark specs (--benchmark KIND:PATH, repeatable):
{benchmarks}

methods (--methods, comma-separated):
{methods}

judge specs (--judge, repeatable; the first that decides 'unsafe' gives USR, the first that
decides 'refused' gives ASR and the refusal rate on safe items):
  refusal | refusal:MARKERS         offline refusal markers (safety prefix ignored)
  md-judge | md-judge:PATH_OR_ID    MD-Judge v0.1 on a local transformers model (USR)
  md-judge@v2:PATH_OR_ID            MD-Judge v0.2 (ETA's judge; v2 template, trust_remote_code)
  langchain:PROVIDER:MODEL          any LangChain chat model as an MD-Judge-style judge (USR)
  constant:unsafe|safe,refused|complied   the same verdict for everything (dry runs)

model (--model):
  HUB_ID_OR_FOLDER                  a local Hugging Face LVLM: every method, calibration included
  langchain:PROVIDER:MODEL          a black-box chat model (init_chat_model): masking on a local
                                    CLIP, the prefix by prompt; calibration is unavailable

outputs in --out: responses.jsonl (every response + verdicts), items.jsonl, results.csv,
results.json, table.txt, usr_vs_time.png, run.json. Run the same command again to resume; a
folder holding another run is refused unless --force replaces it.
"""


def _epilog() -> str:
    from guardalign_core.eval.datasets import BENCHMARKS
    from guardalign_core.eval.methods import METHODS

    benchmarks = "\n".join(f"  {r.usage:<34}{r.description}" for r in BENCHMARKS.values())
    methods = "\n".join(f"  {m.name:<34}{m.description}" for m in METHODS.values())
    return _EPILOG.format(benchmarks=benchmarks, methods=methods)


def _chat_model_target(spec: str, args: argparse.Namespace):
    """``langchain:PROVIDER:MODEL``: the chat model behind the real adapter (GuardedChatModel)."""
    model = spec.removeprefix("langchain:")
    if ":" not in model or not all(model.split(":", 1)):
        raise ValueError(f"--model {spec!r}: write langchain:PROVIDER:MODEL, e.g. langchain:openai:gpt-4o")
    if importlib.util.find_spec("langchain") is None:
        raise ValueError("--model langchain:... needs LangChain and the provider's package: pip install 'guardalign[agents]' langchain-<provider>")
    from langchain.chat_models import init_chat_model

    from guardalign_integrations.langchain.eval_target import GuardedChatTarget

    return GuardedChatTarget(init_chat_model(model, temperature=args.temperature, max_tokens=args.max_new_tokens), model_id=spec)


def _local_target(args: argparse.Namespace):
    from guardalign_core.calibration import CalibrationConfig
    from guardalign_core.eval.targets import LocalTarget
    from guardalign_core.lvlm import LocalLVLM

    check_checkpoint_folder("--model", args.model_id)
    calibration = CalibrationConfig(gamma=args.gamma) if args.gamma is not None else None
    lvlm = LocalLVLM.from_pretrained(args.model_id, device=args.device, dtype=args.dtype)
    return LocalTarget(lvlm, calibration=calibration, suppress_special_tokens=args.suppress_special)


def _guard(args: argparse.Namespace) -> Any:
    from guardalign_core.config import resolve_config

    check_device("--clip-device", args.clip_device)
    config = resolve_config(args.guard)
    if args.clip_device:
        config = config.model_copy(update={"detector": config.detector.model_validate({**config.detector.model_dump(), "device": args.clip_device})})
    return config


def _print_run(run) -> None:
    from guardalign_core.eval.report import format_paper_results

    out = sys.stdout
    out.write(run.table + "\n")
    for note in run.notes:
        out.write(f"note: {note}\n")
    if any(row.benchmark == "spa-vl-harm" for row in run.rows):
        out.write("\n" + format_paper_results() + "\n")
    out.write(f"\nwrote {', '.join(p.name for p in run.paths.values())} to {run.out_dir}")
    if run.generated or run.reused:
        out.write(f" ({run.generated} generated, {run.reused} resumed)")
    out.write("\n")


def _register_adapter_judges() -> None:
    """Let ``--judge langchain:...`` work: the adapter package registers that judge kind on import."""
    if importlib.util.find_spec("langchain_core") is not None:
        import guardalign_integrations.langchain.judges  # noqa: F401


def _judges(args: argparse.Namespace) -> list[Any]:
    """Judge specs, with MD-Judge placed on --judge-device (a 7B judge on CPU would take hours)."""
    from guardalign_core.eval.judges import get_judge

    _register_adapter_judges()
    check_device("--judge-device", args.judge_device)

    judges: list[Any] = []
    for spec in args.judge or ["refusal"]:
        if spec.strip().partition(":")[0].partition("@")[0] == "md-judge":
            judges.append(get_judge(spec, device=args.judge_device or args.device, dtype=args.judge_dtype))
        else:
            judges.append(spec)
    return judges


def run_eval_command(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ImportError as err:  # a missing optional package (langchain, transformers): one line, like other errors
        raise ValueError(str(err)) from err


def _run(args: argparse.Namespace) -> int:
    from guardalign_core.eval.runner import rejudge, run_eval

    judges = _judges(args)
    progress = not args.no_progress
    if args.rejudge:
        run = rejudge(args.out, judges, force=args.force, progress=progress)
        _print_run(run)
        return 0
    if not args.model_id:
        raise ValueError("--model is required (a hub id, a local folder, or langchain:PROVIDER:MODEL)")
    if not args.benchmark:
        raise ValueError("--benchmark is required (KIND:PATH; see guardalign eval --help)")
    from guardalign_core.eval.datasets import load_benchmark
    from guardalign_core.eval.judging import resolve_judges
    from guardalign_core.eval.methods import parse_methods
    from guardalign_core.lvlm import GenerationOptions

    check_device("--device", args.device)
    # Every check runs before a model is touched: methods, then data, then (in run_eval) judges.
    methods = parse_methods(args.methods)
    readers = {"skip_missing": True} if args.skip_missing else {}
    benchmarks = [load_benchmark(spec, limit=args.limit, allow_download=args.allow_download, **readers) for spec in args.benchmark]
    guard = _guard(args)
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    resolve_judges(judges, [])  # a bad judge fails here, before the model is even looked for (run_eval builds them again)
    target = _chat_model_target(args.model_id, args) if args.model_id.startswith("langchain:") else _local_target(args)
    try:
        run = run_eval(
            target, benchmarks, methods, judges, out_dir=args.out, guard=guard, options=options, resume=not args.no_resume,
            overwrite=args.force, progress=progress, raise_errors=args.debug,
        )
    except KeyboardInterrupt:
        sys.stderr.write(f"guardalign eval: the responses so far are saved in {args.out}; run the same command again to resume\n")
        raise
    _print_run(run)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval",
        help="compare vanilla / ETA / GuardAlign ablations on benchmarks (USR, ASR, time)",
        description="Run every method on every benchmark item with one model, judge the responses, and write the "
        "results table (USR, ASR, refusal rate on safe items, seconds per item, flag rate), a USR-vs-time plot and "
        "every response as JSONL. Interrupted runs resume; --rejudge re-judges saved responses.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", dest="model_id", help="hub id or local folder of the LVLM, or langchain:PROVIDER:MODEL")
    parser.add_argument("--device", default="cpu", help="device of the local LVLM (default cpu); CLIP's is --clip-device")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"], help="dtype of the local LVLM")
    parser.add_argument("--benchmark", action="append", metavar="KIND:PATH", help="a benchmark spec (repeatable; see below)")
    parser.add_argument("--methods", default="vanilla,eta,guardalign", help="comma-separated methods (default vanilla,eta,guardalign)")
    parser.add_argument("--judge", action="append", metavar="SPEC", help="a judge spec (repeatable; default refusal)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (reused to resume)")
    parser.add_argument("--judge-device", help="device of an md-judge model (default: --device)")
    parser.add_argument("--judge-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"], help="dtype of an md-judge model")
    parser.add_argument("--guard", metavar="PRESET_OR_FILE", help="detector/prefix config: a preset (default, fast-cpu, ...) or a YAML/JSON file")
    parser.add_argument("--clip-device", metavar="DEVICE", help="device of the detector's CLIP (overrides the guard config)")
    parser.add_argument("--gamma", type=float, help="calibration strength γ (default: the library's)")
    parser.add_argument("--limit", type=int, metavar="N", help="only the first N items of each benchmark")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="tokens generated per response (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    parser.add_argument("--seed", type=int, help="seed for sampling (with --temperature > 0)")
    parser.add_argument("--no-resume", action="store_true", help="start the same setup over, overwriting its responses in --out")
    parser.add_argument("--rejudge", action="store_true", help="only judge the responses saved in --out again (no generation)")
    parser.add_argument("--force", action="store_true", help="replace another run's outputs in --out (a different setup, or files "
                        "without run.json); with --rejudge: replace the given judges' saved verdicts")
    parser.add_argument("--skip-missing", action="store_true", help="drop benchmark items whose image file is missing (logged) instead of failing")
    parser.add_argument("--allow-download", action="store_true", help="allow http(s) URLs as benchmark paths")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--suppress-special", action="store_true", help="suppress special tokens (random-weight test models)")
    parser.set_defaults(func=run_eval_command)
