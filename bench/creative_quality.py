#!/usr/bin/env python3
"""Creative quality of the planner -> overlay -> ocr_eval -> readability_eval -> iou_eval path,
measured from the output pixels on photographs that ship inside installed packages.

The evaluation set (bench/eval_set.json) holds hand-drawn subject and face boxes for ultralytics'
bus.jpg and zidane.jpg, matplotlib's grace_hopper.jpg and the three generated product shots of
console/samples.py, and six kinds of copy. Every photo x copy runs twice: with no detections (what
the tiny profile's YOLO gives) and with the hand boxes given as detections (first subject = product).

What is measured comes from the overlay's pixels, not from what the stages say about themselves:
  - covered: share of each subject box inside the drawn block (the bounding box of every pixel
    the overlay changed: ink, scrim or backing); faces: any changed pixel inside a face box;
  - ocr: Tesseract's reading of each line (ocr_eval) equal to the line drawn;
  - contrast: worst-10% WCAG contrast of the text colour against the pixels around each line's
    ink, and the share of pixels right next to the glyphs below the required ratio (<= 1% passes);
  - css px: the em size measured from each line's ink height, in CSS px on a 375 px wide phone;
  - block share: the drawn block's area over the image's; broken words and orphan last lines;
  - post: the feed composition (instagram_feed_gen.compose + encode_under) meets the size limits.

    .venv/bin/python bench/creative_quality.py [--mode none|hand|both] [--json out.json] [--quiet]
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import traceback
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from console.samples import sample_images  # noqa: E402
from stages import fonts, imaging, instagram_feed_gen, iou_eval, ocr_eval, overlay, planner, readability_eval  # noqa: E402
from stages.contract import PermanentStageError, StageInput  # noqa: E402

STAGES = (("planner", planner), ("overlay", overlay), ("ocr_eval", ocr_eval),
          ("readability_eval", readability_eval), ("iou_eval", iou_eval))
EVAL_SET = Path(__file__).with_name("eval_set.json")
PHONE_CSS_WIDTH = 375
MIN_CSS_PX = 14.0
LARGE_BOLD_CSS_PX = 18.66  # WCAG "large": 14 pt bold; the font is a bold face
MAX_BLOCK_SHARE = 0.25
ADJACENT_MAX_SHARE = 0.01
CHANGED_TOLERANCE = 8  # a channel moving more than this between original and overlay was drawn on


def _site_packages() -> Path:
    import PIL

    return Path(PIL.__file__).resolve().parent.parent


def load_photo(source: str) -> Image.Image:
    kind, _, name = source.partition(":")
    if kind == "sample":
        return dict(sample_images())[name]
    path = _site_packages() / name
    return imaging.load_image(path.read_bytes())


def post_scale(size: tuple[int, int]) -> float:
    """Image px -> CSS px on a phone: the feed composition's scale, then 1080 -> 375."""
    canvas, padding = instagram_feed_gen.compose(Image.new("RGB", size))
    shown_w = canvas.width - padding[0] - padding[2]
    return shown_w / size[0] * PHONE_CSS_WIDTH / canvas.width


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """`radius` steps of 4-neighbour growth (OpenCV's, not the stage's own code: the bench measures
    independently of what it checks)."""
    import cv2

    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    return cv2.dilate(mask.astype(np.uint8), cross, iterations=radius).astype(bool) if radius else mask.copy()


def _half_ink_height(text: str, size: int) -> int:
    """Rows of the line's glyph pixels at least half covered when set at `size` px."""
    mask = fonts.load_font(size).getmask2(text, mode="L", anchor="la")[0]
    rows = np.nonzero((np.asarray(mask).reshape(mask.size[1], mask.size[0]) >= 128).any(axis=1))[0]
    return int(rows.max() - rows.min() + 1) if rows.size else 0


def em_from_ink(text: str, ink_h: int) -> float:
    """The font size whose rendering of `text` is `ink_h` rows high: the font as a ruler (hinting
    makes glyph height not quite proportional to size, so the nearest sizes are tried)."""
    reference = _half_ink_height(text, 200) / 200.0
    if reference <= 0:
        return float(ink_h)
    guess = ink_h / reference
    sizes = list(range(max(1, int(guess * 0.85)), int(guess * 1.15) + 2))
    errors = [abs(_half_ink_height(text, s) - ink_h) for s in sizes]
    tied = [s for s, e in zip(sizes, errors) if e == min(errors)]
    return float(np.median(tied))  # several sizes can ink the same rows: the middle one, unbiased


