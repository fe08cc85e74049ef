"""Toy world: deterministic scenes, caption round trip, renders, the toy VAE, the judge and the cache."""
import json
import os
import time

import numpy as np
import pytest
import torch

from l2p import cache
from l2p.toyworld import scenes as sc
from l2p.toyworld import vae as tv
from l2p.toyworld.evaluator import (CATEGORY_CHECKS, EVALUATOR_MODES, Evaluator, EvaluatorTrainConfig, JudgeConfig,
                                    JudgeNet, held_out_accuracy, load_or_train_evaluator, train_evaluator)

# ----------------------------------------------------------------------------------------------
#                                          Scenes
# ----------------------------------------------------------------------------------------------


def test_generate_is_deterministic():
    a, ca, _ = sc.generate(24, seed=3)
    b, cb, _ = sc.generate(24, seed=3)
    c, cc, _ = sc.generate(24, seed=4)
    assert a.dtype == np.uint8 and a.shape == (24, 64, 64, 3)
    assert np.array_equal(a, b) and ca == cb
    assert not np.array_equal(a, c) and ca != cc


def test_items_are_addressable():
    """Item i of a stream is the same however it is reached: slices, offsets, the Dataset."""
    full, caps, _ = sc.generate(12, seed=5)
    part, pcaps, _ = sc.generate(4, seed=5, start=8)
    assert np.array_equal(full[8:], part) and caps[8:] == pcaps
    ds = sc.ToyWorldDataset(12, seed=5)
    x, cap, labels = ds[10]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1
    assert torch.equal(x, sc.to_tensor(full[10])) and cap == caps[10]
    assert labels["cell_shape"].shape == (9,) and int(labels["count"]) == int((labels["cell_shape"] > 0).sum())
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 64, 64) and len(batch[1]) == 4 and batch[2]["background"].shape == (4,)
    with pytest.raises(IndexError):
        ds[12]


def test_to_tensor_to_uint8_roundtrip():
    imgs, _, _ = sc.generate(3, seed=0)
    assert np.array_equal(sc.to_uint8(sc.to_tensor(imgs)), imgs)


@pytest.mark.parametrize("kind", sc.KINDS)
def test_caption_roundtrip(kind):
    cfg = sc.ToyWorldConfig(shapes=sc.SHAPES, colors=tuple(sc.COLORS))
    for i in range(250):
        rng = sc.item_rng(11, i)
        scene = sc.sample_scene(rng, cfg, kind)
        for text in (sc.caption(scene, rng), sc.caption(scene)):  # varied wording, then canonical
            assert sc.parse_caption(text) == scene.attributes(), text


def test_caption_wording_varies():
    caps = {sc.caption(sc.sample_scene(sc.item_rng(1, 0), kind="single"), sc.item_rng(2, j)) for j in range(40)}
    assert len(caps) > 20


def test_parse_handwritten_captions():
    p = sc.parse_caption("A large red circle in the top left on a striped background.")
    assert p == {"kind": "single", "count": 1, "background": "stripes", "relation": None,
                 "objects": [{"shape": "circle", "color": "red", "size": "large", "position": "top left"}]}
    p = sc.parse_caption("on a grainy backdrop, two small blue squares")
    assert (p["kind"], p["count"], p["objects"][0]["shape"], p["background"]) == ("counting", 2, "square", "grain")
    p = sc.parse_caption("a big yellow plus sign to the left of a tiny violet triangle over a flat background")
    assert p["kind"] == "two_object" and p["relation"] == "left of"
    assert [(o["shape"], o["color"], o["size"]) for o in p["objects"]] == [("cross", "yellow", "large"),
                                                                          ("triangle", "purple", "small")]
    with pytest.raises(ValueError):
        sc.parse_caption("a red circle")  # no background


