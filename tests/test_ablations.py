"""The ablation verdicts are computed from the runs: check them on hand-made curves."""
import numpy as np
import pandas as pd
import pytest

from l2p.toyworld.ablations import final_table, get_experiment, steps_to_reach, variant_config, verdict


def curves(finals: dict, steps=(0, 100, 200, 300)) -> pd.DataFrame:
    """Linear learning curves ending at each (variant → per-seed final scores)."""
    rows = []
    for v, per_seed in finals.items():
        for seed, end in enumerate(per_seed):
            for s in steps:
                rows.append({"variant": v, "seed": seed, "step": s, "geneval": end * s / steps[-1], "fid": 1.0,
                             "spectral": 1.0, "final_loss": 0.1})
    return pd.DataFrame(rows)


def test_final_table_and_steps_to_reach():
    c = curves({"a": [0.3, 0.5, 0.4], "b": [0.1, 0.1, 0.1]})
    t = final_table(c)
    assert list(t.index) == ["a", "b"] and abs(t.loc["a", "geneval mean"] - 0.4) < 1e-12 and t.loc["a", "seeds"] == 3
    st = steps_to_reach(c, 0.15)
    assert st[st.variant == "a"].steps.tolist() == [200.0, 100.0, 200.0] and st[st.variant == "b"].steps.isna().all()


def test_freeze_verdict_separates_ties_from_losses():
    exp = get_experiment("freeze_policy")
    names = list(exp.variants)
    tie = curves({names[0]: [0.10, 0.12, 0.08], names[1]: [0.13, 0.07, 0.11], names[2]: [0.05] * 3,
                  names[3]: [0.05] * 3})
    assert verdict(exp, tie, 0.5)[1].startswith("inconclusive")
    loss = curves({names[0]: [0.10, 0.11, 0.09], names[1]: [0.30, 0.31, 0.29], names[2]: [0.05] * 3,
                   names[3]: [0.05] * 3})
    assert verdict(exp, loss, 0.5)[1].startswith("disagrees")
    win = curves({names[0]: [0.30, 0.31, 0.29], names[1]: [0.10] * 3, names[2]: [0.05] * 3, names[3]: [0.05] * 3})
    assert verdict(exp, win, 0.5)[1].startswith("agrees")


def test_the_1500_step_twins_test_their_claims_on_transfers_baseline_runs():
    """freeze_at_budget, data_source_at_budget and data_quantity_at_budget judge the paper's claim as their
    300-step twins do (not as questions without a claim), on the runs `transfer` already trained."""
    transfer = get_experiment("transfer")
    for name, twin in (("freeze_at_budget", "freeze_policy"), ("data_source_at_budget", "data_source"),
                       ("data_quantity_at_budget", "data_quantity")):
        exp, short = get_experiment(name), get_experiment(twin)
        assert exp.rule == short.rule != "" and exp.variants == short.variants
        baseline = "2000 images" if name == "data_quantity_at_budget" else next(iter(exp.variants))
        for seed in (0, 1, 2):
            assert variant_config(exp, exp.variants[baseline], "full", seed) == \
                variant_config(transfer, {}, "full", seed)
        assert variant_config(exp, {}, "smoke", 0).steps == 2
    exp = get_experiment("freeze_at_budget")
    a, b = list(exp.variants)[:2]
    tie = curves({a: [0.19, 0.22, 0.16], b: [0.18, 0.13, 0.23], **{v: [0.05] * 3 for v in list(exp.variants)[2:]}})
    assert verdict(exp, tie, 0.6)[1] == f"agrees in direction: {a} is best, but within the seed spread of {b}"
    from l2p.toyworld.ablations import Experiment
    with pytest.raises(ValueError, match="'typo': unknown rule 'first-best'"):
        Experiment("typo", "?", "!", rule="first-best")
    src = get_experiment("data_source_at_budget")
    own, real, cross = src.variants
    _, lost = verdict(src, curves({own: [0.19, 0.20, 0.21], real: [0.30, 0.31, 0.29], cross: [0.2] * 3}), 0.6)
    assert lost == f"disagrees: {real} beats {own} by more than the seed spread"
    # Fig. 12's twin keeps its 128², patch-32 ground-truth runs and takes the release's budget
    shift, short = get_experiment("noise_shift_at_budget"), get_experiment("noise_shift_highres")
    assert shift.rule == short.rule == "larger_shift" and shift.variants == short.variants
    for overrides in shift.variants.values():
        long, brief = variant_config(shift, overrides, "full", 1), variant_config(short, overrides, "full", 1)
        assert long == brief.replace(steps=1500, batch_size=32, eval_every=250, eval_prompts=100)
        assert (long.image_size, long.patch, long.corpus) == (128, 32, "ground_truth")
    assert variant_config(shift, {}, "smoke", 0).steps == 2
    # ... and its base-resolution twin differs only in the image size and patch (64², 16 px): the paper's 1K
    # default first, its runs data_source_at_budget's ground-truth runs
    base = get_experiment("noise_shift_base_res")
    assert base.rule == "first_best" and list(base.variants) == ["shift 3", "shift 1", "shift 12"]
    for label, overrides in base.variants.items():
        low, high = variant_config(base, overrides, "full", 2), variant_config(shift, shift.variants[label], "full", 2)
        assert low == high.replace(image_size=64, patch=16)
    real = variant_config(src, src.variants["ground truth (real)"], "full", 0)
    assert variant_config(base, base.variants["shift 3"], "full", 0) == real


