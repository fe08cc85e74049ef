"""Train what the reports need ahead of the notebooks, in parallel worker processes (`l2p.reports --jobs N`).

Every fine-tuning run of notebooks 03, 04 and 07 is an independent cached artefact, and together they are
most of a report run's cost. Here the main process first builds, one by one, what the runs depend on (their
worlds, corpora, converted inits, the cross-model LDM: larger jobs on `cache.build_threads()` threads, 2),
then workers train the runs side by side, each on `cache.run_threads()` threads (1), as every run is built,
so a run built here is exactly the run a notebook would have trained. N workers therefore want N·threads
cores; more workers than the cores hold are cut to what fits, since oversubscribed OpenMP threads slow every
job down. On the 2-core reference machine that is 2 workers × 1 thread, 0.63× the time of training the runs
one after the other on 2 threads (bench/bench_oversubscription.py). A run takes minutes, so the workers send a
line per evaluation back to the main process's log, and each finished run updates the estimate of time left.
"""
from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from queue import Empty
from typing import Optional

import pandas as pd

from ..cache import available_cores, is_cached, run_threads
from .recipe import FINETUNE_MODES, FinetuneConfig, from_scratch, recipe_config, run_key
from .world import SPECS, WorldSpec, world_pieces


@dataclass(frozen=True)
class PlannedRun:
    """One fine-tuning run a notebook will ask for: the world it runs in, its config, who asks."""

    world: WorldSpec
    config: FinetuneConfig
    label: str  # "notebook · experiment: variant, seed"

    def cached(self) -> bool:
        return is_cached("toy_finetune", run_key(self.world, self.config), self.config.seed)


def planned_runs(mode: str = "full") -> list[PlannedRun]:
    """Every fine-tuning run notebooks 03, 04 and 07 make with their default parameters, once each (02 and 05
    show 03's seed-0 run).

    The order puts runs of different worlds side by side, so that parallel workers start by building
    different worlds rather than waiting for one.
    """
    from . import ablations, grid
    spec = SPECS[mode]
    base = FINETUNE_MODES[mode]
    best = recipe_config("best", mode)  # notebook 03's defaults: the best recipe over 04's seeds, and from scratch
    runs = [PlannedRun(spec, best.replace(seed=seed), f"03 · best recipe, seed {seed}")
            for seed in ablations.SEEDS[mode]]
    runs.append(PlannedRun(spec, from_scratch(best), "03 · from scratch"))
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


_heartbeat = None  # in a worker: the queue its progress lines go to, read by the main process


def _init_worker(queue) -> None:
    global _heartbeat
    _heartbeat = queue


@dataclass(frozen=True)
class _Started:
    """A worker's word that it has begun training a run (wall-clock `time.time()`)."""

    label: str
    at: float


def _build(run: PlannedRun) -> tuple[PlannedRun, float]:
    """Worker: train one run into the cache (or load it, if another process got there first)."""
    from .recipe import finetune
    from .world import build_toy_world
    t0 = time.perf_counter()
    log = None
    if _heartbeat is not None:  # the main process counts a run in training by what it has left, not whole
        _heartbeat.put(_Started(run.label, time.time()))
        log = lambda m: _heartbeat.put(f"    {run.label}: {m}")  # noqa: E731
    finetune(build_toy_world(spec=run.world, progress=False), run.config, progress=False, log=log)
    return run, time.perf_counter() - t0


def _relay(queue, log, timeout: float = 0.0, started: Optional[dict] = None) -> None:
    """Pass the workers' progress lines on to `log`, and their start times into `started` (label → time)."""
    while True:
        try:
            item = queue.get(timeout=timeout) if timeout else queue.get_nowait()
        except Empty:
            return
        if isinstance(item, _Started):
            if started is not None:
                started[item.label] = item.at
        else:
            log(item)


