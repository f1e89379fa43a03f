"""The HTML job report: built from a real tiny-profile job, loaded in headless Chromium with no
console error, every image decoded; usable at a phone's 375 px, its chosen variant, ranking and
variant sections linked; a job with one failed variant and one retried task says so in its header,
timeline and attempt history; a failed job's report shows its errors; unit checks of the OCR diff
and the drawings."""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from outbox.artifacts import open_store
from outbox.jobs import submit_job
from outbox.report import gather
from console.report import PRODUCT_COLOUR, draw_detections, ocr_diff, render_report
from console.samples import DEMO_COPY, write_samples
from tests.conftest import ROOT, cli
from tests.helpers import claim, complete, fail, insert_job
from tests.browser import browser  # noqa: F401  (a fixture)
from tests.workerproc import WorkerProcess, wait_for_jobs

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--hide-scrollbars", "--no-first-run", "--disable-extensions"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium not installed (Debian: apt-get install chromium; .ci/run installs it as root)")


def run_browser(args: list[str], tmp_path: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                          env={**os.environ, "HOME": str(tmp_path)})


@pytest.fixture
def open_report(browser):
    """Opens a report file at a viewport width; the page, once its load handler ran, and the
    console errors and uncaught exceptions it had (CSP kept: the report's own is under test)."""
    contexts = []

    def open_at(path: Path, width: int, height: int = 812):
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        errors: list[str] = []
        page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-report-ready]", state="attached")
        return page, errors

    yield open_at
    for context in contexts:
        context.close()


def overflowing(page) -> list[str]:
    """Elements whose right edge is past the viewport, outside the boxes that scroll on their own:
    what a reader would have to scroll the whole page sideways for."""
    return page.evaluate("""() => [...document.querySelectorAll('body *')]
        .filter(e => !e.closest('.scroll') && e.getBoundingClientRect().right > window.innerWidth + 0.5)
        .slice(0, 10).map(e => e.tagName + '.' + e.className + ' right=' + Math.round(e.getBoundingClientRect().right))""")


