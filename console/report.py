"""The job report as one self-contained HTML file: every image embedded as a data: URI, no outside
resource, no network.

Per variant: the original image, the detections drawn on it, the text placements the planner
weighed (the chosen one marked), the finished overlay, every check with pass/fail (VLM verdicts,
OCR read-back with the differences highlighted, contrast, coverage), and the stage timeline with
durations and attempts. Then the chosen variant and why, and the Instagram post in a phone-sized
preview with its Korean caption. Results of the `tiny` model profile get a banner that says so.

Input is plain data (outbox.report.gather) and a function that reads artifacts by key: no SQL here.
"""
from __future__ import annotations

import base64
import difflib
import html
import io
import re
from datetime import datetime
from typing import Any, Callable, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from stages import imaging

Reader = Callable[[str], bytes]
PREVIEW_MAX_SIDE = 720
PRODUCT_COLOUR = (255, 0, 153)
OBJECT_COLOUR = (0, 190, 255)
CHOSEN_COLOUR = (20, 200, 90)
OTHER_COLOUR = (40, 40, 40, 150)
MODEL_STAGES = ("vlm_analyze", "yolo_detect", "vlm_judge", "ad_copy_gen_kor")


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


# --- images ----------------------------------------------------------------------------------------


def data_uri(img: Image.Image, max_side: int = PREVIEW_MAX_SIDE, quality: int = 86) -> str:
    img = img.convert("RGB")
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def bytes_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _label_font(size: int):
    try:
        from stages import fonts

        return fonts.load_font(size)
    except Exception:  # no font configured: Pillow's own
        return ImageFont.load_default(size)


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour, size: int, inside: bool = False) -> None:
    font = _label_font(size)
    x, y = xy
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right - left + 2 * (size // 4), bottom - top + 2 * (size // 5)
    y = y if inside or y - h < 0 else y - h
    draw.rectangle((x, y, x + w, y + h), fill=colour)
    dark = sum(colour[:3]) > 450
    draw.text((x + size // 4 - left, y + size // 5 - top), text, font=font, fill=(0, 0, 0) if dark else (255, 255, 255))


def draw_detections(img: Image.Image, yolo: Mapping[str, Any]) -> Image.Image:
    """The detections on a copy of the original: the product thick and magenta, others cyan."""
    out = img.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    unit = max(2, round(max(out.size) / 200))
    detections = list(yolo.get("detections") or [])
    for det in sorted(detections, key=lambda d: bool(d.get("is_product"))):  # the product on top
        try:
            x1, y1, x2, y2 = (float(v) for v in det["box"])
        except (KeyError, TypeError, ValueError):
            continue
        colour = PRODUCT_COLOUR if det.get("is_product") else OBJECT_COLOUR
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=unit * (2 if det.get("is_product") else 1))
        name = f"{'PRODUCT ' if det.get('is_product') else ''}{det.get('label', '?')} {float(det.get('confidence', 0)):.2f}"
        _label(draw, (x1, y1), name, colour, 6 * unit)
    return out


def draw_placement(img: Image.Image, planner: Mapping[str, Any]) -> Image.Image:
    """Every proposal the planner weighed (thin, with its id) and the chosen one (thick, green)."""
    out = img.convert("RGBA").copy()
    shade = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    unit = max(2, round(max(out.size) / 200))
    chosen_id = planner.get("proposal_id")
    proposals = list(planner.get("proposals") or [])
    for proposal in proposals:
        if proposal.get("proposal_id") == chosen_id:
            continue
        try:
            box = [float(v) for v in proposal["box"]]
        except (KeyError, TypeError, ValueError):
            continue
        draw.rectangle(box, outline=OTHER_COLOUR, width=max(1, unit // 2))
        _label(draw, (box[0], box[1]), str(proposal.get("proposal_id")), OTHER_COLOUR, 5 * unit, inside=True)
    chosen = next((p for p in proposals if p.get("proposal_id") == chosen_id), None)
    if chosen and chosen.get("box"):
        box = [float(v) for v in chosen["box"]]
        draw.rectangle(box, fill=CHOSEN_COLOUR + (60,), outline=CHOSEN_COLOUR + (255,), width=unit * 2)
        _label(draw, (box[0], box[1]), f"{chosen_id} chosen: {chosen.get('region')} score {chosen.get('score')}",
               CHOSEN_COLOUR + (255,), 6 * unit)
    return Image.alpha_composite(out, shade).convert("RGB")


# --- small HTML pieces ----------------------------------------------------------------------------


def badge(passed: Any, yes: str = "PASS", no: str = "FAIL") -> str:
    if passed is None:
        return '<span class="badge na">n/a</span>'
    return f'<span class="badge pass">{yes}</span>' if passed else f'<span class="badge fail">{no}</span>'


def status_badge(status: str | None) -> str:
    kind = {"done": "pass", "failed": "fail", "running": "run", "queued": "wait", "cancelled": "fail"}.get(status or "", "na")
    return f'<span class="badge {kind}">{esc(status or "-")}</span>'


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} s" if value < 60 else f"{int(value // 60)}m{int(value % 60):02d}s"


def span(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


def ocr_diff(expected: str, read: str) -> str:
    """The expected line with what OCR missed struck through and what it read instead inserted."""
    matcher = difflib.SequenceMatcher(None, expected, read, autojunk=False)
    out = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            out.append(esc(expected[i1:i2]))
            continue
        if tag in ("delete", "replace"):
            out.append(f'<del title="expected, not read">{esc(expected[i1:i2])}</del>')
        if tag in ("insert", "replace"):
            out.append(f'<ins title="read, not expected">{esc(read[j1:j2])}</ins>')
    return "".join(out)


def figure(kind: str, caption: str, uri: str | None, missing: str) -> str:
    body = (f'<img src="{uri}" alt="{esc(caption)}" loading="eager">' if uri
            else f'<div class="missing">{esc(missing)}</div>')
    return f'<figure class="fig fig-{kind}">{body}<figcaption>{esc(caption)}</figcaption></figure>'


# --- sections --------------------------------------------------------------------------------------


class Report:
    def __init__(self, data: Mapping[str, Any], read: Reader):
        self.data = data
        self.read = read
        self.job = data["job"]
        self.variants = list(data["variants"])
        self.job_results = data.get("job_results") or {}
        self.job_tasks = data.get("job_tasks") or {}
        self.variant_stages = [g["stage"] for g in data["graph"] if g["level"] == "variant"]
        self.job_stages = [g["stage"] for g in data["graph"] if g["level"] == "job"]
        self.problems: list[str] = []
        post = self.job_results.get("instagram_feed_gen") or {}
        self.ranking = {row["variant_id"]: row for row in post.get("ranking") or []}
        self.chosen = post.get("chosen_variant_id") or next((v["variant_id"] for v in self.variants if v.get("selected")), None)

    # images
    def image(self, key: str | None, what: str) -> Image.Image | None:
        if not key:
            return None
        try:
            return imaging.load_image(self.read(key))
        except Exception as exc:  # the report still renders; the gap is explained in place
            self.problems.append(f"{what}: {type(exc).__name__}: {exc}")
            return None

    def profiles(self) -> dict[str, tuple[str, str]]:
        found = {}
        for results in [v["results"] for v in self.variants] + [self.job_results]:
            for stage in MODEL_STAGES:
                result = results.get(stage)
                if result and result.get("profile"):
                    found.setdefault(stage, (result["profile"], str(result.get("model", ""))))
        return found

    @property
    def tiny(self) -> bool:
        return any(profile == "tiny" for profile, _ in self.profiles().values())

    def render(self) -> str:
        job = self.job
        finished = job["status"] in ("failed", "cancelled") or (
            job["status"] == "done" and job["current_step"] == (self.job_stages[-1] if self.job_stages else None))
        body = [
            self.banner(),
            self.header(finished),
            self.post_and_selection(),
            *[self.variant(v) for v in self.variants],
            self.problems_section(),
            '<pre id="console-errors" hidden></pre>',
            f'<footer>Generated by adflow <code>cli.py report</code> at {esc(self.data["generated_at"].isoformat(timespec="seconds"))}. '
            'Self-contained: every image is embedded; nothing is fetched.</footer>',
        ]
        title = f"adflow job {job['job_id'][:8]}"
        return PAGE.format(title=esc(title), css=CSS, script=SCRIPT, body="\n".join(b for b in body if b))

    def banner(self) -> str:
        if not self.tiny:
            return ""
        return ('<div id="tiny-banner" class="banner" role="alert"><strong>TINY MODEL PROFILE: random-weight models.</strong> '
                "The VLM verdicts, the detections and the Korean translation below come from tiny models with random "
                "weights, built to exercise the pipeline end to end. They are <em>not meaningful</em>. Point "
                "<code>MODEL_PROFILE=real</code> and <code>VLM_MODEL</code> / <code>YOLO_MODEL</code> / "
                "<code>TRANSLATION_MODEL</code> at real weights for real results (see the README, \"Model profiles\"). "
                "Planner, overlay, OCR, contrast and coverage are real computations in either profile.</div>")

    def header(self, finished: bool) -> str:
        job = self.job
        ends = [t["finished_at"] for v in self.variants for t in v["tasks"].values() if t["finished_at"]]
        ends += [t["finished_at"] for t in self.job_tasks.values() if t["finished_at"]]
        took = span(job["created_at"], max(ends)) if ends else None
        profiles = self.profiles()
        models = "".join(f"<li><code>{esc(stage)}</code>: {esc(model)} <span class=\"muted\">({esc(profile)})</span></li>"
                         for stage, (profile, model) in profiles.items()) or "<li>no model results yet</li>"
        state = "" if finished else '<p class="note">The job is not finished: this report shows what has committed so far.</p>'
        return f"""<header id="job-summary">
<h1>Ad job <code>{esc(job['job_id'])}</code></h1>
<div class="summary-grid">
 <div><div class="k">status</div><div class="v">{status_badge(job['status'])} <span class="muted">at {esc(job['current_step'])}</span></div></div>
 <div><div class="k">tenant</div><div class="v">{esc(job['tenant_id'])}</div></div>
 <div><div class="k">variants</div><div class="v">{len(self.variants)}</div></div>
 <div><div class="k">submitted</div><div class="v">{esc(job['created_at'].strftime('%Y-%m-%d %H:%M:%S %Z'))}</div></div>
 <div><div class="k">time to finished post</div><div class="v">{seconds(took)}</div></div>
</div>
<p class="copy"><span class="k">ad copy (English)</span><br><q id="ad-copy">{esc(job.get('ad_copy'))}</q></p>
<details><summary>models used</summary><ul>{models}</ul></details>
{state}
</header>"""

    # --- the chosen variant and the post
    def post_and_selection(self) -> str:
        post = self.job_results.get("instagram_feed_gen")
        korean = (self.job_results.get("ad_copy_gen_kor") or {}).get("korean")
        if not post:
            task = self.job_tasks.get("instagram_feed_gen") or self.job_tasks.get("ad_copy_gen_kor")
            why = f"job stage {task['stage']} {task['status']}: {task['last_error']}" if task and task.get("last_error") else \
                "the job-level stages have not run (yet)"
            return (f'<section id="selection" class="card"><h2>Instagram post</h2><p class="missing">No post: {esc(why)}</p></section>'
                    + self.job_timeline())
        key = (post.get("artifacts") or {}).get("post.jpg")
        uri = None
        if key:
            try:
                uri = bytes_uri(self.read(key), "image/jpeg")
            except Exception as exc:
                self.problems.append(f"post.jpg: {type(exc).__name__}: {exc}")
        chosen = next((v for v in self.variants if v["variant_id"] == post.get("chosen_variant_id")), None)
        return f"""<section class="post-row">
<div class="left">{self.selection(post, chosen)}{self.job_timeline()}</div>
{self.phone(uri, post.get('caption') or '', korean)}
</section>"""

    def selection(self, post: Mapping[str, Any], chosen: Mapping[str, Any] | None) -> str:
        ranking = post.get("ranking") or []
        orders = {v["variant_id"]: v["creation_order"] for v in self.variants}
        rows = []
        for row in ranking:
            c = row.get("components") or {}
            mark = ' class="chosen"' if row["variant_id"] == post.get("chosen_variant_id") else ""
            rows.append(f"<tr{mark}><td>{row.get('rank')}</td><td>variant {orders.get(row['variant_id'], '?')}</td>"
                        f"<td>{row.get('score')}</td><td>{c.get('judge')}</td><td>{c.get('ocr')}</td>"
                        f"<td>{c.get('readability')}</td><td>{c.get('product_clear')}</td></tr>")
        not_ranked = [v for v in self.variants if v["variant_id"] not in self.ranking]
        for v in not_ranked:
            rows.append(f"<tr class=\"out\"><td>-</td><td>variant {v['creation_order']}</td><td colspan=\"5\">not ranked: "
                        f"{esc(v['current_step'])} {esc(v['status'])}</td></tr>")
        why = self.why(post, ranking, orders)
        name = f"variant {chosen['creation_order']}" if chosen else "?"
        return f"""<div id="selection" class="card">
<h2>Chosen: {esc(name)}</h2>
<p class="why">{why}</p>
<table class="ranking"><thead><tr><th>rank</th><th>variant</th><th>score</th><th>judge ×0.4</th><th>OCR ×0.25</th>
<th>readability ×0.15</th><th>product clear ×0.2</th></tr></thead><tbody>{''.join(rows)}</tbody></table>
<p class="rule"><span class="k">selection rule</span> {esc(post.get('selection_rule'))}</p>
</div>"""

    def why(self, post: Mapping[str, Any], ranking: Sequence[Mapping[str, Any]], orders: Mapping[str, int]) -> str:
        if not ranking:
            return "No variant finished the pipeline."
        best = ranking[0]
        parts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in (best.get("components") or {}).items())
        text = f"Variant {orders.get(best['variant_id'], '?')} has the highest score, {best['score']} ({parts})"
        if len(ranking) > 1:
            runner = ranking[1]
            gap = round(best["score"] - runner["score"], 4)
            lead = max((k for k in best.get("components") or {}),
                       key=lambda k: (best["components"][k] - (runner.get("components") or {}).get(k, 0)) *
                       {"judge": 0.4, "ocr": 0.25, "readability": 0.15, "product_clear": 0.2}.get(k, 0))
            text += (f"; {gap} ahead of variant {orders.get(runner['variant_id'], '?')}, mostly on "
                     f"{lead.replace('_', ' ')}" if gap > 0 else
                     f"; tied with variant {orders.get(runner['variant_id'], '?')}, so the earlier variant wins")
        return esc(text) + "."

    def phone(self, uri: str | None, caption: str, korean: str | None) -> str:
        image = f'<img class="ig-image" src="{uri}" alt="the Instagram post">' if uri else '<div class="missing">post.jpg missing</div>'
        lines = caption.split("\n")
        rendered = "<br>".join(re.sub(r"(#[\w가-힣]+)", r'<span class="hashtag">\1</span>', esc(line)) for line in lines)
        return f"""<div id="instagram-preview" class="phone-wrap">
<div class="phone"><div class="notch"></div><div class="screen">
<div class="ig-top">Instagram</div>
<div class="ig-header"><span class="avatar"></span><span class="user">adflow.demo</span><span class="sponsored">Sponsored</span></div>
{image}
<div class="ig-actions">{ICONS}</div>
<div class="ig-caption" lang="ko"><span class="user">adflow.demo</span> {rendered}</div>
</div></div>
<p class="muted small">Korean copy: <span lang="ko" id="korean-copy">{esc(korean)}</span></p>
</div>"""

    # --- one variant
    def variant(self, v: Mapping[str, Any]) -> str:
        results = v["results"]
        n = v["creation_order"]
        original = self.image(v.get("asset_uri"), f"variant {n} original image")
        yolo, planner, overlay = results.get("yolo_detect"), results.get("planner"), results.get("overlay")
        figures = [
            figure("original", "original", data_uri(original) if original else None, "image unreadable"),
            figure("detections", f"detections ({len((yolo or {}).get('detections') or []) or 'none found'})",
                   data_uri(draw_detections(original, yolo)) if original and yolo else None, "no yolo_detect result"),
            figure("placement", f"text placement ({len((planner or {}).get('proposals') or [])} proposals)",
                   data_uri(draw_placement(original, planner)) if original and planner else None, "no planner result"),
        ]
        overlay_img = self.image(((overlay or {}).get("artifacts") or {}).get("overlay.png"), f"variant {n} overlay")
        figures.append(figure("overlay", "overlay", data_uri(overlay_img) if overlay_img else None, "no overlay result"))
        rank = self.ranking.get(v["variant_id"])
        chosen = ' <span class="badge chosen-badge">CHOSEN</span>' if v["variant_id"] == self.chosen else ""
        ranked = f' <span class="muted">rank {rank["rank"]}, score {rank["score"]}</span>' if rank else ""
        return f"""<section class="variant card" id="variant-{n}" data-variant-id="{esc(v['variant_id'])}">
<h2>Variant {n}{chosen} {status_badge(v['status'])} <span class="muted">at {esc(v['current_step'])}</span>{ranked}</h2>
<p class="muted small">variant <code>{esc(v['variant_id'])}</code>, image asset <code>{esc(v.get('img_asset_id'))}</code></p>
<div class="figures">{''.join(figures)}</div>
<div class="scores">{self.checks(v)}</div>
{self.timeline(v['tasks'], self.variant_stages, f'variant {n}')}
</section>"""

    def checks(self, v: Mapping[str, Any]) -> str:
        r = v["results"]
        parts = []
        a = r.get("vlm_analyze")
        if a:
            colours = "".join(f'<span class="swatch" style="background:{esc(c.get("hex"))}" title="{esc(c.get("hex"))} {c.get("share")}"></span>'
                              for c in a.get("pixel_colors") or [] if re.fullmatch(r"#[0-9a-fA-F]{6}", str(c.get("hex", ""))))
            parts.append(self.check("vlm-analyze", "VLM analysis: usable?", badge(a.get("usable"), "USABLE", "NOT USABLE"), f"""
<dl><dt>description</dt><dd>{esc(a.get('description'))}</dd><dt>main subject</dt><dd>{esc(a.get('main_subject'))}</dd>
<dt>reasons</dt><dd>{esc('; '.join(map(str, a.get('reasons') or [])))}</dd>
<dt>colours</dt><dd>{esc(', '.join(map(str, a.get('dominant_colors') or [])))} {colours}</dd></dl>"""))
        j = r.get("vlm_judge")
        if j:
            scores = j.get("scores") or {}
            bars = "".join(f'<div class="meter"><span>{esc(k.replace("_", " "))}</span><b style="width:{10 * int(val or 0)}%"></b>'
                           f'<em>{esc(val)}/10</em></div>' for k, val in scores.items() if isinstance(val, (int, float)))
            parts.append(self.check("vlm-judge", "VLM verdict", badge(j.get("verdict") == "pass" if j.get("verdict") else None),
                                    f"{bars}<p>{esc(j.get('reasons'))}</p>"))
        o = r.get("ocr_eval")
        if o:
            rows = "".join(f"<tr><td class=\"diff\">{ocr_diff(b.get('expected', ''), b.get('read', ''))}</td>"
                           f"<td><code>{esc(b.get('read'))}</code></td><td>{b.get('cer_nospace')}</td></tr>" for b in o.get("boxes") or [])
            parts.append(self.check("ocr", "OCR read-back", badge(o.get("passed")), f"""
<p>character error rate (spaces ignored) <b>{o.get('cer_nospace')}</b> ≤ {o.get('cer_threshold')}?</p>
<table class="ocr-diff"><thead><tr><th>expected, with <del>missed</del> / <ins>misread</ins></th><th>read</th><th>CER</th></tr></thead>
<tbody>{rows}</tbody></table>"""))
        rd = r.get("readability_eval")
        if rd:
            rows = "".join(
                f"<tr><td>{esc(b.get('text'))}</td><td>{b.get('contrast')} ≥ {b.get('required_contrast')} {badge((b.get('checks') or {}).get('contrast'))}</td>"
                f"<td>{b.get('text_height_ratio')} {badge((b.get('checks') or {}).get('text_height'))}</td>"
                f"<td>{b.get('busyness')} {badge((b.get('checks') or {}).get('busyness'))}</td></tr>" for b in rd.get("boxes") or [])
            parts.append(self.check("contrast", "Contrast and readability", badge(rd.get("passed")), f"""
<table><thead><tr><th>line</th><th>contrast (WCAG)</th><th>text height / image</th><th>background busyness</th></tr></thead>
<tbody>{rows}</tbody></table>"""))
        c = r.get("iou_eval")
        if c:
            rows = "".join(f"<tr><td>{'PRODUCT ' if ob.get('is_product') else ''}{esc(ob.get('label'))}</td><td>{ob.get('iou')}</td>"
                           f"<td>{ob.get('covered_share')}</td></tr>" for ob in c.get("objects") or [])
            parts.append(self.check("coverage", "Coverage of objects by text", badge(c.get("passed")), f"""
<p>product covered: <b>{'yes' if c.get('product_covered') else 'no'}</b> (share {c.get('product_covered_share')}); largest IoU
<b>{c.get('max_iou')}</b> ≤ {c.get('max_object_iou')}?</p>
{'<table><thead><tr><th>object</th><th>IoU with text</th><th>share covered</th></tr></thead><tbody>' + rows + '</tbody></table>' if rows else '<p class="muted">no objects detected</p>'}"""))
        p = r.get("planner")
        if p:
            chosen = next((x for x in p.get("proposals") or [] if x.get("proposal_id") == p.get("proposal_id")), {})
            s = chosen.get("scores") or {}
            ov = r.get("overlay") or {}
            parts.append(self.check("placement", "Chosen text placement", f'<span class="badge na">{esc(p.get("proposal_id"))}</span>', f"""
<dl><dt>region</dt><dd>{esc(chosen.get('region'))}, font {esc(chosen.get('font_size'))} px, colour <span class="swatch" style="background:{esc(chosen.get('color'))}"></span> {esc(chosen.get('color'))}</dd>
<dt>score</dt><dd>{esc(chosen.get('score'))} (object overlap {s.get('object_overlap')}, saliency {s.get('saliency')}, busyness {s.get('busyness')}, contrast {s.get('contrast')}, size {s.get('size')})</dd>
<dt>scrim</dt><dd>{'yes, alpha ' + esc(ov.get('scrim_alpha')) if ov.get('scrim') else 'no'}</dd></dl>
<p class="rule small">{esc(p.get('scoring'))}</p>"""))
        for stage, task in v["tasks"].items():
            if task["status"] == "failed":
                parts.append(self.check("failure", f"{stage} failed", badge(False, no="FAILED"),
                                        f'<pre class="error">{esc(task["last_error"])}</pre>'))
        return "".join(parts) or '<p class="muted">No results yet.</p>'

    @staticmethod
    def check(kind: str, title: str, verdict: str, body: str) -> str:
        return f'<div class="check check-{kind}"><h3>{esc(title)} {verdict}</h3>{body}</div>'

    # --- timelines
    def timeline(self, tasks: Mapping[str, Mapping[str, Any]], stages: Sequence[str], label: str) -> str:
        origin = self.job["created_at"]
        times = [t[k] for t in tasks.values() for k in ("finished_at", "started_at") if t.get(k)]
        end = max(times) if times else origin
        total = max(1e-6, (end - origin).total_seconds())
        rows = []
        for stage in stages:
            t = tasks.get(stage)
            if not t:
                rows.append(f'<tr class="pending"><td>{esc(stage)}</td><td>{status_badge("pending")}</td><td>-</td><td>-</td><td></td></tr>')
                continue
            start = span(origin, t["created_at"]) or 0.0
            began = span(origin, t["started_at"])
            ran = span(t["started_at"], t["finished_at"])
            wait_w = ((began if began is not None else total) - start) / total * 100
            run_w = (ran or 0.0) / total * 100
            bar = (f'<div class="bar"><i class="wait" style="left:{start / total * 100:.2f}%;width:{max(0.0, wait_w):.2f}%"></i>'
                   f'<i class="run {esc(t["status"])}" style="left:{(began or 0) / total * 100:.2f}%;width:{max(0.4, run_w):.2f}%"></i></div>'
                   if began is not None else '<div class="bar"></div>')
            error = (f'<div class="error small">{esc((t["last_error"] or "").strip().splitlines()[0][:300])}</div>'
                     if t.get("last_error") else "")
            rows.append(f'<tr><td>{esc(stage)}</td><td>{status_badge(t["status"])}</td><td>{t["attempts"]}/{t["max_attempts"]}</td>'
                        f'<td>{seconds(ran)}</td><td>{bar}{error}</td></tr>')
        return f"""<div class="timeline"><h3>Stage timeline <span class="muted small">({esc(label)}; 0 = job submitted, {seconds(total)} shown;
light = queued, dark = running)</span></h3>
<table><thead><tr><th>stage</th><th>status</th><th>attempts</th><th>took</th><th class="barcol">when</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table></div>"""

    def job_timeline(self) -> str:
        return f'<div class="card" id="job-stages">{self.timeline(self.job_tasks, self.job_stages, "job stages")}</div>'

    def problems_section(self) -> str:
        if not self.problems:
            return ""
        items = "".join(f"<li>{esc(p)}</li>" for p in self.problems)
        return f'<section class="card" id="report-problems"><h2>Missing pieces</h2><ul>{items}</ul></section>'


def render_report(data: Mapping[str, Any], read: Reader) -> str:
    """The whole HTML document for one job."""
    return Report(data, read).render()


ICONS = ('<svg viewBox="0 0 24 24" width="24" height="24" aria-label="like"><path d="M12 21s-7.5-4.6-9.5-9.1C1.1 8.6 3.2 5 6.6 5c2 0 3.4 1.1 4.4 2.6C12 6.1 13.4 5 15.4 5c3.4 0 5.5 3.6 4.1 6.9C19.5 16.4 12 21 12 21z" fill="none" stroke="#222" stroke-width="1.8"/></svg>'
         '<svg viewBox="0 0 24 24" width="24" height="24" aria-label="comment"><path d="M20 12a8 8 0 1 1-3.2-6.4A8 8 0 0 1 20 12zm0 0 1 7-5-2" fill="none" stroke="#222" stroke-width="1.8" stroke-linejoin="round"/></svg>'
         '<svg viewBox="0 0 24 24" width="24" height="24" aria-label="share"><path d="M21 3 3 10l7 3 3 7 8-17zM10 13l5-5" fill="none" stroke="#222" stroke-width="1.8" stroke-linejoin="round"/></svg>'
         '<svg class="save" viewBox="0 0 24 24" width="24" height="24" aria-label="save"><path d="M6 3h12v18l-6-5-6 5z" fill="none" stroke="#222" stroke-width="1.8" stroke-linejoin="round"/></svg>')

# Runs first: anything that goes wrong in the page is written into #console-errors, so a headless
# browser's DOM dump shows it; every image must have decoded by the load event.
SCRIPT = """
(function () {
  var errors = [];
  function report(message) {
    errors.push(String(message));
    var box = document.getElementById('console-errors');
    if (box) { box.textContent = errors.join('\\n'); box.hidden = false; }
  }
  window.addEventListener('error', function (e) {
    var what = e.message || (e.target && (e.target.src || e.target.href) ? 'failed to load ' + String(e.target.src || e.target.href).slice(0, 80) : e);
    report('error: ' + what);
  }, true);
  window.addEventListener('unhandledrejection', function (e) { report('unhandled rejection: ' + e.reason); });
  var original = console.error;
  console.error = function () { report(Array.prototype.join.call(arguments, ' ')); return original.apply(console, arguments); };
  window.addEventListener('load', function () {
    var images = Array.prototype.slice.call(document.images);
    var ok = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
    if (ok !== images.length) { report((images.length - ok) + ' image(s) did not decode'); }
    document.body.setAttribute('data-images', ok + '/' + images.length);
    document.body.setAttribute('data-report-ready', errors.length ? 'with-errors' : 'ok');
    if (errors.length) { var box = document.getElementById('console-errors'); if (box) { box.textContent = errors.join('\\n'); box.hidden = false; } }
  });
  document.addEventListener('click', function (e) {
    if (e.target.tagName === 'IMG' && e.target.closest('.fig')) { e.target.closest('.fig').classList.toggle('zoom'); }
  });
})();
"""

CSS = """
:root { --fg:#1d2330; --muted:#6b7385; --line:#e3e6ee; --bg:#f5f6fa; --pass:#137a3d; --fail:#c62828; --accent:#3b5bdb; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg); font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans KR","NanumGothic",sans-serif; }
main { max-width:1240px; margin:0 auto; padding:24px; }
h1 { font-size:24px; margin:0 0 12px; } h2 { font-size:19px; margin:0 0 10px; } h3 { font-size:15px; margin:14px 0 6px; }
code { font:13px ui-monospace,SFMono-Regular,Menlo,monospace; background:#eef0f6; padding:1px 4px; border-radius:4px; }
.muted { color:var(--muted); font-weight:normal; } .small { font-size:13px; }
.card, header#job-summary { background:#fff; border:1px solid var(--line); border-radius:12px; padding:20px; margin:0 0 20px; }
.banner { background:#fff4d6; border:2px solid #e0a800; color:#5c4300; border-radius:12px; padding:14px 18px; margin:0 0 20px; }
.summary-grid { display:grid; grid-template-columns:repeat(auto-fit,minmax(170px,1fr)); gap:12px; }
.k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; } .v { font-size:16px; }
.copy q { font-size:18px; }
.note { background:#eef3ff; padding:8px 12px; border-radius:8px; }
.badge { display:inline-block; font-size:11px; font-weight:700; letter-spacing:.04em; padding:2px 8px; border-radius:999px; vertical-align:middle; background:#e9ecf3; color:#414a5e; }
.badge.pass { background:#dff3e6; color:var(--pass); } .badge.fail { background:#fde3e3; color:var(--fail); }
.badge.run { background:#fff1cc; color:#8a5a00; } .badge.wait { background:#e9ecf3; }
.badge.chosen-badge { background:var(--accent); color:#fff; }
.post-row { display:grid; grid-template-columns:1fr 400px; gap:20px; align-items:start; margin-bottom:20px; }
.post-row .card { margin:0 0 20px; }
.why { font-size:16px; }
table { border-collapse:collapse; width:100%; font-size:13px; } th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; } tr.chosen td { background:#eef3ff; font-weight:600; } tr.out td { color:var(--muted); }
.rule { color:var(--muted); font-size:12px; }
.figures { display:grid; grid-template-columns:repeat(4,1fr); gap:12px; margin:12px 0; }
.fig { margin:0; background:#fafbfd; border:1px solid var(--line); border-radius:8px; overflow:hidden; cursor:zoom-in; }
.fig img { display:block; width:100%; height:auto; } .fig figcaption { padding:6px 10px; font-size:13px; color:var(--muted); }
.fig.zoom { position:fixed; inset:20px; z-index:10; overflow:auto; cursor:zoom-out; } .fig.zoom img { width:auto; max-width:100%; margin:auto; }
.missing { padding:40px 12px; text-align:center; color:var(--muted); background:repeating-linear-gradient(45deg,#f3f4f8,#f3f4f8 10px,#eceef4 10px,#eceef4 20px); }
.scores { display:grid; grid-template-columns:repeat(auto-fit,minmax(340px,1fr)); gap:12px; }
.check { border:1px solid var(--line); border-radius:8px; padding:4px 12px 10px; } .check h3 { display:flex; gap:8px; align-items:center; justify-content:space-between; }
dl { display:grid; grid-template-columns:110px 1fr; gap:2px 10px; margin:0; font-size:13px; } dt { color:var(--muted); } dd { margin:0; }
.swatch { display:inline-block; width:14px; height:14px; border-radius:3px; border:1px solid #0002; vertical-align:middle; margin-right:2px; }
.meter { display:grid; grid-template-columns:130px 1fr 44px; gap:8px; align-items:center; font-size:13px; }
.meter b { display:block; height:8px; background:var(--accent); border-radius:4px; } .meter em { font-style:normal; color:var(--muted); }
.diff { font:14px ui-monospace,Menlo,monospace; white-space:pre-wrap; }
del { background:#fde3e3; color:var(--fail); text-decoration:line-through; } ins { background:#dff3e6; color:var(--pass); text-decoration:none; border-bottom:2px solid var(--pass); }
.timeline table td:first-child { white-space:nowrap; font-family:ui-monospace,Menlo,monospace; } .barcol { width:45%; }
.bar { position:relative; height:14px; background:#f1f2f6; border-radius:3px; }
.bar i { position:absolute; top:0; bottom:0; border-radius:3px; } .bar i.wait { background:#c9d3ee; } .bar i.run { background:var(--accent); }
.bar i.run.failed { background:var(--fail); } .bar i.run.running { background:#e0a800; }
.error { color:var(--fail); white-space:pre-wrap; } pre.error { background:#fff5f5; padding:8px; border-radius:6px; font-size:12px; overflow:auto; }
#console-errors { background:#fde3e3; color:var(--fail); padding:10px; border-radius:8px; }
footer { color:var(--muted); font-size:12px; text-align:center; margin:20px 0; }
.phone-wrap { text-align:center; }
.phone { width:375px; margin:0 auto; border:12px solid #111; border-radius:44px; background:#111; position:relative; box-shadow:0 12px 40px #0003; }
.phone .notch { position:absolute; top:0; left:50%; transform:translateX(-50%); width:120px; height:22px; background:#111; border-radius:0 0 14px 14px; z-index:2; }
.screen { background:#fff; border-radius:32px; overflow:hidden; text-align:left; padding-top:26px; min-height:600px; }
.ig-top { font:600 20px/1.2 "Segoe Script","Brush Script MT",cursive; padding:4px 14px 8px; border-bottom:1px solid var(--line); }
.ig-header { display:flex; align-items:center; gap:8px; padding:8px 12px; font-size:13px; }
.avatar { width:30px; height:30px; border-radius:50%; background:conic-gradient(#f9ce34,#ee2a7b,#6228d7,#f9ce34); border:2px solid #fff; box-shadow:0 0 0 1px #ddd; }
.user { font-weight:600; } .sponsored { color:var(--muted); font-size:11px; margin-left:auto; }
.ig-image { display:block; width:100%; height:auto; }
.ig-actions { display:flex; gap:14px; padding:10px 12px 4px; } .ig-actions .save { margin-left:auto; }
.ig-caption { padding:4px 12px 18px; font-size:14px; line-height:1.45; word-break:break-word; }
.hashtag { color:#00376b; }
@media (max-width: 1000px) { .post-row { grid-template-columns:1fr; } .figures { grid-template-columns:repeat(2,1fr); } }
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title>
<script>{script}</script>
<style>{css}</style>
</head>
<body>
<main>
{body}
</main>
</body>
</html>
"""
