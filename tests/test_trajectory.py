"""Trajectory capture, the figures built from it, the linear readout, and the two-stage handoff sampler."""
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from l2p import trajectory as tj
from l2p.config import tiny_latent, tiny_pixel
from l2p.handoff import handoff_sample, run_sweep, split_schedule, sweep_figure
from l2p.model import ZImageDiT
from l2p.pipeline import L2PPipeline, LatentPipeline
from l2p.schedule import sampling_sigmas

PROMPTS = ["a red disk at the top", "two blue squares"]
KW = dict(steps=3, cfg_scale=2.0, shift=3.0, height=64, width=64)


class HashText:
    """A deterministic stand-in text encoder: a few tokens per prompt, derived from its characters."""

    dim = 32

    def encode_list(self, prompts):
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(map(ord, p)) + len(p))
            out.append(torch.randn(max(1, len(p.split())), self.dim, generator=g))
        return out


def _jitter(model: ZImageDiT, seed: int) -> ZImageDiT:
    """Perturb every weight so zero-initialised parts (pad tokens) do not make outputs degenerate."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def tiny_pipes() -> tuple[LatentPipeline, L2PPipeline]:
    """A random tiny latent DiT + stride-8 VAE and a random tiny pixel DiT sharing one text encoder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, scaling_factor=0.5, shift_factor=0.1)
    text = HashText()
    return (LatentPipeline(_jitter(ZImageDiT(tiny_latent()), 1), text, vae),
            L2PPipeline(_jitter(ZImageDiT(tiny_pixel()), 2), text))


@pytest.fixture(scope="module")
def pipes():
    return tiny_pipes()


@pytest.fixture(scope="module")
def trajs(pipes):
    return tj.capture_pair(*pipes, PROMPTS, seed=3, **KW)


def _sample(pipe, prompts=PROMPTS, seed=3, steps=3, cfg_scale=2.0, shift=3.0):
    return pipe.sample(prompts, seed=seed, num_inference_steps=steps, cfg_scale=cfg_scale, shift=shift,
                       height=64, width=64)


# ----------------------------------------------------------------------------------------------
#                                          Capture
# ----------------------------------------------------------------------------------------------

def test_capture_shapes(trajs):
    lat, pix = trajs["latent"], trajs["pixel"]
    assert lat.x_t.shape == lat.x0.shape == lat.velocity.shape == lat.x0_cond.shape == (3, 2, 16, 8, 8)
    assert pix.x_t.shape == pix.x0.shape == pix.velocity.shape == pix.x0_cond.shape == (3, 2, 3, 64, 64)
    for tr in (lat, pix):
        assert tr.x_t_pixels.shape == tr.x0_pixels.shape == (3, 2, 3, 64, 64)
        assert tr.final.shape == (2, 3, 64, 64)
        assert tr.features.shape == (3, 2, 64, 4, 4)  # tiny dim 64 on the 4×4 token grid of 64² images
        assert tr.sigmas.shape == (4,) and tr.step_sigmas[0] == 1.0 and tr.sigmas[-1] == 0.0
        assert tr.seconds > 0 and tr.prompts == PROMPTS and tr.num_steps == 3
        # the stored x0 is the sampler's: x0 = x_t − σ·v, and cfg makes the guided x0 differ from the conditional
        s = tr.step_sigmas.view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(tr.x0, tr.x_t - s * tr.velocity)
        assert not torch.allclose(tr.x0, tr.x0_cond)
    assert torch.equal(pix.x_t_pixels, pix.x_t)  # pixel states are already pixels


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_capture_reproduces_the_pipeline_exactly(pipes, cfg_scale):
    for pipe in pipes:
        tr = tj.capture(pipe, PROMPTS, seed=3, **{**KW, "cfg_scale": cfg_scale})
        assert torch.equal(tr.final, _sample(pipe, cfg_scale=cfg_scale))
        assert torch.equal(tr.x_t[0], pipe.initial_noise(2, 64, 64, 3))


