"""Engines that run :func:`hepatoquant.cohort.runner.analyze_item` over a cohort.

- ``local``: a process pool on this machine (spawned processes: PyTorch and fork do not mix), one worker per
  device by default, each keeping one copy of the models for all its slides.
- ``ray``: a pool of Ray actors, one per GPU when the cluster has GPUs, each loading the model packs once; Ray
  places them across the cluster and each free actor takes the next slide. An actor that dies (out of memory, a
  crash) fails only the slide it held and is replaced. ``address`` is a running
  cluster's (``auto`` or ``ray://host:10001``); without one, Ray starts on this machine with ``workers`` CPUs.
  Every node must see the slides, the models folder and the output folder at the same paths (a shared file
  system), and have hepatoquant installed.

Both skip slides whose complete outputs exist, and report each outcome as it arrives (in completion order).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from hepatoquant.cohort.inputs import CohortItem
from hepatoquant.cohort.runner import CohortSettings, SlideOutcome, analyze_item, is_complete
from hepatoquant.errors import InvalidParameterError

__all__ = ["ENGINES", "run_cohort"]

ENGINES = ("local", "ray")
OnOutcome = Callable[[SlideOutcome], object]

_worker_models = None  # the ModelCache of a local worker process


def run_cohort(items: Sequence[CohortItem], settings: CohortSettings, out: str | Path, *, engine: str = "local",
               workers: int = 1, address: str | None = None, on_outcome: OnOutcome | None = None,
               ) -> dict[str, SlideOutcome]:
    """Every slide's outcome by slide id; slides already complete come back as ``skipped``."""
    if engine not in ENGINES:
        raise InvalidParameterError(f"engine {engine!r} is not known; use {' or '.join(ENGINES)}")
    if workers < 1:
        raise InvalidParameterError("--workers must be at least 1")
    out = str(out)  # a folder or an fsspec URL (see hepatoquant.cohort.storage)
    outcomes: dict[str, SlideOutcome] = {}

    def record(outcome: SlideOutcome) -> None:
        outcomes[outcome.slide_id] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    pending = []
    for item in items:
        if is_complete(out, item.slide_id):
            record(SlideOutcome(item.slide_id, str(item.slide), ok=True, skipped=True))
        else:
            pending.append(item)
    if pending:
        run = _run_local if engine == "local" else _run_ray
        run(pending, settings, out, workers, address, record)
    return outcomes


def _init_local_worker(threads: int) -> None:
    """One model cache per process, and a share of the cores (workers x threads = cores, as Ray's actors get)."""
    global _worker_models
    import torch

    from hepatoquant.analysis import ModelCache

    torch.set_num_threads(threads)
    _worker_models = ModelCache()


def _local_task(item: CohortItem, settings: CohortSettings, out: str) -> SlideOutcome:
    return analyze_item(item, settings, out, _worker_models)


def _run_local(items, settings, out, workers, address, record) -> None:
    if address:
        raise InvalidParameterError("--address is for --engine ray")
    context = multiprocessing.get_context("spawn")
    count = min(workers, len(items))
    threads = max(1, (os.cpu_count() or 1) // count)
    with ProcessPoolExecutor(max_workers=count, mp_context=context, initializer=_init_local_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(_local_task, item, settings, out): item for item in items}
        for future in as_completed(futures):
            item = futures[future]
            try:
                record(future.result())
            except Exception as exc:  # noqa: BLE001 - a worker process died (e.g. out of memory)
                record(SlideOutcome(item.slide_id, str(item.slide), ok=False, error_type=type(exc).__name__,
                                    error=f"the worker process analysing this slide failed: {exc}"))


def _run_ray(items, settings, out, workers, address, record) -> None:
    try:
        import ray
    except ImportError as exc:
        raise InvalidParameterError(
            "--engine ray needs Ray: pip install 'hepatoquant-server[ray]' (ray==2.60.0)"
        ) from exc

    started_here = not ray.is_initialized()
    if started_here:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:  # a Ray instance on this machine, sized to the workers asked for
            ray.init(num_cpus=workers, num_gpus=0 if settings.runtime.device == "cpu" else None,
                     object_store_memory=256 * 1024 * 1024, include_dashboard=False, log_to_driver=False)
    try:
        gpus = int(ray.cluster_resources().get("GPU", 0)) if settings.runtime.device != "cpu" else 0
        count = min(len(items), gpus if gpus else workers)
        actor_class = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(_RayWorker)
        idle = [actor_class.remote(settings, out) for _ in range(count)]
        queue, running = list(items), {}
        while queue or running:  # Ray places the actors and runs the calls; this only tracks which slide is where
            while queue and idle:
                actor, item = idle.pop(), queue.pop(0)
                running[actor.run.remote(item)] = (actor, item)
            [finished], _ = ray.wait(list(running), num_returns=1)
            actor, item = running.pop(finished)
            try:
                record(ray.get(finished))
                idle.append(actor)
            except ray.exceptions.RayError as exc:  # the actor died (out of memory, a crash): a new one goes on
                record(SlideOutcome(item.slide_id, str(item.slide), ok=False, error_type=type(exc).__name__,
                                    error=f"the Ray worker analysing this slide died: {str(exc).splitlines()[0]}"))
                ray.kill(actor)
                idle.append(actor_class.remote(settings, out))
    finally:
        if started_here:
            ray.shutdown()


class _RayWorker:
    """One model copy per actor, kept for all the slides the actor is given."""

    def __init__(self, settings: CohortSettings, out: str) -> None:
        from hepatoquant.analysis import ModelCache

        self.settings, self.out, self.models = settings, out, ModelCache()

    def run(self, item: CohortItem) -> SlideOutcome:
        return analyze_item(item, self.settings, self.out, self.models)
