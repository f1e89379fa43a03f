"""Worker metrics (Prometheus): one registry per worker process."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.claimed = Counter("adflow_tasks_claimed", "Tasks claimed", ["stage"], registry=r)
        self.completed = Counter("adflow_tasks_completed", "Tasks completed (result committed)", ["stage"], registry=r)
        self.failed = Counter("adflow_tasks_failed", "Tasks failed for good", ["stage"], registry=r)
        self.retries = Counter("adflow_task_retries", "Failed attempts put back for a retry", ["stage"], registry=r)
        self.duration = Histogram("adflow_stage_duration_seconds", "Stage run time per batch", ["stage"],
                                  buckets=(0.005, 0.02, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                                  registry=r)
        self.lease_losses = Counter("adflow_lease_losses", "Results dropped because the lease was lost", registry=r)
        self.lease_rescues = Counter("adflow_lease_rescues", "Expired leases of other workers recovered", registry=r)
        self.reconnects = Counter("adflow_listener_reconnects", "Listener reconnect attempts", registry=r)
        self.notifications = Counter("adflow_notifications_received", "Notifications received", registry=r)
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