def test_capture_without_features(pipes):
    tr = tj.capture(pipes[1], PROMPTS[0], seed=0, features=False, **KW)
    assert tr.features is None and tr.x0_cond is None and tr.x_t.shape == (3, 1, 3, 64, 64)
    with pytest.raises(ValueError, match="features"):
        tj.detailer_comparison(tr)


def test_capture_can_keep_only_some_steps(pipes, trajs):
    """keep_steps stores a subset (memory at 1024²) with the same values; the final image is unchanged."""
    full = trajs["pixel"]
    some = tj.capture(pipes[1], PROMPTS, seed=3, keep_steps=[2, 0], **KW)
    assert some.num_steps == 2 and some.step_index == [0, 2] and full.step_index == [0, 1, 2]
    assert torch.equal(some.final, full.final)
    for key in ("x_t", "x0", "velocity", "features", "x0_cond"):
        assert torch.equal(getattr(some, key), getattr(full, key)[[0, 2]]), key
    assert torch.equal(some.step_sigmas, full.step_sigmas[[0, 2]])
    assert tj.detailer_comparison(some).table.step.tolist() == [0, 2]
    with pytest.raises(ValueError, match="keep_steps"):
        tj.capture(pipes[1], PROMPTS, seed=3, keep_steps=[3], **KW)


def test_pick_steps():
    assert tj.pick_steps(20, 6) == [0, 4, 8, 11, 15, 19]
    assert tj.pick_steps(3, 6) == [0, 1, 2]
    assert tj.pick_steps(1, 4) == [0]


# ----------------------------------------------------------------------------------------------
#                                   Spectra, PCA, readout
# ----------------------------------------------------------------------------------------------

def test_step_spectra_and_distance(trajs):
    f, p = tj.step_spectra(trajs["pixel"])
    assert f.shape == (33,) and p.shape == (3, 33) and np.all(p[:, 1:] > 0)
    d = tj.spectral_distance_over_steps(trajs["pixel"], trajs["pixel"].final)
    assert d.shape == (3,) and d[-1] >= 0
    # against itself the final x0 of the pixel side is 0 decades away
    assert tj.spectral_distance_over_steps(trajs["pixel"], trajs["pixel"].x0_pixels[-1])[-1] == 0.0
    fig, dists = tj.spectral_distance_figure(trajs, trajs["pixel"].final)
    assert list(dists) == list(trajs) and np.array_equal(dists["pixel"], d)
    assert [tuple(line.get_ydata()) for line in fig.axes[0].get_lines()] == [tuple(v) for v in dists.values()]


def test_pca_rgb_recovers_planted_components():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 3, generator=g))[0].T  # 3 orthonormal directions in 32-d
    coeff = torch.randn(10, 3, 4, 4, generator=g) * torch.tensor([5.0, 3.0, 2.0]).view(1, 3, 1, 1)
    feats = torch.einsum("nkhw,kd->ndhw", coeff, basis) + 0.01 * torch.randn(10, 32, 4, 4, generator=g)
    rgb = tj.pca_rgb(feats)
    assert rgb.shape == (10, 3, 4, 4) and rgb.min() >= 0 and rgb.max() <= 1
    for k in range(3):  # each colour channel follows one planted component (up to sign and scale)
        r = np.corrcoef(rgb[:, k].flatten().numpy(), coeff[:, k].flatten().numpy())[0, 1]
        assert abs(r) > 0.95
    assert torch.equal(tj.pca_rgb(feats[:2], fit=feats), tj.pca_rgb(feats)[:2])


def test_linear_readout_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    n, d, p = 40, 6, 4
    feats, sigma = torch.randn(n, d, 2, 2, generator=g), torch.rand(n, generator=g)
    w = torch.randn(2 * d + 1, p * p * 3, generator=g, dtype=torch.float64)
    target = tj.LinearReadout(w, p, 0.0)(feats, sigma)
    ro = tj.fit_linear_readout(feats, sigma, target, ridge=1e-10)
    assert ro.patch == p and ro.weight.shape == w.shape
    torch.testing.assert_close(ro(feats, sigma), target, atol=1e-4, rtol=1e-4)
    # unpatchify matches the model's patch order: a one-hot weight lights exactly one pixel per token
    w1 = torch.zeros_like(w)
    w1[-1, (1 * p + 2) * 3 + 0] = 1.0  # bias → patch row 1, column 2, red
    img = tj.LinearReadout(w1, p, 0.0)(feats[:1], sigma[:1])
    assert img[0, 0, 1, 2] == 1 and img[0, 0, p + 1, p + 2] == 1 and img.sum() == 4


