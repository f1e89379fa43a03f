"""The console's ASGI application (Starlette, rendered with Jinja2, served by uvicorn).

Pages read through outbox/views.py and the other outbox modules, on a small connection pool that
opens no connection until a page needs one; the live parts of each page re-read themselves (htmx)
when the server's one listening connection (live.py) hears a change and tells the page through
Server-Sent Events. Actions (replay, cancel) are POSTs behind a confirmation page, a CSRF token and
an Origin check (security.py), and each is logged with who did it.
"""
from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import re
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlencode

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from console.web import live
from console.web.jobview import JobView, job_keys
from console.web.security import (CSRF_COOKIE, CSRF_FIELD, LOCAL_IDENTITY, SESSION_COOKIE, Access, new_nonce)
from outbox import config, db, views
from outbox.artifacts import ArtifactError, ArtifactNotFound, open_store
from outbox.jobs import InvalidInput, NotFound, cancel_job, validate_uuid
from outbox.queue import replay_failed
from outbox.report import asset_reader, gather

log = logging.getLogger("console")

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50
FAILED_PAGE = 100
# Every backend the console opens says so (pg_stat_activity, and outbox.views.list_workers, which
# matches workers by application_name, does not mistake it for one).
APPLICATION_NAME = "adflow-console"
# SSE: a comment this often keeps proxies from closing a quiet stream (no query is involved).
# Changes are sent at most once per interval per stream, so a busy pipeline costs each open page
# one re-read per interval, not one per notification: a job page hears only its job and re-reads
# little; the other pages hear every change and re-read counts over the whole task table.
KEEPALIVE_S = 20.0
JOB_INTERVAL_S = 0.4
GLOBAL_INTERVAL_S = 2.0
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                                 b"script-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; "
                                 b"base-uri 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
]
OPEN_PATHS = ("/healthz", "/readyz", "/login", "/static/")
INLINE_TYPES = {"image/png", "image/jpeg", "image/webp", "image/gif"}


# ----------------------------------------------------------------------------- access guard
class Guard:
    """ASGI middleware: security headers on every answer; the Host check and the token on every
    request but the probes, the login page and the static files; an Origin check on every POST."""

    def __init__(self, app, access: Access):
        self.app = app
        self.access = access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *SECURITY_HEADERS]
            await send(message)

        request = Request(scope)
        path = scope["path"]
        probe = path in ("/healthz", "/readyz")
        if not probe and not self.access.host_allowed(request.headers):
            return await PlainTextResponse("this console answers only to localhost (Host refused)",
                                           status_code=421)(scope, receive, send_with_headers)
        who = self.access.identify(request.headers, request.cookies)
        scope.setdefault("state", {})["who"] = who
        if who is None and not path.startswith(OPEN_PATHS):
            if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                target = "/login?" + urlencode({"next": path + (f"?{scope['query_string'].decode()}" if scope["query_string"] else "")})
                response = RedirectResponse(target, status_code=303)
            else:
                response = PlainTextResponse("a console token is needed (Authorization: Bearer ..., or log in)",
                                             status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send_with_headers)
        if request.method not in ("GET", "HEAD") and not self.access.same_origin(request.headers):
            log.warning("[CONSOLE] cross-site %s %s refused (Origin %r, Host %r)", request.method, path,
                        request.headers.get("origin"), request.headers.get("host"))
            return await PlainTextResponse("cross-site request refused: this form must be sent from the console itself",
                                           status_code=403)(scope, receive, send_with_headers)
        await self.app(scope, receive, send_with_headers)


# ----------------------------------------------------------------------------- helpers
def who(request: Request) -> str:
    return request.state.who


def csrf_nonce(request: Request) -> tuple[str, bool]:
    nonce = request.cookies.get(CSRF_COOKIE)
    return (nonce, False) if nonce else (new_nonce(), True)


