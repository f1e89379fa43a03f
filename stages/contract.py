"""The contract between the engine's task runner and a stage: plain data in, plain data out.

The engine (workers/) loads a claimed task's inputs into a StageInput, calls the stage, stores the
StageOutput's artifacts and commits its result. Stages never see SQL, connections or workers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence


class PermanentStageError(Exception):
    """Retrying cannot help (bad input, an answer that cannot be used): the task fails at once.

    The message is what an operator reads in `cli.py status`, so it names the problem plainly.
    `details` (JSON-serialisable) is recorded beside it, e.g. the raw text a model answered.
    """

    def __init__(self, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.details = dict(details or {})


@dataclass(frozen=True)
class StageInput:
    stage: str
    job_id: str
    tenant_id: str
    variant_id: str | None  # None for job-level stages
    attempt: int
    ad_copy: str
    # Variant stages: bytes of the variant's original image. Job stages: None.
    image: bytes | None
    # Variant stages: this variant's earlier results, stage -> result.
    # Job stages: this job's earlier job-level results, stage -> result.
    results: Mapping[str, Mapping[str, Any]]
    # Job stages only: variant_id -> {"status", "current_step", "creation_order", "results": stage -> result}.
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Reads an artifact by the key recorded in an earlier result (tenant-checked by the engine).
    read_artifact: Callable[[str], bytes] = lambda key: (_ for _ in ()).throw(KeyError(key))


@dataclass
class StageOutput:
    # JSON-serialisable. The engine adds result["artifacts"] = {name: key} for the artifacts below.
    result: dict[str, Any]
    # name -> bytes (e.g. "overlay.png"); the engine stores them under write-once keys.
    artifacts: dict[str, bytes] = field(default_factory=dict)


# A stage takes a batch of inputs (one or more tasks of the same stage) and returns, position by
# position, an output or the exception that input raised. CPU stages usually get batches of one.
BatchFn = Callable[[Sequence[StageInput]], list["StageOutput | BaseException"]]


@dataclass(frozen=True)
class StageSpec:
    name: str
    run_batch: BatchFn
    device: str = "cpu"  # "cpu" or "gpu": which pool of workers should run it
    max_batch: int = 1  # how many tasks of this stage one call may take
    warm: Callable[[], None] | None = None  # loads models; called once at worker start


def one_at_a_time(fn: Callable[[StageInput], StageOutput]) -> BatchFn:
    """Lifts a per-input stage function to the batch interface, isolating each input's failure."""

    def run_batch(inputs: Sequence[StageInput]) -> list[StageOutput | BaseException]:
        outputs: list[StageOutput | BaseException] = []
        for item in inputs:
            try:
                outputs.append(fn(item))
            except Exception as exc:  # each input fails alone; the engine records which and why
                outputs.append(exc)
        return outputs

    return run_batch