def test_detailer_comparison(pipes, trajs):
    pix = trajs["pixel"]
    comp = tj.detailer_comparison(pix)
    assert comp.in_sample and comp.head.shape == comp.linear.shape == (3, 2, 3, 64, 64)
    assert list(comp.table.columns) == ["step", "sigma", "psnr", "residual_fraction", "hf_ratio"]
    assert torch.equal(comp.head, pix.x0_cond)
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    ro = tj.fit_readout_on_images(pipes[1], images, ["a", "b", "c", "d"], sigmas=[0.9, 0.5, 0.1], batch_size=3)
    held_out = tj.detailer_comparison(pix, ro)
    assert not held_out.in_sample and np.isfinite(held_out.table.psnr).all()


def test_figures_are_figures(trajs):
    comp = tj.detailer_comparison(trajs["pixel"])
    figs = [tj.trajectory_figure(trajs, item=1), tj.spectra_figure(trajs, reference=trajs["pixel"].final),
            tj.pca_figure(trajs, steps=[0, 2]), tj.detailer_figure(comp, k=2)]
    assert all(isinstance(f, Figure) for f in figs)
    assert len(figs[0].axes) == 4 * 4  # (x_t, x0) × 2 models, 3 steps + final
    assert len(figs[2].axes) == 2 * 3


# ----------------------------------------------------------------------------------------------
#                                         Handoff
# ----------------------------------------------------------------------------------------------

def test_split_schedule():
    s = sampling_sigmas(4, 3.0)  # 1, .9, .75, .5, 0
    lat, pix = split_schedule(s, 0.6)
    assert torch.equal(lat, torch.tensor([1.0, s[1], s[2], 0.6])) and torch.equal(pix, torch.tensor([0.6, s[3], 0.0]))
    lat, pix = split_schedule(s, float(s[2]))  # on the grid: nothing inserted
    assert len(lat) + len(pix) == len(s) + 1
    assert torch.equal(split_schedule(s, 1.0)[1], s) and torch.equal(split_schedule(s, 0.0)[0], s)
    with pytest.raises(ValueError):
        split_schedule(s, 1.5)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_handoff_limits_are_the_pure_samplers(pipes, cfg_scale):
    lat_pipe, pix_pipe = pipes
    kw = dict(seed=3, num_inference_steps=3, cfg_scale=cfg_scale, shift=3.0, height=64, width=64)
    at0 = handoff_sample(lat_pipe, pix_pipe, PROMPTS, 0.0, **kw)
    at1 = handoff_sample(lat_pipe, pix_pipe, PROMPTS, 1.0, **kw)
    assert torch.equal(at0.images, _sample(lat_pipe, cfg_scale=cfg_scale))
    assert torch.equal(at1.images, _sample(pix_pipe, cfg_scale=cfg_scale))
    assert (at0.latent_steps, at0.pixel_steps, at1.latent_steps, at1.pixel_steps) == (3, 0, 0, 3)
    assert at1.handoff is None and torch.equal(at0.handoff, at0.images)


