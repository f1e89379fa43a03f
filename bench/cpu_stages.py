#!/usr/bin/env python3
"""Seconds per variant of each CPU stage, with ocr_eval on both Tesseract engines, in one run.

The demo's sample images (800x1000) each carry three copies (English, Korean, mixed), and every
variant goes through the CPU stages in this process one after another as a worker calls them:
planner, overlay, ocr_eval, readability_eval, iou_eval. ocr_eval runs three times on the same
overlay:

- before: pytesseract (a tesseract process per line), kor+eng on every line with Hangul, as the
  stage read before per-line languages;
- pytesseract with each line's own language (stages/ocr_eval.line_language);
- tesserocr in-process, each line's own language (what a worker uses where tesserocr imports).

Wall seconds and CPU seconds (this process and the tesseract processes it waited for) are both
reported: the CLI's tesseract may use several threads, and CPU time is what sizes the pool. The
detections are a planted product box (the stage code is the same whatever found it). Prints the
tables and how many busy CPU cores keep one GPU worker busy at the VLM target of shared/TARGETS.md.

    .venv/bin/python bench/cpu_stages.py [--repeat 3] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from console.samples import DEMO_COPY, sample_images  # noqa: E402
from stages import iou_eval, ocr_engine, ocr_eval, overlay, planner, readability_eval  # noqa: E402
from stages.contract import StageInput  # noqa: E402

COPIES = (
    ("en", DEMO_COPY),
    ("ko", "상큼한 레몬 탄산수, 설탕 제로. 이번 주 두 캔에 5달러!"),
    ("mixed", "Sparkling lemon water 레몬 탄산수 2 for $5 이번 주 한정"),
)
VLM_VARIANTS_PER_S = 38 / 2  # shared/TARGETS.md: 38 VLM img/s per H100, two VLM stages a variant
OTHER_STAGES = (("planner", planner), ("overlay", overlay), ("readability_eval", readability_eval),
                ("iou_eval", iou_eval))


class BeforeLanguages:
    """An engine that reads every Hangul line with kor+eng, as ocr_eval did before line_language."""

    def __init__(self, engine: ocr_engine.Engine) -> None:
        self.engine, self.name = engine, f"{engine.name}, kor+eng"

    def languages(self) -> frozenset[str]:
        return self.engine.languages()

    def read(self, line_img, lang: str) -> str:
        return self.engine.read(line_img, "kor+eng" if "kor" in lang else lang)


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(call):
    wall, cpu = time.perf_counter(), cpu_seconds()
    out = call()
    return out, time.perf_counter() - wall, cpu_seconds() - cpu


def variants(faces: str = "detected"):
    """faces "detected": the detections stand for real YOLO weights, which saw a bottle and no
    person, so the planner searches no face (production on a product shot); "whole": the tiny
    profile's case, faces searched over the whole image."""
    for image_name, image in sample_images():
        buf = io.BytesIO()
        image.save(buf, "PNG")
        w, h = image.size
        yolo = {"image_size": [w, h], "product_index": 0, **({"profile": "real"} if faces == "detected" else {}),
                "detections": [
            {"box": [w * 0.35, h * 0.3, w * 0.65, h * 0.8], "cls": 39, "label": "bottle", "confidence": 0.9,
             "is_product": True}]}
        for copy_name, copy in COPIES:
            yield f"{image_name}/{copy_name}", copy_name, copy, buf.getvalue(), yolo, (w, h)


def stage_input(name, copy, image, results, store) -> StageInput:
    return StageInput(stage=name, job_id="j", tenant_id="t", variant_id="v", attempt=1, ad_copy=copy,
                      image=image, results=results, read_artifact=store.__getitem__)


