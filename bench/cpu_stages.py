#!/usr/bin/env python3
"""Seconds per variant of each CPU stage on the demo's sample images (800x1000), run in
this process one after another exactly as a worker calls them: planner, overlay, ocr_eval,
readability_eval, iou_eval. The detections are a planted product box (the stage code is the
same whatever found it). Prints a table and how many CPU worker slots keep one GPU busy at the
GPU targets of shared/TARGETS.md.

    .venv/bin/python bench/cpu_stages.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages import iou_eval, ocr_eval, overlay, planner, readability_eval  # noqa: E402
from stages.contract import StageInput  # noqa: E402
from console.samples import DEMO_COPY, sample_images  # noqa: E402

CPU_STAGES = (("planner", planner), ("overlay", overlay), ("ocr_eval", ocr_eval),
              ("readability_eval", readability_eval), ("iou_eval", iou_eval))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    timings: dict[str, list[float]] = {name: [] for name, _ in CPU_STAGES}
    for _ in range(args.repeat):
        for _, image in sample_images():
            buf = io.BytesIO()
            image.save(buf, "PNG")
            w, h = image.size
            results = {"yolo_detect": {"image_size": [w, h], "product_index": 0, "detections": [
                {"box": [w * 0.35, h * 0.3, w * 0.65, h * 0.8], "cls": 39, "label": "bottle", "confidence": 0.9,
                 "is_product": True}]}}
            store: dict[str, bytes] = {}
            for name, module in CPU_STAGES:
                inp = StageInput(stage=name, job_id="j", tenant_id="t", variant_id="v", attempt=1, ad_copy=DEMO_COPY,
                                 image=buf.getvalue(), results=results, read_artifact=store.__getitem__)
                started = time.perf_counter()
                out = module.run(inp)
                timings[name].append(time.perf_counter() - started)
                keys = {}
                for art, data in out.artifacts.items():
                    store[f"{name}/{art}"] = data
                    keys[art] = f"{name}/{art}"
                results[name] = {**out.result, **({"artifacts": keys} if keys else {})}
    print(f"sample images {w}x{h}, {args.repeat * 3} variants\n")
    print("| stage | median s per variant |\n|---|---|")
    total = 0.0
    for name, values in timings.items():
        median = statistics.median(values)
        total += median
        print(f"| {name} | {median:.3f} |")
    print(f"| **all CPU stages** | **{total:.3f}** |")
    for label, gpu_rate in (("VLM-bound GPU worker, 38 img/s over 2 VLM stages", 38 / 2),):
        print(f"\n{label}: {gpu_rate:.0f} variants/s needs {gpu_rate * total:.0f} busy CPU cores")


if __name__ == "__main__":
    main()