def _broken_words(lines: list[str], copy: str) -> int:
    words = set(copy.split())
    broken = 0
    for a, b in zip(lines, lines[1:]):
        if not a or not b:
            continue
        tail, head = a.split()[-1], b.split()[0]
        if tail.endswith("-"):
            continue
        if tail + head in words or (tail not in words and head not in words and any(
                w.startswith(tail) and head in w for w in words)):
            broken += 1
    return broken


def measure(original: Image.Image, rendered: Image.Image, overlay_result: dict, photo: dict, copy: str) -> dict:
    # An extended canvas (the planner's band outside the photo): compare on that canvas, with the
    # photo's boxes where the photo now sits.
    canvas = overlay_result.get("canvas")
    ox, oy = (int(v) for v in canvas["offset"]) if canvas else (0, 0)
    if canvas:
        original = imaging.extend_canvas(original, canvas)
    before = imaging.rgb_array(original)
    after = imaging.rgb_array(rendered)
    height, width = before.shape[:2]
    changed = np.abs(after - before).max(axis=2) > CHANGED_TOLERANCE
    ys, xs = np.nonzero(changed)
    if xs.size == 0:
        return {"drawn": False}
    block = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    block_share = (block[2] - block[0]) * (block[3] - block[1]) / (width * height)

    def covered_share(box) -> float:
        x1, y1, x2, y2 = (int(round(v)) for v in (box[0] + ox, box[1] + oy, box[2] + ox, box[3] + oy))
        ix = max(0, min(x2, block[2]) - max(x1, block[0]))
        iy = max(0, min(y2, block[3]) - max(y1, block[1]))
        return ix * iy / max(1, (x2 - x1) * (y2 - y1))

    subjects = [covered_share(s["box"]) for s in photo["subjects"]]
    faces = []
    for f in photo["faces"]:
        x1, y1, x2, y2 = (int(v) for v in (f[0] + ox, f[1] + oy, f[2] + ox, f[3] + oy))
        faces.append(bool(changed[y1:y2, x1:x2].any()))

    text_rgb = np.asarray(imaging.hex_to_rgb(overlay_result.get("text_color", "#000000")), dtype=np.float64)
    text_lum = imaging.relative_luminance(text_rgb)
    scale = post_scale((width, height))
    lines_out = []
    for tb in overlay_result.get("text_boxes") or []:
        x1, y1, x2, y2 = (int(round(v)) for v in tb["box"])
        m = max(2, int(round(0.25 * (y2 - y1))))
        rx1, ry1, rx2, ry2 = max(0, x1 - m), max(0, y1 - m), min(width, x2 + m), min(height, y2 + m)
        crop = after[ry1:ry2, rx1:rx2]
        # Ink: what the overlay changed and that now lies at least a quarter of the way from the
        # local ground (the crop's median: mostly background) to the text colour, so the glyphs'
        # anti-aliased fringe counts as glyph, not as the background next to it.
        distance = np.abs(crop - text_rgb).max(axis=2)
        ground_distance = float(np.abs(np.median(crop.reshape(-1, 3), axis=0) - text_rgb).max())
        ink = (distance <= 0.75 * max(ground_distance, 1.0)) & changed[ry1:ry2, rx1:rx2]
        if not ink.any():
            lines_out.append({"text": tb.get("text", ""), "ink": False})
            continue
        # Glyph pixels at least half way from the background to the text colour: the same cut as
        # the per-em reference above, so anti-aliasing does not shrink or grow the estimate.
        ground = np.median(crop[~ink], axis=0) if (~ink).any() else 255 - text_rgb
        half = np.abs(crop - text_rgb).max(axis=2) <= 0.5 * np.abs(ground - text_rgb).max()
        core = (half & changed[ry1:ry2, rx1:rx2]) if (half & changed[ry1:ry2, rx1:rx2]).any() else ink
        iy = np.nonzero(core.any(axis=1))[0]
        ink_h = iy.max() - iy.min() + 1
        em_px = em_from_ink(tb.get("text", ""), int(ink_h))
        css = em_px * scale
        required = imaging.WCAG_AA_LARGE if css >= LARGE_BOLD_CSS_PX else imaging.WCAG_AA_NORMAL
        lum = imaging.relative_luminance(crop)
        ratio = np.asarray(imaging.contrast_ratio(text_lum, lum))
        background = ~_dilate(ink, 1)
        ring = _dilate(ink, max(2, int(round(em_px * 0.12)))) & ~_dilate(ink, 1)
        worst = float(np.quantile(ratio[background], 0.10, method="lower")) if background.any() else 0.0
        adjacent_below = float((ratio[ring] < required).mean()) if ring.any() else 1.0
        lines_out.append({"text": tb.get("text", ""), "ink": True, "css_px": round(css, 1),
                          "contrast": round(worst, 2), "required": required,
                          "adjacent_below": round(adjacent_below, 4),
                          "legible": worst >= required and adjacent_below <= ADJACENT_MAX_SHARE})
    drawn_lines = [tb.get("text", "") for tb in overlay_result.get("text_boxes") or []]
    try:
        canvas, _ = instagram_feed_gen.compose(rendered)
        jpeg, _ = instagram_feed_gen.encode_under(canvas)
        aspect = canvas.width / canvas.height
        post_ok = (canvas.width == 1080 and instagram_feed_gen.MIN_ASPECT - 1e-6 <= aspect
                   <= instagram_feed_gen.MAX_ASPECT + 1e-6 and len(jpeg) < instagram_feed_gen.MAX_BYTES)
    except PermanentStageError:
        post_ok = False
    inside = 0 <= block[0] and 0 <= block[1] and block[2] <= width and block[3] <= height
    return {
        "drawn": True,
        "block": list(block),
        "block_share": round(block_share, 4),
        "subject_covered": [round(s, 4) for s in subjects],
        "faces_covered": faces,
        "lines": lines_out,
        "broken_words": _broken_words(drawn_lines, fonts.clean_text(copy)),
        "orphan": len(drawn_lines) > 1 and len(drawn_lines[-1].split()) == 1 and len(drawn_lines[-2].split()) > 2,
        "post_ok": bool(post_ok and inside),
    }


