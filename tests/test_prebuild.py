"""Parallel prebuild of the reports' fine-tuning runs, and the cache lock that lets workers share artefacts."""
import json
import shutil
import threading
import time
import warnings
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from l2p import cache
from l2p.toyworld import ablations, grid, prebuild, recipe


def test_concurrent_builders_of_one_key_build_it_once(tmp_path):
    builds, results = [], []

    def build():
        builds.append(1)
        time.sleep(0.3)  # long enough for the other thread to arrive while this one builds
        return "artefact"

    def save(art, p):
        (p / "a.txt").write_text(art)

    def load(p):
        return (p / "a.txt").read_text()

    threads = [threading.Thread(target=lambda: results.append(cache.cached("x", {"a": 1}, 0, build, save, load,
                                                                           root=tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and results == ["artefact"] * 3
    # different keys do not wait for each other's lock, and a failed build leaves nothing behind
    with pytest.raises(RuntimeError):
        cache.cached("x", {"a": 2}, 0, lambda: (_ for _ in ()).throw(RuntimeError("boom")), save, load, root=tmp_path)
    assert not cache.is_cached("x", {"a": 2}, 0, root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != cache.LOCKS) == [
        cache.key_for("x", {"a": 1}, 0)]


def test_builds_run_on_the_build_thread_count_and_record_it(tmp_path, monkeypatch):
    from importlib.metadata import version
    seen = []

    def build():
        seen.append(torch.get_num_threads())
        return "a"

    def save(art, p):
        (p / "a.txt").write_text(art)

    def load(p):
        return (p / "a.txt").read_text()

    monkeypatch.setenv("L2P_BUILD_THREADS", "2")
    before = torch.get_num_threads()
    assert cache.cached("y", {}, 0, build, save, load, root=tmp_path) == "a"
    assert seen == [2] and torch.get_num_threads() == before  # the caller's count comes back
    meta = json.loads((tmp_path / cache.key_for("y", {}, 0) / "cache_meta.json").read_text())
    assert meta["threads"] == 2 and meta["libraries"]["torch"] == version("torch")
    assert meta["cpu"] == cache.cpu_model() and f"({torch.backends.cpu.get_cpu_capability()}" in meta["cpu"]
    monkeypatch.setenv("L2P_BUILD_THREADS", "1")  # an entry built on another count still loads, with a warning
    with pytest.warns(UserWarning, match="built on 2 thread"):
        assert cache.cached("y", {}, 0, build, save, load, root=tmp_path) == "a"
    assert seen == [2]
    monkeypatch.setenv("L2P_BUILD_THREADS", "two")
    with pytest.raises(ValueError, match="L2P_BUILD_THREADS"):
        cache.build_threads()
    monkeypatch.setenv("L2P_BUILD_THREADS", "2")
    # an artefact kind with its own count (fine-tuning runs: run_threads) builds and records on that count
    assert cache.cached("z", {}, 0, build, save, load, root=tmp_path, threads=1) == "a"
    assert seen == [2, 1] and torch.get_num_threads() == before
    assert json.loads((tmp_path / cache.key_for("z", {}, 0) / "cache_meta.json").read_text())["threads"] == 1
    with pytest.warns(UserWarning, match="built on 1 thread"):
        cache.cached("z", {}, 0, build, save, load, root=tmp_path)  # asked for on build_threads (2)
    cache.cached("z", {"other": 1}, 0, build, save, load, root=tmp_path, threads=1)
    with warnings.catch_warnings():  # said once per kind and counts: a report loads dozens of runs
        warnings.simplefilter("error")
        cache.cached("z", {"other": 1}, 0, build, save, load, root=tmp_path)
    monkeypatch.delenv("L2P_RUN_THREADS", raising=False)
    assert cache.run_threads() == 1
    monkeypatch.setenv("L2P_RUN_THREADS", "0")
    with pytest.raises(ValueError, match="L2P_RUN_THREADS"):
        cache.run_threads()


def _fake_runs(monkeypatch):
    """Record every (world, config) a notebook helper asks `finetune` for, without training."""
    asked = set()

    def fake(world, cfg, progress=True):
        asked.add((repr(world.spec.key()), repr(cfg.key())))
        evals = pd.DataFrame({"step": [0, cfg.steps], "geneval": [0.0, 0.0], "fid": [1.0, 1.0],
                              "spectral": [0.0, 0.0]})
        return SimpleNamespace(config=cfg, evals=evals, history=pd.DataFrame({"loss": [0.0]}))

    for module in (ablations, grid, recipe):
        monkeypatch.setattr(module, "finetune", fake)
    return asked


def test_the_recorded_cpu_tells_apart_two_cpus_of_one_model_name(tmp_path):
    """Sessions 28 and 29 built two different worlds on CPUs both named "Intel(R) Xeon(R) Processor": the record
    carries family/model/stepping and the matrix extensions that pick kernels, which the name does not."""
    block = ("processor\t: {n}\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: {model}\n"
             "model name\t: Intel(R) Xeon(R) Processor\nstepping\t: {step}\nflags\t\t: fpu avx2 avx512f {extra}\n\n")
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_text(block.format(n=0, model=85, step=7, extra="avx512_vnni"))
    new.write_text("".join(block.format(n=n, model=143, step=8, extra="avx512_bf16 amx_bf16 amx_tile") for n in (0, 1)))
    a, b = cache.cpu_model(old), cache.cpu_model(new)
    assert a != b and a.startswith("Intel(R) Xeon(R) Processor, family 6 model 85 stepping 7 (")
    assert b.endswith("; avx512_bf16 amx_bf16)") and "amx" not in a
    assert cache.cpu_model(tmp_path / "missing").endswith(f"({torch.backends.cpu.get_cpu_capability()})")


@pytest.mark.parametrize("mode", ["smoke", "full"])
def test_plan_covers_every_run_the_notebooks_ask_for(mode, monkeypatch):
    asked = _fake_runs(monkeypatch)
    world = SimpleNamespace(spec=prebuild.SPECS[mode], mode=mode)
    # notebook 03 with its default parameters: the best recipe, its other seeds, its from-scratch comparison
    cfg = recipe.recipe_config("best", mode, policy="paper", n=1, seed=0)
    for c in [cfg.replace(seed=s) for s in ablations.SEEDS[mode]] + [cfg.replace(init="scratch", vae_fit_gain=None)]:
        recipe.finetune(world, c)
    for exp in ablations.EXPERIMENTS:  # notebook 04
        ablations.run_experiment(world, exp, mode)
    worlds = {name: SimpleNamespace(spec=spec) for name, spec in grid.GRIDS[mode].items()}  # notebook 07
    grid.grid_runs(worlds, mode)
    plan = {(repr(r.world.key()), repr(r.config.key())) for r in prebuild.planned_runs(mode)}
    assert asked == plan
    if mode == "full":  # 03 and 04 share all but 03's from-scratch run: 121 distinct runs, and 6 for 07
        assert len(plan) == 127


@pytest.mark.slow
def test_prebuild_trains_in_workers_what_the_notebook_then_loads(monkeypatch):
    from l2p.toyworld.world import build_toy_world, missing_pieces
    logged = []
    monkeypatch.setattr(prebuild, "available_cores", lambda: 2)  # 2 workers × 1 thread fit, whatever CI has
    ours = [r for r in prebuild.planned_runs("smoke") if r.label.startswith("03 ")]

    def entry(r):
        return cache.cache_dir() / cache.key_for("toy_finetune", recipe.run_key(r.world, r.config), r.config.seed)
    # earlier tests of the session (the smoke report run) may have cached them all: one trains here
    shutil.rmtree(entry(ours[0]), ignore_errors=True)
    fresh = [r for r in ours if not r.cached()]
    world_was_cached = not missing_pieces(ours[0].world)
    done = prebuild.prebuild("smoke", jobs=2, notebooks=["03_finetune"], log=logged.append)
    assert done["planned"] == 3 and len(ours) == 3 and all(r.cached() for r in ours)
    assert logged[0].startswith("prebuild (smoke): ") and "2 worker(s) × 1 thread(s)" in logged[0]
    ready = next(i for i, m in enumerate(logged) if m.startswith("  world smoke: ready"))  # built before the workers
    assert ready in (1, 2) and (ready == 1) == world_was_cached
    if not world_was_cached:  # what is missing is named before it trains
        assert logged[1].startswith("  world smoke: training ")
    assert fresh and logged[ready + 1].startswith(f"  {len(fresh)} run(s) to train on 2 worker(s): ")
    # each worker's evaluations reach the caller's log while it trains, the untrained one (step 0) to the last
    steps = recipe.FINETUNE_MODES["smoke"].steps
    for r in ours:
        beats = [m for m in logged if m.startswith(f"    {r.label}: step ")]
        if r not in fresh:
            assert not beats  # loaded, not trained: nothing to report
            continue
        assert beats[0].startswith(f"    {r.label}: step 0/{steps}: toy-GenEval ")
        assert beats[-1].startswith(f"    {r.label}: step {steps}/{steps}: toy-GenEval ")
    assert len([m for m in logged if m.startswith("  [")]) == len(fresh)  # one line per finished run
    # the workers trained on run_threads(), and the world's parts were built on build_threads()
    for r in ours:
        assert json.loads((entry(r) / "cache_meta.json").read_text())["threads"] == cache.run_threads()
    inits = list(cache.cache_dir().glob("toy_pixel_init-*/cache_meta.json"))
    assert inits and all(json.loads(m.read_text())["threads"] == cache.build_threads() for m in inits)
    # the notebook's calls now load, never train
    monkeypatch.setattr(cache, "_build_and_save", lambda *a, **k: pytest.fail(f"rebuilt {a[0]}"))
    world = build_toy_world("smoke", progress=False)
    base = recipe.recipe_config("best", "smoke")
    run = recipe.finetune(world, base, progress=False)
    assert run.evals.step.iloc[-1] == base.steps
    recipe.finetune(world, base.replace(seed=1), progress=False)
    recipe.finetune(world, base.replace(init="scratch", vae_fit_gain=None), progress=False)
    again = prebuild.prebuild("smoke", jobs=2, notebooks=["03"], log=logged.append)
    assert again["built"] == 0 and logged[-1].startswith("prebuild (smoke): 3 of 3 runs cached")
    with pytest.raises(ValueError, match="jobs"):
        prebuild.prebuild("smoke", jobs=0)


@pytest.mark.parametrize("cores,threads,jobs,used", [(2, 2, 2, 1), (2, 2, 5, 1), (16, 2, 8, 8), (16, 2, 12, 8),
                                                     (1, 2, 3, 1), (4, 1, 3, 3), (2, 1, 2, 2), (2, 1, 3, 2)])
def test_prebuild_never_runs_more_workers_than_the_cores_hold(monkeypatch, cores, threads, jobs, used):
    """Oversubscribed OpenMP threads slow every job down (bench/bench_oversubscription.py): cut to cores // threads."""
    monkeypatch.setattr(prebuild, "available_cores", lambda: cores)
    monkeypatch.setenv("L2P_RUN_THREADS", str(threads))
    logged = []
    prebuild.prebuild("smoke", jobs=jobs, notebooks=["99"], log=logged.append)  # no notebook 99: nothing to train
    assert f"with {used} worker(s) × {threads} thread(s)" in logged[-1]
    assert any("oversubscribe" in m for m in logged) == (used < jobs)


@pytest.mark.parametrize("mode,cores,threads,used", [("full", 2, 1, 2), ("full", 16, 2, 8), ("full", 1, 1, 1),
                                                     ("full", 3, 2, 1), ("smoke", 16, 1, 1)])
def test_auto_jobs_is_one_worker_per_run_threads_cores_in_full_mode(monkeypatch, mode, cores, threads, used):
    from l2p import reports
    monkeypatch.setattr(prebuild, "available_cores", lambda: cores)
    monkeypatch.setenv("L2P_RUN_THREADS", str(threads))
    assert prebuild.auto_jobs(mode) == used
    logged = []
    prebuild.prebuild(mode, jobs=None, notebooks=["99"], log=logged.append)
    assert f"with {used} worker(s)" in logged[-1] and not any("oversubscribe" in m for m in logged)
    assert reports._jobs("auto") is None and reports._jobs("3") == 3
    with pytest.raises(Exception, match="auto"):
        reports._jobs("many")


def test_a_toy_build_is_bit_identical_when_rebuilt_on_the_build_thread_count(tmp_path, monkeypatch):
    """What the cache's keys assume: the same config, built again on the same thread count, is the same artefact."""
    from l2p.toyworld.vae import load_or_train_vae, vae_train_config
    cfg = vae_train_config("smoke").replace(steps=12)
    weights = []
    for root in ("a", "b"):
        monkeypatch.setenv("L2P_CACHE", str(tmp_path / root))
        vae, _ = load_or_train_vae(cfg, progress=False)
        weights.append({k: v.clone() for k, v in vae.state_dict().items()})
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_the_plan_table_says_what_is_cached_and_estimates_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("L2P_CACHE", str(tmp_path))
    monkeypatch.setenv("L2P_BUILD_THREADS", "2")
    spec = prebuild.SPECS["smoke"]
    base = recipe.FINETUNE_MODES["smoke"]
    runs = [prebuild.PlannedRun(spec, base.replace(seed=s), f"04 · x: a, seed {s}") for s in (0, 1)]
    runs.append(prebuild.PlannedRun(spec, base.replace(steps=99), "07 · y, seed 0"))
    monkeypatch.setattr(prebuild, "planned_runs", lambda mode: runs)
    r = runs[0]

    def slow_build():
        time.sleep(0.05)
        return "x"
    cache.cached("toy_finetune", recipe.run_key(r.world, r.config), r.config.seed, slow_build,
                 lambda a, p: (p / "a").write_text(a), lambda p: p)
    df = prebuild.plan_table("smoke", threads=2)
    assert df.cached.tolist() == [True, False, False] and df.estimated.tolist() == [False, True, True]
    assert df.threads[0] == 2 and df.basis[1] == "2 thread(s)"  # cache.cached builds on build_threads() = 2
    assert df.minutes[0] > 0 and df.minutes[1] == df.minutes[0] and df.minutes.isna()[2]  # no run of its budget
    text = prebuild.plan_summary(df, jobs=2, threads=2)
    assert "04: 1 of 2 runs cached" in text and "07: 0 of 1 runs cached" in text and "1 of unknown cost" in text
    assert "another thread count" not in text
    # workers on 1 thread: the 2-thread run still stands in, but the summary says so
    df1 = prebuild.plan_table("smoke", threads=1)
    assert df1.minutes[1] == df.minutes[1] and df1.basis[1] == "other threads"
    assert "1 estimated from runs on another thread count" in prebuild.plan_summary(df1, jobs=2, threads=1)
    assert list(prebuild.plan_table("smoke", notebooks=["07_token_grid"]).notebook) == ["07"]
    # one notebook's runs are estimated from every notebook's cached runs (a fresh 07 learns from 04's)
    alone = prebuild.plan_table("smoke", notebooks=["04"], threads=2)
    assert alone.run.tolist() == [runs[0].label, runs[1].label] and alone.minutes[1] == df.minutes[1]
    runs[2] = prebuild.PlannedRun(spec, base.replace(seed=5), "07 · y, seed 5")
    assert prebuild.plan_table("smoke", notebooks=["07"], threads=2).minutes[0] == df.minutes[0]
    # a latent-loss run of the same steps costs about twice as much: no estimate from plain runs
    runs[2] = prebuild.PlannedRun(spec, base.replace(seed=5, latent_loss=1.0), "04 · z, seed 5")
    assert prebuild.plan_table("smoke", threads=2).minutes.isna()[2]
    # the smoke world is not built in this empty cache: the summary says so, naming its pieces
    assert "worlds: 0 of 1 built" in text and "the world of 04 · x: a (toy VAE, judge, source LDM)" in text


def _timed_runs():
    """Five smoke runs: three with minutes (a cached run of their budget would give them), two without."""
    spec, base = prebuild.SPECS["smoke"], recipe.FINETUNE_MODES["smoke"]
    runs = {name: prebuild.PlannedRun(spec, base.replace(**kw), f"04 · {name}, seed 0") for name, kw in
            [("a", dict(steps=100)), ("b", dict(steps=400)), ("c", dict(steps=200)), ("d", dict(steps=100,
             latent_loss=1.0)), ("e", dict(steps=300))]}
    minutes = {runs["a"].label: 10.0, runs["c"].label: 20.0, runs["e"].label: 60.0, runs["b"].label: float("nan")}
    return list(runs.values()), minutes


def test_runs_are_ordered_by_their_estimated_minutes_and_the_rest_by_their_work():
    runs, minutes = _timed_runs()
    names = lambda rs: [r.label.split(" ")[2].rstrip(",") for r in rs]  # "04 · b, seed 0" → "b"
    # a, c: 0.1 min per step; e: 0.2. Untimed b (400 steps) ~ 40 min at the median rate, d (100 steps with a
    # latent loss, 1.9×) ~ 19 min
    assert names(prebuild.order_runs(runs, "longest", minutes)) == ["e", "b", "c", "d", "a"]
    assert names(prebuild.order_runs(runs, "shortest", minutes)) == ["a", "d", "c", "b", "e"]
    assert names(prebuild.order_runs(runs, "plan", minutes)) == ["a", "b", "c", "d", "e"]
    # nothing timed: by work alone
    assert names(prebuild.order_runs(runs, "longest")) == ["b", "e", "c", "d", "a"]
    with pytest.raises(ValueError, match="order must be one of.*'fastest'"):
        prebuild.order_runs(runs, "fastest")


@pytest.mark.parametrize("order", ["longest", "shortest", "plan"])
def test_prebuild_hands_the_workers_their_runs_in_the_order_asked(tmp_path, monkeypatch, order):
    from concurrent.futures import Future
    from l2p import reports
    monkeypatch.setenv("L2P_CACHE", str(tmp_path))  # nothing cached: every run is to train
    runs, minutes = _timed_runs()
    monkeypatch.setattr(prebuild, "planned_runs", lambda mode: runs)
    monkeypatch.setattr(prebuild, "available_cores", lambda: 2)
    monkeypatch.setattr(prebuild, "_prepare", lambda todo, log: None)
    monkeypatch.setattr(prebuild, "plan_table", lambda mode, notebooks=None: pd.DataFrame(
        {"run": [r.label for r in runs], "minutes": [minutes.get(r.label) for r in runs], "cached": False}))
    submitted = []

    class Pool:  # runs nothing: records what is handed over, in order
        def __init__(self, *a, **k):
            pass

        def submit(self, fn, run):
            submitted.append(run.label)
            fut = Future()
            fut.set_result((run, 0.0))
            return fut

        def shutdown(self, **k):
            pass
    monkeypatch.setattr(prebuild, "ProcessPoolExecutor", Pool)
    logged = []
    prebuild.prebuild("smoke", jobs=2, log=logged.append, order=order)
    assert submitted == [r.label for r in prebuild.order_runs(runs, order, minutes)]
    assert ("first" in logged[0]) == (order != "plan")
    # the command line offers the same orders, longest first by default
    import argparse
    ap = argparse.ArgumentParser()
    reports._args(ap)
    action = next(a for a in ap._actions if a.dest == "order")
    assert tuple(action.choices) == prebuild.ORDERS and action.default == "longest"


def test_the_time_left_counts_a_long_run_left_over_at_the_end():
    assert prebuild.finish_minutes([60, 10, 10, 10], jobs=2) == 60  # longest first: the others fill the other worker
    assert prebuild.finish_minutes([10, 10, 10, 60], jobs=2) == 70  # started last, it runs alone (sum / 2 is 45)
    assert prebuild.finish_minutes([10, 20, 30], jobs=1) == 60 and prebuild.finish_minutes([], jobs=3) == 0
    df = pd.DataFrame({"notebook": "04", "run": [f"04 · x: a, seed {s}" for s in range(4)], "cached": False,
                       "minutes": [10.0, 60.0, 10.0, 10.0], "basis": "1 thread(s)", "world": "w", "world_missing": "",
                       "world_minutes": float("nan")})
    assert "04: 0 of 4 runs cached; ~90 run-min left, roughly 60 min on 2 worker(s)" in prebuild.plan_summary(df, 2, 1)


def test_a_run_in_training_counts_only_what_it_has_left(monkeypatch):
    labels = [f"04 · x: a, seed {s}" for s in range(3)]
    monkeypatch.setattr(prebuild, "plan_table", lambda mode, notebooks=None: pd.DataFrame(
        {"run": labels, "minutes": [40.0, 40.0, 10.0], "cached": False}))
    assert prebuild._time_left("full", None, 2) == "~50 min left"  # 40 | 40 + 10
    now = 10_000.0
    # both 40-min runs 30 min in: 10 left each, then the 10-min run on one worker
    started = {labels[0]: now - 30 * 60, labels[1]: now - 30 * 60}
    assert prebuild._time_left("full", None, 2, started, now=now) == "~20 min left"
    started[labels[1]] = now - 90 * 60  # past its estimate: about to finish, not negative
    assert prebuild._time_left("full", None, 2, started, now=now) == "~10 min left"


def test_the_workers_start_times_are_kept_apart_from_their_log_lines(monkeypatch):
    import queue

    from l2p.toyworld import recipe, world
    q, logged, started = queue.Queue(), [], {}
    q.put("    04 · x: step 0/1500")
    q.put(prebuild._Started("04 · x", 123.0))
    prebuild._relay(q, logged.append, started=started)
    assert logged == ["    04 · x: step 0/1500"] and started == {"04 · x": 123.0}
    # a worker announces a run before it trains it
    run = prebuild.planned_runs("smoke")[0]
    monkeypatch.setattr(recipe, "finetune", lambda *a, **k: None)
    monkeypatch.setattr(world, "build_toy_world", lambda **k: None)
    monkeypatch.setattr(prebuild, "_heartbeat", q)
    prebuild._build(run)
    prebuild._relay(q, logged.append, started=started)
    assert run.label in started and len(logged) == 1


def test_a_fresh_cache_estimates_every_full_run_and_world_from_the_reference_machine(tmp_path, monkeypatch):
    """A first report run is the one whose cost a user must know: every budget the full plan uses has a reference
    time (a new budget must bring one), and the worlds' pieces are counted once even where two worlds share them."""
    monkeypatch.setenv("L2P_CACHE", str(tmp_path))
    monkeypatch.setenv("L2P_RUN_THREADS", "1")
    df = prebuild.plan_table("full")
    assert len(df) == len(prebuild.planned_runs("full")) and not df.cached.any()
    assert set(df.budget) == set(prebuild.REFERENCE_MINUTES), "a full-mode budget without a reference time"
    assert (df.basis == "reference machine").all() and df.minutes.notna().all()
    assert df.minutes.tolist() == df.budget.map(prebuild.REFERENCE_MINUTES).tolist()
    ref = prebuild.REFERENCE_WORLD_MINUTES
    worlds = df.groupby("world", sort=False).world_minutes.first()
    assert [prebuild.world_name(r.world) for r in prebuild.planned_runs("full")[:3]] == ["default", "coarse", "fine"]
    # 07's coarse world trains on the default world's VAE and judge, and the fine world on its judge
    assert worlds.tolist() == pytest.approx([sum(ref["default"].values()), ref["coarse"]["source LDM"],
                                             ref["fine"]["toy VAE"] + ref["fine"]["source LDM"]])
    text = prebuild.plan_summary(df, jobs=2, threads=1)
    assert f"all: 0 of {len(df)} runs cached" in text and "unknown cost" not in text
    assert f"(~{worlds.sum():.0f} min on the reference machine)" in text
    # a smoke run takes seconds: no reference, so an empty cache leaves it unknown
    assert prebuild.plan_table("smoke").minutes.isna().all()