def record(name, out, results, store) -> None:
    keys = {}
    for art, data in out.artifacts.items():
        store[f"{name}/{art}"] = data
        keys[art] = f"{name}/{art}"
    results[name] = {**out.result, **({"artifacts": keys} if keys else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="also print cProfile's top entries for each non-OCR stage")
    parser.add_argument("--faces", choices=("detected", "whole"), default="detected",
                        help="detected: real YOLO weights saw no person, no face search (production, product "
                             "shots); whole: faces searched over the whole image (the tiny profile)")
    args = parser.parse_args()

    cli = ocr_engine.CliEngine()
    in_process = ocr_engine.InProcessEngine()
    engines = {"before": BeforeLanguages(cli), "pytesseract": cli, "tesserocr": in_process}
    loads = {}
    for lang in ("eng", "kor", "kor+eng"):  # the one-time cost per worker thread, kept out of the medians
        _, loads[lang], _ = timed(lambda: in_process.api(lang))

    wall = {k: [] for k in [n for n, _ in OTHER_STAGES] + [f"ocr_eval:{e}" for e in engines]}
    cpu = {k: [] for k in wall}
    ocr_by_copy = {(c, e): [] for c, _ in COPIES for e in engines}
    passed = {e: 0 for e in engines}
    profiles = {name: cProfile.Profile() for name, _ in OTHER_STAGES} if args.profile else {}
    count = 0
    for _ in range(args.repeat):
        for label, copy_name, copy, image, yolo, size in variants(args.faces):
            count += 1
            results, store = {"yolo_detect": yolo}, {}
            for name, module in OTHER_STAGES[:2]:
                out, w, c = timed(lambda: module.run(stage_input(name, copy, image, results, store)))
                wall[name].append(w)
                cpu[name].append(c)
                record(name, out, results, store)
            readings = {}
            order = list(engines.items())
            order = order[count % len(order):] + order[:count % len(order)]  # no engine always goes first
            for engine_name, engine in order:
                inp = stage_input("ocr_eval", copy, image, results, store)
                out, w, c = timed(lambda: ocr_eval.evaluate(inp, engine))
                wall[f"ocr_eval:{engine_name}"].append(w)
                cpu[f"ocr_eval:{engine_name}"].append(c)
                ocr_by_copy[(copy_name, engine_name)].append(c)
                passed[engine_name] += out.result["passed"]
                readings[engine_name] = [b["read"] for b in out.result["boxes"]]
            if readings["pytesseract"] != readings["tesserocr"]:
                print(f"{label}: the engines read differently: {readings}", file=sys.stderr)
            record("ocr_eval", out, results, store)
            for name, module in OTHER_STAGES[2:]:
                out, w, c = timed(lambda: module.run(stage_input(name, copy, image, results, store)))
                wall[name].append(w)
                cpu[name].append(c)
                record(name, out, results, store)
            for name, module in OTHER_STAGES if args.profile else ():
                profiles[name].runcall(module.run, stage_input(name, copy, image, results, store))

    med = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    others = [n for n, _ in OTHER_STAGES]
    print(f"sample images {size[0]}x{size[1]}, {count} variants ({len(COPIES)} copies on each image), "
          f"median seconds per variant, wall / CPU\n")
    print("| stage | " + " | ".join(f"{e} (wall / CPU)" for e in engines) + " |")
    print("|---|" + "---|" * len(engines))
    totals = {}
    for name in others[:2] + ["ocr_eval"] + others[2:]:
        if name == "ocr_eval":
            cells = [f"{med[f'ocr_eval:{e}']:.3f} / {med_cpu[f'ocr_eval:{e}']:.3f}" for e in engines]
        else:
            cells = [f"{med[name]:.3f} / {med_cpu[name]:.3f}"] * len(engines)
        print(f"| {name} | " + " | ".join(cells) + " |")
    for e in engines:
        totals[e] = (sum(med[n] for n in others) + med[f"ocr_eval:{e}"],
                     sum(med_cpu[n] for n in others) + med_cpu[f"ocr_eval:{e}"])
    print("| **all CPU stages** | " + " | ".join(f"**{w:.3f} / {c:.3f}**" for w, c in totals.values()) + " |")

    print("\nocr_eval CPU s per variant by copy:\n")
    print("| copy | " + " | ".join(engines) + " | before / tesserocr |")
    print("|---|" + "---|" * (len(engines) + 1))
    for copy_name, _ in COPIES:
        cells = [statistics.median(ocr_by_copy[(copy_name, e)]) for e in engines]
        print(f"| {copy_name} | " + " | ".join(f"{v:.3f}" for v in cells) + f" | {cells[0] / cells[-1]:.1f}x |")

    before, after = totals["before"][1], totals["tesserocr"][1]
    ocr_before, ocr_after = med_cpu["ocr_eval:before"], med_cpu["ocr_eval:tesserocr"]
    print(f"\nratios (CPU): ocr_eval before / tesserocr {ocr_before / ocr_after:.1f}x, "
          f"pytesseract per-line language / tesserocr {med_cpu['ocr_eval:pytesseract'] / ocr_after:.1f}x; "
          f"all CPU stages before / after {before / after:.1f}x")
    print("passed: " + ", ".join(f"{e} {passed[e]}/{count}" for e in engines))
    print("tesserocr one-time load per worker thread: "
          + ", ".join(f"{lang} {s:.3f} s" for lang, s in loads.items()))
    print(f"\nVLM-bound GPU worker ({VLM_VARIANTS_PER_S:.0f} variants/s) needs busy CPU cores: "
          + ", ".join(f"{e} {VLM_VARIANTS_PER_S * totals[e][1]:.1f}" for e in engines))

    for name, profile in profiles.items():
        print(f"\n--- cProfile, {name}, {count} variants, top 12 by own time ---")
        pstats.Stats(profile).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