def _time_left(mode: str, notebooks: Optional[list[str]], jobs: int, started: Optional[dict] = None,
               now: Optional[float] = None, table: Optional[pd.DataFrame] = None) -> str:
    """"~N min left": when `jobs` workers finish the runs not cached yet, by the plan's estimates; a run in
    training (`started`: label → its start, `time.time()`) counts only what it has left. "" where no run has an
    estimate. `table`: the `plan_table` already read, when no run has finished since."""
    left = (plan_table(mode, notebooks) if table is None else table).query("not cached")
    if not len(left) or left.minutes.isna().all():
        return ""
    unknown = int(left.minutes.isna().sum())
    now = time.time() if now is None else now
    training = left.run.isin(list(started or {}))
    # a run past its estimate is taken to be about to finish
    busy = [max(0.0, m - (now - started[r]) / 60) for r, m in zip(left.run[training], left.minutes[training])
            if m == m]
    wall = _longest_first(left.minutes[~training], jobs, busy=busy[:jobs])
    return f"~{wall:.0f} min left" + (f" and {unknown} run(s) of unknown cost" if unknown else "")


def _of(label: str, notebooks: Optional[list[str]]) -> bool:
    """Whether a run label ("07 · fine grid, seed 0") is of `notebooks` ("07", "07_token_grid", …; None: all)."""
    return notebooks is None or any(label.startswith(nb[:2] + " ") for nb in notebooks)


def _planned(mode: str, notebooks: Optional[list[str]]) -> list[PlannedRun]:
    """The plan, limited to the runs of `notebooks` ("03", "07_token_grid", …; None: all)."""
    return [r for r in planned_runs(mode) if _of(r.label, notebooks)]


ORDERS = ("longest", "shortest", "plan")

# What a run of each full-mode budget took on the reference machine (2 cores of an AMD EPYC with AVX512-BF16,
# 1 thread per run beside another run, as the workers train; the median of sessions 18–26's cached runs). A
# fresh cache has timed nothing yet, and a first report run is the one whose cost a user most needs to know.
REFERENCE_MINUTES = {
    "300 × 16 at 64²": 1.4,                   # 33 runs, 0.9–2.5
    "200 × 16 at 128²": 1.6,                  # 9 runs, 1.5–1.7
    "1500 × 32 at 64²": 8.3,                  # 54 runs, 4.7–13.5 (head-only the fastest)
    "1500 × 32 at 64² + latent loss": 14.3,   # 9 runs, 12.3–17.6
    "1500 × 32 at 128²": 18.4,                # 9 runs, 17.0–19.5
    "6000 × 32 at 64² + latent loss": 59.0,   # 5 runs, 50.2–75.0
}
# What each world piece took there, by world ("default", or 07's "coarse" and "fine") and piece (`world_pieces`):
# the build of `2bc7244efa` (session 20, its VAE beside tests) and 07's worlds (session 22). Pieces that two
# worlds share (07's coarse world trains on the default world's VAE and judge) are counted once.
REFERENCE_WORLD_MINUTES = {
    "default": {"toy VAE": 15.8, "judge": 0.9, "source LDM": 14.2},
    "coarse": {"toy VAE": 15.8, "judge": 0.9, "source LDM": 6.2},
    "fine": {"toy VAE": 8.1, "judge": 0.9, "source LDM": 11.9},
}


def budget(c: FinetuneConfig) -> str:
    """A run's budget, "1500 × 32 at 64²": runs of one budget take about as long. A latent loss runs the VAE
    encoder twice a step (~1.9× the time), so it makes a budget of its own."""
    return f"{c.steps} × {c.batch_size} at {c.image_size}²" + (" + latent loss" if c.latent_loss else "")


def world_name(spec: WorldSpec) -> Optional[str]:
    """"default", "coarse" or "fine" for the full-mode worlds the reports use (`REFERENCE_WORLD_MINUTES`)."""
    from .grid import GRIDS
    names = {"default": SPECS["full"], **GRIDS["full"]}
    return next((name for name, s in names.items() if s == spec), None)


def _work(c: FinetuneConfig) -> float:
    """A run's cost in arbitrary units, to rank runs no cached run has timed: pixels trained on, ~1.9× with a
    latent loss (its VAE encoder passes)."""
    return c.steps * c.batch_size * c.image_size ** 2 * (1.9 if c.latent_loss else 1.0)


