"""Worker metrics (Prometheus): one registry per worker process."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

JOB_OUTCOMES = ("done", "failed")
# From a stage that runs in milliseconds to a GPU batch near its 300 s timeout.
RUN_BUCKETS = (0.005, 0.02, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# A claim riding on a completion waits ~0; a backlog, or a pool scaling from zero, minutes.
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
JOB_BUCKETS = (1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600)


def package_version() -> str:
    """As `cli.py --version` says it (cli.py is above workers/, so not imported from here)."""
    try:
        return version("adflow")
    except PackageNotFoundError:  # a checkout that was never installed
        import tomllib

        from outbox.config import PROJECT_ROOT

        try:
            return tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["version"]
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def configured_profile() -> str:
    """The model profile the stage registry resolves when `--models` is not given."""
    from stages.models import resolve_profile

    try:
        return resolve_profile()
    except ValueError:
        # A bad MODEL_PROFILE with a valid --models starts fine: a label must not stop it.
        return "unknown"


class BuildInfo:
    """adflow_build_info, collected at each scrape: the stages a worker claims are settled only by
    its start-up check of the stage graph, after the registry exists."""

    NAME = "adflow_build_info"
    HELP = ("1 per worker: its adflow version, model profile (tiny: random weights, results mean nothing) "
            "and the stages it claims (sorted, comma-separated)")
    LABELS = ("version", "model_profile", "stages")

    def __init__(self, version: str, model_profile: str, stages: Callable[[], Iterable[str]]) -> None:
        self.version, self.model_profile, self.stages = version, model_profile, stages

    def describe(self):
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=self.LABELS)

    def collect(self):
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=self.LABELS)
        # Sorted: the same set of stages is the same series, whichever order a worker keeps.
        family.add_metric([self.version, self.model_profile, ",".join(sorted(self.stages()))], 1)
        yield family


class Metrics:
    def __init__(self, model_profile: str | None = None, stages: Callable[[], Iterable[str]] = tuple) -> None:
        """`model_profile`: None reads MODEL_PROFILE as the registry does; `stages`: called at each
        scrape for the build info's stages label."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.claimed = Counter("adflow_tasks_claimed", "Tasks claimed", ["stage"], registry=r)
        self.completed = Counter("adflow_tasks_completed", "Tasks completed (result committed)", ["stage"], registry=r)
        self.failed = Counter("adflow_tasks_failed", "Tasks failed for good", ["stage"], registry=r)
        self.retries = Counter("adflow_task_retries", "Failed attempts put back for a retry", ["stage"], registry=r)
        self.duration = Histogram(
            "adflow_stage_duration_seconds",
            "Run time of one stage call on a batch (up to the stage's batch size of tasks), once per batch that "
            "gave at least one result; a batch that only failed or timed out is left out (its time is an error's "
            "or the timeout's) and counted in adflow_tasks_failed / adflow_task_retries",
            ["stage"], buckets=RUN_BUCKETS, registry=r)
        self.task_duration = Histogram(
            "adflow_task_duration_seconds",
            "A batch's run time divided by its number of tasks, once per task of each batch that "
            "adflow_stage_duration_seconds observes (so the two _sum agree): the cost of one task where GPU "
            "stages batch",
            ["stage"], buckets=RUN_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "adflow_queue_wait_seconds",
            "Seconds from a task becoming claimable (its enqueue, or its retry time) to its claim, once per claim",
            ["stage"], buckets=WAIT_BUCKETS, registry=r)
        self.job_duration = Histogram(
            "adflow_job_duration_seconds",
            "Seconds from a job's creation to its end, observed only by the worker whose commit ended it (done: "
            "its last job stage; failed: the failure that failed it): sum over workers, never max",
            ["outcome"], buckets=JOB_BUCKETS, registry=r)
        self.jobs_finished = Counter(
            "adflow_jobs_finished",
            "Jobs ended, counted once in the whole fleet, by the worker whose commit ended them: sum over workers",
            ["outcome"], registry=r)
        for outcome in JOB_OUTCOMES:  # present at 0, so rate() and alerts see a series from the start
            self.job_duration.labels(outcome)
            self.jobs_finished.labels(outcome)
        self.lease_losses = Counter("adflow_lease_losses", "Results dropped because the lease was lost", registry=r)
        self.lease_rescues = Counter("adflow_lease_rescues", "Expired leases of other workers recovered", registry=r)
        self.reconnects = Counter("adflow_listener_reconnects", "Listener reconnect attempts", registry=r)
        self.notifications = Counter("adflow_notifications_received", "Notifications received", registry=r)
        r.register(BuildInfo(package_version(), model_profile or configured_profile(), stages))
        # Gauges refreshed when /metrics is scraped (workers/health.py): the queue ones from one
        # query over the claimable partial index, the GPU ones only if torch already runs CUDA.
        self.listener_connected = Gauge("adflow_listener_connected",
                                        "1 while the worker's LISTEN connection is up", registry=r)
        self.ready = Gauge("adflow_worker_ready", "1 while /readyz would answer 200", registry=r)
        self.in_flight = Gauge("adflow_tasks_in_flight", "Tasks this worker holds now", registry=r)
        self.queue_depth = Gauge("adflow_queue_depth", "Claimable tasks (queued, run_after passed) by stage",
                                 ["stage"], registry=r)
        self.queue_delayed = Gauge("adflow_queue_delayed", "Queued tasks waiting for their retry time by stage",
                                   ["stage"], registry=r)
        self.queue_oldest_age = Gauge("adflow_queue_oldest_age_seconds",
                                      "Seconds the oldest claimable task of the stage has been claimable",
                                      ["stage"], registry=r)
        self.gpu_memory_allocated = Gauge("adflow_gpu_memory_allocated_bytes", "torch.cuda.memory_allocated",
                                          ["device"], registry=r)
        self.gpu_memory_reserved = Gauge("adflow_gpu_memory_reserved_bytes", "torch.cuda.memory_reserved",
                                         ["device"], registry=r)