def run_variant(photo: dict, image: Image.Image, copy: str, mode: str) -> dict:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    data = buf.getvalue()
    w, h = image.size
    detections = []
    if mode == "hand":
        detections = [{"box": s["box"], "label": s["label"], "cls": 0, "confidence": 1.0, "is_product": i == 0}
                      for i, s in enumerate(photo["subjects"])]
    results: dict = {"yolo_detect": {"image_size": [w, h], "detections": detections,
                                     "product_index": 0 if detections else None}}
    if mode == "hand":
        # The hand boxes stand for a detector with real weights: the planner trusts them, and
        # looks for faces in the persons' heads only (stages/planner.trusted_people).
        results["yolo_detect"]["profile"] = "real"
    store: dict[str, bytes] = {}
    row: dict = {"photo": photo["name"], "mode": mode}
    for name, module in STAGES:
        inp = StageInput(stage=name, job_id="j", tenant_id="t", variant_id="v", attempt=1, ad_copy=copy,
                         image=data, results=results, read_artifact=store.__getitem__)
        try:
            out = module.run(inp)
        except PermanentStageError as exc:
            row.update(status="failed", stage=name, error=str(exc))
            return row
        except Exception as exc:  # a crash is what the bench exists to catch: it is counted, not raised
            row.update(status="crashed", stage=name, error=f"{type(exc).__name__}: {exc}",
                       trace=traceback.format_exc(limit=3))
            return row
        keys = {}
        for art, blob in out.artifacts.items():
            store[f"{name}/{art}"] = blob
            keys[art] = f"{name}/{art}"
        results[name] = {**out.result, **({"artifacts": keys} if keys else {})}
    rendered = imaging.load_image(store["overlay/overlay.png"])
    row["status"] = "done"
    row["metrics"] = measure(image, rendered, results["overlay"], photo, copy)
    row["ocr_exact"] = [bool(r["exact"]) for r in results["ocr_eval"]["boxes"]]
    row["ocr_read"] = [(r["expected"], r["read"]) for r in results["ocr_eval"]["boxes"] if not r["exact"]]
    row["stage_passed"] = {n: results[n].get("passed") for n in ("ocr_eval", "readability_eval", "iou_eval")}
    row["fallback"] = results["planner"].get("fallback", "")
    row["caption_text"] = results["planner"].get("caption_text", "")
    return row