def order_runs(runs: list[PlannedRun], order: str, minutes: Optional[dict] = None) -> list[PlannedRun]:
    """`runs` in the order workers take them up.

    "longest" first keeps workers from idling at the end of a run (a 6000-step run started last would leave the
    other workers an hour with nothing to do); "shortest" first caches the most runs early, for a session that
    may be cut off; "plan" keeps `planned_runs`' order. Cost: `minutes` (label → estimated minutes, as
    `plan_table` gives) where known, else `_work` scaled by the known runs' minutes per unit of work.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if order == "plan":
        return list(runs)
    minutes = {k: v for k, v in (minutes or {}).items() if v == v and v is not None}  # drop NaN
    rates = sorted(minutes[r.label] / _work(r.config) for r in runs if r.label in minutes)
    rate = rates[len(rates) // 2] if rates else 1.0

    def cost(r: PlannedRun) -> float:
        return minutes.get(r.label, _work(r.config) * rate)
    return sorted(runs, key=cost, reverse=order == "longest")  # stable: ties keep the plan's order


def finish_minutes(minutes: list[float], jobs: int) -> float:
    """When `jobs` workers, each taking the next run as it frees up, finish runs of these `minutes` in this
    order: more than sum / jobs where one long run is left over at the end."""
    free = [0.0] * max(1, jobs)
    for m in minutes:
        i = free.index(min(free))
        free[i] += m
    return max(free)


def _longest_first(minutes: pd.Series, jobs: int, busy: list[float] = ()) -> float:
    """`finish_minutes` of the runs with an estimate, longest first, as `prebuild` orders them by default, after
    the `busy` minutes (≤ jobs) the workers still have on the runs they are training."""
    return finish_minutes(list(busy) + sorted(minutes.dropna(), reverse=True), jobs)


def auto_jobs(mode: str = "full") -> int:
    """Workers `--jobs auto` uses: one per `run_threads()` cores in full mode; 1 in smoke mode, whose runs take
    seconds, less than starting a worker."""
    return max(1, available_cores() // run_threads()) if mode == "full" else 1


def _prepare(runs: list[PlannedRun], log) -> None:
    """Build each run's world, corpus and init in this process, one at a time, before any worker starts."""
    from .recipe import prepare
    from .world import build_toy_world, missing_pieces
    worlds: dict = {}
    for r in runs:
        wkey = repr(r.world.key())
        if wkey not in worlds:
            t0 = time.perf_counter()
            missing = missing_pieces(r.world)
            if missing:  # a world takes tens of minutes in full mode: say what is being trained, and show its progress
                log(f"  world {r.world.mode}: training {', '.join(missing)} (one after another, before any run)")
            worlds[wkey] = build_toy_world(spec=r.world, progress=bool(missing))
            log(f"  world {r.world.mode}: ready ({(time.perf_counter() - t0) / 60:.1f} min)")
        prepare(worlds[wkey], r.config)


