"""The web console (`cli.py console`), as an operator meets it: the real command in a subprocess on
the per-test database, driven in headless Chromium (Debian's, through Playwright, no browser
downloaded) and with plain HTTP requests. Job progress is driven with plain SQL (the engine's own
claim and complete functions), so each step the page must show is known. Covered: the overview,
search and filters, a job page that follows its job live (no reload), download links with the
tenant check, replay and cancel through their confirmation pages (logged with who did it), the
token and cross-site refusals, read-only mode, 375 px pages with no horizontal scroll, no browser
console errors, and an idle console that sends the database nothing."""
from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import psycopg
import pytest
from PIL import Image

from outbox.artifacts import artifact_key, open_store
from outbox.db import free_port
from tests.conftest import ROOT, cli
from tests.browser import browser  # noqa: F401  (a fixture)
from tests.helpers import claim, complete, fail, insert_job, wait_until

TOKEN = "ops:" + "s3cret-console-token-" + "x" * 8
SECRET = TOKEN.split(":", 1)[1]
CONSOLE_APP = "adflow-console"


# ----------------------------------------------------------------------------- the server
class ConsoleProcess:
    """`cli.py console` in a subprocess, ready once /readyz says its listening connection is up."""

    def __init__(self, db_url: str, log_path: Path, *args: str, env: dict | None = None, host: str = "127.0.0.1"):
        self.port = free_port()
        self.host = host
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "cli.py"), "console", "--addr", f"{host}:{self.port}", *args],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
            env={**os.environ, "DATABASE_URL": db_url, "PYTHONUNBUFFERED": "1",
                 "JOB_STATE_LISTENER_RECONNECT_DELAY": "0.2", **(env or {})})
        wait_until(self.ready, timeout=60, what="console ready", detail=self.output)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"console exited {self.proc.returncode}:\n{self.output()}")
        try:
            return self.request("GET", "/readyz")[0] == 200
        except OSError:
            return False

    def request(self, method: str, path: str, headers: dict | None = None, body: str | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            headers = {k.lower(): v for k, v in response.getheaders()}
            headers["set-cookie"] = "\n".join(response.headers.get_all("set-cookie") or [])
            return response.status, headers, response.read()
        finally:
            conn.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self.log.close()


@pytest.fixture
def console(db_url, home, tmp_path):
    started = []

    def start(*args, env=None):
        server = ConsoleProcess(db_url, tmp_path / f"console{len(started)}.log", *args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        assert server.stop() == 0, server.output()


# ----------------------------------------------------------------------------- the browser
class Tab:
    """A page with every browser console error and uncaught exception collected."""

    def __init__(self, browser, width: int = 1280, height: int = 900):
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.navigations = 0
        self.page.on("framenavigated", lambda f: setattr(self, "navigations", self.navigations + 1)
                     if f == self.page.main_frame else None)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(browser):
    tabs = []

    def open_tab(**kwargs):
        t = Tab(browser, **kwargs)
        tabs.append(t)
        return t

    yield open_tab
    for t in tabs:
        t.close()


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def wait_live(page) -> None:
    """The page's event stream is open (htmx's SSE extension said so)."""
    page.wait_for_selector('#live-status[data-state="on"]')


def health(server) -> dict:
    status, _, body = server.request("GET", "/healthz")
    assert status == 200, body
    return json.loads(body)


# ----------------------------------------------------------------------------- data
def advance(conn, stages: list[str], owner: str = "w-test", result=None) -> int:
    """Claims and completes the queued tasks of these stages (one step of every variant)."""
    tasks = claim(conn, owner, stages=stages, limit=100)
    for task in tasks:
        assert complete(conn, task, owner, result(task) if result else None)
    return len(tasks)


def jpeg(colour=(30, 120, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (120, 120), colour).save(out, "JPEG")
    return out.getvalue()


VARIANT_STAGES = ["vlm_analyze", "yolo_detect", "planner", "overlay", "vlm_judge", "ocr_eval", "readability_eval",
                  "iou_eval"]


def failed_job(conn, tenant="acme", error="test: planted failure at overlay"):
    """A job whose variant 1 failed permanently at overlay (variant 2 stays at overlay, queued)."""
    job, vids = insert_job(conn, tenant=tenant, variants=2)
    for stage in ("vlm_analyze", "yolo_detect", "planner"):
        advance(conn, [stage])
    [task] = [t for t in claim(conn, "w-test", stages=["overlay"], limit=10) if str(t["job_variants_id"]) == vids[0]] or [None]
    assert task is not None
    assert fail(conn, task, "w-test", error=error, permanent=True) == "failed"
    conn.execute("UPDATE stage_tasks SET error_details = %s WHERE id = %s",
                 (json.dumps({"exception": "PermanentStageError", "hint": "a-very-long-detail-" + "z" * 300}), task["id"]))
    return job, vids, task["id"]  # variant 2's overlay stays running, held by w-test


# ----------------------------------------------------------------------------- pages
def test_overview_search_filters_and_workers(console, conn, tab):
    acme, _ = insert_job(conn, tenant="acme", variants=3)
    beta, _ = insert_job(conn, tenant="beta", variants=1)
    server = console()
    t = tab()
    page = t.page
    page.goto(server.base + "/")
    wait_live(page)
    assert page.locator('#stages tr[data-stage="vlm_analyze"] td.queued').inner_text() == "4"
    assert page.locator("#workers-alive .stat").inner_text() == "0"
    # Live: a claim and a completion move the counts without a reload.
    advance(conn, ["vlm_analyze"])
    # Locator assertions, not wait_for_function: the console's CSP forbids the eval that one uses.
    expect(page.locator('#stages tr[data-stage="yolo_detect"] td.queued')).to_have_text("4")
    assert page.locator("#hour-done").inner_text() == "4"
    assert t.navigations == 1

    # Search by a short id prefix: straight to that job's page.
    page.goto(server.base + "/jobs")
    page.fill("#q", beta[:8])
    page.click("form.filters button[type=submit]")
    page.wait_for_url(f"**/jobs/{beta}")
    assert beta in page.locator("#job-summary h1").inner_text()
    # `latest` too.
    page.goto(server.base + "/jobs?q=latest")
    page.wait_for_url(f"**/jobs/{beta}")
    # Filters, as the CLI's: by tenant, by state.
    page.goto(server.base + "/jobs?" + urlencode({"tenant": "acme"}))
    ids = page.locator("#jobs tbody tr[data-job-id]").evaluate_all("rows => rows.map(r => r.dataset.jobId)")
    assert ids == [acme]
    page.goto(server.base + "/jobs?status=done")
    assert page.locator("#jobs tbody tr[data-job-id]").count() == 0
    page.goto(server.base + "/jobs?since=bogus")
    assert "give a number and a unit" in page.locator("#search-error").inner_text()
    page.goto(server.base + "/jobs?q=zzzz")
    assert "job 'zzzz'" in page.locator("#search-error").inner_text()
    page.goto(server.base + "/workers")
    assert page.locator("#workers").is_visible()
    assert not t.errors, t.errors
    status, _, body = server.request("GET", "/jobs/00000000-0000-0000-0000-000000000000",
                                     headers={"host": f"127.0.0.1:{server.port}"})
    assert status == 404 and b"no job" in body


def test_jobs_are_paged(console, conn, tab):
    for _ in range(52):
        insert_job(conn, tenant="many", variants=1)
    server = console()
    page = tab().page
    page.goto(server.base + "/jobs?tenant=many")
    assert page.locator("#jobs tbody tr[data-job-id]").count() == 50
    page.click("#next-page")
    page.wait_for_url("**page=2")
    assert page.locator("#jobs tbody tr[data-job-id]").count() == 2


def test_job_page_follows_its_job_without_reload(console, conn, home, tab):
    job, vids = insert_job(conn, tenant="acme", variants=2)
    server = console()
    t = tab()
    page = t.page
    page.goto(server.base + f"/jobs/{job[:8]}")  # a prefix redirects to the full id
    page.wait_for_url(f"**/jobs/{job}")
    wait_live(page)
    page.evaluate("window.__sameDocument = 42")
    first = '#variant-1 tr[data-stage="vlm_analyze"]'
    assert page.locator(first).get_attribute("data-status") == "queued"

    first_task = conn.execute("SELECT id FROM stage_tasks WHERE job_variants_id = %s AND stage = 'vlm_analyze'",
                              (vids[0],)).fetchone()["id"]
    [task] = claim(conn, "w-browser", stages=["vlm_analyze"], limit=1, task_id=first_task)
    page.wait_for_selector(f'{first}[data-status="running"]')
    assert page.locator("#variant-1 .stages").inner_text().count("w-browser") == 1  # who holds it
    assert complete(conn, task, "w-browser")
    page.wait_for_selector(f'{first}[data-status="done"]')
    # Every stage of both variants, then the job stages with a post whose image is an artifact.
    store = open_store()
    post_key = artifact_key("acme", job, None, "instagram_feed_gen", 1, "post.jpg")
    store.put(post_key, jpeg())

    def result(task):
        if task["stage"] != "instagram_feed_gen":
            return None
        return {"artifacts": {"post.jpg": post_key}, "chosen_variant_id": vids[1], "caption": "Sale today #stayfresh",
                "ranking": [{"variant_id": vids[1], "rank": 1, "score": 0.9, "components": {"judge": 0.9}},
                            {"variant_id": vids[0], "rank": 2, "score": 0.5, "components": {"judge": 0.5}}]}

    while advance(conn, [*VARIANT_STAGES, "ad_copy_gen_kor", "instagram_feed_gen"], "w-browser", result):
        pass
    page.wait_for_selector('#job-summary[data-state="done"]')
    assert "Chosen: variant 2" in page.locator("#selection").inner_text()
    assert page.locator("#variant-2 .badge.chosen").count() == 1
    assert page.locator(".timeline .lane").count() == 3  # two variants and the job
    assert page.locator('#job-stages tr[data-stage="instagram_feed_gen"]').get_attribute("data-status") == "done"
    # The post preview loads through the download route, and the link downloads the same bytes.
    expect(page.locator("#instagram-preview img")).to_have_js_property("naturalWidth", 120)
    href = page.locator('#instagram-preview a[download]').get_attribute("href")
    assert page.request.get(server.base + href).body() == store.get(post_key)
    # Still the same document: it was never reloaded.
    assert page.evaluate("window.__sameDocument") == 42
    assert t.navigations == 1  # the prefix and its redirect: one navigation, none since
    assert int(page.locator("#live").get_attribute("data-updates")) >= 3
    assert not t.errors, t.errors
    # Leaving the page closes its stream on the server too.
    assert health(server)["streams"] == 1
    page.goto("about:blank")
    wait_until(lambda: health(server)["streams"] == 0, timeout=15, what="the stream closed")


def test_job_page_stays_live_across_a_lost_connection(console, conn, pg_server, db_url, tab):
    """The database drops every console connection: the listener reconnects, the page's stream
    carries on, and the next change still reaches the page without a reload."""
    job, vids = insert_job(conn, variants=1)
    server = console()
    t = tab()
    page = t.page
    page.goto(server.base + f"/jobs/{job}")
    wait_live(page)
    dbname = db_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_server.url, autocommit=True) as admin:
        killed = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                               "AND application_name = %s", (dbname, CONSOLE_APP)).fetchall()
    assert killed
    wait_until(lambda: server.output().count("LISTEN started") == 2, timeout=30, what="the listener back",
               detail=server.output)
    advance(conn, ["vlm_analyze"])
    page.wait_for_selector('#variant-1 tr[data-stage="vlm_analyze"][data-status="done"]')
    assert t.navigations == 1
    assert not t.errors, t.errors


def test_downloads_only_the_jobs_own_artifacts(console, conn, home):
    acme, _ = insert_job(conn, tenant="acme", variants=1)
    beta, _ = insert_job(conn, tenant="beta", variants=1)
    store = open_store()
    beta_key = artifact_key("beta", beta, None, "instagram_feed_gen", 1, "post.jpg")
    store.put(beta_key, b"beta's post")
    # acme's result names beta's artifact (a tampered row): the tenant check refuses it.
    conn.execute("INSERT INTO stage_tasks (job_id, stage, status, attempts, max_attempts) "
                 "VALUES (%s, 'instagram_feed_gen', 'done', 1, 3) RETURNING id", (acme,))
    task_id = conn.execute("SELECT id FROM stage_tasks WHERE job_id = %s AND stage = 'instagram_feed_gen'",
                           (acme,)).fetchone()["id"]
    conn.execute("INSERT INTO stage_results (task_id, job_id, stage, attempt, result) VALUES (%s, %s, %s, 1, %s)",
                 (task_id, acme, "instagram_feed_gen", json.dumps({"artifacts": {"post.jpg": beta_key}})))
    server = console()
    status, _, body = server.request("GET", f"/jobs/{acme}/artifact?" + urlencode({"key": beta_key}))
    assert status == 403 and b"tenant" in body
    # A key no result of the job names is not served, whoever's it is.
    status, _, _ = server.request("GET", f"/jobs/{beta}/artifact?" + urlencode({"key": beta_key}))
    assert status == 404


# ----------------------------------------------------------------------------- actions
def test_replay_and_cancel_through_their_confirmation_pages(console, conn, tab):
    job, vids, task_id = failed_job(conn)
    server = console()
    t = tab()
    page = t.page
    page.goto(server.base + "/failed")
    card = page.locator(f'section[data-task-id="{task_id}"]')
    assert "test: planted failure at overlay" in card.inner_text()
    assert "a-very-long-detail" in card.locator("details pre").text_content()
    card.get_by_text("Replay this task").click()
    page.wait_for_url("**/confirm/replay?task=*")
    assert "Replay 1 failed task?" in page.locator("#confirm h1").inner_text()
    # Nothing happened yet: the confirmation page only reads.
    assert conn.execute("SELECT status FROM stage_tasks WHERE id = %s", (task_id,)).fetchone()["status"] == "failed"
    page.click("#confirm-button")
    page.wait_for_url(f"**/jobs/{job}?did=replayed*")
    assert "Replayed 1 failed task" in page.locator("#flash").inner_text()
    row = conn.execute("SELECT status, attempts FROM stage_tasks WHERE id = %s", (task_id,)).fetchone()
    assert (row["status"], row["attempts"]) == ("queued", 0)
    wait_until(lambda: f"localhost replayed 1 failed task(s) (job any, stage any, task {task_id})" in server.output(),
               timeout=10, what="the replay logged", detail=server.output)

    page.click("#cancel-job")
    page.wait_for_url(f"**/confirm/cancel?job={job}")
    page.click("#confirm-button")
    page.wait_for_url(f"**/jobs/{job}?did=cancelled*")
    page.wait_for_selector('#job-summary[data-state="cancelled"]')
    assert conn.execute("SELECT status FROM jobs WHERE job_id = %s", (job,)).fetchone()["status"] == "cancelled"
    assert page.locator("#cancel-job").count() == 0  # a finished job offers no cancel
    wait_until(lambda: f"localhost cancelled job {job}" in server.output(), timeout=10, what="the cancel logged",
               detail=server.output)
    assert not t.errors, t.errors


def test_replay_of_a_stage_of_a_job(console, conn, tab):
    job, _, task_id = failed_job(conn)
    other, _, other_task = failed_job(conn, tenant="beta")
    server = console()
    page = tab().page
    page.goto(server.base + f"/confirm/replay?job={job}&stage=overlay")
    assert "Replay 1 failed task?" in page.locator("#confirm h1").inner_text()
    page.click("#confirm-button")
    page.wait_for_url(f"**/jobs/{job}?did=replayed*")
    states = {r["id"]: r["status"] for r in conn.execute("SELECT id, status FROM stage_tasks WHERE id = ANY (%s)",
                                                          ([task_id, other_task],))}
    assert states == {task_id: "queued", other_task: "failed"}  # only that job's stage
    # A whole job's failures, from its page.
    page.goto(server.base + f"/jobs/{other}")
    page.get_by_text("Replay the job's failed tasks").click()
    page.wait_for_url(f"**/confirm/replay?job={other}")
    page.click("#confirm-button")
    page.wait_for_url(f"**/jobs/{other}?did=replayed*")
    assert conn.execute("SELECT status FROM stage_tasks WHERE id = %s", (other_task,)).fetchone()["status"] == "queued"


# ----------------------------------------------------------------------------- refusals
def csrf_pair(server, headers: dict, path: str) -> tuple[str, str]:
    """A page's CSRF cookie and form field, as a browser would hold them."""
    status, got, body = server.request("GET", path, headers=headers)
    assert status == 200, body[:500]
    cookie = re.search(r"adflow_console_csrf=([^;]+)", got["set-cookie"]).group(1)
    field = re.search(rb'name="csrf" value="([0-9a-f]+)"', body).group(1).decode()
    return cookie, field


def post_form(server, path: str, fields: dict, headers: dict):
    return server.request("POST", path, body=urlencode(fields),
                          headers={"content-type": "application/x-www-form-urlencoded", **headers})


def test_public_address_without_a_token_is_refused(db_url, home):
    done = cli("console", "--addr", f"0.0.0.0:{free_port()}", env={"DATABASE_URL": db_url, "CONSOLE_TOKEN": ""})
    assert done.returncode == 2 and "CONSOLE_TOKEN" in done.stderr and "not a loopback address" in done.stderr
    weak = cli("console", "--addr", f"0.0.0.0:{free_port()}", env={"DATABASE_URL": db_url, "CONSOLE_TOKEN": "short"})
    assert weak.returncode == 2 and "shorter than 16 characters" in weak.stderr
    bad = cli("console", "--addr", "localhost", env={"DATABASE_URL": db_url})
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr


def test_token_login_and_cross_site_refusals(console, conn):
    job, _ = insert_job(conn, variants=1)
    server = console(env={"CONSOLE_TOKEN": TOKEN})
    host = {"host": f"127.0.0.1:{server.port}"}
    origin = {"origin": server.base, **host}
    bearer = {"authorization": f"Bearer {SECRET}", **host}
    # No token: refused (a browser is sent to the login form).
    assert server.request("GET", "/", headers=host)[0] == 401
    status, got, _ = server.request("GET", f"/jobs/{job}", headers={"accept": "text/html", **host})
    assert status == 303 and got["location"].startswith("/login?next=")
    assert server.request("GET", "/", headers={"authorization": "Bearer wrong-token-of-some-length", **host})[0] == 401
    assert server.request("GET", "/events", headers=host)[0] == 401
    assert server.request("GET", "/healthz", headers=host)[0] == 200  # probes need none
    assert server.request("GET", "/", headers=bearer)[0] == 200

    # The login form: a wrong token is refused; the right one sets a session cookie.
    cookie, field = csrf_pair(server, host, "/login")
    jar = {"cookie": f"adflow_console_csrf={cookie}", **origin}
    assert post_form(server, "/login", {"csrf": field, "token": "not-the-token-at-all", "next": "/"}, jar)[0] == 401
    status, got, _ = post_form(server, "/login", {"csrf": field, "token": SECRET, "next": "//evil.example/"}, jar)
    assert status == 303 and got["location"] == "/"  # never an open redirect
    session = re.search(r"adflow_console_session=([^;]+)", got["set-cookie"]).group(1)
    assert SECRET not in session and session.startswith("ops.")
    logged_in = {"cookie": f"adflow_console_session={session}", **host}
    assert server.request("GET", "/", headers=logged_in)[0] == 200

    # Actions: the Origin must be the console's, and the CSRF token must match.
    cookie, field = csrf_pair(server, logged_in, f"/confirm/cancel?job={job}")
    both = {"cookie": f"adflow_console_session={session}; adflow_console_csrf={cookie}", **host}
    fields = {"csrf": field, "job": job}
    assert post_form(server, "/actions/cancel", fields, {**both, "origin": "https://evil.example"})[0] == 403
    assert post_form(server, "/actions/cancel", fields, both)[0] == 403  # no Origin, no Referer
    assert post_form(server, "/actions/cancel", fields, {**both, "origin": server.base,
                                                           "sec-fetch-site": "cross-site"})[0] == 403
    assert post_form(server, "/actions/cancel", {**fields, "csrf": "0" * 64}, {**both, "origin": server.base})[0] == 403
    assert conn.execute("SELECT status FROM jobs WHERE job_id = %s", (job,)).fetchone()["status"] != "cancelled"
    status, got, _ = post_form(server, "/actions/cancel", fields, {**both, "referer": server.base + f"/jobs/{job}"})
    assert status == 303, got
    assert conn.execute("SELECT status FROM jobs WHERE job_id = %s", (job,)).fetchone()["status"] == "cancelled"
    wait_until(lambda: f"ops cancelled job {job}" in server.output(), timeout=10, what="logged with the token's name",
               detail=server.output)
    assert "cross-site POST /actions/cancel refused" in server.output()


def test_localhost_console_refuses_other_host_names(console, conn):
    server = console()
    assert server.request("GET", "/", headers={"host": f"127.0.0.1:{server.port}"})[0] == 200
    assert server.request("GET", "/", headers={"host": f"localhost:{server.port}"})[0] == 200
    # A domain pointed at 127.0.0.1 (DNS rebinding) reaches the socket but not the console.
    assert server.request("GET", "/", headers={"host": f"rebind.evil.example:{server.port}"})[0] == 421


def test_read_only_hides_and_refuses_actions(console, conn):
    job, _, task_id = failed_job(conn)
    conn.execute("UPDATE job_inputs SET ad_copy = %s WHERE job_id = %s", ('<b onmouseover="x()">Sale</b>', job))
    server = console("--read-only")
    host = {"host": f"127.0.0.1:{server.port}"}
    status, _, body = server.request("GET", f"/jobs/{job}", headers=host)
    assert status == 200 and b"read-only" in body
    assert b"&lt;b onmouseover=&#34;x()&#34;&gt;Sale&lt;/b&gt;" in body and b"<b onmouseover" not in body  # escaped
    assert b"/confirm/" not in body and b'id="cancel-job"' not in body
    assert b"/confirm/" not in server.request("GET", "/failed", headers=host)[2]
    assert server.request("GET", f"/confirm/cancel?job={job}", headers=host)[0] == 403
    # Refused as read-only before the form is even read (no page offers one to take a token from).
    jar = {"cookie": "adflow_console_csrf=n", "origin": server.base, **host}
    for path, fields in (("/actions/cancel", {"job": job}), ("/actions/replay", {"task": str(task_id)})):
        status, _, body = post_form(server, path, {"csrf": "x", **fields}, jar)
        assert status == 403 and b"read-only" in body, (path, status, body)
    assert conn.execute("SELECT status FROM jobs WHERE job_id = %s", (job,)).fetchone()["status"] != "cancelled"
    assert conn.execute("SELECT status FROM stage_tasks WHERE id = %s", (task_id,)).fetchone()["status"] == "failed"


# ----------------------------------------------------------------------------- phone width
def test_every_page_fits_375_px(console, conn, home, tab, tmp_path):
    job, vids, task_id = failed_job(conn, error="a long error line " * 20 + "x" * 200)
    server = console()
    t = tab(width=375, height=800)
    page = t.page
    pages = ["/", "/jobs", f"/jobs/{job}", "/workers", "/failed", f"/confirm/replay?job={job}",
             f"/confirm/cancel?job={job}"]
    for path in pages:
        page.goto(server.base + path)
        page.wait_for_load_state("load")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, (path, width)
    guarded = console(env={"CONSOLE_TOKEN": TOKEN})
    page.goto(guarded.base + "/jobs")  # sent to the login form
    page.wait_for_url("**/login?next=*")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.fill("#token", SECRET)
    page.click("#login button[type=submit]")
    page.wait_for_url(guarded.base + "/jobs")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.goto(server.base + f"/jobs/{job}")
    shot = tmp_path / "job-375.png"
    page.screenshot(path=str(shot), full_page=True)
    with Image.open(shot) as image:
        assert image.width == 375
    assert not t.errors, t.errors


# ----------------------------------------------------------------------------- idleness
def console_backends(admin, dbname: str, skip_pid: int) -> list[tuple]:
    return sorted((r["pid"], r["application_name"], r["state_change"], r["xact_start"]) for r in admin.execute(
        "SELECT pid, application_name, state_change, xact_start FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid() AND pid <> %s", (dbname, skip_pid)))


def test_idle_console_sends_no_queries(console, conn, pg_server, db_url):
    server = console()
    # A page was read, so the pool holds a connection; then no browser is open.
    assert server.request("GET", "/", headers={"host": f"127.0.0.1:{server.port}"})[0] == 200
    time.sleep(1.0)
    dbname = db_url.rsplit("/", 1)[1]
    own = conn.execute("SELECT pg_backend_pid() AS pid").fetchone()["pid"]
    with psycopg.connect(pg_server.url, autocommit=True, row_factory=psycopg.rows.dict_row) as admin:
        before = console_backends(admin, dbname, own)
        # The pipeline moves meanwhile: the console hears it but, with no page open, reads nothing.
        insert_job(conn, variants=2)
        advance(conn, ["vlm_analyze"])
        time.sleep(3.0)
        after = console_backends(admin, dbname, own)
    assert {name for _, name, _, _ in before} == {CONSOLE_APP}
    assert len(before) == 2  # the listening connection and one pooled connection
    assert before == after  # neither ran a statement in those 3 s
    assert health(server)["listening"] is True and health(server)["streams"] == 0


# ----------------------------------------------------------------------------- Kubernetes
def test_the_kubernetes_component_serves_its_probes(db_url, home, tmp_path):
    """deploy/k8s/components/console, as every overlay renders it: the Service reaches the pod's
    port, the probes name the port the command binds, the token comes from a Secret, and a console
    started with the manifest's own arguments answers each probe without a token."""
    from tests.deploy.kustomize import render

    overlays = sorted(p for p in (ROOT / "deploy" / "k8s" / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
    assert overlays
    for overlay in overlays:
        resources = render(overlay)
        [deployment] = [r for r in resources if r["kind"] == "Deployment" and r["metadata"]["name"] == "console"]
        [service] = [r for r in resources if r["kind"] == "Service" and r["metadata"]["name"] == "adflow-console"]
        pod = deployment["spec"]["template"]
        [container] = pod["spec"]["containers"]
        argv = container["command"]
        assert argv[:3] == ["python", "cli.py", "console"], argv
        host, port = argv[argv.index("--addr") + 1].rsplit(":", 1)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
        probes = {name: container[name]["httpGet"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
        assert all(ports[get["port"]] == int(port) for get in probes.values())
        assert probes["livenessProbe"]["path"] == "/healthz" and probes["readinessProbe"]["path"] == "/readyz"
        env = {e["name"]: e for e in container["env"]}
        token = env["CONSOLE_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert host == "0.0.0.0" and token["name"] == "adflow-console" and not token.get("optional")

    args = argv[3:]
    at = args.index("--addr")
    del args[at:at + 2]  # ConsoleProcess binds a free port on 127.0.0.1 instead
    server = ConsoleProcess(db_url, tmp_path / "k8s.log", *args, env={"CONSOLE_TOKEN": TOKEN})
    try:
        for get in probes.values():
            status, _, body = server.request("GET", get["path"], headers={"host": f"10.1.2.3:{port}"})
            assert status == 200, (get, body)
        assert server.request("GET", "/", headers={"host": f"10.1.2.3:{port}"})[0] == 401
    finally:
        assert server.stop() == 0, server.output()


# ----------------------------------------------------------------------------- units
def test_token_rules():
    from console.web.security import Access, parse_tokens
    from outbox.config import ConfigError

    assert parse_tokens("alice:" + "a" * 16 + ", bob:" + "b" * 20) == {"alice": "a" * 16, "bob": "b" * 20}
    assert parse_tokens("c" * 16) == {"token": "c" * 16}
    with pytest.raises(ConfigError, match="given twice"):
        parse_tokens(f"a:{'x' * 16},a:{'y' * 16}")
    with pytest.raises(ConfigError, match="token name"):
        parse_tokens(f"a b:{'x' * 16}")
    assert Access.configure("127.0.0.1", token_value="").open_locally
    assert Access.configure("::1", token_value="").open_locally
    with pytest.raises(ConfigError, match="not a loopback"):
        Access.configure("10.0.0.5", token_value="")
    access = Access.configure("0.0.0.0", token_value=TOKEN)
    assert access.identify({"authorization": f"Bearer {SECRET}"}, {}) == "ops"
    assert access.identify({}, {"adflow_console_session": access.session_value("ops")}) == "ops"
    assert access.identify({}, {"adflow_console_session": "ops." + "0" * 64}) is None


def test_the_job_page_lists_every_attempt_with_its_worker_and_error(console, conn, tab):
    job, vids = insert_job(conn, variants=1)
    [task] = claim(conn, "w-first", stages=["vlm_analyze"])
    assert fail(conn, task, "w-first", error="CUDA out of memory (planted)") == "retry"
    conn.execute("UPDATE stage_tasks SET run_after = now() WHERE id = %s", (task["id"],))
    [again] = claim(conn, "w-second", stages=["vlm_analyze"])
    assert fail(conn, again, "w-second", error="weights corrupt (planted)", permanent=True) == "failed"
    server = console()
    t = tab()
    t.page.goto(server.base + f"/jobs/{job}")
    rows = t.page.locator(f'#attempts [data-task-id="{task["id"]}"] tr[data-attempt]')
    assert rows.count() == 2
    first, second = rows.nth(0).inner_text(), rows.nth(1).inner_text()
    assert "retry" in first and "w-first" in first and "CUDA out of memory (planted)" in first
    assert "failed" in second and "w-second" in second and "weights corrupt (planted)" in second
    assert not t.errors, t.errors