def summarise(rows: list[dict]) -> dict:
    done = [r for r in rows if r["status"] == "done" and r["metrics"].get("drawn")]
    lines = [ln for r in done for ln in r["metrics"]["lines"] if ln.get("ink")]
    ocr = [x for r in done for x in r["ocr_exact"]]
    max_cov = [max(r["metrics"]["subject_covered"] or [0.0]) for r in done]
    css = [ln["css_px"] for ln in lines]
    pct = lambda n, d: round(100.0 * n / d, 1) if d else 0.0  # noqa: E731
    return {
        "variants": len(rows),
        "done": len(done),
        "failed (clear error)": sum(r["status"] == "failed" for r in rows),
        "crashed": sum(r["status"] == "crashed" for r in rows),
        "subject never covered %": pct(sum(c == 0 for c in max_cov), len(done)),
        "subject covered <= 5% %": pct(sum(c <= 0.05 for c in max_cov), len(done)),
        "worst subject share covered": round(max(max_cov, default=0.0), 3),
        "variants covering a face": sum(any(r["metrics"]["faces_covered"]) for r in done),
        "OCR exact lines %": pct(sum(ocr), len(ocr)),
        "OCR exact variants %": pct(sum(all(r["ocr_exact"]) for r in done), len(done)),
        "legible lines % (contrast and <=1% adjacent)": pct(sum(ln["legible"] for ln in lines), len(lines)),
        "legible variants %": pct(sum(all(ln.get("legible") for ln in r["metrics"]["lines"]) for r in done), len(done)),
        "median worst-10% contrast": round(statistics.median([ln["contrast"] for ln in lines]), 2) if lines else 0,
        "smallest text css px": min(css, default=0),
        "lines >= 14 css px %": pct(sum(c >= MIN_CSS_PX for c in css), len(css)),
        "largest block share": round(max((r["metrics"]["block_share"] for r in done), default=0), 3),
        "blocks <= 25% %": pct(sum(r["metrics"]["block_share"] <= MAX_BLOCK_SHARE for r in done), len(done)),
        "broken words": sum(r["metrics"]["broken_words"] for r in done),
        "orphans": sum(bool(r["metrics"]["orphan"]) for r in done),
        "post meets limits %": pct(sum(r["metrics"]["post_ok"] for r in done), len(rows)),
    }


def _variant_line(r: dict) -> str:
    if r["status"] != "done":
        return f"| {r['photo']} | {r['copy']} | {r['mode']} | {r['status']} at {r['stage']}: {r['error'][:90]} |"
    m = r["metrics"]
    if not m.get("drawn"):
        return f"| {r['photo']} | {r['copy']} | {r['mode']} | nothing drawn |"
    lines = [ln for ln in m["lines"] if ln.get("ink")]
    return ("| {p} | {c} | {mode} | cov {cov:.0%} face {face} | ocr {ocr}/{n} | contrast {con} adj {adj:.1%} | "
            "css {css} | block {blk:.0%} | {fb} |").format(
        p=r["photo"], c=r["copy"], mode=r["mode"], cov=max(m["subject_covered"] or [0]),
        face="Y" if any(m["faces_covered"]) else "n", ocr=sum(r["ocr_exact"]), n=len(r["ocr_exact"]),
        con=min((ln["contrast"] for ln in lines), default=0), adj=max((ln["adjacent_below"] for ln in lines), default=0),
        css=min((ln["css_px"] for ln in lines), default=0), blk=m["block_share"], fb=r.get("fallback") or "-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("none", "hand", "both"), default="both")
    parser.add_argument("--json", type=Path, help="write every row and the summaries here")
    parser.add_argument("--quiet", action="store_true", help="aggregate tables only")
    parser.add_argument("--photos", nargs="*", help="only these photo names")
    args = parser.parse_args()
    spec = json.loads(EVAL_SET.read_text())
    modes = ("none", "hand") if args.mode == "both" else (args.mode,)
    rows = []
    for photo in spec["photos"]:
        if args.photos and photo["name"] not in args.photos:
            continue
        image = load_photo(photo["source"])
        assert list(image.size) == photo["size"], (photo["name"], image.size)
        for mode in modes:
            for copy_name, copy in spec["copies"].items():
                row = run_variant(photo, image, copy, mode)
                row["copy"] = copy_name
                rows.append(row)
                if not args.quiet:
                    print(_variant_line(row), flush=True)
    summaries = {mode: summarise([r for r in rows if r["mode"] == mode]) for mode in modes}
    print("\n| measure | " + " | ".join(f"{m} detections" if m == "none" else "hand boxes as detections"
                                       for m in modes) + " |")
    print("|---|" + "---|" * len(modes))
    for key in summaries[modes[0]]:
        print(f"| {key} | " + " | ".join(str(summaries[m][key]) for m in modes) + " |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summaries": summaries}, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