def broken_links(page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll('a[href^="#"]')]
        .map(a => a.getAttribute('href')).filter(h => !document.getElementById(decodeURIComponent(h.slice(1))))""")


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.fixture
def tiny_job(conn, db_url, home, tmp_path):
    """A whole job through a worker with the real stages and the tiny model profile."""
    images = write_samples(tmp_path / "samples")
    job = submit_job(conn, open_store(), images, DEMO_COPY, tenant="demo").job_id
    log = tmp_path / "worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "workers", "start", "--models", "tiny", "--concurrency", "4"],
                            cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1", "HEALTH_ADDR": ""})
    try:
        states = wait_for_jobs(db_url, [job], timeout=240)
    finally:
        proc.terminate()
        proc.wait(60)
    assert states == {job: "done"}, log.read_text()[-3000:]
    return job


def test_report_of_a_tiny_job_loads_in_chromium_without_errors(tiny_job, db_url, tmp_path):
    out = tmp_path / "report.html"
    done = cli("report", tiny_job, "-o", str(out), env={"DATABASE_URL": db_url}, check=True)
    assert done.stdout.strip() == str(out)
    page = out.read_text(encoding="utf-8")
    # Self-contained: no outside resource of any kind.
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page)
    assert "http://" not in page and "https://" not in page
    # Key elements.
    assert 'id="tiny-banner"' in page and "TINY MODEL PROFILE" in page
    assert page.count('class="variant card') == 3
    for kind in ("original", "detections", "placement", "overlay"):
        assert page.count(f'class="fig fig-{kind}"><img') == 3, kind
    for check in ("vlm-analyze", "vlm-judge", "ocr", "contrast", "coverage", "placement"):
        assert page.count(f'class="check check-{check}"') == 3, check
    assert page.count('class="timeline"') == 4  # three variants and the job
    assert 'id="selection"' in page and re.search(r'Chosen: <a href="#variant-\d">variant \d</a>', page) and "selection rule" in page
    assert "3 of 3 variants done" in page and 'id="job-timeline"' in page
    assert 'id="instagram-preview"' in page and 'class="ig-image"' in page
    caption = page[page.index('class="ig-caption"'):]
    assert re.search("[\uac00-\ud7a3]", caption[:3000]) and "#stayfresh" in caption  # the Korean caption
    images = page.count("<img ")
    assert images == 3 * 4 + 1

    # A real browser: the page loads, every image decodes, nothing is reported as an error.
    shot = tmp_path / "report.png"
    rendered = run_browser(["--enable-logging=stderr", "--v=0", "--window-size=1280,4000", f"--screenshot={shot}",
                            out.as_uri()], tmp_path)
    console = [line for line in rendered.stderr.splitlines() if "CONSOLE" in line]
    assert not console, "\n".join(console)
    assert shot.is_file() and png_size(shot) == (1280, 4000)
    dom = run_browser(["--virtual-time-budget=5000", "--dump-dom", out.as_uri()], tmp_path).stdout
    assert 'data-report-ready="ok"' in dom, dom[-2000:]
    assert f'data-images="{images}/{images}"' in dom
    assert re.search(r'<pre id="console-errors" hidden="">\s*</pre>', dom)
    assert 'id="tiny-banner"' in dom and 'id="instagram-preview"' in dom and dom.count('class="variant card') == 3


def test_report_of_a_tiny_job_fits_a_phone_and_links_its_parts(tiny_job, conn, db_url, tmp_path, open_report):
    out = tmp_path / "report.html"
    cli("report", tiny_job, "-o", str(out), env={"DATABASE_URL": db_url}, check=True)
    chosen_id = conn.execute("SELECT job_variants_id::text AS id FROM jobs_variants WHERE job_id = %s AND selected",
                             (tiny_job,)).fetchone()["id"]

    # 375 px: nothing widens the page; the phone mock-up and the figures shrink into it.
    page, errors = open_report(out, 375)
    assert page.get_attribute("body", "data-report-ready") == "ok", errors
    assert errors == []
    assert page.evaluate("document.documentElement.scrollWidth") <= 375, overflowing(page)
    assert overflowing(page) == []
    phone = page.locator("#instagram-preview .phone").bounding_box()
    assert phone["x"] >= 0 and phone["x"] + phone["width"] <= 375
    assert phone["height"] > 1.6 * phone["width"]  # still phone-shaped, not squashed
    post = page.locator("#instagram-preview .ig-image").bounding_box()
    assert post["x"] >= phone["x"] and post["x"] + post["width"] <= phone["x"] + phone["width"]
    figures = [page.locator("#variant-1 .figures > figure").nth(i).bounding_box() for i in range(4)]
    assert len({round(f["x"]) for f in figures}) == 1  # one column
    assert all(a["y"] + a["height"] <= b["y"] for a, b in zip(figures, figures[1:]))
    # The wide ranking table scrolls inside its own box instead.
    assert page.locator("#selection .scroll > table#ranking").count() == 1

    # Links: the chosen variant and every ranking row lead to that variant's section, and back.
    assert broken_links(page) == []
    chosen_link = page.locator("#selection h2 a")
    target = chosen_link.get_attribute("href")
    assert page.locator(f"section.variant{target}").get_attribute("data-variant-id") == chosen_id
    ranked = page.locator("#ranking tbody a")
    assert ranked.count() == 3
    hrefs = [ranked.nth(i).get_attribute("href") for i in range(3)]
    assert sorted(hrefs) == ["#variant-1", "#variant-2", "#variant-3"]
    for href in hrefs:
        assert page.locator(f"section.variant{href}").count() == 1
    chosen_link.click()
    assert page.evaluate("location.hash") == target
    assert page.locator(target).is_visible()
    assert page.evaluate(f"document.querySelector('{target}').getBoundingClientRect().top") < 812
    section = page.locator(target)
    assert "This is the chosen variant" in section.locator(".standing").inner_text()
    assert section.locator('.standing a[href="#ranking"]').count() == 1
    others = page.locator("section.variant:not(.chosen-variant) .standing")
    assert others.count() == 2 and all("Not chosen: rank" in others.nth(i).inner_text() for i in range(2))

    # One timeline for the whole job: a row per task, each named by variant (or job), stage and worker.
    rows = page.locator("#job-timeline .g-row[data-task-id]")
    assert rows.count() == 3 * 8 + 2
    labels = [rows.nth(i).locator(".g-label").inner_text() for i in range(rows.count())]
    assert sum(label.startswith("variant ") for label in labels) == 24 and sum(label.startswith("job ") for label in labels) == 2
    assert all("no worker yet" not in label for label in labels), labels
    assert page.locator("#job-timeline .g-track i.att.ok").count() == 26
    assert page.locator("#job-timeline .g-track i.att:not(.ok)").count() == 0
    assert page.locator("#attempt-history").count() == 0  # nothing was retried or failed

    # The desktop keeps its two columns: the phone beside the selection, four figures in a row.
    page, errors = open_report(out, 1280, 900)
    assert errors == []
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
    selection = page.locator("#selection").bounding_box()
    phone = page.locator("#instagram-preview .phone").bounding_box()
    assert phone["x"] >= selection["x"] + selection["width"]
    assert 360 <= phone["width"] <= 400
    figures = [page.locator("#variant-1 .figures > figure").nth(i).bounding_box() for i in range(4)]
    assert len({round(f["y"]) for f in figures}) == 1


PLANTED = "test: overlay cannot place the text " + "x" * 240  # one long word: it must wrap, not widen


@pytest.fixture
def mixed_job(conn):
    """A job driven through the engine's SQL functions: variant 1's vlm_analyze fails once on
    worker w-first and is retried on w-second; variant 2 fails for good at overlay; variants 1
    and 3 finish and the job's post is made from variant 1. Returns (job, variant ids, the
    retried task's id)."""
    job, vids = insert_job(conn, variants=3)
    first = {str(t["job_variants_id"]): t for t in claim(conn, "w-first", stages=["vlm_analyze"])}
    assert set(first) == set(vids)
    assert fail(conn, first[vids[0]], "w-first", error="test: planted transient failure", retry_in=0) == "retry"
    for vid in vids[1:]:
        assert complete(conn, first[vid], "w-first")
    ranking = [{"variant_id": vids[0], "rank": 1, "score": 0.8, "components": {"judge": 0.7, "ocr": 1.0}},
               {"variant_id": vids[2], "rank": 2, "score": 0.6, "components": {"judge": 0.5, "ocr": 0.9}}]
    results = {"ad_copy_gen_kor": {"korean": "하나 사면 하나 무료"},
               "instagram_feed_gen": {"chosen_variant_id": vids[0], "ranking": ranking, "caption": "하나 사면 하나 무료 #sale",
                                      "selection_rule": "highest score"}}
    while tasks := claim(conn, "w-second", limit=100):
        for task in tasks:
            if task["stage"] == "overlay" and str(task["job_variants_id"]) == vids[1]:
                assert fail(conn, task, "w-second", error=PLANTED, permanent=True) == "failed"
            else:
                assert complete(conn, task, "w-second", results.get(task["stage"]))
    state = conn.execute("SELECT outbox_job_state(status, current_step) AS s FROM jobs WHERE job_id = %s", (job,)).fetchone()
    assert state["s"] == "done"
    return job, vids, first[vids[0]]["id"]