def test_transfer_verdict_without_reaching_the_goal_measures_the_speed_up():
    exp = get_experiment("transfer")
    c = curves({"converted init": [0.3, 0.3, 0.3], "from scratch": [0.09, 0.09, 0.09]})
    found, agrees = verdict(exp, c, source_geneval=1.0)  # 90% of 1.0 is out of reach
    assert "matched scratch's final score" in found and "≥ 3.0× faster" in agrees
    c2 = curves({"converted init": [0.95, 0.95, 0.95], "from scratch": [0.5, 0.5, 0.5]})
    found2, agrees2 = verdict(exp, c2, source_geneval=1.0)  # converted reaches 0.9 at step 300, scratch never
    assert "did not reach it" in found2 and agrees2.startswith("agrees in direction")


def test_smoke_variants_stay_tiny_and_full_ones_share_the_baseline():
    exp = get_experiment("noise_shift_highres")
    smoke = variant_config(exp, exp.variants["shift 12"], "smoke", 0)
    assert smoke.steps == 2 and smoke.shift == 12 and smoke.image_size == 128
    base = [variant_config(get_experiment(n), {}, "full", 1) for n in ("freeze_policy", "data_source",
                                                                        "data_quantity", "detailer_head")]
    assert all(b == base[0] for b in base)  # one cached baseline run per seed serves the short experiments
    # transfer runs at notebook 03's budget, so its seed-0 runs are 03's own runs
    from l2p.toyworld.recipe import FINETUNE_MODES
    transfer = get_experiment("transfer")
    assert variant_config(transfer, {}, "full", 0) == FINETUNE_MODES["full"]
    emb = get_experiment("embedder_init")  # the long experiments share 03's and transfer's baseline runs
    assert [variant_config(emb, o, "full", 1) for o in emb.variants.values()][0] == \
        variant_config(transfer, {}, "full", 1)
    capped = variant_config(emb, emb.variants["vae_fit, noise gain ≤ 1"], "full", 0)
    assert capped.key()["vae_fit_gain"] == 1.0 and "vae_fit_gain" not in FINETUNE_MODES["full"].key()
    assert variant_config(transfer, {"init": "scratch"}, "full", 0) == FINETUNE_MODES["full"].replace(init="scratch")
    choices = get_experiment("training_choices")
    for seed in (0, 1, 2):  # its baseline is transfer's converted run, seed for seed
        assert variant_config(choices, {}, "full", seed) == variant_config(transfer, {}, "full", seed)
    fresh = variant_config(choices, choices.variants["fresh ε every step"], "full", 0)
    assert fresh == FINETUNE_MODES["full"].replace(seeded_noise=False) and fresh.key()["seeded_noise"] is False
    small = variant_config(transfer, {}, "smoke", 0)
    assert small.steps == 2 and small.batch_size == 4 and small.eval_prompts == 8