def render(request: Request, template: str, context: dict, partial: str | None = None, status: int = 200) -> Response:
    """A page, or only its live part when htmx asks for it (HX-Request)."""
    access: Access = request.app.state.access
    nonce, fresh = csrf_nonce(request)
    identity = request.state.who or ""
    name = partial if partial and request.headers.get("hx-request") else template
    response = request.app.state.templates.TemplateResponse(request, name, {
        **context, "who": request.state.who, "read_only": access.read_only, "needs_token": not access.open_locally,
        "csrf_field": CSRF_FIELD, "csrf": access.csrf_for(nonce, identity),
    }, status_code=status)
    response.headers["cache-control"] = "no-store"
    if fresh:
        response.set_cookie(CSRF_COOKIE, nonce, httponly=True, samesite="lax", path="/",
                            secure=request.url.scheme == "https")
    return response


def connection(request: Request):
    return request.app.state.pool.connection()


def since_seconds(value: str | None) -> float | None:
    if not value:
        return None
    return views.parse_age(value).total_seconds()


def optional(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def page_number(value: str | None) -> int:
    try:
        page = int(value or 1)
    except ValueError:
        raise InvalidInput(f"page {value!r}: give a number") from None
    if page < 1:
        raise InvalidInput(f"page {page}: give 1 or more")
    return page


def task_number(value: str | None) -> int | None:
    if not optional(value):
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(f"task {value!r}: give a task id (a number)") from None


def checked_stage(conn, stage: str | None) -> str | None:
    if stage is not None and stage not in views.steps(conn):
        raise InvalidInput(f"unknown stage {stage!r}")
    return stage


# ----------------------------------------------------------------------------- pages
def overview_page(request: Request) -> Response:
    with connection(request) as conn:
        data = views.overview(conn)
        hour = views.last_hour(conn)
        workers = views.list_workers(conn)
    for stage in data["stages"]:
        counts = hour.get(stage["stage"], {})
        stage["hour_done"], stage["hour_failed"] = counts.get("done", 0), counts.get("failed", 0)
    alive = [w for w in workers if w["alive"]]
    return render(request, "overview.html", {
        "nav": "overview", "data": data, "alive": alive, "workers": workers,
        "hour_done": sum(s["hour_done"] for s in data["stages"]),
        "hour_failed": sum(s["hour_failed"] for s in data["stages"]),
        "live_url": "/", "events": "/events",
    }, partial="_overview.html")


def jobs_page(request: Request) -> Response:
    q = request.query_params
    filters = {"tenant": optional(q.get("tenant")), "status": optional(q.get("status")),
               "stage": optional(q.get("stage")), "since": optional(q.get("since"))}
    search = optional(q.get("q"))
    page = page_number(q.get("page"))
    error = None
    with connection(request) as conn:
        if search:
            try:
                job_id = views.resolve_job(conn, search, tenant=filters["tenant"])
                return RedirectResponse(f"/jobs/{job_id}", status_code=303)
            except (InvalidInput, NotFound, views.AmbiguousJob) as exc:
                error = str(exc)
        try:
            rows = views.list_jobs(conn, tenant=filters["tenant"], status=filters["status"], stage=filters["stage"],
                                   since_s=since_seconds(filters["since"]), limit=PAGE_SIZE + 1,
                                   offset=(page - 1) * PAGE_SIZE)
        except InvalidInput as exc:
            rows, error = [], str(exc)
        steps = views.steps(conn)
    kept = {k: v for k, v in filters.items() if v}
    return render(request, "jobs.html", {
        "nav": "jobs", "rows": rows[:PAGE_SIZE], "filters": filters, "search": search or "", "error": error,
        "page": page, "has_next": len(rows) > PAGE_SIZE, "states": views.JOB_STATES, "steps": steps,
        "prev_url": "/jobs?" + urlencode({**kept, "page": page - 1}) if page > 1 else None,
        "next_url": "/jobs?" + urlencode({**kept, "page": page + 1}),
        "live_url": "/jobs?" + urlencode({**kept, "page": page}), "events": "/events",
    }, partial="_jobs.html")  # a refused filter is shown beside the form, on a page that still works


def job_page(request: Request) -> Response:
    ref = request.path_params["ref"]
    with connection(request) as conn:
        job_id = views.resolve_job(conn, ref)
        if job_id != ref:  # a prefix or `latest`: the page follows one job, by its full id
            return RedirectResponse(f"/jobs/{job_id}", status_code=303)
        summary = views.job_summary(conn, job_id)
        data = gather(conn, job_id)
    view = JobView(data, summary)
    did = request.query_params.get("did")
    return render(request, "job.html", {
        "nav": "jobs", "v": view, "job": data["job"], "did": did if did in ("replayed", "cancelled", "nothing") else None,
        "n": task_number(request.query_params.get("n")) if did else None,
        "live_url": f"/jobs/{job_id}", "events": f"/events?job={job_id}",
    }, partial="_job.html")


def artifact(request: Request) -> Response:
    """One artifact or input image of a job, only if the job's results name it, read with the
    tenant check (outbox.artifacts.read_asset under the job's tenant)."""
    job_id = validate_uuid(request.path_params["job_id"], "job id")
    key = request.query_params.get("key", "")
    with connection(request) as conn:
        data = gather(conn, job_id)
    if key not in job_keys(data):
        raise HTTPException(404, "this job names no such artifact")
    read = asset_reader(request.app.state.store, config.asset_root(), data["job"]["tenant_id"])
    try:
        body = read(key)
    except ArtifactNotFound:
        raise HTTPException(404, "the artifact is gone (pruned, or never written)") from None
    except ArtifactError as exc:
        log.warning("[CONSOLE] artifact %r of job %s refused: %s", key, job_id, exc)
        raise HTTPException(403, f"refused: {exc}") from None
    name = key.rsplit("/", 1)[-1].rsplit(":", 1)[-1] or "artifact"
    mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
    # Inline only for raster images: an SVG or HTML artifact shown on the console's origin could
    # run script; everything else is a download, in a sandbox should a browser render it anyway.
    disposition = "inline" if request.query_params.get("inline") and mime in INLINE_TYPES else "attachment"
    return Response(body, media_type=mime, headers={
        "content-disposition": f'{disposition}; filename="{re.sub(r"[^A-Za-z0-9._-]", "_", name)}"',
        "cache-control": "private, max-age=3600", "content-security-policy": "sandbox",
    })


def workers_page(request: Request) -> Response:
    with connection(request) as conn:
        workers = views.list_workers(conn)
    return render(request, "workers.html", {"nav": "workers", "workers": workers, "live_url": "/workers",
                                            "events": "/events"}, partial="_workers.html")


def failed_page(request: Request) -> Response:
    tenant = optional(request.query_params.get("tenant"))
    error = None
    with connection(request) as conn:
        try:
            rows = views.failed_tasks(conn, tenant=tenant, limit=FAILED_PAGE)
        except InvalidInput as exc:
            rows, error = [], str(exc)
    for row in rows:
        details = row.get("error_details")
        row["details"] = json.dumps(details, indent=2, ensure_ascii=False, default=str) if details else None
    query = urlencode({"tenant": tenant}) if tenant else ""
    return render(request, "failed.html", {"nav": "failed", "rows": rows, "tenant": tenant or "", "error": error,
                                           "live_url": "/failed" + (f"?{query}" if query else ""), "events": "/events"},
                  partial="_failed.html")


# ----------------------------------------------------------------------------- actions
def action_target(conn, params) -> dict:
    target = {"job": optional(params.get("job")), "stage": optional(params.get("stage")),
              "task": task_number(params.get("task"))}
    if target["job"]:
        target["job"] = validate_uuid(target["job"], "job id")
    checked_stage(conn, target["stage"])
    if not target["job"] and target["task"] is None:
        raise InvalidInput("name a job or a task")
    return target


def refuse_if_read_only(request: Request) -> None:
    if request.app.state.access.read_only:
        raise HTTPException(403, "this console is read-only (--read-only): actions are switched off")


def confirm_page(request: Request) -> Response:
    """What an action would do, and the form that does it."""
    refuse_if_read_only(request)
    action = request.path_params["action"]
    with connection(request) as conn:
        target = action_target(conn, request.query_params)
        if action == "replay":
            tasks = replay_failed(conn, job_id=target["job"], stage=target["stage"], task_id=target["task"],
                                  dry_run=True)
            summary = None
        else:
            if not target["job"]:
                raise InvalidInput("cancel needs a job")
            tasks, summary = [], views.job_summary(conn, target["job"])
    return render(request, "confirm.html", {"nav": None, "action": action, "target": target, "tasks": tasks,
                                            "summary": summary})


async def form_of(request: Request) -> dict:
    """The action's form, once its CSRF token matches this browser's cookie and identity."""
    form = await request.form()
    if not request.app.state.access.csrf_valid(request.cookies, form.get(CSRF_FIELD), request.state.who or ""):
        log.warning("[CONSOLE] %s %s refused: missing or wrong CSRF token (by %s)", request.method,
                    request.url.path, request.state.who)
        raise HTTPException(403, "the form's CSRF token is missing or stale: reload the page and try again")
    return dict(form)


def back_to(target: dict, job_id: str | None, did: str, n: int) -> str:
    return (f"/jobs/{job_id}?" if job_id else "/failed?") + urlencode({"did": did, "n": n})


async def replay_action(request: Request) -> Response:
    refuse_if_read_only(request)
    form = await form_of(request)

    def run():
        with connection(request) as conn:
            target = action_target(conn, form)
            return target, replay_failed(conn, job_id=target["job"], stage=target["stage"], task_id=target["task"])

    target, rows = await run_in_threadpool(run)
    job_id = target["job"] or (str(rows[0]["job_id"]) if rows else None)
    log.info("[CONSOLE] %s replayed %d failed task(s) (job %s, stage %s, task %s): %s", who(request), len(rows),
             target["job"] or "any", target["stage"] or "any", target["task"] or "any",
             ", ".join(str(r["id"]) for r in rows) or "none")
    return RedirectResponse(back_to(target, job_id, "replayed" if rows else "nothing", len(rows)), status_code=303)


async def cancel_action(request: Request) -> Response:
    refuse_if_read_only(request)
    form = await form_of(request)
    job_id = validate_uuid(form.get("job") or "", "job id")
    done = await run_in_threadpool(lambda: _cancel(request, job_id))
    log.info("[CONSOLE] %s cancelled job %s (%d task(s) ended%s)", who(request), job_id, done.tasks,
             "; it was already cancelled" if done.already else "")
    return RedirectResponse(back_to({}, job_id, "cancelled" if not done.already else "nothing", done.tasks),
                            status_code=303)


def _cancel(request: Request, job_id: str):
    with connection(request) as conn:
        return cancel_job(conn, job_id)


# ----------------------------------------------------------------------------- login
def safe_next(value: str | None) -> str:
    """Only a path of this console: never another site (an open redirect)."""
    value = value or "/"
    return value if value.startswith("/") and not value.startswith("//") and "\\" not in value else "/"


async def login(request: Request) -> Response:
    access: Access = request.app.state.access
    if access.open_locally:
        return RedirectResponse("/", status_code=303)
    if request.method == "GET":
        return render(request, "login.html", {"nav": None, "next": safe_next(request.query_params.get("next")),
                                              "error": None})
    form = await form_of(request)
    name = access.check_secret(str(form.get("token", "")))
    if name is None:
        log.warning("[CONSOLE] login refused: wrong token (from %s)", request.client.host if request.client else "?")
        return render(request, "login.html", {"nav": None, "next": safe_next(form.get("next")),
                                              "error": "That token is not valid."}, status=401)
    log.info("[CONSOLE] %s logged in", name)
    response = RedirectResponse(safe_next(form.get("next")), status_code=303)
    response.set_cookie(SESSION_COOKIE, access.session_value(name), httponly=True, samesite="lax", path="/",
                        secure=request.url.scheme == "https")
    # A new identity: the CSRF token is bound to it, so the old nonce goes.
    response.delete_cookie(CSRF_COOKIE, path="/")
    return response


async def logout(request: Request) -> Response:
    await form_of(request)
    response = RedirectResponse("/login" if request.state.who != LOCAL_IDENTITY else "/", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    response.delete_cookie(CSRF_COOKIE, path="/")
    return response


# ----------------------------------------------------------------------------- live and health
async def events(request: Request) -> Response:
    """Server-Sent Events: `change` when something the page shows may have changed. The stream
    carries no data worth keeping; the page re-reads its live part."""
    job = request.query_params.get("job")
    job_id = validate_uuid(job, "job id") if job else None
    hub: live.Hub = request.app.state.hub
    resumed = "last-event-id" in request.headers  # a reconnect: it may have missed changes
    interval = JOB_INTERVAL_S if job_id else GLOBAL_INTERVAL_S
    loop = asyncio.get_running_loop()

    async def stream():
        sent, last = 0, float("-inf")
        # Subscribed inside the stream, so that whatever ends it (the browser leaving, a stop)
        # also unsubscribes it.
        sub = hub.subscribe(job_id)
        try:
            yield "retry: 2000\n\n"
            if resumed:
                sent += 1
                yield f"id: {sent}\nevent: change\ndata: {{\"resync\": true}}\n\n"
            else:
                yield f"id: {sent}\nevent: hello\ndata: {{}}\n\n"
            while True:
                try:
                    change = await asyncio.wait_for(sub.queue.get(), timeout=KEEPALIVE_S)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                # Let a burst (one commit's notifications) settle, and keep to the interval.
                await asyncio.sleep(max(JOB_INTERVAL_S, last + interval - loop.time()))
                resync = change.resync
                while not sub.queue.empty():
                    resync = sub.queue.get_nowait().resync or resync
                sent, last = sent + 1, loop.time()
                yield f"id: {sent}\nevent: change\ndata: {json.dumps({'job_id': change.job_id, 'resync': resync})}\n\n"
        finally:
            hub.unsubscribe(sub)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})


