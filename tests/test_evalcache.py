"""The evaluation cache: a hit returns exactly what the computation returned; any change of input misses."""
import pytest
import torch

from l2p.cache import cache_dir
from l2p.toyworld.evalcache import NAME


def _entries() -> set:
    return {p.name for p in cache_dir().glob(f"{NAME}-*")}


@pytest.fixture(scope="module")
def world():
    from l2p.toyworld.world import build_toy_world
    return build_toy_world("smoke", progress=False)


def _same(a: dict, b: dict) -> None:
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["reference"], b["reference"])
    assert a["scores"].equals(b["scores"]) and a["summary"].equals(b["summary"])
    assert list(a["scores"].dtypes) == list(b["scores"].dtypes)
    for k in ("geneval", "fid", "kid", "spectral"):
        assert a[k] == b[k] and type(a[k]) is type(b[k]), k


def test_a_hit_equals_a_fresh_evaluation_and_does_not_sample(world, monkeypatch):
    prompts = world.prompts(6, seed=501)
    pipe = world.latent_pipeline()
    fresh = world.evaluate(pipe, prompts, seed=3, cache=False)
    before = _entries()
    first = world.evaluate(pipe, prompts, seed=3)
    assert len(_entries() - before) == 1
    _same(fresh, first)

    def no_sampling(*a, **k):
        raise AssertionError("a cached evaluation sampled again")
    monkeypatch.setattr(type(world), "sample", no_sampling)
    _same(fresh, world.evaluate(pipe, prompts, seed=3))
    _same(fresh, world.evaluate(world.latent_pipeline(), list(prompts), seed=3))  # a new pipeline, same weights


def test_every_input_that_decides_the_result_is_in_the_key(world):
    from l2p.toyworld.recipe import FINETUNE_MODES, finetune
    prompts = world.prompts(4, seed=502)
    model = finetune(world, FINETUNE_MODES["smoke"], progress=False).model
    pixel = world.pixel_pipeline(model)
    base = dict(seed=1, cfg_scale=2.0, steps=2)
    world.evaluate(pixel, prompts, **base)
    n = len(_entries())
    world.evaluate(pixel, prompts, **base)
    assert len(_entries()) == n  # the same evaluation: a hit
    changed = [dict(base, seed=2), dict(base, cfg_scale=1.5), dict(base, steps=3), dict(base, shift=6.0),
               dict(base, batch_size=2), dict(base, solver="heun")]
    for kw in changed:
        world.evaluate(pixel, prompts, **kw)
    world.evaluate(pixel, world.prompts(4, seed=503), **base)
    assert len(_entries()) == n + len(changed) + 1

    other = type(model)(model.cfg)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)  # one weight moved: another model
    world.evaluate(world.pixel_pipeline(other), prompts, **base)
    assert len(_entries()) == n + len(changed) + 2


def test_what_cannot_be_keyed_is_computed_and_not_stored(world, monkeypatch):
    prompts = world.prompts(3, seed=504)
    before = _entries()
    seen = []
    r = world.evaluate(world.latent_pipeline(), prompts, steps=2, callback=seen.append)  # a function in the settings
    assert seen and 0.0 <= r["geneval"] <= 1.0
    monkeypatch.setenv("L2P_EVAL_CACHE", "0")
    world.evaluate(world.latent_pipeline(), prompts, steps=2)
    assert _entries() == before


def test_training_time_evaluations_are_not_stored(world):
    from l2p.toyworld.recipe import FINETUNE_MODES, finetune
    before = _entries()
    run = finetune(world, FINETUNE_MODES["smoke"].replace(seed=91), progress=False)
    assert len(run.evals) >= 2
    assert _entries() == before


def test_a_cached_table_comes_back_exactly_and_follows_its_inputs(world, monkeypatch):
    from l2p.toyworld import readout
    from l2p.toyworld.recipe import FINETUNE_MODES, finetune
    model = finetune(world, FINETUNE_MODES["smoke"], progress=False).model
    kw = dict(sigmas=(0.3, 1.0), n_train=24, n_test=8)
    fresh = readout.shape_readout(world, {"pixel": model}, cache=False, **kw)
    first = readout.shape_readout(world, {"pixel": model}, **kw)
    assert fresh.equals(first) and first.index.name == "sigma" and list(first.dtypes) == list(fresh.dtypes)
    calls = []
    real = readout._shape_readout
    monkeypatch.setattr(readout, "_shape_readout", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert readout.shape_readout(world, {"pixel": model}, **kw).equals(fresh) and not calls  # a hit
    readout.shape_readout(world, {"pixel": model}, **{**kw, "n_train": 20})
    readout.shape_readout(world, {"other name": model}, **kw)  # the column names are the labels: part of the key
    assert len(calls) == 2


def test_the_per_sigma_probes_are_cached_exactly_and_lambdas_are_not(world, monkeypatch):
    """denoising_error / denoising_checks (a two-level index) / velocity_error: a hit equals the fresh table."""
    import pandas as pd
    from l2p.toyworld.world import ToyWorld
    from l2p.toyworld.recipe import FINETUNE_MODES, finetune
    model = finetune(world, FINETUNE_MODES["smoke"], progress=False).model
    probes = {"denoising_error": dict(n=4, seed=5), "denoising_checks": dict(n=4, seed=21),
              "velocity_error": dict(n=4, seed=31, batch_size=2)}

    def no_model_call(*a, **k):
        raise AssertionError("a cache hit ran the models")

    for name, kw in probes.items():
        method = getattr(world, name)
        fresh = method({"pixel": model}, sigmas=(0.2, 0.7), cache=False, **kw)
        first = method({"pixel": model}, sigmas=(0.2, 0.7), **kw)
        assert fresh.equals(first) and list(first.index.names) == list(fresh.index.names), name
        with monkeypatch.context() as m:
            m.setattr(ToyWorld, "_one_step_x0", no_model_call)
            m.setattr(ToyWorld, "sample", no_model_call)
            hit = method({"pixel": model}, sigmas=[0.2, 0.7], **kw)  # the same floats as a list: the same key
        assert hit.equals(fresh) and hit.index.equals(fresh.index), name
        assert list(hit.dtypes) == list(fresh.dtypes), name
    assert isinstance(world.denoising_checks({"pixel": model}, sigmas=(0.2, 0.7), n=4, seed=21).index, pd.MultiIndex)

    entries = lambda: {p.name for p in cache_dir().glob("toy_denoising_error-*")}  # noqa: E731
    before = entries()
    zero = lambda xs, t, feats: torch.zeros_like(xs)  # noqa: E731  (no weights to key: computed, not stored)
    world.denoising_error({"zero": zero}, sigmas=(0.2,), n=4, seed=6)
    assert entries() == before
    world.denoising_error({"pixel": model}, sigmas=(0.2,), n=4, seed=6)  # a new setting: one new entry
    assert len(entries() - before) == 1