def prebuild(mode: str = "full", jobs: Optional[int] = None, notebooks: Optional[list[str]] = None,
             log=print, order: str = "longest") -> dict:
    """Build every planned run that is not cached, `jobs` at a time (None: `auto_jobs(mode)`), in `order`
    (`order_runs`: longest first by default, for the shortest wall time).

    `notebooks` ("03", "07_token_grid", …) limits the plan to those notebooks' runs. Returns counts and
    the wall time.
    """
    if jobs is None:
        jobs = auto_jobs(mode)
    if jobs < 1:
        raise ValueError(f"jobs must be ≥ 1, got {jobs}")
    threads, cores = run_threads(), available_cores()
    fit = max(1, cores // threads)
    if jobs > fit:
        # torch's OpenMP threads spin at barriers waiting for threads the OS has descheduled: two 2-thread jobs on
        # 2 cores are far slower together than one after the other (bench/bench_oversubscription.py)
        log(f"note: {jobs} workers × {threads} threads would oversubscribe {cores} core(s); using {fit} worker(s)")
        jobs = fit
    plan = _planned(mode, notebooks)
    todo = [r for r in plan if not r.cached()]
    minutes, est = {}, None
    if order != "plan" and len(todo) > 1:  # the estimates read every run's cache entry: only when they matter
        est = plan_table(mode, notebooks)
        minutes = dict(zip(est.run, est.minutes))
    todo = order_runs(todo, order, minutes)
    total = len(plan)
    log(f"prebuild ({mode}): {total - len(todo)} of {total} runs cached; training {len(todo)} "
        f"with {jobs} worker(s) × {threads} thread(s)" + (f", {order} first" if order != "plan" else ""))
    t0 = time.perf_counter()
    if todo:
        _prepare(todo, log)
        left = _time_left(mode, notebooks, jobs, table=est) or "no estimate yet"  # no run has trained since
        log(f"  {len(todo)} run(s) to train on {jobs} worker(s): {left} (from cached runs of the same budgets); "
            "each logs its evaluations as it trains")
        # spawn, not fork: a forked child inherits the parent's OpenMP state and can hang in torch
        ctx = get_context("spawn")
        heartbeat = ctx.Queue()
        pool = ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(heartbeat,))
        try:
            pending, i, started = {pool.submit(_build, r) for r in todo}, 0, {}
            while pending:
                finished, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                _relay(heartbeat, log, started=started)
                for fut in finished:
                    run, sec = fut.result()  # a failed run stops the prebuild with its error
                    i += 1
                    started.pop(run.label, None)
                    left = _time_left(mode, notebooks, jobs, started) if pending else ""
                    log(f"  [{i}/{len(todo)}] {run.label} ({sec / 60:.1f} min, {(time.perf_counter() - t0) / 60:.0f} "
                        f"min in{', ' + left if left else ''})")
        finally:  # on an error or Ctrl-C, start nothing new; finished runs stay cached
            pool.shutdown(wait=True, cancel_futures=True)
            _relay(heartbeat, log, timeout=0.2)
    return {"planned": total, "built": len(todo), "minutes": (time.perf_counter() - t0) / 60}


def plan_table(mode: str = "full", notebooks: Optional[list[str]] = None, threads: Optional[int] = None
               ) -> pd.DataFrame:
    """One row per planned run: its notebook, label, budget, whether it is cached, what its build took and on how
    many threads.

    For a run not cached yet, `minutes` is the median of the cached runs of the same budget (steps, batch, image
    size, and whether a latent loss adds encoder passes), from any notebook, trained on `threads` (default
    `run_threads()`, what the workers use), marked `estimated`. A 1-thread run that shared the cores with
    another records its time as it ran (1500 × 32: 12–14 min in session 12, against 6–8 for runs alone on 2
    threads in sessions 8–10), so mixing counts could be off by half. Where no run of the budget was trained on
    `threads`, the median over other counts stands in (`basis` "other threads"); where none is cached, in full
    mode, what the budget took on the reference machine (`REFERENCE_MINUTES`, basis "reference machine"); else
    NaN. `world_minutes`: the reference machine's minutes for the pieces of the run's world not cached yet
    (shared pieces counted once, for the first world). What `l2p.reports --plan` prints.
    """
    from ..cache import build_meta, is_cached
    threads = threads or run_threads()
    rows, missing, counted = [], {}, set()
    for r in _planned(mode, None):  # every notebook's cached runs inform the estimates; `notebooks` filters below
        c, wkey = r.config, repr(r.world.key())
        if wkey not in missing:
            todo = [(label, (name, repr(key), seed)) for label, name, key, seed in world_pieces(r.world)
                    if not is_cached(name, key, seed)]
            reference = REFERENCE_WORLD_MINUTES.get(world_name(r.world) or "", {})
            # a piece two worlds share is trained once, for the first world that needs it
            fresh = [label for label, k in todo if k not in counted]
            counted.update(k for _, k in todo)
            minutes = sum(reference.get(label, float("nan")) for label in fresh) if reference else float("nan")
            missing[wkey] = (", ".join(label for label, _ in todo), minutes)
        meta = build_meta("toy_finetune", run_key(r.world, c), c.seed) or {}
        sec = meta.get("build_seconds")
        rows.append({"notebook": r.label[:2], "run": r.label, "budget": budget(c),
                     "cached": r.cached(), "minutes": None if sec is None else sec / 60,
                     "threads": meta.get("threads"), "estimated": False, "basis": None, "world": wkey,
                     "world_missing": missing[wkey][0], "world_minutes": missing[wkey][1]})
    df = pd.DataFrame(rows, columns=["notebook", "run", "budget", "cached", "minutes", "threads", "estimated",
                                     "basis", "world", "world_missing", "world_minutes"])
    if len(df):
        df["minutes"] = df["minutes"].astype(float)
        done = df[df.cached & df.minutes.notna()]
        same = done[done.threads == threads].groupby("budget").minutes.median()
        other = done.groupby("budget").minutes.median()
        todo = ~df.cached
        by_same = df.loc[todo, "budget"].map(same).astype(float)
        by_other = df.loc[todo, "budget"].map(other).astype(float)
        basis = pd.Series(None, index=by_same.index, dtype=object)
        reference = REFERENCE_MINUTES if mode == "full" else {}  # smoke runs take seconds: no reference kept
        by_reference = df.loc[todo, "budget"].map(reference).astype(float)
        basis[by_same.notna()] = f"{threads} thread(s)"
        basis[by_same.isna() & by_other.notna()] = "other threads"
        basis[by_same.isna() & by_other.isna() & by_reference.notna()] = "reference machine"
        df.loc[todo, "minutes"] = by_same.fillna(by_other).fillna(by_reference)
        df.loc[todo, "estimated"] = True
        df.loc[todo, "basis"] = basis
    return df[df.run.map(lambda label: _of(label, notebooks)).astype(bool)].reset_index(drop=True)