def test_report_of_a_partly_failed_job_says_so_and_shows_the_attempts(mixed_job, db_url, home, tmp_path, open_report):
    job, vids, retried = mixed_job
    out = tmp_path / "report.html"
    cli("report", job, "-o", str(out), env={"DATABASE_URL": db_url}, check=True)
    page, errors = open_report(out, 375)
    assert errors == []
    assert page.evaluate("document.documentElement.scrollWidth") <= 375, overflowing(page)

    # The header: how it ended, the partial failure, and which variant, linked.
    outcome = page.locator("#job-outcome")
    text = outcome.inner_text()
    assert "1 of 3 variants failed" in text and "2 of 3 variants done" in text, text
    assert outcome.get_attribute("class").split()[-1] == "outcome-partial"
    failed = outcome.locator(".failures li")
    assert failed.count() == 1
    assert "variant 2 failed at overlay" in failed.inner_text() and "cannot place the text" in failed.inner_text()
    assert failed.locator("a").get_attribute("href") == "#variant-2"
    assert page.locator("#variant-2").get_attribute("data-variant-id") == vids[1]
    assert "Not ranked: failed at overlay" in page.locator("#variant-2 .standing").inner_text()
    assert broken_links(page) == []

    # The timeline shows the retried attempt and the failed one as such, with their workers.
    row = page.locator(f'#job-timeline .g-row[data-task-id="{retried}"]')
    assert row.locator("i.att.retry").count() == 1 and row.locator("i.att.ok").count() == 1
    assert "w-first → w-second" in row.inner_text()
    overlay = page.locator("#job-timeline .g-row", has=page.locator('a[href="#variant-2"]')).filter(has_text="overlay")
    assert overlay.locator("i.att.failed").count() == 1

    # The attempt history: both attempts of the retried task, the failed task's error.
    history = page.locator(f'#attempt-history .history[data-task-id="{retried}"]')
    attempts = history.locator("tr[data-attempt]")
    assert attempts.count() == 2
    one, two = attempts.nth(0), attempts.nth(1)
    assert one.get_attribute("data-attempt") == "1" and one.get_attribute("data-outcome") == "retry"
    assert one.locator("td.worker").inner_text() == "w-first"
    assert two.get_attribute("data-attempt") == "2" and two.get_attribute("data-outcome") == "done"
    assert two.locator("td.worker").inner_text() == "w-second"
    assert "test: planted transient failure" in history.inner_text()
    assert re.search(r"\+\d", one.locator("td").nth(3).inner_text())  # when, after submission
    failures = page.locator("#attempt-history .history", has_text="overlay")
    assert failures.count() == 1 and PLANTED in failures.inner_text()
    assert page.locator("#attempt-history .history").count() == 2  # nothing else went wrong


