"""``guardalign chat`` and ``guardalign profile``: the calibrated local LVLM from the shell."""

from __future__ import annotations

import argparse
import json
import sys

from ._options import DeprecatedAlias, check_checkpoint_folder, check_device
from ._scan import add_detector_options, config_from_args


def _pipeline(args: argparse.Namespace):
    from guardalign_core.calibration import CalibrationConfig
    from guardalign_core.config import PrefixConfig
    from guardalign_core.pipeline import GuardAlignPipeline
    from guardalign_core.runners import get_local_lvlm

    check_device("--device", args.lvlm_device)
    config = config_from_args(args)  # checks --clip-device and --clip-pretrained
    check_checkpoint_folder("--model", args.model_id)
    calibration = CalibrationConfig(
        gamma=args.gamma if args.gamma is not None else CalibrationConfig().gamma,
        layers=tuple(args.layers) if args.layers else None,
        backend=args.attention,
        enabled=not args.no_calibration,
    )
    prefix = PrefixConfig(text=args.prefix, when="never" if args.no_prefix else "always", placement=args.placement)
    lvlm = get_local_lvlm(args.model_id, device=args.lvlm_device, dtype=args.dtype, backend=calibration.backend)
    return GuardAlignPipeline(lvlm, config, prefix=prefix, calibration=calibration)


def _messages(args: argparse.Namespace) -> list[dict]:
    content = [{"type": "image", "image": path} for path in args.image or []]
    content.append({"type": "text", "text": args.question})
    return [{"role": "user", "content": content}]


def run_chat(args: argparse.Namespace) -> int:
    pipe = _pipeline(args)
    extra = {"suppress_tokens": pipe.lvlm.tokenizer.all_special_ids} if args.suppress_special else {}
    stream = pipe.stream(_messages(args), max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, **extra)
    for delta in stream:
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n\n--- guard record ---\n" + json.dumps(stream.record.model_dump(mode="json"), indent=2) + "\n")
    return 0


def run_profile(args: argparse.Namespace) -> int:
    pipe = _pipeline(args)
    extra = {"suppress_tokens": pipe.lvlm.tokenizer.all_special_ids} if args.suppress_special else {}
    profile = pipe.profile(_messages(args), answer_tokens=args.answer_tokens, **extra)
    if args.json:
        sys.stdout.write(json.dumps(profile.to_dict(), indent=2) + "\n")
    else:
        sys.stdout.write("Mean attention mass on the safety prefix, per decoder layer (queries after the prefix):\n")
        sys.stdout.write(profile.to_table() + "\n")
    if args.plot:
        plot_profile(profile, args.plot, title=args.model_id)
        sys.stdout.write(f"wrote {args.plot}\n")
    return 0


def plot_profile(profile, path: str, title: str = "") -> None:
    """Draw the per-layer prefix attention with and without calibration (the paper's Fig. 1b)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError("--plot needs matplotlib: pip install 'guardalign[plot]'") from err
    layers = [r.layer for r in profile.layers]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(layers, [r.baseline for r in profile.layers], "o-", label="without calibration")
    ax.plot(layers, [r.calibrated for r in profile.layers], "s-", label="with calibration")
    for r in profile.layers:
        if r.gamma:
            ax.axvspan(r.layer - 0.5, r.layer + 0.5, color="orange", alpha=0.12, lw=0)
    ax.set_xlabel("decoder layer (shaded: calibrated)")
    ax.set_ylabel("attention mass on prefix")
    ax.set_title(f"Safety-prefix attention {title}".strip())
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", dest="model_id", required=True, help="Hugging Face hub id or local checkpoint folder of the LVLM")
    parser.add_argument("--image", action="append", help="an image (repeat for several)")
    parser.add_argument("--device", dest="lvlm_device", default="cpu", help="device of the LVLM (default cpu); CLIP's is --clip-device")
    parser.add_argument("--lvlm-device", dest="lvlm_device", action=DeprecatedAlias, new="--device", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--gamma", type=float, help="calibration strength γ (Eq. 13)")
    parser.add_argument("--layers", type=int, nargs="+", help="decoder layers to calibrate (default: the middle half)")
    parser.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa", help="stock attention the calibration delegates to")
    parser.add_argument("--no-calibration", action="store_true", help="prefix only, no attention calibration")
    parser.add_argument("--no-prefix", action="store_true", help="no safety prefix (and so no calibration)")
    parser.add_argument("--prefix", default="As an AI assistant, ", help="the safety prefix")
    parser.add_argument("--placement", choices=["response", "prompt"], default="response")
    parser.add_argument("--suppress-special", action="store_true", help="suppress special tokens (for random-weight test models)")
    add_detector_options(parser, lvlm=True)


def register(commands: argparse._SubParsersAction) -> None:
    chat = commands.add_parser("chat", help="ask a local LVLM with GuardAlign (streamed)", description="Stream a calibrated answer and print the guard record.")
    chat.add_argument("question")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--seed", type=int)
    _add_model_options(chat)
    chat.set_defaults(func=run_chat)

    profile = commands.add_parser(
        "profile", help="prefix attention per layer, with and without calibration",
        description="Measure the mean attention mass on the safety prefix per decoder layer (the paper's Fig. 1b).",
    )
    profile.add_argument("--prompt", dest="question", required=True, help="the user instruction")
    profile.add_argument("--answer-tokens", type=int, default=16, help="answer tokens generated and measured as queries")
    profile.add_argument("--plot", metavar="FILE.png", help="draw the profile")
    profile.add_argument("--json", action="store_true")
    _add_model_options(profile)
    profile.set_defaults(func=run_profile)
