"""Running claimed tasks: load their inputs (one query per batch), call the stage, store its
artifacts, and hand back a JSON result to commit. The stage itself sees only plain data."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from outbox import artifacts
from outbox.artifacts import ArtifactStore, artifact_key, check_size
from outbox.completion import Completion
from outbox.queue import ClaimedTask
from stages.contract import PermanentStageError, StageInput, StageOutput, StageSpec
from workers import trace

class TaskRunner:
    def __init__(self, store: ArtifactStore, asset_root: Path):
        self.store = store
        self.asset_root = Path(asset_root).resolve()

    def read_asset(self, uri: str, asset_tenant: str, tenant: str) -> bytes:
        """An image asset of the task's own tenant: a store key, or a file under ASSET_ROOT.
        Every refusal is permanent: a bad uri or tenant stays bad however often it is retried."""
        if asset_tenant != tenant:
            raise PermanentStageError(f"image asset belongs to tenant {asset_tenant!r}, not the job's tenant {tenant!r}: refused")
        try:
            # The same parsing and path check as the report's reader (outbox.artifacts.read_asset).
            return artifacts.read_asset(self.store, self.asset_root, uri, tenant)
        except artifacts.ArtifactNotFound:
            what = f"image file missing: {uri[5:]!r}" if uri.startswith("file:") else f"artifact not found: {uri}"
            raise PermanentStageError(what) from None
        except (artifacts.InvalidKey, artifacts.TenantMismatch) as exc:
            raise PermanentStageError(f"image asset {uri!r}: {exc}") from None

    def read_artifact(self, key: str, tenant: str) -> bytes:
        try:
            # Parsed by segment: the key's tenant segment must equal the task's tenant (a prefix
            # test let tenant 'acme' read 'acme/evil/...').
            artifacts.check_key_tenant(key, tenant)
        except artifacts.TenantMismatch as exc:
            raise PermanentStageError(str(exc)) from None
        except artifacts.InvalidKey as exc:
            raise PermanentStageError(f"{exc}: refused") from None
        try:
            return self.store.get(key)
        except KeyError:
            raise PermanentStageError(f"artifact not found: {key}") from None

    def build_input(self, task: ClaimedTask) -> StageInput:
        row = task.inputs
        # The tenant first, before any stage runs: a tenant written by plain SQL that breaks the
        # rule (quotes, '/', Unicode, empty) would otherwise run three stages and then fail at
        # overlay, the first stage that builds an artifact key, after all its retries.
        try:
            artifacts.check_tenant(task.tenant_id)
        except artifacts.InvalidTenant as exc:
            raise PermanentStageError(f"job {task.job_id} has an {exc}: refused (fix jobs.tenant_id)") from None
        if row["ad_copy"] is None:
            raise PermanentStageError(f"job {task.job_id} has no job_inputs row (no ad copy)")
        image = None
        if task.variant_id is not None:
            if row["asset_uri"] is None:
                raise PermanentStageError(f"variant {task.variant_id} has no image asset (img_asset_id {row['img_asset_id']})")
            image = self.read_asset(row["asset_uri"], row["asset_tenant"], task.tenant_id)
        return StageInput(
            stage=task.stage, job_id=task.job_id, tenant_id=task.tenant_id, variant_id=task.variant_id,
            attempt=task.attempt, ad_copy=row["ad_copy"], image=image, results=row["results"] or {},
            variants=row["variants"] or {},
            read_artifact=lambda key, tenant=task.tenant_id: self.read_artifact(key, tenant))

    def run(self, spec: StageSpec, tasks: Sequence[ClaimedTask]) -> list[Completion | BaseException]:
        """Runs one batch of a stage (in a worker thread). Position by position: what to commit,
        or the exception that task failed with."""
        trace.step("thread", (t.id for t in tasks))
        outcomes: list[Completion | BaseException | None] = [None] * len(tasks)
        inputs, positions = [], []
        for i, task in enumerate(tasks):
            try:
                inputs.append(self.build_input(task))
                positions.append(i)
            except Exception as exc:
                outcomes[i] = exc
        if inputs:
            outputs = spec.run_batch(inputs)
            if len(outputs) != len(inputs):
                raise RuntimeError(f"stage {spec.name} returned {len(outputs)} outputs for {len(inputs)} inputs")
            for i, output in zip(positions, outputs):
                outcomes[i] = output if isinstance(output, BaseException) else self._finish(tasks[i], output)
        return outcomes

    def _finish(self, task: ClaimedTask, output: StageOutput) -> Completion | BaseException:
        pending: dict[str, bytes] = {}
        try:
            result = dict(output.result)
            if output.artifacts:
                keys = {}
                for name, data in output.artifacts.items():
                    key = artifact_key(task.tenant_id, task.job_id, task.variant_id, task.stage, task.attempt, name)
                    if self.store.in_database:
                        check_size(self.store, key, data)
                        pending[key] = data
                    else:
                        self.store.put(key, data)
                    keys[name] = key
                result["artifacts"] = keys
            encoded = json.dumps(result, allow_nan=False)
        except artifacts.InvalidKey as exc:
            # e.g. an artifact name with '/' or '..': the same name fails on every attempt.
            return PermanentStageError(f"stage {task.stage} returned an artifact that cannot be stored: {exc}")
        except (TypeError, ValueError) as exc:
            return PermanentStageError(f"stage {task.stage} returned a result that is not JSON: {exc}")
        except Exception as exc:
            return exc
        if "\\u0000" in encoded:
            return PermanentStageError(f"stage {task.stage} returned text with NUL characters, which PostgreSQL cannot store")
        return Completion(task.id, task.attempt, result, pending)
