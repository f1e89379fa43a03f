"""`workers start`: the worker process command (also `cli.py workers start`)."""
from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from typing import Optional

import typer

from outbox import config, db
from outbox.artifacts import open_store
from outbox.errors import describe_error

app = typer.Typer(help="Run pipeline workers.", no_args_is_help=True, add_completion=False)
log = logging.getLogger("workers")
DEFAULT_REGISTRY = "stages.registry:build_registry"


def load_registry(spec: str, profile: str | None, device: str) -> dict:
    """`module:function`: the function builds the stage registry for a model profile and device."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise typer.BadParameter(f"--registry {spec!r}: expected module:function")
    module = importlib.import_module(module_name)
    describe = getattr(module, "describe_profile", None)
    if describe:
        line = describe(profile)
        (log.warning if "RANDOM" in line.upper() else log.info)("models: %s", line)
    return getattr(module, attr)(profile=profile, device=device)


@app.callback()
def main() -> None:
    """Pipeline workers."""


def child_argv(ctx, **resolved: object) -> list[str]:
    """The `start` command line of a supervised child: every option the parent was given, read
    from the command's own declaration (so an option added later cannot be left out), except
    --processes, with `resolved` values (e.g. the health address) in place of the given ones."""
    argv = [ctx.info_name or "start"]
    for param in ctx.command.params:
        # By its kind, not isinstance: typer ships its own copy of click's classes.
        if param.param_type_name != "option" or param.name == "processes":
            continue
        value = resolved.get(param.name, ctx.params.get(param.name))
        if value is None:
            continue
        if param.is_flag:
            if value:
                argv.append(param.opts[0])
            elif param.secondary_opts:
                argv.append(param.secondary_opts[0])
            continue
        argv += [param.opts[0], str(value)]
    return argv


@app.command()
def start(
    ctx: typer.Context,
    processes: int = typer.Option(1, min=1, max=64, help="Worker processes under one supervisor."),
    concurrency: Optional[int] = typer.Option(None, min=1, max=256,
                                              help="Tasks in flight per process (default 8; with --gpu, the largest "
                                                   "batch of its GPU stages, so a claim can fill a batch)."),
    stages: Optional[str] = typer.Option(None, help="Comma-separated stages to claim (default: all the registry has)."),
    gpu: bool = typer.Option(False, "--gpu", help="Place GPU stages' models on CUDA (fails if CUDA is absent)."),
    models: Optional[str] = typer.Option(None, help="Model profile: real or tiny (default MODEL_PROFILE, else real)."),
    registry: str = typer.Option(os.environ.get("STAGE_REGISTRY", DEFAULT_REGISTRY),
                                 help="module:function that builds the stage registry."),
    lease: float = typer.Option(30.0, min=1.0, help="Lease seconds; heartbeats renew it every third."),
    grace: float = typer.Option(30.0, min=0.0, help="Seconds to finish in-flight tasks after SIGTERM."),
    retry_base: float = typer.Option(2.0, min=0.0, help="First retry delay in seconds; doubles per attempt, with jitter."),
    retry_max: float = typer.Option(300.0, min=0.0, help="Longest retry delay in seconds."),
    health_addr: Optional[str] = typer.Option(
        None, "--health-addr", help="HOST:PORT for GET /healthz, /readyz, /metrics (default HEALTH_ADDR, else "
        "127.0.0.1:8080; '' turns them off). With --processes N, process i serves on PORT+i."),
) -> None:
    """Start worker process(es): LISTEN, claim with SKIP LOCKED, run stages, commit results."""
    from workers.logs import setup_logging
    from workers.worker import Worker, WorkerSettings, new_worker_id

    worker_id = new_worker_id()
    setup_logging(worker_id if processes == 1 else "supervisor")
    try:
        url = db.resolve_url()
        listen_url = config.listen_database_url(url)
        delay = config.reconnect_delay()
        db_timeout, liveness = config.db_timeout(), config.liveness_interval()
        enabled = config.listener_enabled()
    except (config.ConfigError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2)
    stage_list = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    from workers import health

    try:
        health_addr = health.offset_addr(health.resolve_addr(health_addr), int(os.environ.get(health.SLOT_ENV) or 0))
    except (health.AddressError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--health-addr")
    if processes > 1:
        from workers.supervisor import supervise

        child = child_argv(ctx, health_addr=health_addr)
        env = {**os.environ, "DATABASE_URL": url}
        raise typer.Exit(supervise(child, processes, env, grace))
    if not enabled:
        log.warning("[LISTENER] disabled by ENABLE_JOB_STATE_LISTENER=false: no automatic chaining; "
                    "run stages by hand with `cli.py run-stage`")
        import signal

        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        signal.sigwait({signal.SIGTERM, signal.SIGINT})
        return
    import signal

    def stop_before_start(signum, _frame):
        # Until Worker.run puts its graceful handlers in place, SIGTERM ends the process at once,
        # cleanly (exit 0): nothing is claimed yet, and loading models can take minutes. A
        # worker stopped while starting (a rolling update, a scale-down) is not a failure.
        log.info("stopped by %s while starting", signal.Signals(signum).name)
        logging.shutdown()
        # os._exit: a SystemExit raised inside a callback (an import's, a finaliser's) is printed
        # and ignored, and the stop would be lost.
        os._exit(0)

    signal.signal(signal.SIGTERM, stop_before_start)
    device = "cuda" if gpu else "cpu"
    try:
        built = load_registry(registry, models, device)
        if stage_list:
            unknown = [s for s in stage_list if s not in built]
            if unknown:
                raise typer.BadParameter(f"unknown stage(s) {', '.join(unknown)}; known: {', '.join(built)}",
                                         param_hint="--stages")
        for name in stage_list or list(built):
            if built[name].warm:
                built[name].warm()
    except typer.BadParameter:
        raise
    except Exception as exc:
        log.error("cannot start: %s", describe_error(exc))
        raise typer.Exit(2)
    if concurrency is None:
        batches = [built[name].max_batch for name in stage_list or list(built) if built[name].device == "gpu"]
        concurrency = max(batches) if gpu and batches else 8
    settings = WorkerSettings(url=url, listen_url=listen_url, stages=stage_list, concurrency=concurrency,
                              lease_s=lease, heartbeat_s=lease / 3, grace_s=grace, reconnect_delay_s=delay,
                              db_timeout_s=db_timeout, liveness_s=liveness,
                              retry_base_s=retry_base, retry_max_s=retry_max, worker_id=worker_id,
                              health_addr=health_addr, model_profile=models)
    from workers.runner import TaskRunner

    worker = Worker(settings, built, TaskRunner(open_store(), config.asset_root()))
    try:
        code = asyncio.run(worker.run())
    except Exception as exc:
        # describe_error, not "%s": a TimeoutError or PoolTimeout has no message, and this line
        # read "worker stopped: " with nothing after it (a worker started while the database was
        # down, giving up after DB_OPERATION_TIMEOUT).
        log.error("worker stopped: %s", describe_error(exc))
        code = 2
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # A stage thread stuck past the grace period must not keep the process alive.
    os._exit(code)

