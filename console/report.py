"""The job report as one self-contained HTML file: every image embedded as a data: URI, no outside
resource, no network.

The header says how the job ended, partial failures included ("1 of 3 variants failed", and
which). Then the chosen variant and why, with the ranking, and the Instagram post in a phone-sized
preview with its Korean caption; one timeline of the whole job (every variant's stages and the job
stages, each attempt with its worker, failed attempts marked); the attempt history of every task
that failed or ran more than once. Per variant: the original image, the detections drawn on it,
the text placements the planner weighed (the chosen one marked), the finished overlay, every check
with pass/fail (VLM verdicts, OCR read-back with the differences highlighted, contrast, coverage),
and the stage timeline with durations and attempts. The chosen variant, the ranking and the
variant sections link to each other. Results of the `tiny` model profile get a banner that says so.

Every part is usable on a 375 px phone: wide tables scroll inside their own box, the rest reflows.

Input is plain data (outbox.report.gather) and a function that reads artifacts by key: no SQL here.
"""
from __future__ import annotations

import base64
import difflib
import html
import io
import re
from datetime import datetime, timezone
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
FINAL_TASK_STATES = ("done", "failed", "cancelled")
# How an attempt ended (stage_tasks.attempt_log outcome, or a task's own status) -> its CSS class.
OUTCOME_CLASS = {"done": "ok", "retry": "retry", "failed": "failed", "cancelled": "cancelled",
                 "lease expired": "expired", "abandoned": "expired", "running": "running"}


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
    """Every proposal the planner weighed (thin, with its id) and the chosen one (thick, green). A
    chosen extension is drawn on its extended canvas, with the proposals made for that canvas."""
    proposals = list(planner.get("proposals") or [])
    chosen_id = planner.get("proposal_id")
    chosen = next((p for p in proposals if p.get("proposal_id") == chosen_id), None)
    canvas = (chosen or {}).get("canvas")
    if canvas:
        try:
            img = imaging.extend_canvas(img, imaging.parse_canvas(canvas, img.size))
        except Exception:  # a malformed canvas is the overlay's error to report; draw what can be
            canvas = None
    proposals = [p for p in proposals if p.get("canvas") == canvas]
    out = img.convert("RGBA").copy()
    shade = Image.new("RGBA", out.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    unit = max(2, round(max(out.size) / 200))
    for proposal in proposals:
        if proposal.get("proposal_id") == chosen_id:
            continue
        try:
            box = [float(v) for v in proposal["box"]]
        except (KeyError, TypeError, ValueError):
            continue
        draw.rectangle(box, outline=OTHER_COLOUR, width=max(1, unit // 2))
        _label(draw, (box[0], box[1]), str(proposal.get("proposal_id")), OTHER_COLOUR, 5 * unit, inside=True)
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
    kind = {"done": "pass", "failed": "fail", "running": "run", "queued": "wait", "cancelled": "fail",
            "open": "run"}.get(status or "", "na")
    return f'<span class="badge {kind}">{esc(status or "-")}</span>'


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f} s" if value < 60 else f"{int(value // 60)}m{int(value % 60):02d}s"


def span(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


def parse_time(value: Any) -> datetime | None:
    """A timestamp from a task column (a datetime) or from attempt_log (ISO text, from jsonb)."""
    if isinstance(value, datetime):
        found = value
    elif isinstance(value, str) and value:
        try:
            found = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return found if found.tzinfo else found.replace(tzinfo=timezone.utc)


def first_line(text: Any, limit: int = 300) -> str:
    lines = str(text or "").strip().splitlines()
    return lines[0][:limit] if lines else ""


def scroll(table: str) -> str:
    """A table in a box of its own that scrolls sideways, so a wide table never widens the page."""
    return f'<div class="scroll">{table}</div>'


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
        self.orders = {v["variant_id"]: v["creation_order"] for v in self.variants}
        # The database's rules (outbox_variant_state, outbox_job_state, read by outbox/report.py):
        # a variant between two stages is queued, not done, as `status` counts it.
        self.states = {v["variant_id"]: v["state"] for v in self.variants}
        self.state = self.job["state"]
        self.now = parse_time(data.get("generated_at")) or datetime.now(timezone.utc)

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
        body = [
            self.banner(),
            self.header(),
            self.post_and_selection(),
            self.job_gantt(),
            self.attempt_history(),
            *[self.variant(v) for v in self.variants],
            self.problems_section(),
            '<pre id="console-errors" hidden></pre>',
            f'<footer>Generated by adflow <code>cli.py report</code> at {esc(self.now.isoformat(timespec="seconds"))}. '
            'Self-contained: every image is embedded; nothing is fetched.</footer>',
        ]
        title = f"adflow job {job['job_id'][:8]}"
        return PAGE.format(title=esc(title), css=CSS, script=SCRIPT, body="\n".join(b for b in body if b))

    # --- anchors: every link target is one of these, so a link and its section cannot drift apart
    def anchor(self, variant_id: str | None) -> str:
        return f"variant-{self.orders.get(variant_id, '?')}"

    def variant_link(self, variant_id: str | None) -> str:
        if variant_id not in self.orders:
            return "variant ?"
        return f'<a href="#{self.anchor(variant_id)}">variant {self.orders[variant_id]}</a>'

    def banner(self) -> str:
        if not self.tiny:
            return ""
        return ('<div id="tiny-banner" class="banner" role="alert"><strong>TINY MODEL PROFILE: random-weight models.</strong> '
                "The VLM verdicts, the detections and the Korean translation below come from tiny models with random "
                "weights, built to exercise the pipeline end to end. They are <em>not meaningful</em>. Point "
                "<code>MODEL_PROFILE=real</code> and <code>VLM_MODEL</code> / <code>YOLO_MODEL</code> / "
                "<code>TRANSLATION_MODEL</code> at real weights for real results (see the README, \"Model profiles\"). "
                "Planner, overlay, OCR, contrast and coverage are real computations in either profile.</div>")

    def failure_of(self, tasks: Mapping[str, Mapping[str, Any]]) -> tuple[str, str] | None:
        """(stage, error) of the task that ended this variant (or the job) failed or cancelled."""
        for stage, task in tasks.items():
            if task["status"] in ("failed", "cancelled"):
                return stage, first_line(task.get("last_error"), 200)
        return None

    def outcome(self) -> tuple[str, str, list[str]]:
        """(kind, the sentence, one line per variant or job stage that failed): how the job ended,
        said plainly, partial failure included."""
        total = len(self.variants)
        counts = {state: sum(1 for s in self.states.values() if s == state)
                  for state in ("failed", "cancelled", "done", "running", "queued")}
        noun = "variant" if total == 1 else "variants"
        parts = [f"{counts[s]} of {total} {noun} {s}" for s in ("failed", "cancelled", "done") if counts[s]]
        parts += [f"{counts[s]} {s}" for s in ("running", "queued") if counts[s]]
        job_failure = self.failure_of(self.job_tasks)
        post = self.job_results.get("instagram_feed_gen")
        if self.state == "done":
            chosen = f" from {self.variant_link(self.chosen)}" if self.chosen in self.orders else ""
            lead = f"Finished: the Instagram post is ready{chosen}" if post else "Finished"
            kind = "partial" if counts["failed"] or counts["cancelled"] else "ok"
        elif self.state == "failed":
            lead, kind = ("Failed: no post", "failed")
            if job_failure:
                lead += f" (job stage <code>{esc(job_failure[0])}</code> failed)"
            elif total and counts["failed"] == total:
                lead += " (every variant failed)"
        elif self.state == "cancelled":
            lead, kind = "Cancelled", "failed"
        else:
            lead, kind = "Not finished: this report shows what has committed so far", "open"
        sentence = f"{lead}. {esc(', '.join(parts) or 'no variants')}."
        which = []
        for v in self.variants:
            state = self.states[v["variant_id"]]
            if state in ("failed", "cancelled"):
                stage, error = self.failure_of(v["tasks"]) or (v["current_step"], "")
                which.append(f'{self.variant_link(v["variant_id"])} {esc(state)} at <code>{esc(stage)}</code>'
                             + (f': <span class="error">{esc(error)}</span>' if error else ""))
        if job_failure:
            which.append(f'job stage <code>{esc(job_failure[0])}</code> failed: <span class="error">{esc(job_failure[1])}</span>')
        return kind, sentence, which

    def header(self) -> str:
        job = self.job
        ends = [t["finished_at"] for v in self.variants for t in v["tasks"].values() if t["finished_at"]]
        ends += [t["finished_at"] for t in self.job_tasks.values() if t["finished_at"]]
        took = span(job["created_at"], max(ends)) if ends else None
        profiles = self.profiles()
        models = "".join(f"<li><code>{esc(stage)}</code>: {esc(model)} <span class=\"muted\">({esc(profile)})</span></li>"
                         for stage, (profile, model) in profiles.items()) or "<li>no model results yet</li>"
        kind, sentence, which = self.outcome()
        failures = f'<ul class="failures">{"".join(f"<li>{w}</li>" for w in which)}</ul>' if which else ""
        by_state = ", ".join(f"{n} {state}" for state in ("done", "failed", "cancelled", "running", "queued")
                             if (n := sum(1 for s in self.states.values() if s == state)))
        jumps = " · ".join([f'<a href="#{self.selection_anchor()}">post and ranking</a>', '<a href="#job-timeline">timeline</a>']
                           + (['<a href="#attempt-history">attempts</a>'] if self.troubled_tasks() else [])
                           + [self.variant_link(v["variant_id"]) for v in self.variants])
        return f"""<header id="job-summary">
<h1>Ad job <code>{esc(job['job_id'])}</code></h1>
<div id="job-outcome" class="outcome outcome-{kind}" data-state="{esc(self.state)}"><p>{sentence}</p>{failures}</div>
<div class="summary-grid">
 <div><div class="k">status</div><div class="v">{status_badge(self.state)} <span class="muted">at {esc(job['current_step'])} ({esc(job['status'])})</span></div></div>
 <div><div class="k">tenant</div><div class="v">{esc(job['tenant_id'])}</div></div>
 <div><div class="k">variants</div><div class="v">{len(self.variants)} <span class="muted small">{esc(by_state)}</span></div></div>
 <div><div class="k">submitted</div><div class="v">{esc(job['created_at'].strftime('%Y-%m-%d %H:%M:%S %Z'))}</div></div>
 <div><div class="k">time to finished post</div><div class="v">{seconds(took)}</div></div>
</div>
<p class="copy"><span class="k">ad copy (English)</span><br><q id="ad-copy">{esc(job.get('ad_copy'))}</q></p>
<details><summary>models used</summary><ul>{models}</ul></details>
<nav class="jumps small" aria-label="sections">{jumps}</nav>
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

    def selection_anchor(self) -> str:
        """Where a variant's "back" link goes: the ranking when there is one, else the post's box."""
        return "ranking" if self.job_results.get("instagram_feed_gen") else "selection"

    def selection(self, post: Mapping[str, Any], chosen: Mapping[str, Any] | None) -> str:
        ranking = post.get("ranking") or []
        orders = self.orders
        rows = []
        for row in ranking:
            c = row.get("components") or {}
            mark = ' class="chosen"' if row["variant_id"] == post.get("chosen_variant_id") else ""
            rows.append(f"<tr{mark}><td>{esc(row.get('rank'))}</td><td>{self.variant_link(row['variant_id'])}</td>"
                        f"<td>{esc(row.get('score'))}</td><td>{esc(c.get('judge'))}</td><td>{esc(c.get('ocr'))}</td>"
                        f"<td>{esc(c.get('readability'))}</td><td>{esc(c.get('product_clear'))}</td></tr>")
        not_ranked = [v for v in self.variants if v["variant_id"] not in self.ranking]
        for v in not_ranked:
            rows.append(f"<tr class=\"out\"><td>-</td><td>{self.variant_link(v['variant_id'])}</td><td colspan=\"5\">not ranked: "
                        f"{esc(self.states[v['variant_id']])} at {esc(v['current_step'])}</td></tr>")
        why = self.why(post, ranking, orders)
        name = self.variant_link(chosen["variant_id"]) if chosen else "?"
        return f"""<div id="selection" class="card">
<h2>Chosen: {name}</h2>
<p class="why">{why}</p>
{scroll(f'<table class="ranking" id="ranking"><thead><tr><th>rank</th><th>variant</th><th>score</th><th>judge ×0.4</th><th>OCR ×0.25</th>'
        f'<th>readability ×0.15</th><th>product clear ×0.2</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')}
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
            figure("original", "original", data_uri(original) if original else None,
                   "image unreadable" if v.get("asset_uri") else "no image asset"),
            figure("detections", f"detections ({len((yolo or {}).get('detections') or []) or 'none found'})",
                   data_uri(draw_detections(original, yolo)) if original and yolo else None, "no yolo_detect result"),
            figure("placement", f"text placement ({len((planner or {}).get('proposals') or [])} proposals)",
                   data_uri(draw_placement(original, planner)) if original and planner else None, "no planner result"),
        ]
        overlay_img = self.image(((overlay or {}).get("artifacts") or {}).get("overlay.png"), f"variant {n} overlay")
        figures.append(figure("overlay", "overlay", data_uri(overlay_img) if overlay_img else None, "no overlay result"))
        rank = self.ranking.get(v["variant_id"])
        is_chosen = v["variant_id"] == self.chosen
        state = self.states[v["variant_id"]]
        chosen = ' <span class="badge chosen-badge">CHOSEN</span>' if is_chosen else ""
        ranked = f' <span class="muted">rank {esc(rank["rank"])}, score {esc(rank["score"])}</span>' if rank else ""
        back = f'<a class="back" href="#{self.selection_anchor()}">↑ {"ranking" if self.selection_anchor() == "ranking" else "post"}</a>'
        if is_chosen:
            standing = "This is the chosen variant: the Instagram post is made from it."
        elif rank:
            standing = f"Not chosen: rank {esc(rank.get('rank'))} of {len(self.ranking)}, score {esc(rank.get('score'))}."
        elif state in ("failed", "cancelled"):
            stage = (self.failure_of(v["tasks"]) or (v["current_step"], ""))[0]
            standing = f"Not ranked: {esc(state)} at <code>{esc(stage)}</code>."
        else:
            standing = "Not ranked" + (" (yet)." if self.state == "open" else ".")
        return f"""<section class="variant card{' chosen-variant' if is_chosen else ''}" id="{self.anchor(v['variant_id'])}" data-variant-id="{esc(v['variant_id'])}" data-state="{esc(state)}">
<h2>Variant {n}{chosen} {status_badge(state)} <span class="muted">at {esc(v['current_step'])}</span>{ranked}</h2>
<p class="standing">{standing} {back} · <a href="#job-timeline">timeline</a></p>
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
<div class="scroll"><table class="ocr-diff"><thead><tr><th>expected, with <del>missed</del> / <ins>misread</ins></th><th>read</th><th>CER</th></tr></thead>
<tbody>{rows}</tbody></table></div>"""))
        rd = r.get("readability_eval")
        if rd:
            rows = "".join(
                f"<tr><td>{esc(b.get('text'))}</td><td>{b.get('contrast')} ≥ {b.get('required_contrast')} {badge((b.get('checks') or {}).get('contrast'))}</td>"
                f"<td>{b.get('text_height_ratio')} {badge((b.get('checks') or {}).get('text_height'))}</td>"
                f"<td>{b.get('busyness')} {badge((b.get('checks') or {}).get('busyness'))}</td></tr>" for b in rd.get("boxes") or [])
            parts.append(self.check("contrast", "Contrast and readability", badge(rd.get("passed")), f"""
<div class="scroll"><table><thead><tr><th>line</th><th>contrast (WCAG)</th><th>text height / image</th><th>background busyness</th></tr></thead>
<tbody>{rows}</tbody></table></div>"""))
        c = r.get("iou_eval")
        if c:
            rows = "".join(f"<tr><td>{'PRODUCT ' if ob.get('is_product') else ''}{esc(ob.get('label'))}</td><td>{ob.get('iou')}</td>"
                           f"<td>{ob.get('covered_share')}</td></tr>" for ob in c.get("objects") or [])
            parts.append(self.check("coverage", "Coverage of objects by text", badge(c.get("passed")), f"""
<p>product covered: <b>{'yes' if c.get('product_covered') else 'no'}</b> (share {c.get('product_covered_share')}); largest IoU
<b>{c.get('max_iou')}</b> ≤ {c.get('max_object_iou')}?</p>
{scroll('<table><thead><tr><th>object</th><th>IoU with text</th><th>share covered</th></tr></thead><tbody>' + rows + '</tbody></table>') if rows else '<p class="muted">no objects detected</p>'}"""))
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
<div class="scroll"><table><thead><tr><th>stage</th><th>status</th><th>attempts</th><th>took</th><th class="barcol">when</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table></div></div>"""

    # --- attempts, from stage_tasks.attempt_log where the row has one
    def attempts_of(self, t: Mapping[str, Any]) -> list[dict]:
        """A task's attempts, oldest first, each {attempt, worker, started, ended, outcome, error,
        logged}. attempt_log holds the ended ones; the attempt under way (or one the log lacks,
        as on rows older than the log) comes from the task's own columns, logged=False."""
        log = t.get("attempt_log")
        attempts = []
        for entry in log if isinstance(log, list) else []:
            if not isinstance(entry, Mapping):
                continue
            attempts.append({"attempt": entry.get("attempt"), "worker": entry.get("worker"),
                             "started": parse_time(entry.get("started_at")), "ended": parse_time(entry.get("ended_at")),
                             "outcome": str(entry.get("outcome") or "?"), "error": entry.get("error"), "logged": True})
        n = t.get("attempts") or 0
        if n and n not in {a["attempt"] for a in attempts}:
            status = t["status"]
            # A queued task that has run before waits for its retry: its last attempt ended in one.
            outcome = "retry" if status == "queued" else status
            attempts.append({"attempt": n, "worker": t.get("lease_owner"), "started": parse_time(t.get("started_at")),
                             "ended": parse_time(t.get("finished_at")) if status != "running" else None,
                             "outcome": outcome, "error": t.get("last_error") if status != "done" else None,
                             "logged": False})
        return attempts

    def all_tasks(self) -> list[tuple[str | None, str, Mapping[str, Any]]]:
        """(variant id or None for the job, label, task) in pipeline order, variant by variant."""
        rows = []
        for v in self.variants:
            rows += [(v["variant_id"], f"variant {v['creation_order']}", v["tasks"][stage])
                     for stage in self.variant_stages if stage in v["tasks"]]
            rows += [(v["variant_id"], f"variant {v['creation_order']}", t)
                     for stage, t in v["tasks"].items() if stage not in self.variant_stages]
        rows += [(None, "job", self.job_tasks[stage]) for stage in self.job_stages if stage in self.job_tasks]
        return rows

    def troubled_tasks(self) -> list[tuple[str | None, str, Mapping[str, Any], list[dict]]]:
        """Tasks with more than one attempt, an error, or an attempt that did not end done."""
        found = []
        for vid, label, t in self.all_tasks():
            attempts = self.attempts_of(t)
            if ((t.get("attempts") or 0) > 1 or t.get("last_error") or t["status"] in ("failed", "cancelled")
                    or any(a["outcome"] not in ("done", "running") for a in attempts)):
                found.append((vid, label, t, attempts))
        return found

    def lane_link(self, vid: str | None, label: str) -> str:
        return self.variant_link(vid) if vid else '<a href="#job-stages">job</a>'

    def at(self, when: datetime | None) -> str:
        """A moment as seconds after submission, the clock time in its title."""
        if when is None:
            return "-"
        offset = (when - self.job["created_at"]).total_seconds()
        return f'<time datetime="{esc(when.isoformat())}" title="{esc(when.isoformat(timespec="seconds"))}">+{seconds(max(0.0, offset))}</time>'

    def job_gantt(self) -> str:
        """Every task of the job on one time axis from submission: a row per variant stage and job
        stage, labelled with both and the worker(s) that ran it; light = queued, then one segment
        per attempt, coloured by how it ended (failed, retried and expired attempts hatched red)."""
        origin = self.job["created_at"]
        tasks = self.all_tasks()
        if not tasks:
            return '<section class="card" id="job-timeline"><h2>Job timeline</h2><p class="muted">No stage has been enqueued yet.</p></section>'
        attempts = {id(t): self.attempts_of(t) for _, _, t in tasks}
        moments = [parse_time(t.get(k)) for _, _, t in tasks for k in ("created_at", "started_at", "finished_at")]
        moments += [a[k] for group in attempts.values() for a in group for k in ("started", "ended")]
        open_work = self.state == "open" and any(t["status"] in ("running", "queued") for _, _, t in tasks)
        if open_work:
            moments.append(self.now)
        total = max(1e-3, max(((m - origin).total_seconds() for m in moments if m), default=0.0))

        def pct(when: datetime | None) -> float:
            return 0.0 if when is None else min(100.0, max(0.0, (when - origin).total_seconds() / total * 100))

        rows = []
        for vid, label, t in tasks:
            group = attempts[id(t)]
            first_start = next((a["started"] for a in group if a["started"]), None)
            created = parse_time(t.get("created_at"))
            wait_end = first_start or (self.now if t["status"] == "queued" and open_work else parse_time(t.get("finished_at")))
            segments = []
            if created and wait_end:
                segments.append(f'<i class="wait" style="left:{pct(created):.2f}%;width:{max(0.0, pct(wait_end) - pct(created)):.2f}%" '
                                f'title="{esc(label)} {esc(t["stage"])}: queued"></i>')
            for a in group:
                start = a["started"] or a["ended"]
                if start is None:
                    continue
                end = a["ended"] or (self.now if a["outcome"] == "running" else start)
                kind = OUTCOME_CLASS.get(a["outcome"], "failed")
                what = (f'{label} · {t["stage"]} · attempt {a["attempt"]} · {a["worker"] or "worker unknown"} · '
                        f'{a["outcome"]}, {seconds(span(a["started"], a["ended"]))}' + (f': {first_line(a["error"], 200)}' if a["error"] else ""))
                segments.append(f'<i class="att {kind}" style="left:{pct(start):.2f}%;width:{max(0.6, pct(end) - pct(start)):.2f}%" '
                                f'title="{esc(what)}" aria-label="{esc(what)}" data-outcome="{esc(a["outcome"])}"></i>')
            workers = []
            for a in group:
                if a["worker"] and a["worker"] not in workers:
                    workers.append(a["worker"])
            bad = sum(1 for a in group if OUTCOME_CLASS.get(a["outcome"], "failed") in ("failed", "retry", "expired", "cancelled"))
            tries = (f", {len(group)} attempts" if len(group) > 1 else "") + (f', <span class="error">{bad} failed</span>' if bad else "")
            took = span(first_start, parse_time(t.get("finished_at")))
            who = " → ".join(f'<span class="g-worker">{esc(w)}</span>' for w in workers) or "no worker yet"
            rows.append(f'<div class="g-row" data-task-id="{esc(t["id"])}" data-status="{esc(t["status"])}">'
                        f'<div class="g-label"><span class="g-what">{self.lane_link(vid, label)} · <code>{esc(t["stage"])}</code></span> '
                        f'{status_badge(t["status"])} <span class="muted small g-who">{who}'
                        f' · {seconds(took)}{tries}</span></div>'
                        f'<div class="g-track">{"".join(segments)}</div></div>')
        ticks = "".join(f'<span style="left:{q * 25}%">{seconds(total * q / 4)}</span>' for q in range(5))
        return f"""<section class="card" id="job-timeline"><h2>Job timeline <span class="muted small">every variant's stages and the job
stages on one axis, 0 = job submitted, {seconds(total)} shown</span></h2>
<p class="legend small"><i class="wait"></i> queued <i class="att ok"></i> ran, done <i class="att running"></i> running
<i class="att retry"></i> failed, retried <i class="att failed"></i> failed <i class="att expired"></i> lease expired
<i class="att cancelled"></i> cancelled</p>
<div class="gantt"><div class="g-row g-axis" aria-hidden="true"><div class="g-label"></div><div class="g-ticks">{ticks}</div></div>
{''.join(rows)}</div></section>"""

    def attempt_history(self) -> str:
        troubled = self.troubled_tasks()
        if not troubled:
            return ""
        blocks = []
        for vid, label, t, attempts in troubled:
            rows = []
            for a in attempts:
                kind = OUTCOME_CLASS.get(a["outcome"], "failed")
                badge_kind = {"ok": "pass", "running": "run"}.get(kind, "fail")
                rows.append(f'<tr data-attempt="{esc(a["attempt"])}" data-outcome="{esc(a["outcome"])}"><td>{esc(a["attempt"])}</td>'
                            f'<td><span class="badge {badge_kind}">{esc(a["outcome"])}</span></td>'
                            f'<td class="worker">{esc(a["worker"] or "-")}</td><td>{self.at(a["started"])}</td><td>{self.at(a["ended"])}</td>'
                            f'<td>{seconds(span(a["started"], a["ended"]))}</td></tr>')
                if a["error"]:
                    rows.append(f'<tr class="err-row"><td></td><td colspan="5"><pre class="error">{esc(a["error"])}</pre></td></tr>')
            if not attempts:
                rows.append(f'<tr><td colspan="6" class="muted">no attempt ran{": " + esc(t["last_error"]) if t.get("last_error") else ""}</td></tr>')
            earlier = attempts[0]["attempt"] if attempts else None
            note = ""
            if isinstance(earlier, int) and earlier > 1:
                # Rows older than attempt_log, or a log that starts late: say what is not known.
                missing = "Attempt 1 is" if earlier == 2 else f"Attempts 1–{earlier - 1} are"
                note = f'<p class="muted small">{missing} not recorded one by one; the task keeps only its latest error.</p>'
            if note and t.get("last_error") and not any(a["error"] == t.get("last_error") for a in attempts):
                note += f'<pre class="error">last error: {esc(t.get("last_error"))}</pre>'
            details = t.get("error_details")
            more = (f'<details><summary>error details</summary><pre class="error">{esc(details)}</pre></details>' if details else "")
            blocks.append(f"""<div class="history" data-task-id="{esc(t['id'])}"><h3>{self.lane_link(vid, label)} · <code>{esc(t['stage'])}</code>
{status_badge(t['status'])} <span class="muted small">{esc(t.get('attempts'))} of {esc(t.get('max_attempts'))} attempts</span></h3>
{scroll(f'<table class="attempts"><thead><tr><th>attempt</th><th>outcome</th><th>worker</th><th>started</th><th>ended</th><th>took</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')}
{note}{more}</div>""")
        return f"""<section class="card" id="attempt-history"><h2>Attempt history <span class="muted small">every task that failed or ran more than
once; times after submission</span></h2>
{''.join(blocks)}</section>"""

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
a { color:var(--accent); } :target { scroll-margin-top:12px; } section.variant:target, #ranking:target { outline:3px solid var(--accent); outline-offset:2px; }
h1 { font-size:24px; margin:0 0 12px; } h2 { font-size:19px; margin:0 0 10px; } h3 { font-size:15px; margin:14px 0 6px; }
code { font:13px ui-monospace,SFMono-Regular,Menlo,monospace; background:#eef0f6; padding:1px 4px; border-radius:4px; overflow-wrap:break-word; }
.muted { color:var(--muted); font-weight:normal; } .small { font-size:13px; }
.card, header#job-summary { background:#fff; border:1px solid var(--line); border-radius:12px; padding:20px; margin:0 0 20px; }
.banner { background:#fff4d6; border:2px solid #e0a800; color:#5c4300; border-radius:12px; padding:14px 18px; margin:0 0 20px; }
.summary-grid { display:grid; grid-template-columns:repeat(auto-fit,minmax(170px,1fr)); gap:12px; }
.k { color:var(--muted); font-size:12px; text-transform:uppercase; letter-spacing:.04em; } .v { font-size:16px; }
.copy q { font-size:18px; }
.note { background:#eef3ff; padding:8px 12px; border-radius:8px; }
.outcome { border-radius:8px; padding:10px 14px; margin:0 0 14px; font-size:16px; } .outcome p { margin:0; }
.outcome-ok { background:#dff3e6; } .outcome-partial { background:#fff1cc; } .outcome-failed { background:#fde3e3; } .outcome-open { background:#eef3ff; }
.outcome .failures { margin:6px 0 0; padding-left:20px; font-size:14px; overflow-wrap:anywhere; }
.jumps { margin:10px 0 0; } .standing { margin:0 0 4px; } .back { white-space:nowrap; }
.badge { display:inline-block; font-size:11px; font-weight:700; letter-spacing:.04em; padding:2px 8px; border-radius:999px; vertical-align:middle; background:#e9ecf3; color:#414a5e; }
.badge.pass { background:#dff3e6; color:var(--pass); } .badge.fail { background:#fde3e3; color:var(--fail); }
.badge.run { background:#fff1cc; color:#8a5a00; } .badge.wait { background:#e9ecf3; }
.badge.chosen-badge { background:var(--accent); color:#fff; }
.post-row { display:grid; grid-template-columns:minmax(0,1fr) 400px; gap:20px; align-items:start; margin-bottom:20px; }
.post-row > * { min-width:0; }
.scroll { overflow-x:auto; max-width:100%; -webkit-overflow-scrolling:touch; } .scroll table { min-width:100%; }
.post-row .card { margin:0 0 20px; }
.why { font-size:16px; }
table { border-collapse:collapse; width:100%; font-size:13px; } th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; } tr.chosen td { background:#eef3ff; font-weight:600; } tr.out td { color:var(--muted); }
.rule { color:var(--muted); font-size:12px; }
.figures { display:grid; grid-template-columns:repeat(4,minmax(0,1fr)); gap:12px; margin:12px 0; }
.fig { margin:0; background:#fafbfd; border:1px solid var(--line); border-radius:8px; overflow:hidden; cursor:zoom-in; }
.fig img { display:block; width:100%; height:auto; } .fig figcaption { padding:6px 10px; font-size:13px; color:var(--muted); }
.fig.zoom { position:fixed; inset:20px; z-index:10; overflow:auto; cursor:zoom-out; } .fig.zoom img { width:auto; max-width:100%; margin:auto; }
.missing { padding:40px 12px; text-align:center; color:var(--muted); background:repeating-linear-gradient(45deg,#f3f4f8,#f3f4f8 10px,#eceef4 10px,#eceef4 20px); }
.scores { display:grid; grid-template-columns:repeat(auto-fit,minmax(min(340px,100%),1fr)); gap:12px; }
.check { border:1px solid var(--line); border-radius:8px; padding:4px 12px 10px; min-width:0; overflow-wrap:break-word; } .check h3 { display:flex; gap:8px; align-items:center; justify-content:space-between; }
dl { display:grid; grid-template-columns:110px minmax(0,1fr); gap:2px 10px; margin:0; font-size:13px; } dt { color:var(--muted); } dd { margin:0; }
.swatch { display:inline-block; width:14px; height:14px; border-radius:3px; border:1px solid #0002; vertical-align:middle; margin-right:2px; }
.meter { display:grid; grid-template-columns:minmax(0,130px) minmax(0,1fr) 44px; gap:8px; align-items:center; font-size:13px; }
.meter b { display:block; height:8px; background:var(--accent); border-radius:4px; } .meter em { font-style:normal; color:var(--muted); }
.diff { font:14px ui-monospace,Menlo,monospace; white-space:pre-wrap; }
del { background:#fde3e3; color:var(--fail); text-decoration:line-through; } ins { background:#dff3e6; color:var(--pass); text-decoration:none; border-bottom:2px solid var(--pass); }
.timeline table td:first-child { white-space:nowrap; font-family:ui-monospace,Menlo,monospace; } .barcol { width:45%; }
.timeline table { min-width:520px; } .timeline .error, table.attempts pre.error { overflow-wrap:anywhere; }
td a, .g-what a, td time { white-space:nowrap; } .timeline td:nth-child(4), table.attempts td:last-child { white-space:nowrap; }
.bar { position:relative; height:14px; background:#f1f2f6; border-radius:3px; }
.bar i { position:absolute; top:0; bottom:0; border-radius:3px; } .bar i.wait { background:#c9d3ee; } .bar i.run { background:var(--accent); }
.bar i.run.failed { background:var(--fail); } .bar i.run.running { background:#e0a800; }
.error { color:var(--fail); white-space:pre-wrap; overflow-wrap:break-word; } pre.error { background:#fff5f5; padding:8px; border-radius:6px; font-size:12px; overflow:auto; margin:4px 0; }
.gantt { display:grid; gap:3px; font-size:13px; }
.g-row { display:grid; grid-template-columns:minmax(0,400px) minmax(0,1fr); gap:4px 12px; align-items:center; padding:2px 0; border-bottom:1px solid var(--line); }
.g-label { min-width:0; overflow-wrap:anywhere; } .g-worker { white-space:nowrap; } .g-label code { font-size:12px; }
.g-track, .g-ticks { position:relative; height:16px; background:#f1f2f6; border-radius:3px; overflow:hidden; }
.g-ticks { background:none; overflow:visible; height:18px; color:var(--muted); font-size:11px; }
.g-ticks span { position:absolute; transform:translateX(-50%); white-space:nowrap; } .g-ticks span:first-child { transform:none; }
.g-ticks span:last-child { transform:translateX(-100%); }
.g-track i, .legend i { position:absolute; top:0; bottom:0; border-radius:2px; }
.legend i { position:static; display:inline-block; width:18px; height:10px; vertical-align:middle; margin-left:8px; }
i.wait { background:#c9d3ee; } i.att.ok { background:var(--accent); } i.att.running { background:#e0a800; }
i.att.failed { background:repeating-linear-gradient(135deg,var(--fail),var(--fail) 3px,#f28b8b 3px,#f28b8b 6px); }
i.att.retry { background:repeating-linear-gradient(135deg,var(--fail),var(--fail) 2px,#fbd0d0 2px,#fbd0d0 5px); }
i.att.expired { background:repeating-linear-gradient(135deg,#8a5a00,#8a5a00 2px,#ffd27a 2px,#ffd27a 5px); }
i.att.cancelled { background:repeating-linear-gradient(135deg,#6b7385,#6b7385 2px,#d5d9e2 2px,#d5d9e2 5px); }
.g-track i.att { min-width:3px; box-shadow:0 0 0 1px #fff; }
.history { border-top:1px solid var(--line); padding-top:4px; } .history:first-of-type { border-top:0; }
.history h3 { flex-wrap:wrap; } table.attempts { min-width:480px; } table.attempts td.worker { font-family:ui-monospace,Menlo,monospace; white-space:nowrap; }
table.attempts tr.err-row td { border-bottom:1px solid var(--line); padding-top:0; } table.attempts pre.error { white-space:pre-wrap; max-width:70ch; }
#console-errors { background:#fde3e3; color:var(--fail); padding:10px; border-radius:8px; }
footer { color:var(--muted); font-size:12px; text-align:center; margin:20px 0; }
.phone-wrap { text-align:center; }
.phone { width:100%; max-width:375px; aspect-ratio:375 / 740; display:flex; flex-direction:column; margin:0 auto; border:12px solid #111;
  border-radius:44px; background:#111; position:relative; box-shadow:0 12px 40px #0003; }
.phone .notch { position:absolute; top:0; left:50%; transform:translateX(-50%); width:120px; height:22px; background:#111; border-radius:0 0 14px 14px; z-index:2; }
.screen { flex:1 1 auto; background:#fff; border-radius:32px; overflow:hidden; text-align:left; padding-top:26px; }
.ig-top { font:600 20px/1.2 "Segoe Script","Brush Script MT",cursive; padding:4px 14px 8px; border-bottom:1px solid var(--line); }
.ig-header { display:flex; align-items:center; gap:8px; padding:8px 12px; font-size:13px; }
.avatar { width:30px; height:30px; border-radius:50%; background:conic-gradient(#f9ce34,#ee2a7b,#6228d7,#f9ce34); border:2px solid #fff; box-shadow:0 0 0 1px #ddd; }
.user { font-weight:600; } .sponsored { color:var(--muted); font-size:11px; margin-left:auto; }
.ig-image { display:block; width:100%; height:auto; }
.ig-actions { display:flex; gap:14px; padding:10px 12px 4px; } .ig-actions .save { margin-left:auto; }
.ig-caption { padding:4px 12px 18px; font-size:14px; line-height:1.45; word-break:break-word; }
.hashtag { color:#00376b; }
@media (max-width: 1000px) { .post-row { grid-template-columns:minmax(0,1fr); } .figures { grid-template-columns:repeat(2,minmax(0,1fr)); } }
@media (max-width: 640px) {
  main { padding:10px; } .card, header#job-summary { padding:14px; border-radius:10px; } h1 { font-size:20px; }
  .figures { grid-template-columns:minmax(0,1fr); } .g-row { grid-template-columns:minmax(0,1fr); } .g-axis .g-label { display:none; }
  .summary-grid { grid-template-columns:repeat(2,minmax(0,1fr)); } .fig.zoom { inset:4px; }
  .phone { border-width:8px; border-radius:34px; } .screen { border-radius:26px; }
}
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