def test_data_quantity_verdict_needs_gains_beyond_the_spread():
    exp = get_experiment("data_quantity")
    a, b, c = exp.variants
    saturating = curves({a: [0.10, 0.11, 0.09], b: [0.30, 0.31, 0.29], c: [0.33, 0.34, 0.32]})
    assert verdict(exp, saturating, 0.5)[1] == "agrees: gains shrink as the corpus grows"
    # scores that fall with the corpus inside the spread are no "shrinking gains" (session 12's 300-step runs)
    flat = curves({a: [0.115, 0.07, 0.16], b: [0.108, 0.07, 0.145], c: [0.087, 0.066, 0.108]})
    assert verdict(exp, flat, 0.5)[1].startswith("inconclusive")
    falling = curves({a: [0.30, 0.31, 0.29], b: [0.20, 0.21, 0.19], c: [0.10, 0.11, 0.09]})
    assert verdict(exp, falling, 0.5)[1].startswith(f"disagrees: {a} beats the largest corpus")
    linear = curves({a: [0.10, 0.11, 0.09], b: [0.20, 0.21, 0.19], c: [0.40, 0.41, 0.39]})
    assert verdict(exp, linear, 0.5)[1].startswith("disagrees: the larger corpus still helps")


def test_combined_long_verdict_compares_its_best_variant_with_the_source_itself():
    exp = get_experiment("combined_long")
    v, wide = exp.variants
    found, agrees = verdict(exp, curves({v: [0.40, 0.44, 0.42], wide: [0.30, 0.31, 0.29]}), 0.6)
    assert f"The best, {v}, is 0.70× the source's 0.600" in found
    assert agrees.startswith("disagrees at this cfg: 0.70×")
    found, agrees = verdict(exp, curves({v: [0.40, 0.44, 0.42], wide: [0.55, 0.56, 0.57]}), 0.6)
    assert f"The best, {wide}, is 0.93×" in found and agrees == "agrees: ≥ 0.9× the source"
    assert verdict(exp, curves({v: [0.55, 0.56, 0.57], wide: [0.5] * 3}), 0.0)[1].startswith("inconclusive")
    full = variant_config(exp, exp.variants[v], "full", 1)
    assert (full.steps, full.batch_size, full.eval_every, full.eval_prompts) == (6000, 32, 500, 100)
    # the same runs as the session-15/16 probes (cached under this key), and in smoke `combined`'s own runs
    from l2p.toyworld.recipe import FinetuneConfig
    assert full == FinetuneConfig(steps=6000, eval_every=500, head_time=True, init="vae_fit", vae_fit_gain=1.0,
                                  latent_loss=0.5, seed=1)
    # session 18's probes: the same recipe with a head as wide as the toy VAE's decoder
    assert variant_config(exp, exp.variants[wide], "full", 1) == full.replace(head_channels=(16, 32, 64, 64))
    combined = get_experiment("combined")
    assert variant_config(exp, exp.variants[v], "smoke", 0) == \
        variant_config(combined, combined.variants[v], "smoke", 0)


def test_notebook_03s_best_recipe_is_04s_widest_combined_long_run_and_smoke_keeps_its_tiny_budget():
    from l2p.toyworld.ablations import _WIDE, get_experiment, variant_config
    from l2p.toyworld.recipe import FINETUNE_MODES, recipe_config
    exp = get_experiment("combined_long")
    for seed in (0, 1, 2):  # one cached run serves both notebooks
        assert recipe_config("best", "full", seed=seed) == variant_config(exp, exp.variants[_WIDE], "full", seed)
    assert recipe_config("release", "full") == FINETUNE_MODES["full"]
    smoke = recipe_config("best", "smoke", head_channels=[8, 16, 32, 32])  # a papermill list becomes a tuple
    assert smoke.replace(head_channels=None, head_time=False, init="release", vae_fit_gain=None, latent_loss=0.0) \
        == FINETUNE_MODES["smoke"] and smoke.head_channels == (8, 16, 32, 32) and smoke.latent_loss == 0.5
    assert recipe_config("best", "full", steps=100, init="scratch").steps == 100
    with pytest.raises(ValueError, match="unknown recipe 'bestest'"):
        recipe_config("bestest")
    with pytest.raises(ValueError, match=r"unknown fine-tuning fields \['head_widht'\]"):
        recipe_config("best", head_widht=16)


