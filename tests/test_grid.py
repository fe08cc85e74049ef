"""The fine-grid world (stride-4 VAE, 8-px patches) and the token-grid study, in smoke mode."""
import pytest
import torch

from l2p.config import get_config
from l2p.model import ZImageDiT
from l2p.toyworld import grid
from l2p.toyworld import recipe
from l2p.toyworld.world import SPECS


def test_pixel_patch_puts_pixel_tokens_on_the_latent_grid():
    assert SPECS["full"].pixel_patch == 16 and SPECS["smoke"].pixel_patch == 16
    assert SPECS["fine"].pixel_patch == 8 and grid.GRIDS["smoke"]["fine"].pixel_patch == 8
    # same latent size (1,024 values per 64² image) in both worlds; only the grid differs
    for spec in (SPECS["full"], SPECS["fine"]):
        side = 64 // 2 ** (len(spec.vae.block_out_channels) - 1)
        assert side ** 2 * spec.vae.latent_channels == 1024
    lat, pix = ZImageDiT(get_config("toy_latent_fine")), ZImageDiT(get_config("toy_pixel_fine"))
    z, x, cap = torch.randn(1, 4, 16, 16), torch.randn(1, 3, 64, 64), torch.randn(1, 5, 384)
    with torch.no_grad():
        assert lat(z, torch.rand(1), cap).shape == z.shape
        assert pix(x, torch.rand(1), cap).shape == x.shape


def test_toy_detailer_follows_the_world_and_refuses_unknown_patches():
    class W:
        class spec:
            pixel_patch = 8
    assert recipe.toy_detailer(W).depth == 3
    W.spec.pixel_patch = 32
    with pytest.raises(ValueError, match="pixel patch 32"):
        recipe.toy_detailer(W)


@pytest.mark.slow
def test_grid_study_smoke_runs_both_worlds_and_resamples_final_scores():
    worlds = grid.grid_worlds("smoke", progress=False)
    runs = grid.grid_runs(worlds, "smoke")
    df = grid.compare(worlds, runs, "smoke")
    assert list(df.grid.unique()) == ["coarse", "fine"]
    assert set(df.model) == {"VAE ceiling", "source LDM", "pixel (L2P)"}
    run = runs["fine"][0]
    # the fine world's pixel model: an 8-1 embedder and a depth-3 head whose bottleneck is the 8×8 token grid
    assert set(run.model.all_x_embedder) == {"8-1"} and run.model.cfg.detailer.depth == 3
    assert run.config.patch == 8
    # re-sampling the final weights reproduces the run's own last evaluation
    row = df[(df.grid == "fine") & (df.model == "pixel (L2P)")].iloc[0]
    assert row.geneval == pytest.approx(run.evals.geneval.iloc[-1])
    assert row.fid == pytest.approx(run.evals.fid.iloc[-1], rel=1e-4)
    # the ceiling row is the world's own measure, summarised
    ceiling = df[(df.grid == "coarse") & (df.model == "VAE ceiling")].iloc[0]
    scores = worlds["coarse"].vae_ceiling(n=recipe.FINETUNE_MODES["smoke"].eval_prompts)
    assert ceiling.geneval == pytest.approx(scores.groupby("category")["correct"].mean().mean())
    assert ceiling["shape"] == pytest.approx(scores["shape"].dropna().astype(bool).mean())
    s = grid.summary(df)
    assert list(s.index) == ["coarse", "fine"] and list(s["patch (px)"]) == [16, 8]
    assert list(s.tokens) == ["4²", "8²"]
    curves = grid.curves(runs)
    assert set(curves.variant) == {"coarse grid", "fine grid"} and curves.step.max() == run.config.steps
    shapes = grid.shape_per_sigma(worlds, runs, sigmas=(0.4,), n=4)
    assert {"identity", "pixel (L2P)", "source LDM (decoded)"} <= set(shapes.columns)
    assert list(shapes.index.get_level_values("grid").unique()) == ["coarse", "fine"]
