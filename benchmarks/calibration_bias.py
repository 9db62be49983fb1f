"""Calibrated decoding: the per-forward mask buffer against the per-layer rebuild, side by side.

Runs ``guardalign_core.bench.bench_calibration`` (off / SDPA / eager, decode tokens/s) on the
bench LVLM twice per round in one process: with the library's attention-interface function as
it is, and with its per-layer mask builder swapped for the one it replaced (kept below
verbatim). Rounds alternate the order so that load drifts hit both alike.

    PYTHONPATH=. python benchmarks/calibration_bias.py [--rounds 2] [--layers 8] [--hidden 512]
"""

from __future__ import annotations

import argparse
import json

from guardalign_core.bench import bench_calibration
from guardalign_core.calibration import _interface
from guardalign_core.bench_models import build_bench_lvlm
from guardalign_core.testing.calibration_reference import legacy_biased_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    model, processor = build_bench_lvlm(num_layers=args.layers, hidden=args.hidden)
    current = _interface.biased_mask
    runs: dict[str, list[dict]] = {"buffer": [], "per_layer": []}
    for round_ in range(args.rounds):
        order = ("buffer", "per_layer") if round_ % 2 == 0 else ("per_layer", "buffer")
        for name in order:
            _interface.biased_mask = current if name == "buffer" else legacy_biased_mask
            try:
                runs[name].append(bench_calibration(model, processor, new_tokens=args.new_tokens))
            finally:
                _interface.biased_mask = current
    summary = {}
    for name, reports in runs.items():
        summary[name] = {
            "off_tokens_per_s": max(r["off"]["decode_tokens_per_s"] for r in reports),
            "sdpa_tokens_per_s": max(r["sdpa"]["decode_tokens_per_s"] for r in reports),
            "eager_tokens_per_s": max(r["eager"]["decode_tokens_per_s"] for r in reports),
            "sdpa_prefill_ms": min(r["sdpa"]["prefill_ms"] for r in reports),
            "sdpa_decode_vs_off": [r["ratios"]["sdpa_decode_vs_off"] for r in reports],
        }
    summary["sdpa_buffer_vs_per_layer"] = round(summary["buffer"]["sdpa_tokens_per_s"] / summary["per_layer"]["sdpa_tokens_per_s"], 4)
    summary["machine"] = runs["buffer"][0]["machine"]
    summary["model"] = runs["buffer"][0]["model"]
    summary["input_tokens"] = runs["buffer"][0]["sdpa"]["input_tokens"]
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