def test_a_verdict_at_the_untrained_floor_is_inconclusive():
    """Session 12: three Detailer Heads ended at 0.067 on every seed, their step-0 score; no ranking of those."""
    exp = get_experiment("detailer_head")
    flat = curves({v: [0.0] * 3 for v in exp.variants})
    flat["geneval"] = 0.067
    flat.loc[(flat.variant == "toy head (8 wide)") & (flat.step == 300), "geneval"] = [0.06, 0.10, 0.10]
    found, agrees = verdict(exp, flat, 0.5)
    assert "Untrained (step 0): 0.067." in found and agrees.startswith("inconclusive: no variant ends above")
    learned = curves({v: [0.2, 0.21, 0.19] for v in exp.variants})  # linear from 0: every variant learned
    assert "no variant ends above" not in verdict(exp, learned, 0.5)[1]


def test_noise_shift_verdict_needs_a_clear_winner():
    exp = get_experiment("noise_shift_highres")
    clear = curves({"shift 1": [0.1] * 3, "shift 3": [0.2] * 3, "shift 12": [0.4, 0.41, 0.39]})
    assert verdict(exp, clear, 0.5)[1].startswith("agrees")
    tie = curves({"shift 1": [0.1] * 3, "shift 3": [0.3, 0.2, 0.25], "shift 12": [0.24, 0.31, 0.2]})
    assert verdict(exp, tie, 0.5)[1].startswith("inconclusive")


def test_finetune_keys_leave_late_options_out_at_their_defaults():
    """Runs cached before the late options existed keep their keys; setting one makes a new run."""
    from l2p.toyworld.recipe import FinetuneConfig
    base = FinetuneConfig()
    late = ("prediction", "head_channels", "ema_decay", "seeded_noise", "caption_dropout", "lr_decay", "head_time",
            "head_upsample", "latent_loss", "vae_fit_gain", "start_from")
    assert not set(late) & set(base.key())
    assert base.key() == {k: v for k, v in base.__dict__.items() if k not in late}
    assert FinetuneConfig(ema_decay=0.995).key()["ema_decay"] == 0.995
    assert FinetuneConfig(prediction="x").key()["prediction"] == "x"
    assert FinetuneConfig(head_channels=(16, 32, 64, 64)).key()["head_channels"] == (16, 32, 64, 64)
    assert FinetuneConfig(caption_dropout=0.1).key()["caption_dropout"] == 0.1
    assert FinetuneConfig(head_time=True).key()["head_time"] is True
    assert FinetuneConfig(head_upsample="learned").key()["head_upsample"] == "learned"
    assert FinetuneConfig(latent_loss=1.0).key()["latent_loss"] == 1.0
    assert FinetuneConfig(init="vae_fit", vae_fit_gain=1.0).key()["vae_fit_gain"] == 1.0


def test_experiments_without_a_claim_do_not_crown_a_winner_inside_the_spread():
    exp = get_experiment("embedder_init")
    a, b = list(exp.variants)[:2]
    _, tie = verdict(exp, curves({a: [0.10, 0.12, 0.08], b: [0.11, 0.09, 0.13]}), 0.5)
    assert "no variant beats" in tie and b in tie
    _, win = verdict(exp, curves({a: [0.10, 0.11, 0.09], b: [0.30, 0.31, 0.29]}), 0.5)
    assert win.endswith(f"{b} beats {a} by more than the seed spread")
    head = get_experiment("detailer_head")
    assert [variant_config(head, o, "full", 0).key().get("prediction") for o in head.variants.values()] == \
        [None, None, "x", "edm"]


def test_ema_run_reports_the_averaged_weights_at_the_end():
    """With ema_decay the final evaluation (and the saved model) are the averaged weights, not the raw ones."""
    import torch
    from l2p.toyworld.recipe import FINETUNE_MODES, finetune
    from l2p.toyworld.world import build_toy_world
    world = build_toy_world("smoke", progress=False)
    cfg = FINETUNE_MODES["smoke"]
    raw, ema = finetune(world, cfg, progress=False), finetune(world, cfg.replace(ema_decay=0.5), progress=False)
    assert raw.path != ema.path and list(ema.evals.step) == list(raw.evals.step)
    same_until_end = ema.evals.iloc[:-1].reset_index(drop=True).equals(raw.evals.iloc[:-1].reset_index(drop=True))
    assert same_until_end  # identical training; only the last evaluation sees other weights
    w = "local_decoder.out_conv.weight"
    assert not torch.equal(raw.model.state_dict()[w], ema.model.state_dict()[w])


