"""A job's report data (outbox.report.gather) arranged for the job page: variants in order with
their stages, one timeline across every variant and the job stages, the attempts that went
wrong, the chosen variant and its post, and every artifact the job's results name."""
from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any, Mapping

from console.report import span  # seconds between two times, None when either is unknown

FINAL_TASK_STATES = ("done", "failed", "cancelled")


def artifact_names(results: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(stage, file name, key) for every artifact the results of one variant (or the job) name."""
    found = []
    for stage, result in results.items():
        artifacts = (result or {}).get("artifacts") if isinstance(result, Mapping) else None
        if isinstance(artifacts, Mapping):
            for name, key in artifacts.items():
                if isinstance(key, str):
                    found.append((stage, str(name), key))
    return found


def job_keys(data: Mapping[str, Any]) -> set[str]:
    """Every key or asset uri this job's page may link to: the only ones its download route serves."""
    keys = {key for _, _, key in artifact_names(data.get("job_results") or {})}
    for v in data["variants"]:
        keys |= {key for _, _, key in artifact_names(v["results"])}
        if v.get("asset_uri"):
            keys.add(v["asset_uri"])
    return keys


class JobView:
    def __init__(self, data: Mapping[str, Any], summary: Mapping[str, Any], now: datetime | None = None):
        """data: outbox.report.gather (states, tasks with their lease owners and attempts,
        results, assets); summary: outbox.views.job_summary (the job's row in `jobs`: its true
        state, where its variants are, the variants by state)."""
        self.data = data
        self.summary = summary
        self.now = now or datetime.now(timezone.utc)
        self.job = data["job"]
        self.graph = data["graph"]
        self.variant_stages = [g["stage"] for g in self.graph if g["level"] == "variant"]
        self.job_stages = [g["stage"] for g in self.graph if g["level"] == "job"]
        self.job_tasks = dict(data.get("job_tasks") or {})
        self.job_results = data.get("job_results") or {}
        self.post = self.job_results.get("instagram_feed_gen") or None
        self.orders = {v["variant_id"]: v["creation_order"] for v in data["variants"]}
        ranking = (self.post or {}).get("ranking") or []
        self.ranking = [{**row, "order": self.orders.get(row.get("variant_id"))} for row in ranking]
        self.rank_of = {row.get("variant_id"): row for row in self.ranking}
        self.chosen_id = (self.post or {}).get("chosen_variant_id") or next(
            (v["variant_id"] for v in data["variants"] if v.get("selected")), None)
        self.variants = [self._variant(v) for v in data["variants"]]

    # --- states (the database's rule, through outbox.views)
    @property
    def state(self) -> str:
        return self.summary["status"]

    @property
    def finished(self) -> bool:
        return self.state != "open"

    @property
    def headline(self) -> str:
        """How the variants stand, in words: "1 of 3 variants failed, 2 queued"."""
        counts = self.summary.get("variants_by_state") or {}
        total = self.summary.get("variants", len(self.variants))
        parts = [f"{counts[s]} of {total} variant{'s' if total != 1 else ''} {s}"
                 for s in ("failed", "cancelled", "done") if counts.get(s)]
        parts += [f"{counts[s]} {s}" for s in ("running", "queued") if counts.get(s)]
        return ", ".join(parts) or "no variants yet"

    def _variant(self, v: Mapping[str, Any]) -> dict:
        tasks = v["tasks"]
        return {
            **v,
            "chosen": v["variant_id"] == self.chosen_id,
            "rank": self.rank_of.get(v["variant_id"]),
            "stages": [(stage, tasks.get(stage)) for stage in self.variant_stages],
            "artifacts": artifact_names(v["results"]),
            "overlay_key": ((v["results"].get("overlay") or {}).get("artifacts") or {}).get("overlay.png"),
        }

    @property
    def job_stage_rows(self) -> list[tuple[str, Mapping | None]]:
        return [(stage, self.job_tasks.get(stage)) for stage in self.job_stages]

    @property
    def job_artifacts(self) -> list[tuple[str, str, str]]:
        return artifact_names(self.job_results)

    # --- the chosen variant and the post
    @property
    def chosen_order(self) -> int | None:
        return self.orders.get(self.chosen_id) if self.chosen_id else None

    @property
    def post_key(self) -> str | None:
        return ((self.post or {}).get("artifacts") or {}).get("post.jpg")

    @property
    def korean(self) -> str | None:
        return (self.job_results.get("ad_copy_gen_kor") or {}).get("korean")

    # --- one timeline for the whole job
    def all_tasks(self) -> list[tuple[str, Mapping]]:
        rows = []
        for v in self.variants:
            rows += [(f"variant {v['creation_order']}", t) for _, t in v["stages"] if t]
        rows += [("job", t) for _, t in self.job_stage_rows if t]
        return rows

    @property
    def timeline(self) -> dict:
        """Bars on one time axis from the job's submission: queued (light) then running (dark), a
        row per variant and one for the job stages, each bar labelled with its stage and, where
        the database knows it, the worker that holds it."""
        origin = self.job["created_at"]
        tasks = self.all_tasks()
        ends = [t[k] for _, t in tasks for k in ("finished_at", "started_at", "created_at") if t.get(k)]
        if any(t["status"] in ("running", "queued") for _, t in tasks) and not self.finished:
            ends.append(self.now)
        total = max(1e-3, max((span(origin, e) or 0.0 for e in ends), default=0.0))
        lanes: dict[str, list[dict]] = {}
        for lane, t in tasks:
            created = span(origin, t.get("created_at")) or 0.0
            started = span(origin, t.get("started_at"))
            ended = span(origin, t.get("finished_at"))
            if ended is None and t["status"] not in FINAL_TASK_STATES:
                ended = total
            run_from = started if started is not None else (ended if ended is not None else total)
            bar = {
                "stage": t["stage"], "status": t["status"], "task_id": t["id"],
                "worker": t.get("lease_owner"),
                "wait_left": 100 * created / total, "wait_width": max(0.0, 100 * (run_from - created) / total),
                "run_left": 100 * run_from / total,
                "run_width": max(0.5, 100 * ((ended if ended is not None else run_from) - run_from) / total)
                if started is not None else 0.0,
                "took": span(t.get("started_at"), t.get("finished_at")),
            }
            lanes.setdefault(lane, []).append(bar)
        return {"total_s": total, "lanes": list(lanes.items())}

    # --- what went wrong
    @property
    def attempts(self) -> list[dict]:
        """Every task that failed at least once or ended failed, with its error and details and
        each of its attempts (outbox_attempts: worker, outcome, error)."""
        rows = []
        for lane, t in self.all_tasks():
            if t.get("last_error") or t["status"] == "failed" or t["attempts"] > 1:
                details = t.get("error_details")
                rows.append({**t, "lane": lane, "history": t.get("attempt_log") or [],
                             "details": json.dumps(details, indent=2, ensure_ascii=False, default=str) if details else None})
        return rows

    @property
    def failed_tasks(self) -> list[tuple[str, Mapping]]:
        return [(lane, t) for lane, t in self.all_tasks() if t["status"] == "failed"]

    @property
    def failed_stages(self) -> list[str]:
        seen: list[str] = []
        for _, t in self.failed_tasks:
            if t["stage"] not in seen:
                seen.append(t["stage"])
        return seen
