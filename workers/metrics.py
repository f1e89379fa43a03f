"""Worker metrics (Prometheus): one registry per worker process."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


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