def test_training_choices_reach_the_training_loop():
    """Fresh noise and caption dropout each change what the run learns (and its cache entry)."""
    import torch
    from l2p.toyworld.recipe import FINETUNE_MODES, finetune
    from l2p.toyworld.world import build_toy_world
    world = build_toy_world("smoke", progress=False)
    cfg = FINETUNE_MODES["smoke"]
    runs = [finetune(world, c, progress=False) for c in (cfg, cfg.replace(seeded_noise=False),
                                                          cfg.replace(caption_dropout=0.5))]
    assert len({r.path for r in runs}) == 3
    base = runs[0].model.state_dict()
    for r in runs[1:]:  # (Adam's first steps move by ±lr whatever the gradient, so compare every tensor)
        assert any(not torch.equal(base[k], v) for k, v in r.model.state_dict().items()), r.config


def test_a_time_conditioned_head_run_converts_with_film_and_trains_it():
    """head_time=True goes through `l2p convert` (zero FiLM in the init file) and the FiLM layers then learn."""
    from l2p.toyworld.recipe import FINETUNE_MODES, finetune, initial_model
    from l2p.toyworld.world import build_toy_world
    world = build_toy_world("smoke", progress=False)
    cfg = FINETUNE_MODES["smoke"].replace(head_time=True)
    init = initial_model(world, cfg)
    assert init.cfg.detailer.time_conditioning and not init.local_decoder.film_dec1.weight.any()
    run = finetune(world, cfg, progress=False)
    assert run.model.cfg.detailer.time_conditioning and run.model.local_decoder.film_dec1.weight.any()
    assert run.path != finetune(world, FINETUNE_MODES["smoke"], progress=False).path


def test_a_learned_upsampling_head_run_converts_with_nearest_upsamplers_and_trains_them():
    """head_upsample="learned" goes through `l2p convert` (nearest ×2 in the init file), then the upsamplers learn."""
    import torch
    from l2p.model import nearest_upsample_weight
    from l2p.toyworld.recipe import FINETUNE_MODES, finetune, initial_model
    from l2p.toyworld.world import build_toy_world
    world = build_toy_world("smoke", progress=False)
    cfg = FINETUNE_MODES["smoke"].replace(head_upsample="learned")
    init = initial_model(world, cfg)
    w = init.local_decoder.up1[0].weight
    assert init.cfg.detailer.upsample == "learned" and torch.equal(w, nearest_upsample_weight(w.shape[0]))
    run = finetune(world, cfg, progress=False)
    assert run.model.cfg.detailer.upsample == "learned"
    assert not torch.equal(run.model.local_decoder.up1[0].weight, w)


def test_check_accuracy_re_scores_the_final_evaluation_exactly():
    """check_accuracy re-samples each run's last evaluation: its "overall" is the final toy-GenEval of the curves."""
    from l2p.toyworld.ablations import check_accuracy, final_samples, run_experiment, variant_runs
    from l2p.toyworld.world import build_toy_world
    world = build_toy_world("smoke", progress=False)
    checks = check_accuracy(world, "head_upsample", seeds=(0, 1))
    assert list(checks.index) == list(get_experiment("head_upsample").variants)
    assert {"shape", "color", "overall"} <= set(checks.columns) and checks.le(1).all().all()
    table = final_table(run_experiment(world, "head_upsample", seeds=(0, 1)))
    assert np.allclose(checks["overall"].values, table["geneval mean"].values)
    runs = variant_runs(world, "head_upsample")
    assert runs["learned upsampling"].model.cfg.detailer.upsample == "learned"
    assert len(final_samples(runs).axes) >= 2 * 8


