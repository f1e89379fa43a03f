"""A whole job through a real worker process with the real stages and the `tiny` model profile."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

from PIL import Image, ImageDraw

from outbox.artifacts import open_store
from outbox.jobs import submit_job
from tests.workerproc import ROOT, wait_for_jobs


def product_photo(path, colour):
    image = Image.new("RGB", (320, 400), (235, 230, 220))
    draw = ImageDraw.Draw(image)
    draw.rectangle((110, 150, 210, 330), fill=colour)  # the "product"
    draw.ellipse((130, 110, 190, 160), fill=(40, 40, 40))
    image.save(path)
    return path


def test_tiny_profile_job_end_to_end(conn, db_url, home, tmp_path):
    images = [product_photo(tmp_path / f"v{i}.png", c) for i, c in enumerate([(200, 40, 40), (40, 120, 200), (60, 160, 80)])]
    job = submit_job(conn, open_store(), images, "Summer Sale: 50% off all drinks #summer", tenant="acme").job_id
    log = tmp_path / "worker.log"
    proc = subprocess.Popen([sys.executable, "-m", "workers", "start", "--models", "tiny", "--concurrency", "4"],
                            cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1"})
    try:
        states = wait_for_jobs(db_url, [job], timeout=400)
    finally:
        proc.terminate()
        proc.wait(60)
    output = log.read_text()
    assert states == {job: "done"}, output[-4000:]
    assert "RANDOM-WEIGHT" in output  # the worker says plainly that tiny random models are in use
    results = {(r["stage"], r["job_variants_id"]): r["result"] for r in conn.execute(
        "SELECT stage, job_variants_id::text, result FROM stage_results WHERE job_id = %s", (job,))}
    assert len(results) == 3 * 8 + 2
    for (stage, _), result in results.items():
        if stage in ("vlm_analyze", "yolo_detect", "vlm_judge", "ad_copy_gen_kor"):
            assert result["profile"] == "tiny" and "random" in result["warning"]
    post = results[("instagram_feed_gen", None)]
    store = open_store()
    jpeg = store.get(post["artifacts"]["post.jpg"])
    bundle = json.loads(store.get(post["artifacts"]["post.json"]))
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.width == 1080 and len(jpeg) < 8 * 1024 * 1024
    assert 0.8 <= image.width / image.height <= 1.91
    assert len(bundle["caption"]) <= 2200 and "#summer" in bundle["caption"]
    assert post["chosen_variant_id"] in {str(v) for (s, v) in results if s == "overlay"}
    selected = conn.execute("SELECT job_variants_id::text AS v FROM jobs_variants WHERE job_id = %s AND selected",
                            (job,)).fetchall()
    assert selected == [{"v": post["chosen_variant_id"]}]