async def healthz(request: Request) -> Response:
    """Liveness: the process answers. Sends no query (a probe must not make an idle console busy)."""
    hub: live.Hub = request.app.state.hub
    return JSONResponse({"ok": True, "listening": hub.connected, "streams": len(hub.subscribers)})


async def readyz(request: Request) -> Response:
    """Readiness: the listening connection is up, so pages will be live."""
    hub: live.Hub = request.app.state.hub
    return JSONResponse({"ready": hub.connected}, status_code=200 if hub.connected else 503)


# ----------------------------------------------------------------------------- errors
async def error_page(request: Request, exc: Exception) -> Response:
    if isinstance(exc, HTTPException):
        status, message = exc.status_code, exc.detail
    elif isinstance(exc, (NotFound,)):
        status, message = 404, str(exc)
    elif isinstance(exc, (InvalidInput, views.AmbiguousJob)):
        status, message = 400, str(exc)
    else:  # the database went away, or the pool had no connection in time
        status, message = 503, f"the database is unavailable: {type(exc).__name__}: {str(exc).strip()[:300]}"
        log.warning("[CONSOLE] %s %s: %s", request.method, request.url.path, message)
    if request.url.path.startswith("/events") or request.state.who is None:
        return PlainTextResponse(message, status_code=status)
    return render(request, "error.html", {"nav": None, "status": status, "message": message}, status=status)