def test_sampling_shift_table_samples_every_run_with_each_shift_and_its_own_shift_gives_its_final_score():
    from l2p.toyworld.ablations import run_experiment, sampling_shift_table
    from l2p.toyworld.world import build_toy_world
    world = build_toy_world("smoke", progress=False)
    curves = run_experiment(world, "noise_shift_at_budget", seeds=(0, 1))  # trained (and evaluated) first
    final = curves[curves.step == curves.step.max()].groupby("variant").geneval.mean()
    asked, evaluate = [], world.evaluate
    world.evaluate = lambda pipe, prompts=None, **kw: asked.append(kw["shift"]) or evaluate(pipe, prompts, **kw)
    try:
        table = sampling_shift_table(world, "noise_shift_at_budget", (1, 12), seeds=(0, 1))
    finally:
        del world.evaluate
    variants = list(get_experiment("noise_shift_at_budget").variants)
    assert list(table.index) == [(v, s) for v in variants for s in (1.0, 12.0)]
    assert asked == [1.0, 12.0] * len(variants) * 2 and (table.seeds == 2).all()
    assert {"overall mean", "overall std", "shape mean", "color mean"} <= set(table.columns)
    for v, shift in (("shift 1", 1.0), ("shift 12", 12.0)):  # its own shift re-samples its last evaluation
        assert table.loc[(v, shift), "overall mean"] == pytest.approx(final[v])


def test_checks_across_puts_experiments_with_the_same_variants_side_by_side():
    from l2p.toyworld.ablations import check_accuracy, checks_across
    from l2p.toyworld.world import build_toy_world
    world = build_toy_world("smoke", progress=False)
    both = {"64²": "noise_shift_base_res", "128²": "noise_shift_at_budget"}
    order = ["shift 1", "shift 3", "shift 12"]
    table = checks_across(world, both, checks=("overall", "shape"), rows=order)
    assert list(table.index) == order
    assert list(table.columns) == [("overall", "64²"), ("overall", "128²"), ("shape", "64²"), ("shape", "128²")]
    for label, name in both.items():
        alone = check_accuracy(world, name)
        for check in ("overall", "shape"):
            assert table[(check, label)].tolist() == alone[check].reindex(order).tolist()


def test_a_latent_loss_run_trains_through_the_frozen_toy_vae_encoder():
    """latent_loss > 0: a separate cached run whose update differs; the VAE itself is not changed."""
    import torch
    from l2p.toyworld.recipe import FINETUNE_MODES, finetune
    from l2p.toyworld.world import build_toy_world
    world = build_toy_world("smoke", progress=False)
    vae_before = {k: v.clone() for k, v in world.vae.state_dict().items()}
    base = finetune(world, FINETUNE_MODES["smoke"], progress=False)
    run = finetune(world, FINETUNE_MODES["smoke"].replace(latent_loss=1.0), progress=False)
    assert run.path != base.path
    assert any(not torch.equal(a, b) for a, b in zip(run.model.state_dict().values(), base.model.state_dict().values()))
    assert all(torch.equal(v, world.vae.state_dict()[k]) for k, v in vae_before.items())


def test_a_continuation_starts_from_the_finished_runs_weights():
    """start_from: step 0 is the parent's final model (same score), training moves on, keys nest the parent."""
    import pytest
    import torch
    from l2p.toyworld.recipe import FINETUNE_MODES, finetune, initial_model
    from l2p.toyworld.world import build_toy_world
    world = build_toy_world("smoke", progress=False)
    parent = FINETUNE_MODES["smoke"]
    cfg = parent.replace(lr_decay="cosine", start_from=parent)
    assert cfg.key()["start_from"] == parent.key() and "start_from" not in parent.key()
    first = finetune(world, parent, progress=False)
    init = initial_model(world, cfg)
    assert all(torch.equal(v, first.model.state_dict()[k]) for k, v in init.state_dict().items())
    run = finetune(world, cfg, progress=False)
    assert run.path != first.path
    assert run.evals.iloc[0]["geneval"] == first.evals.iloc[-1]["geneval"]
    assert any(not torch.equal(v, first.model.state_dict()[k]) for k, v in run.model.state_dict().items())
    with pytest.raises(ValueError, match="head_time"):
        initial_model(world, parent.replace(head_time=True, start_from=parent))


def test_a_vae_fit_gain_needs_the_vae_fit_init():
    from types import SimpleNamespace

    import pytest
    from l2p.toyworld.recipe import pixel_init
    with pytest.raises(ValueError, match="init='vae_fit' only"):
        pixel_init(SimpleNamespace(), "release", vae_fit_gain=1.0)