def plan_summary(df: pd.DataFrame, jobs: int, threads: Optional[int] = None) -> str:
    """Per notebook: runs cached of planned, and the run-minutes left (estimated) over `jobs` workers."""
    threads = threads or run_threads()
    lines = []
    for nb, g in df.groupby("notebook"):
        left = g[~g.cached]
        unknown = int(left.minutes.isna().sum())
        other = int((left.basis == "other threads").sum())
        est = left.minutes.sum()
        wall = _longest_first(left.minutes, jobs)
        reference = int((left.basis == "reference machine").sum())
        tail = f"; {unknown} of unknown cost (no cached run of their budget)" if unknown else ""
        tail += f"; {other} estimated from runs on another thread count" if other else ""
        tail += f"; {reference} estimated from the reference machine's times" if reference else ""
        lines.append(f"{nb}: {int(g.cached.sum())} of {len(g)} runs cached; ~{est:.0f} run-min left, roughly "
                     f"{wall:.0f} min on {jobs} worker(s){tail}")
    if df.notebook.nunique() > 1:
        left = df[~df.cached]
        lines.append(f"all: {int(df.cached.sum())} of {len(df)} runs cached; ~{left.minutes.sum():.0f} run-min left, "
                     f"roughly {_longest_first(left.minutes, jobs):.0f} min on {jobs} worker(s), longest first")
    # a world is named by its first run's label without the seed: "07 · fine grid"
    worlds = df.groupby("world", sort=False).agg(missing=("world_missing", "first"), first=("run", "first"),
                                                  minutes=("world_minutes", "first"))
    unbuilt = worlds[worlds.missing != ""]
    if len(unbuilt):
        known = unbuilt.minutes.notna().all()
        lines.append(f"worlds: {len(worlds) - len(unbuilt)} of {len(worlds)} built; to train first, one after another "
                     + (f"(~{unbuilt.minutes.sum():.0f} min on the reference machine), " if known else "")
                     + "not counted above: " + "; ".join(f"the world of {w.first.split(', seed')[0]} ({w.missing})"
                                                         for w in unbuilt.itertuples()))
    lines.append(f"(estimates: the median build time of cached runs of the same budget trained on {threads} "
                 "thread(s), as the workers train, else the reference machine's (2 cores, 1 thread per run); "
                 "corpora, converted inits and the notebooks themselves not counted)")
    return "\n".join(lines)
