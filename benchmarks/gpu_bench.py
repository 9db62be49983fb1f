"""GPU timings with random weights of real-size configs (speed does not depend on weights).

Run on a CUDA machine: ``python benchmarks/gpu_bench.py --out results.json``. Measures the
detector (ViT-B-32 and ViT-L-14-336, grid and tokens modes, batched vs one-at-a-time) and the
attention calibration on a LLaVA-1.5-7B-sized model (bf16): prefill and decode speed with
calibration off, on with SDPA, on with eager. Results go into docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from guardalign_core.bench import bench_calibration, bench_detector


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", default=str(Path(__file__).resolve().parents[1] / "shared" / "data"))
    parser.add_argument("--out", default="gpu_bench.json")
    parser.add_argument("--skip-lvlm", action="store_true")
    parser.add_argument("--prompt-repeat", type=int, default=70, help="≈650 prompt tokens, like one LLaVA-1.5 image + question")
    args = parser.parse_args()
    images = sorted(str(p) for p in Path(args.images).rglob("*") if p.suffix.lower() in (".png", ".jpg"))
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}
    runs = [("ViT-B-32", "grid", "float16"), ("ViT-L-14-336", "grid", "float16"), ("ViT-L-14-336", "tokens", "float16"),
            ("ViT-B-32", "grid", "float32")]
    for model, mode, dtype in runs:
        t0 = time.time()
        key = f"{model}/{mode}/{dtype}"
        report[key] = bench_detector(images, model=model, device="cuda", patch_mode=mode, dtype=dtype, batch=32, single=16)
        print(key, f"{time.time() - t0:.1f}s", json.dumps(report[key]["ot"]), flush=True)
    if not args.skip_lvlm:
        from transformers import LlavaForConditionalGeneration

        from guardalign_core.bench_models import llava_1_5_7b_config
        from guardalign_core.testing.tiny_lvlm import build_tiny_lvlm

        _, processor = build_tiny_lvlm("llava")
        with torch.device("cuda"):
            model = LlavaForConditionalGeneration(llava_1_5_7b_config()).to(torch.bfloat16).eval()
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id or 0
        report["llava-1.5-7b-random-bf16"] = bench_calibration(model, processor, prompt_repeat=args.prompt_repeat, new_tokens=64, repeats=3)
        print(json.dumps(report["llava-1.5-7b-random-bf16"], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