def test_guidance_table_scores_each_final_model_and_the_source_at_each_scale():
    """Rows variant × cfg over the seeds; at the world's cfg a variant's score is its run's final score."""
    from l2p.toyworld.ablations import best_guidance, guidance_table, run_experiment
    from l2p.toyworld.world import build_toy_world
    world = build_toy_world("smoke", progress=False)
    scales = (1.5, world.cfg_scale)
    table = guidance_table(world, "combined", scales, seeds=(0, 1))
    variants = ["source LDM", "release", "σ-head + capped vae_fit + latent loss λ=0.5"]
    assert list(table.index) == [(v, float(s)) for v in variants for s in scales]
    assert (table.seeds == 2).all() and table["geneval std"].notna().all()
    curves = run_experiment(world, "combined", seeds=(0, 1))
    final = curves[curves.step == curves.step.max()].groupby("variant").geneval.mean()
    for v in variants[1:]:
        assert table.loc[(v, world.cfg_scale), "geneval mean"] == pytest.approx(final[v])
    best = best_guidance(table)
    assert list(best.index) == variants and set(best["best cfg"]) <= set(scales)
    for v in variants:
        assert best.loc[v, "geneval mean"] == table.xs(v, level="variant")["geneval mean"].max()
    with pytest.raises(ValueError, match="128²"):
        guidance_table(world, "noise_shift_highres", scales, seeds=(0,))
    sizes, sweep = [], world.guidance_sweep  # prompts=12: every model sampled on 12 prompts (the runs used 8)
    world.guidance_sweep = lambda pipe, sc, prompts, **kw: sizes.append(len(prompts)) or sweep(pipe, sc, prompts, **kw)
    try:
        more = guidance_table(world, "combined", (world.cfg_scale,), seeds=(0,), prompts=12)
    finally:
        del world.guidance_sweep
    assert sizes == [12, 12, 12] and list(more.index.get_level_values("variant")) == variants


def test_the_notebook_helpers_summarise_introduce_and_plot_from_the_tables():
    """04's summary, headings and guidance plot come from the package and carry the tables' own values."""
    from l2p.toyworld.ablations import introduce, plot_guidance, summarize_guidance, summary_table
    tables = {"one": final_table(curves({"a": [0.3, 0.5], "b": [0.1, 0.2]})),
              "two": final_table(curves({"c": [0.6, 0.6, 0.9]}))}
    s = summary_table(tables)
    assert list(zip(s.experiment, s.variant)) == [("one", "a"), ("one", "b"), ("two", "c")]
    assert s["toy-GenEval"].tolist() == pytest.approx([0.4, 0.15, 0.7]) and s.seeds.tolist() == [2, 2, 3]
    exp = get_experiment("transfer")
    text = introduce(exp, variant_config(exp, {}, "full", 0), 0.6304)
    assert text.startswith("## transfer\n") and exp.question in text and exp.claim in text
    assert "1500 steps × batch 32" in text and "source LDM on those prompts: 0.630" in text
    rows = pd.DataFrame([{"variant": v, "cfg": c, "seed": s, "geneval": g + 0.01 * s, "fid": 100.0}
                         for v, g in (("source LDM", 0.6), ("pixel", 0.5)) for c in (1.0, 3.0) for s in (0, 1)])
    fig = plot_guidance(summarize_guidance(rows))
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["source LDM", "pixel"]
        assert [tuple(line.get_xdata()) for line in ax.get_lines()[::3]][:2] == [(1.0, 3.0), (1.0, 3.0)]
    assert fig.axes[0].get_lines()[0].get_ydata().tolist() == pytest.approx([0.605, 0.605])


def test_the_source_is_judged_on_the_runs_own_prompts_and_seed():
    from types import SimpleNamespace

    from l2p.toyworld.recipe import EVAL_SEED, FinetuneConfig, evaluate_source
    calls = []
    world = SimpleNamespace(latent_pipeline=lambda: "latent", prompts=lambda n, seed: ("prompts", n, seed),
                            evaluate=lambda pipe, prompts, seed: calls.append((pipe, prompts, seed)) or {})
    evaluate_source(world, FinetuneConfig(eval_prompts=12, seed=2))
    assert calls == [("latent", ("prompts", 12, EVAL_SEED), 2)]