def test_handoff_in_between(pipes):
    lat_pipe, pix_pipe = pipes
    kw = dict(seed=3, num_inference_steps=4, cfg_scale=2.0, height=64, width=64)
    seen = []
    mid = handoff_sample(lat_pipe, pix_pipe, PROMPTS, 0.6, callback=lambda stage, info: seen.append(
        (stage, info.sigma, info.sigma_next)), **kw)
    assert (mid.latent_steps, mid.pixel_steps) == (3, 2)  # 0.6 is inserted between 0.75 and 0.5
    assert [s for s, *_ in seen] == ["latent"] * 3 + ["pixel"] * 2
    assert seen[2][2] == pytest.approx(0.6) and seen[3][1] == pytest.approx(0.6)
    assert mid.handoff.shape == mid.images.shape == (2, 3, 64, 64) and mid.seconds > 0
    assert not torch.equal(mid.images, _sample(pix_pipe, steps=4)) and not torch.equal(mid.images, mid.handoff)
    again = handoff_sample(lat_pipe, pix_pipe, PROMPTS, 0.6, **kw)
    other = handoff_sample(lat_pipe, pix_pipe, PROMPTS, 0.6, noise_seed=99, **kw)
    assert torch.equal(again.images, mid.images) and torch.equal(other.handoff, mid.handoff)
    assert not torch.equal(other.images, mid.images)  # the re-noising ε is seeded separately


def test_run_sweep(pipes):
    lat_pipe, pix_pipe = pipes
    df, images = run_sweep(lat_pipe, pix_pipe, [0.0, 0.5, 1.0], PROMPTS * 2, seed=3, steps=2, cfg_scale=2.0,
                           batch_size=2, score_fn=lambda gen: {"mean": float(gen.mean())}, warmup=False)
    assert isinstance(df, pd.DataFrame) and list(df.sigma_h) == [0.0, 0.5, 1.0]
    assert {"latent_steps", "pixel_steps", "seconds", "ms_per_image", "mean"} <= set(df.columns)
    assert list(df.latent_steps) == [2, 2, 0] and list(df.pixel_steps) == [0, 1, 2]  # σ: 1, .75, (.5), 0
    assert images[0.0].shape == (4, 3, 64, 64)
    # batch k uses seed + k, like ToyWorld.evaluate
    assert torch.equal(images[1.0][2:], _sample(pix_pipe, seed=5, steps=2))
    assert isinstance(sweep_figure(df, metrics=("mean", "ms_per_image")), Figure)


def test_each_stage_has_its_own_guidance(pipes):
    """pixel_cfg_scale guides only the pixel stage: the limits are each pure sampler at its own scale."""
    lat_pipe, pix_pipe = pipes
    kw = dict(seed=3, num_inference_steps=3, cfg_scale=2.0, shift=3.0, height=64, width=64, pixel_cfg_scale=1.5)
    assert torch.equal(handoff_sample(lat_pipe, pix_pipe, PROMPTS, 0.0, **kw).images, _sample(lat_pipe, cfg_scale=2.0))
    assert torch.equal(handoff_sample(lat_pipe, pix_pipe, PROMPTS, 1.0, **kw).images, _sample(pix_pipe, cfg_scale=1.5))
    mid = handoff_sample(lat_pipe, pix_pipe, PROMPTS, 0.6, **kw)
    same = handoff_sample(lat_pipe, pix_pipe, PROMPTS, 0.6, **{**kw, "pixel_cfg_scale": 2.0})
    default = handoff_sample(lat_pipe, pix_pipe, PROMPTS, 0.6, **{**kw, "pixel_cfg_scale": None})
    assert torch.equal(mid.handoff, same.handoff) and not torch.equal(mid.images, same.images)
    assert torch.equal(same.images, default.images)  # None: the pixel stage uses cfg_scale
    df, images = run_sweep(lat_pipe, pix_pipe, [1.0], PROMPTS, seed=3, steps=3, cfg_scale=2.0, pixel_cfg_scale=1.5,
                           warmup=False)
    assert torch.equal(images[1.0], _sample(pix_pipe, cfg_scale=1.5))
    pair = tj.capture_pair(lat_pipe, pix_pipe, PROMPTS, seed=3, steps=3, cfg_scale=2.0, pixel_cfg_scale=1.5)
    assert torch.equal(pair["pixel"].final, _sample(pix_pipe, cfg_scale=1.5))
    assert torch.equal(pair["latent"].final, _sample(lat_pipe, cfg_scale=2.0))
