"""Train what the reports need ahead of the notebooks, in parallel worker processes (`l2p.reports --jobs N`).

Every fine-tuning run of notebooks 03, 04 and 07 is an independent cached artefact, and together they are
most of a report run's cost. Here workers build them side by side; the notebooks then find them all in the
cache. A worker that needs something another is building (a world, a corpus, the cross-model LDM) waits
on the cache's per-key lock and then loads it, so nothing is built twice.

Each worker trains on `cache.build_threads()` threads (2 by default), as every cached build does, so a run
built here is exactly the run a notebook would have trained. N workers therefore want 2·N cores; more
workers than the cores hold are cut to what fits, since oversubscribed OpenMP threads slow every job down
(on the 2-core reference machine, one worker).
"""
from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Optional

from ..cache import available_cores, build_threads, is_cached
from .recipe import FINETUNE_MODES, FinetuneConfig, run_key
from .world import SPECS, WorldSpec


@dataclass(frozen=True)
class PlannedRun:
    """One fine-tuning run a notebook will ask for: the world it runs in, its config, who asks."""

    world: WorldSpec
    config: FinetuneConfig
    label: str  # "notebook · experiment: variant, seed"

    def cached(self) -> bool:
        return is_cached("toy_finetune", run_key(self.world, self.config), self.config.seed)


def planned_runs(mode: str = "full") -> list[PlannedRun]:
    """Every fine-tuning run notebooks 03, 04 and 07 make with their default parameters, once each.

    The order puts runs of different worlds side by side, so that parallel workers start by building
    different worlds rather than waiting for one.
    """
    from . import ablations, grid
    spec = SPECS[mode]
    base = FINETUNE_MODES[mode]
    runs = [PlannedRun(spec, base, "03 · converted init"),
            PlannedRun(spec, base.replace(init="scratch"), "03 · from scratch")]
    for exp in ablations.EXPERIMENTS:
        for label, overrides in exp.variants.items():
            for seed in ablations.SEEDS[mode]:
                runs.append(PlannedRun(spec, ablations.variant_config(exp, overrides, mode, seed),
                                       f"04 · {exp.name}: {label}, seed {seed}"))
    for name, gspec in grid.GRIDS[mode].items():
        for seed in grid.SEEDS[mode]:
            runs.append(PlannedRun(gspec, base.replace(patch=gspec.pixel_patch, seed=seed),
                                   f"07 · {name} grid, seed {seed}"))
    # the first to ask names a run that several notebooks share
    first: dict = {}
    for r in runs:
        first.setdefault((repr(r.world.key()), repr(r.config.key())), r)
    unique = list(first.values())
    by_world: dict[str, list[PlannedRun]] = {}
    for r in unique:
        by_world.setdefault(repr(r.world.key()), []).append(r)
    queues, ordered = list(by_world.values()), []
    while any(queues):  # round robin over worlds
        for q in queues:
            if q:
                ordered.append(q.pop(0))
    return ordered


def _build(run: PlannedRun) -> tuple[PlannedRun, float]:
    """Worker: train one run into the cache (or load it, if another process got there first)."""
    from .recipe import finetune
    from .world import build_toy_world
    t0 = time.perf_counter()
    finetune(build_toy_world(spec=run.world, progress=False), run.config, progress=False)
    return run, time.perf_counter() - t0


def prebuild(mode: str = "full", jobs: int = 2, notebooks: Optional[list[str]] = None, log=print) -> dict:
    """Build every planned run that is not cached, `jobs` at a time.

    `notebooks` ("03", "07_token_grid", …) limits the plan to those notebooks' runs. Returns counts and
    the wall time.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be ≥ 1, got {jobs}")
    threads, cores = build_threads(), available_cores()
    fit = max(1, cores // threads)
    if jobs > fit:
        # torch's OpenMP threads spin at barriers waiting for threads the OS has descheduled: two 2-thread jobs on
        # 2 cores are far slower together than one after the other (bench/bench_oversubscription.py)
        log(f"note: {jobs} workers × {threads} threads would oversubscribe {cores} core(s); using {fit} worker(s)")
        jobs = fit
    plan = [r for r in planned_runs(mode)
            if notebooks is None or any(r.label.startswith(nb[:2] + " ") for nb in notebooks)]
    todo = [r for r in plan if not r.cached()]
    total = len(plan)
    log(f"prebuild ({mode}): {total - len(todo)} of {total} runs cached; training {len(todo)} "
        f"with {jobs} worker(s) × {threads} thread(s)")
    t0 = time.perf_counter()
    if todo:
        # spawn, not fork: a forked child inherits the parent's OpenMP state and can hang in torch
        pool = ProcessPoolExecutor(jobs, mp_context=get_context("spawn"))
        try:
            futures = [pool.submit(_build, r) for r in todo]
            for i, fut in enumerate(as_completed(futures), 1):
                run, sec = fut.result()  # a failed run stops the prebuild with its error
                log(f"  [{i}/{len(todo)}] {run.label} ({sec / 60:.1f} min, {(time.perf_counter() - t0) / 60:.0f} "
                    f"min in)")
        finally:  # on an error or Ctrl-C, start nothing new; finished runs stay cached
            pool.shutdown(wait=True, cancel_futures=True)
    return {"planned": total, "built": len(todo), "minutes": (time.perf_counter() - t0) / 60}