def test_report_of_rows_without_an_attempt_log_still_shows_the_history(mixed_job, conn, home):
    """Tasks from before attempt_log (no log, no lease owner): the latest attempt and error only."""
    job, _, retried = mixed_job
    data = gather(conn, job)
    for tasks in [v["tasks"] for v in data["variants"]] + [data["job_tasks"]]:
        for task in tasks.values():
            task.pop("attempt_log", None)
            task.pop("lease_owner", None)
    page = render_report(data, lambda key: b"")
    history = page[page.index('id="attempt-history"'):]
    block = history[history.index(f'data-task-id="{retried}"'):]
    block = block[:block.index("</table>") + 200]
    assert re.findall(r'data-attempt="(\d+)" data-outcome="(\w+)"', block) == [("2", "done")]
    assert "Attempt 1 is not recorded one by one" in block
    assert "test: planted transient failure" in block
    assert "1 of 3 variants failed" in page


def test_report_of_an_unfinished_job_shows_the_work_under_way(conn, home):
    job, vids = insert_job(conn, variants=2)
    running = {str(t["job_variants_id"]): t for t in claim(conn, "w-busy", stages=["vlm_analyze"])}
    assert complete(conn, running[vids[1]], "w-busy")
    page = render_report(gather(conn, job), lambda key: b"")
    assert re.search(r"Not finished: [^.]+\. 1 running, 1 queued\.", page)
    row = page[page.index(f'data-task-id="{running[vids[0]]["id"]}"'):]
    row = row[:row.index('</div></div>')]
    assert "w-busy" in row and 'class="att running"' in row
    assert 'id="attempt-history"' not in page  # a first attempt under way is no trouble


def test_report_of_a_failed_job_shows_the_errors(conn, db_url, home, tiny_png, tmp_path):
    job = submit_job(conn, open_store(), [tiny_png], "Bad copy PERMANENT:overlay", variants=2).job_id
    worker = WorkerProcess(db_url, tmp_path / "w.log")
    try:
        assert wait_for_jobs(db_url, [job], timeout=60) == {job: "failed"}
    finally:
        assert worker.stop() == 0
    done = cli("report", "latest", "-o", "-", env={"DATABASE_URL": db_url}, check=True)
    page = done.stdout
    assert f"Ad job <code>{job}</code>" in page
    assert page.count("test stage overlay: bad input planted in the copy") >= 4  # check box and timeline, per variant
    assert 'id="tiny-banner"' not in page  # no model ran
    assert "No post:" in page
    assert page.count('class="fig fig-original"><img') == 2
    assert page.count('class="fig fig-overlay"><div class="missing">') == 2
    assert re.search(r"Failed: no post \(every variant failed\)\. 2 of 2 variants failed\.", page)


def test_report_of_an_unknown_job_exits_3(db_url, home):
    done = cli("report", "00000000-0000-0000-0000-000000000000", env={"DATABASE_URL": db_url})
    assert done.returncode == 3 and "no job" in done.stderr


def test_ocr_diff_marks_missed_and_misread_characters():
    assert ocr_diff("Summer sale", "Summer sale") == "Summer sale"
    html = ocr_diff("50% off <b>", "5O% of <b>")
    assert '<del title="expected, not read">0</del><ins title="read, not expected">O</ins>' in html
    assert "<del" in html and "&lt;b&gt;" in html  # escaped


def test_detections_are_drawn_with_the_product_marked():
    image = Image.new("RGB", (400, 300), (255, 255, 255))
    drawn = draw_detections(image, {"detections": [
        {"box": [100, 100, 300, 250], "label": "bottle", "confidence": 0.9, "is_product": True},
        {"box": [10, 10, 60, 60], "label": "cup", "confidence": 0.4, "is_product": False}]})
    assert drawn.getpixel((200, 249)) == PRODUCT_COLOUR  # the product's bottom edge
    assert drawn.getpixel((35, 59)) != (255, 255, 255)  # the other object is outlined too
    assert image.getpixel((200, 249)) == (255, 255, 255)  # the original is untouched
