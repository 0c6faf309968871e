"""GPU classes: which trainer queue a job's train stage goes to.

A deployment may run trainers on GPUs of several kinds — L4 nodes with 24 GB, A100 nodes with
80 GB — declared by the operator as classes (``AFINA_GPU_CLASSES='{"l4": 24, "a100-80gb": 80}'``).
Each class has its own queue, ``train.<class>``, so that each node pool scales on its own queue
(KEDA in ``k8s/``); the plain ``train`` queue is the default class's (``AFINA_DEFAULT_GPU_CLASS``, or
whatever trainer a deployment without classes runs). A job trains:

- on the class it names (``hyperparameters.gpu_class``), checked against the declared ones when
  it is created;
- else on the default class, until the trainer's preflight finds it does not fit the GPU it landed
  on: then on the smallest declared class whose GPU holds the estimate (``larger_class_for``), the
  job's ``gpu_class`` set so that every later attempt (a resume, a recovery) goes there too;
- with ``num_gpus`` N > 1, on the workers of that class that own N GPUs: queue ``<queue>.x<N>``.

A worker that owns G GPUs consumes its class's queues for 1..G GPUs (``worker_train_queues``).
"""

from __future__ import annotations

from dataclasses import dataclass

from afina.core.errors import InsufficientMemory, InvalidRequest
from afina.core.queue.names import train_queue
from afina.core.settings import Settings

GIB = 1024**3
USABLE_FRACTION = 0.92  # of a class's nominal memory a run may plan on (CUDA context, fragmentation, other users)
PARAM_CLASS = "hyperparameters.gpu_class"
PARAM_GPUS = "hyperparameters.num_gpus"


@dataclass(frozen=True)
class GpuClass:
    name: str
    memory_gib: float

    @property
    def usable_bytes(self) -> float:
        return self.memory_gib * GIB * USABLE_FRACTION


def declared_classes(settings: Settings) -> list[GpuClass]:
    """The operator's classes, smallest GPU first."""
    return sorted((GpuClass(name, float(gib)) for name, gib in settings.gpu_classes.items()),
                  key=lambda c: (c.memory_gib, c.name))


def worker_train_queues(settings: Settings) -> list[str]:
    """What a trainer worker with these settings consumes: its class's queues for 1..``gpus_per_worker`` GPUs,
    and the default class's when it is the default class (or no class is set)."""
    classes: list[str | None] = []
    if settings.gpu_class is not None:
        classes.append(settings.gpu_class)
    if settings.gpu_class is None or settings.gpu_class == settings.default_gpu_class:
        classes.append(None)
    return [train_queue(name, gpus) for name in classes for gpus in range(1, settings.gpus_per_worker + 1)]


def check_job_placement(settings: Settings, gpu_class: str | None, num_gpus: int) -> None:
    """``InvalidRequest`` for a class this deployment does not declare, or more GPUs than its workers own."""
    if gpu_class is not None and gpu_class not in settings.gpu_classes:
        declared = sorted(settings.gpu_classes)
        where = f"the declared classes are {declared}" if declared else "this deployment declares no GPU classes"
        raise InvalidRequest(f"Unknown GPU class {gpu_class!r}: {where}.", param=PARAM_CLASS)
    if num_gpus > settings.gpus_per_worker:
        raise InvalidRequest(f"num_gpus={num_gpus}: the trainers of this deployment own at most "
                             f"{settings.gpus_per_worker} GPU(s) each (AFINA_GPUS_PER_WORKER).", param=PARAM_GPUS)


def larger_class_for(settings: Settings, needed_bytes: float, this_gpu_bytes: float) -> GpuClass | None:
    """The smallest declared class whose GPU is larger than this one and holds ``needed_bytes``; None if none."""
    for candidate in declared_classes(settings):
        if candidate.memory_gib * GIB > this_gpu_bytes * 1.05 and candidate.usable_bytes >= needed_bytes:
            return candidate
    return None


class NeedsLargerGpu(Exception):
    """Raised by a stage whose job does not fit this worker's GPU while a larger declared class would hold it:
    the stage runner records ``gpu_class`` on the job and queues the stage again there (no attempt counted)."""

    def __init__(self, gpu_class: str, message: str) -> None:
        super().__init__(message)
        self.gpu_class = gpu_class
        self.message = message


def reroute_or_raise(settings: Settings, failure: InsufficientMemory, *, device: str, asked_class: str | None,
                     this_gpu_bytes: float | None) -> None:
    """Raise ``NeedsLargerGpu`` when ``failure`` on this CUDA worker can be cured by a larger declared class and
    the job did not name its class; return otherwise (the caller re-raises ``failure``)."""
    if device != "cuda" or asked_class is not None or not this_gpu_bytes:
        return
    target = larger_class_for(settings, failure.needed_bytes, this_gpu_bytes)
    if target is None:
        return
    raise NeedsLargerGpu(target.name, f"This job needs about {failure.needed_bytes / GIB:.1f} GiB of GPU memory and "
                                      f"this worker's GPU has {failure.available_bytes / GIB:.1f} GiB free: moved to "
                                      f"GPU class {target.name!r} ({target.memory_gib:g} GiB)")