def test_relation_scenes_satisfy_their_relation():
    for i in range(200):
        s = sc.sample_scene(sc.item_rng(9, i), kind="two_object")
        a, b = s.objects
        assert sc._relation_holds(s.relation, a.position, b.position)
        assert (a.shape, a.color) != (b.shape, b.color)


def test_render_matches_scene():
    """The object colour sits at the object's centre; its cell differs from every empty cell's centre."""
    cfg = sc.ToyWorldConfig(shapes=sc.SHAPES, mix=(("single", 0.4), ("counting", 0.3), ("mixed", 0.3)))
    imgs, _, scenes = sc.generate(200, seed=2, cfg=cfg)
    for img, s in zip(imgs, scenes):
        for o in s.objects:
            px = img[int(o.cy), int(o.cx)].astype(int)
            assert np.abs(px - np.round(np.asarray(o.rgb) * 255)).max() <= 2
        occupied = {o.cell for o in s.objects}
        for cell in set(range(9)) - occupied:  # empty cells hold no object colour at their centre
            x, y = sc._cell_center(sc.POSITIONS[cell])
            px = img[int(y), int(x)].astype(int)
            assert all(np.abs(px - np.round(np.asarray(o.rgb) * 255)).max() > 12 for o in s.objects)


def test_render_scales_with_size():
    s = sc.sample_scene(sc.item_rng(0, 1), kind="single")
    s.background = sc.Background("plain", (0.5, 0.5, 0.5))
    small, big = sc.render(s, 64), sc.render(s, 128)
    assert big.shape == (128, 128, 3)
    area = lambda im: (np.abs(im.astype(int) - 128).max(-1) > 40).sum()  # noqa: E731
    assert area(big) / area(small) == pytest.approx(4.0, rel=0.1)
    pooled = big.reshape(64, 2, 64, 2, 3).mean((1, 3))
    assert np.abs(pooled - small).mean() < 2.0


def test_textured_backgrounds_carry_high_frequencies():
    from l2p.metrics import high_frequency_energy

    hf = {}
    for bg in sc.BACKGROUNDS:
        imgs, _, _ = sc.generate(16, seed=0, cfg=sc.ToyWorldConfig(backgrounds=(bg,)))
        hf[bg] = high_frequency_energy(sc.to_tensor(imgs), cutoff=0.25)
    for textured in ("stripes", "checks", "grain"):  # the objects' edges are the rest
        assert hf[textured] > 8 * max(hf["plain"], hf["gradient"]), hf


def test_prompt_set_categories():
    ps = sc.prompt_set(80, seed=1)
    cats = [p.category for p in ps]
    assert set(cats) == set(sc.DEFAULT_CATEGORIES) and len(set(cats.count(c) for c in set(cats))) == 1
    for p in ps:
        assert p.scene.kind == sc.CATEGORY_KIND[p.category]
        assert sc.parse_caption(p.text) == p.scene.attributes()
    assert [p.text for p in sc.prompt_set(80, seed=1)] == [p.text for p in ps]
    single = sc.single_object_world()
    assert set(single.categories()) == {"single_object", "colors", "size", "position", "background"}


def test_world_mix_and_validation():
    cfg = sc.ToyWorldConfig()
    kinds = [sc.sample_scene(sc.item_rng(0, i), cfg).kind for i in range(2000)]
    assert 0.75 < kinds.count("single") / len(kinds) < 0.85
    assert max(len(s.objects) for s in (sc.sample_scene(sc.item_rng(1, i), cfg) for i in range(300))) == 3
    with pytest.raises(ValueError):
        sc.ToyWorldConfig(shapes=("hexagon",))
    with pytest.raises(ValueError):
        sc.ToyWorldConfig(max_objects=1)  # the default mix has multi-object kinds


def test_generation_is_fast():
    t = time.perf_counter()
    sc.generate(256, seed=0)
    assert time.perf_counter() - t < 2.0  # ~1–3k images/s on an idle core


# ----------------------------------------------------------------------------------------------
#                                           VAE
# ----------------------------------------------------------------------------------------------


