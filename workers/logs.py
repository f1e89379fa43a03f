"""Log setup: one line per event; JSON with LOG_FORMAT=json, else text that keeps the old
system's grep-able keywords ([LISTENER], [TRIGGER])."""
from __future__ import annotations

import json
import logging
import os
import sys
import time

FIELDS = ("job_id", "variant_id", "stage", "attempt", "task_id")


class JsonFormatter(logging.Formatter):
    def __init__(self, worker_id: str):
        super().__init__()
        self.worker_id = worker_id

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "worker_id": self.worker_id,
                 "message": record.getMessage()}
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(worker_id: str = "-") -> None:
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("LOG_FORMAT", "text").lower() == "json":
        handler.setFormatter(JsonFormatter(worker_id))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [{worker_id}] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("psycopg.pool").setLevel(logging.WARNING)


def task_fields(task) -> dict:
    """The structured fields of a log line about one task (`task` is an outbox.queue.ClaimedTask)."""
    return {"job_id": task.job_id, "variant_id": task.variant_id, "stage": task.stage, "attempt": task.attempt,
            "task_id": task.id}
