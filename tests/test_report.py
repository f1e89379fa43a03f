"""The HTML job report: built from a real tiny-profile job, loaded in headless Chromium with no
console error, every image decoded; a failed job's report shows its errors; unit checks of the
OCR diff and the drawings."""
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
from console.report import PRODUCT_COLOUR, draw_detections, ocr_diff
from console.samples import DEMO_COPY, write_samples
from tests.conftest import ROOT, cli
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
    assert page.count('class="variant card"') == 3
    for kind in ("original", "detections", "placement", "overlay"):
        assert page.count(f'class="fig fig-{kind}"><img') == 3, kind
    for check in ("vlm-analyze", "vlm-judge", "ocr", "contrast", "coverage", "placement"):
        assert page.count(f'class="check check-{check}"') == 3, check
    assert page.count('class="timeline"') == 4  # three variants and the job
    assert 'id="selection"' in page and "Chosen: variant" in page and "selection rule" in page
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
    assert 'id="tiny-banner"' in dom and 'id="instagram-preview"' in dom and dom.count('class="variant card"') == 3


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