# ----------------------------------------------------------------------------- the app
def create_app(url: str, access: Access, store=None) -> Starlette:
    pool = ConnectionPool(url, min_size=0, max_size=4, open=False, timeout=10.0, name="console",
                          kwargs={**db.POOL_KWARGS, "application_name": APPLICATION_NAME, "connect_timeout": 10},
                          check=ConnectionPool.check_connection)
    hub = live.Hub(config.listen_database_url(url), application_name=APPLICATION_NAME)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["age"] = format_age
    templates.env.filters["when"] = format_when
    templates.env.filters["short"] = lambda value, n=8: str(value or "")[:n]

    @asynccontextmanager
    async def lifespan(app):
        pool.open()
        hub.start()
        try:
            yield
        finally:
            await hub.stop()
            pool.close()

    routes = [
        Route("/", overview_page),
        Route("/jobs", jobs_page),
        Route("/jobs/{ref}", job_page),
        Route("/jobs/{job_id}/artifact", artifact),
        Route("/workers", workers_page),
        Route("/failed", failed_page),
        Route("/confirm/{action:str}", confirm_page),
        Route("/actions/replay", replay_action, methods=["POST"]),
        Route("/actions/cancel", cancel_action, methods=["POST"]),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/events", events),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    handlers = {HTTPException: error_page, NotFound: error_page, InvalidInput: error_page,
                views.AmbiguousJob: error_page, psycopg.OperationalError: error_page, PoolTimeout: error_page,
                db.DatabaseUnavailable: error_page}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.pool, app.state.hub, app.state.access = pool, hub, access
    app.state.store = store if store is not None else open_store(url)
    app.state.templates = templates
    app.add_middleware(Guard, access=access)
    return app


def format_age(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"