def test_vae_shapes_and_normalisation(tmp_path):
    torch.manual_seed(0)
    cfg = tv.vae_train_config("smoke")
    vae = tv.build_vae(cfg).eval()
    assert vae.config.latent_channels == 16 and len(vae.config.block_out_channels) == 4
    x = sc.to_tensor(sc.generate(16, seed=0)[0])
    shift, scale = tv.calibrate(vae, x)
    z = tv.encode(vae, x)
    assert z.shape == (16, 16, 8, 8)
    assert abs(z.mean().item()) < 1e-4 and z.std().item() == pytest.approx(1.0, rel=1e-3)
    y = tv.decode(vae, z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    tv.save_vae(vae, None, tmp_path / "vae")
    vae2, hist = tv.load_vae(tmp_path / "vae")
    assert hist is None
    assert vae2.config.shift_factor == pytest.approx(shift) and vae2.config.scaling_factor == pytest.approx(scale)
    assert torch.allclose(tv.encode(vae2, x), z, atol=1e-5)


def test_train_vae_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("L2P_CACHE", str(tmp_path))
    cfg = tv.VAETrainConfig(steps=3, batch_size=4, calib_images=8)
    t = time.perf_counter()
    vae, hist = tv.load_or_train_vae(cfg, progress=False)
    assert len(hist) == 3 and {"loss", "l1", "kl", "psnr"} <= set(hist.columns)
    assert vae.config.scaling_factor != 1.0
    assert time.perf_counter() - t < 30
    before = sorted(os.listdir(tmp_path))
    vae2, hist2 = tv.load_or_train_vae(cfg, progress=False)  # a cache hit: nothing new is built
    assert sorted(os.listdir(tmp_path)) == before and len(hist2) == 3
    for a, b in zip(vae.parameters(), vae2.parameters()):
        assert torch.equal(a, b)
    m = tv.evaluate_vae(vae2, n=20)
    assert {"psnr", "hf_ratio", "spectral_fidelity"} <= set(m) and any(k.startswith("hf_ratio/") for k in m)


def test_object_mask_covers_exactly_the_objects():
    scene, _ = sc.sample_item(0, 3, sc.ToyWorldConfig(), kind="single")
    m = sc.object_mask(scene, 64)
    assert m.shape == (64, 64) and m.min() == 0 and m.max() == 1
    # Where the mask is 1 the render shows the object's colour; where 0, the background alone.
    img = sc.render(scene, 64).astype(np.float32) / 255
    plain = sc.render(sc.Scene(scene.kind, [], scene.background), 64).astype(np.float32) / 255
    assert np.abs(img[m == 1] - np.asarray(scene.objects[0].rgb)).max() < 2 / 255
    assert np.abs(img[m == 0] - plain[m == 0]).max() < 2 / 255
    w = tv.object_weights([scene], 64, ring=2)
    assert w.shape == (1, 1, 64, 64) and (w >= torch.from_numpy(m)).all() and w.sum() > m.sum()


def test_vae_training_options_change_the_loss_but_not_old_keys():
    """object_weight / sample_posterior / mixed_precision train; at their defaults the cache key is unchanged."""
    base = tv.VAETrainConfig(steps=2, batch_size=4, calib_images=8)
    assert set(base.to_dict()) == set(base.to_dict()) - {"object_weight", "sample_posterior", "mixed_precision",
                                                         "edge_weight"}
    assert cache.key_for("v", base.to_dict(), 0) != cache.key_for("v", base.replace(object_weight=4.0).to_dict(), 0)
    hists = [tv.train_vae(base.replace(**kw), progress=False)[1]
             for kw in ({}, {"object_weight": 4.0}, {"sample_posterior": False, "mixed_precision": "bf16"})]
    assert hists[0].l1[0] != hists[1].l1[0]  # the weighted L1 differs on the same first batch
    for h in hists:
        assert np.isfinite(h.loss).all()


def test_world_fingerprint_names_the_weights_not_the_config():
    """Two builds of one config that differ in one weight get different fingerprints; a copy gets the same."""
    from l2p.toyworld.world import weights_fingerprint
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint(a) == weights_fingerprint(b) and len(weights_fingerprint(a)) == 10
    with torch.no_grad():
        b.weight[1, 2] = torch.nextafter(b.weight[1, 2], torch.tensor(10.0))  # one ulp
    assert weights_fingerprint(a) != weights_fingerprint(b)
    import copy
    assert weights_fingerprint(copy.deepcopy(a).to(torch.bfloat16)) != weights_fingerprint(a)  # dtype counts


def test_vae_presets_use_bf16_only_where_the_cpu_has_it(monkeypatch):
    """Emulated bf16 is ~15× slower than fp32 (AVX2 CPUs): presets resolve it per machine, the key says which."""
    monkeypatch.setattr(cache, "native_bf16", lambda: False)
    assert cache.vae_precision() == "no"
    monkeypatch.setattr(cache, "native_bf16", lambda: True)
    assert cache.vae_precision() == "bf16"
    monkeypatch.setenv("L2P_VAE_PRECISION", "no")
    assert cache.vae_precision() == "no"
    monkeypatch.setenv("L2P_VAE_PRECISION", "fp16")
    with pytest.raises(ValueError, match="L2P_VAE_PRECISION='fp16'"):
        cache.vae_precision()
    assert all(cfg.mixed_precision == tv.TRAIN_PRECISION for cfg in tv.VAE_MODES.values())
    full = tv.VAE_MODES["full"]
    keys = {p: cache.key_for("v", full.replace(mixed_precision=p).to_dict(), 0) for p in ("no", "bf16")}
    assert keys["no"] != keys["bf16"]


# ----------------------------------------------------------------------------------------------
#                                      Evaluator (judge)
# ----------------------------------------------------------------------------------------------


class OracleEvaluator(Evaluator):
    """Reads the scenes it was built with instead of the images: tests the scoring logic alone."""

    def __init__(self, scenes):
        super().__init__(JudgeNet(JudgeConfig(width=4, cell_dim=4, background_dim=4)))
        self.scenes = scenes

    def predict(self, images):
        out = []
        for s in self.scenes:
            objs = [{"shape": o.shape, "color": o.color, "size": o.size, "position": o.position, "confidence": 1.0}
                    for o in s.objects]
            out.append({"count": len(objs), "objects": objs, "background": s.background.kind})
        return out


def test_scoring_logic_with_an_oracle():
    ps = sc.prompt_set(64, seed=5)
    images = np.zeros((64, 64, 64, 3), np.uint8)
    oracle = OracleEvaluator([p.scene for p in ps])
    df = oracle.score(images, ps)
    assert df["correct"].all() and len(df) == 64
    summ = Evaluator.summary(df)
    assert summ.loc["overall", "accuracy"] == 1.0 and summ.loc["overall", "n"] == 64
    # Break one attribute per scene and check that exactly the categories asking for it fail.
    import copy

    broken = copy.deepcopy([p.scene for p in ps])
    for s in broken:
        o = s.objects[0]
        o.color = "red" if o.color != "red" else "blue"
    df = OracleEvaluator(broken).score(images, ps)
    for cat, group in df.groupby("category"):
        asks_color = "color" in CATEGORY_CHECKS[cat] or "objects" in CATEGORY_CHECKS[cat]
        assert (~group["correct"]).all() if asks_color else group["correct"].all(), cat
    # Swapping a relation's two objects breaks "relation" but not "two_object".
    swapped = copy.deepcopy([p.scene for p in ps])
    for s in swapped:
        if s.kind == "two_object":
            a, b = s.objects
            a.position, b.position = b.position, a.position
    acc = Evaluator.summary(OracleEvaluator(swapped).score(images, ps))["accuracy"]
    assert acc["relation"] == 0.0 and acc["two_object"] == 1.0
    # Captions and scenes work as targets too (default categories from the scene kind).
    df = oracle.score(images, [p.scene for p in ps])
    assert set(df["category"]) == {"full", "counting", "relation"} and df["correct"].all()
    df = oracle.score(images, [p.text for p in ps])
    assert df["correct"].all()


def test_evaluator_smoke_train_save_load(tmp_path):
    ev, hist = train_evaluator("smoke", progress=False)
    assert len(hist) == EVALUATOR_MODES["smoke"].steps
    imgs, _, scenes = sc.generate(8, seed=1)
    f = ev.features(imgs)
    assert f.shape == (8, ev.feature_dim) and torch.isfinite(f).all()
    assert ev.features(sc.to_tensor(imgs)).allclose(f, atol=1e-5)  # uint8 HWC and float CHW agree
    big = np.stack([sc.render(s, 128) for s in scenes])
    assert ev.features(big).shape == f.shape  # other sizes are resized
    ev.save(tmp_path / "judge")
    ev2 = Evaluator.load(tmp_path / "judge")
    assert torch.allclose(ev2.features(imgs), f, atol=1e-6) and ev2.world == ev.world


# A quick judge on an easier task, trained inside the test in ~10–30 s: single objects, and only the
# attributes that are learnt first (count, colour, position, background). Shape needs the full run.
QUICK = EvaluatorTrainConfig(steps=300, batch_size=24, net=JudgeConfig(width=12, cell_dim=16, background_dim=16),
                             world=sc.single_object_world())


def test_quick_evaluator_reads_easy_attributes():
    ev, _ = train_evaluator(QUICK, progress=False)
    df, _ = held_out_accuracy(ev, n=200, world=QUICK.world)
    acc = Evaluator.attribute_accuracy(df)
    for attr in ("count", "color", "position", "background"):
        assert acc[attr] >= 0.9, acc



def test_side_by_side_puts_categories_overall_and_checks_of_several_frames_in_one_table():
    import pandas as pd
    a = pd.DataFrame({"category": ["single", "single", "colour"], "correct": [True, False, True],
                      **{k: [True, None, False] for k in ("count", "shape", "color", "size", "position",
                                                           "background", "objects", "relation")}})
    b = a.assign(correct=[True, True, True], shape=[True, None, True],
                 category=["single", "count", "count"])  # no "colour" rows, a category a lacks
    t = Evaluator.side_by_side({"a": a, "b": b})
    assert list(t.columns) == ["a", "b"] and list(t.index[:5]) == ["single", "colour", "count", "overall",
                                                                   "check: count"]
    assert t.loc["single", "a"] == 0.5 and t.loc["overall", "a"] == 0.75 and t.loc["overall", "b"] == 1.0
    assert t.loc["check: shape", "a"] == 0.5 and t.loc["check: shape", "b"] == 1.0
    assert pd.isna(t.loc["colour", "b"])


def test_the_ceiling_readout_names_what_the_vae_costs_and_what_the_source_adds():
    import pandas as pd
    limits = pd.DataFrame({"gt": [0.99, 1.0, 1.0, 1.0], "ceiling": [0.77, 0.57, 0.81, 0.95],
                           "source": [0.60, 0.5, 0.6, 0.9], "best": [0.61, 0.55, 0.61, 0.90]},
                          index=["overall", "check: background", "check: shape", "check: colour"])
    goal, vae, source = Evaluator.ceiling_readout(limits, best_cfg=2.0)
    assert goal.startswith("goal 0.80: the source scores 0.610 at its best cfg 2;") and "0.770 (below the goal)" in goal
    assert vae.endswith("background 0.57, shape 0.81")  # colour (0.95) is not a loss
    assert source.endswith("shape (0.61 vs 0.81), colour (0.90 vs 0.95)")
    assert "(above the goal)" in Evaluator.ceiling_readout(limits, 2.0, goal=0.7)[0]

@pytest.mark.slow
def test_full_evaluator_accuracy_on_ground_truth():
    """The full-mode judge (from the cache, or trained: ~2–5 min) scores ≥ 0.95 on held-out ground truth."""
    ev = load_or_train_evaluator("full", progress=False)
    df, summ = held_out_accuracy(ev, n=800)
    assert summ.loc["overall", "accuracy"] >= 0.95, summ


# ----------------------------------------------------------------------------------------------
#                                           Cache
# ----------------------------------------------------------------------------------------------


def _json_artefact(calls):
    def build():
        calls.append(1)
        return {"value": len(calls)}

    save = lambda art, p: (p / "a.json").write_text(json.dumps(art))  # noqa: E731
    load = lambda p: json.loads((p / "a.json").read_text())  # noqa: E731
    return build, save, load


def test_cache_hit_miss(tmp_path):
    calls = []
    build, save, load = _json_artefact(calls)
    cfg = {"b": 2, "a": (1, 2)}
    a = cache.cached("thing", cfg, 0, build, save, load, root=tmp_path)
    b = cache.cached("thing", {"a": [1, 2], "b": 2}, 0, build, save, load, root=tmp_path)  # same key
    assert a == b == {"value": 1} and len(calls) == 1
    assert cache.is_cached("thing", cfg, 0, root=tmp_path)
    c = cache.cached("thing", cfg, 1, build, save, load, root=tmp_path)  # another seed: a miss
    assert c == {"value": 2} and len(calls) == 2
    d = cache.cached("thing", cfg, 0, build, save, load, root=tmp_path, rebuild=True)
    assert d == {"value": 3}
    entries = [p for p in tmp_path.iterdir() if p.name != cache.LOCKS]  # no temporaries left behind
    assert len(entries) == 2 and not any(p.name.startswith(".") for p in entries)
    meta = json.loads((tmp_path / cache.key_for("thing", cfg, 0) / "cache_meta.json").read_text())
    assert meta["seed"] == 0 and meta["version"] == cache.version_string()
    assert cache.build_seconds("thing", cfg, 0, root=tmp_path) == meta["build_seconds"] >= 0
    assert cache.build_seconds("thing", cfg, 5, root=tmp_path) is None


def test_world_keys_follow_the_vae_and_the_architecture(monkeypatch):
    """A new VAE config or LDM architecture must invalidate the source LDM and everything downstream."""
    from l2p.toyworld import world as tw
    spec = tw.SPECS["smoke"]
    k0 = spec.key()
    monkeypatch.setitem(tv.VAE_MODES, "smoke", tv.VAE_MODES["smoke"].replace(steps=7))
    assert spec.key() != k0 and spec.ldm_key() != tw.SPECS["smoke"].ldm_key(spec.ldm.replace(seed=1))
    monkeypatch.undo()
    assert spec.key() == k0 and spec.key()["arch"]["seq_multiple"] == 16
    # a VAE config in place of a preset name: another seed is another world; the preset's own config is this one
    other = tw.WorldSpec(mode="smoke", ldm=spec.ldm, vae_mode=tv.VAE_MODES["smoke"].replace(seed=1))
    assert other.vae.seed == 1 and other.key() != k0
    assert tw.WorldSpec(mode="smoke", ldm=spec.ldm, vae_mode=tv.VAE_MODES["smoke"]).key() == k0


def test_the_strong_world_is_the_default_with_its_vae_and_source_trained_longer():
    """SPECS["strong"]: 8000 VAE steps and 6000 source steps, nothing else changed (it shares full's judge and
    sizes); a spec naming the same VAE by its config is the same world; `l2p synth --toy` offers every world."""
    from dataclasses import replace
    from l2p.cli import build_parser
    from l2p.toyworld import corpus
    from l2p.toyworld import world as tw
    full, strong = tw.SPECS["full"], tw.SPECS["strong"]
    assert strong.vae == full.vae.replace(steps=8000) and strong.ldm == full.ldm.replace(steps=6000)
    assert replace(strong, vae_mode=None, ldm=full.ldm) == full and strong.mode == "full"
    assert strong.key() != full.key() and strong.pixel_patch == full.pixel_patch == 16
    same = tw.WorldSpec(vae_mode=tv.VAE_MODES["full"].replace(steps=8000), ldm=tw.LDMTrainConfig(steps=6000))
    assert same.key() == strong.key()
    assert sorted(corpus.TOY_WORLDS) == sorted(tw.SPECS)
    assert build_parser().parse_args(["synth", "--out", "x", "--toy", "strong", "--toy-prompts", "4"]).toy == "strong"
    with pytest.raises(ValueError, match="unknown toy world 'strongest'.*strong"):
        tw.build_toy_world("strongest")


def test_cache_keys():
    k = cache.key_for("vae", tv.VAETrainConfig(), 0)
    assert k == cache.key_for("vae", tv.VAETrainConfig().to_dict(), 0) and k.startswith("vae-")
    assert k != cache.key_for("vae", tv.VAETrainConfig(steps=7), 0)
    assert k != cache.key_for("vae", tv.VAETrainConfig(), 1)
    assert k != cache.key_for("vae", tv.VAETrainConfig(), 0, version="other")


def test_cache_failed_build_leaves_nothing(tmp_path):
    def boom(art, p):
        (p / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        cache.cached("x", {}, 0, lambda: 1, boom, lambda p: 1, root=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [cache.LOCKS]  # only the (empty) lock file's folder


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("L2P_CACHE", str(tmp_path / "c"))
    assert cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("L2P_CACHE")
    assert cache.cache_dir().parts[-2:] == (".cache", "l2p")


def test_bench_toyworld_smoke_reports_every_piece(tmp_path, monkeypatch):
    """The build benchmark (smoke mode) records a time for each piece of the world."""
    import importlib.util
    from pathlib import Path
    monkeypatch.setenv("L2P_CACHE", str(tmp_path))
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_toyworld.py"
    spec = importlib.util.spec_from_file_location("bench_toyworld", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--mode", "smoke", "--cache", "--threads", "1"])
    pieces = res["smoke"]["build"]["pieces_s"]
    assert len(pieces) == 5 and all(v == v and v >= 0 for v in pieces.values())  # no NaN: all were built here
    assert res["smoke"]["build"]["total_s"] == pytest.approx(sum(v for k, v in pieces.items() if k != "total"))


def test_accuracy_by_size_groups_prompts_by_their_objects():
    import pandas as pd
    prompts = sc.prompt_set(60, 0)
    sizes = [{o.size for o in p.scene.objects} for p in prompts]
    label = [s.pop() if len(s) == 1 else "mixed" for s in sizes]
    df = pd.DataFrame({"index": range(60), "shape": [x == "large" for x in label], "correct": [True] * 60})
    df = df.iloc[::-1]  # rows are matched to prompts by `index`, not by position
    t = Evaluator.accuracy_by_size(df, prompts)
    assert t.n.sum() == 60 and {"large", "small"} <= set(t.index)
    assert t.loc["large", "shape"] == 1.0 and t.loc["small", "shape"] == 0.0
    assert t.n.to_dict() == pd.Series(label).value_counts().to_dict()


def test_velocity_error_is_measured_on_the_sources_own_renders():
    """A zero model scores E‖ε − x0‖² at every σ; an oracle that knows the source's render scores 0."""
    import numpy as np
    from l2p.toyworld.world import build_toy_world
    world = build_toy_world("smoke", progress=False)
    n, seed = 6, 31
    caps = list(sc.generate(n, seed, world.world)[1])
    x0 = world.latent_pipeline().sample(caps, seed=seed, num_inference_steps=world.sample_steps,
                                        cfg_scale=world.cfg_scale, height=64, width=64).float()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    zero = lambda xs, t, feats: torch.zeros_like(xs)  # noqa: E731
    oracle = lambda xs, t, feats: x0 - (xs - t[0] * x0) / (1 - t[0])  # noqa: E731  (x0 − ε, ε solved from x_σ)
    df = world.velocity_error({"zero": zero, "oracle": oracle}, sigmas=(0.2, 0.7), n=n, seed=seed)
    assert list(df.index) == [0.2, 0.7]
    assert np.allclose(df["zero"], ((eps - x0) ** 2).mean().item(), rtol=1e-5)
    assert (df["oracle"] < 1e-8).all()


def test_denoising_checks_judge_each_one_step_x0_per_sigma():
    """An oracle's x̂0 is the truth, so it scores what the judge scores on ground truth; a zero output is x_σ."""
    import numpy as np
    from l2p.toyworld.world import build_toy_world
    world = build_toy_world("smoke", progress=False)
    n, seed = 8, 21
    prompts = world.prompts(n, seed=seed)
    x0 = sc.to_tensor(np.stack([sc.render(p.scene, world.image_size) for p in prompts]))
    zero = lambda xs, t, feats: torch.zeros_like(xs)  # noqa: E731
    oracle = lambda xs, t, feats: (x0 - xs) / (1 - t[0])  # noqa: E731
    df = world.denoising_checks({"zero": zero, "oracle": oracle}, sigmas=(0.1, 0.9), n=n, seed=seed)
    models = ["identity", "zero", "oracle", "source LDM (decoded)", "identity (latent, decoded)",
              "VAE reconstruction"]
    assert list(df.index) == [(s, m) for s in (0.1, 0.9) for m in models]
    truth = Evaluator.attribute_accuracy(world.evaluator.score(x0, prompts))
    for s in (0.1, 0.9):
        assert df.loc[(s, "oracle"), "shape"] == truth["shape"]
        assert df.loc[(s, "zero")].equals(df.loc[(s, "identity")])
    assert df.loc[(0.1, "VAE reconstruction")].equals(df.loc[(0.9, "VAE reconstruction")])
    assert df[["shape", "overall"]].apply(lambda c: c.between(0, 1)).all().all()


def test_denoising_error_per_sigma_has_the_right_sign_and_references():
    """x̂0 = x_σ + σ·output: a zero output is the identity, an oracle output has no error."""
    import numpy as np
    from l2p.toyworld.world import build_toy_world
    world = build_toy_world("smoke", progress=False)
    x0 = sc.to_tensor(sc.generate(8, 5, world.world)[0])
    zero = lambda xs, t, feats: torch.zeros_like(xs)  # noqa: E731
    oracle = lambda xs, t, feats: (x0 - xs) / (1 - t[0])  # noqa: E731  (knows x0: ε − x0's negation exactly)
    df = world.denoising_error({"zero": zero, "oracle": oracle}, sigmas=(0.1, 0.5), n=8, seed=5)
    assert list(df.index) == [0.1, 0.5]
    assert np.allclose(df["zero"], df["identity"]) and (df["oracle"] < 1e-10).all()
    assert df["identity"].is_monotonic_increasing and df["VAE reconstruction"].nunique() == 1
    assert np.isfinite(df["source LDM (decoded)"]).all()


def test_a_built_world_has_no_missing_pieces_and_times_each_one():
    """`missing_pieces` (what `--plan` reports) reads the same cache keys `build_toy_world` writes."""
    from l2p.toyworld.world import SPECS, build_toy_world, missing_pieces
    world = build_toy_world("smoke", progress=False)
    assert missing_pieces(SPECS["smoke"]) == []
    times = world.build_times()
    assert list(times.index[:3]) == ["toy VAE", "judge", "source LDM"] and (times.seconds.iloc[:3] > 0).all()
