"""Metrics: spectra, PSNR, toy FID/KID on judge features, and the no-download real-scale metrics."""
import numpy as np
import pytest
import torch

from l2p import metrics
from l2p.toyworld.evaluator import gaussian_blur, train_evaluator
from l2p.toyworld.scenes import ToyWorldConfig, generate, to_tensor


@pytest.fixture(scope="module")
def images():
    return to_tensor(generate(48, seed=7, cfg=ToyWorldConfig())[0])


@pytest.fixture(scope="module")
def random_evaluator():
    """A barely trained (smoke) judge: not accurate, but a fixed embedding with sensible feature scales."""
    return train_evaluator("smoke", progress=False)[0]


def test_to_float_layouts(images):
    u8 = ((images + 1) * 127.5).round().to(torch.uint8)
    nhwc = u8.permute(0, 2, 3, 1).numpy()
    for x in (u8, nhwc, images):
        y = metrics.to_float(x)
        assert y.shape == images.shape and y.dtype == torch.float32
        assert (y - images).abs().max() <= 1 / 127.5 + 1e-6
    assert metrics.to_float(nhwc[0]).shape == (1, 3, 64, 64)


def test_radial_spectrum_shape_and_parseval(images):
    f, p = metrics.radial_power_spectrum(images)
    assert f.shape == p.shape == (33,)
    assert f[0] == 0 and f[-1] == pytest.approx(0.5)
    assert p[0] < 1e-10  # the mean is removed per image
    assert (p[1:] > 0).all()


def test_blur_removes_high_frequencies(images):
    blurred = gaussian_blur(images, torch.full((len(images),), 1.5))
    assert metrics.high_frequency_energy_ratio(images, images) == pytest.approx(1.0)
    assert metrics.high_frequency_energy_ratio(blurred, images) < 0.3
    assert metrics.high_frequency_energy(blurred) < metrics.high_frequency_energy(images)
    assert metrics.spectral_fidelity(images, images) == pytest.approx(0.0, abs=1e-9)
    assert metrics.spectral_fidelity(blurred, images) > 0.3
    noisy = (images + 0.2 * torch.randn_like(images)).clamp(-1, 1)
    assert metrics.high_frequency_energy_ratio(noisy, images) > 1.2


def test_spectrum_figure(images):
    from matplotlib.figure import Figure

    fig = metrics.spectrum_figure({"gt": images, "blurred": gaussian_blur(images, torch.ones(len(images)))})
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 3


def test_psnr_known_value(images):
    assert metrics.psnr(images, images) > 100
    shifted = images + 0.1  # MSE 0.01 with data range 2 → 10·log10(4 / 0.01)
    assert metrics.psnr(shifted, images) == pytest.approx(10 * np.log10(400), rel=1e-4)


def test_toy_fid_and_kid(images, random_evaluator):
    noise = torch.rand_like(images) * 2 - 1
    fid_self = metrics.toy_fid(images, images, random_evaluator)
    fid_noise = metrics.toy_fid(noise, images, random_evaluator)
    assert abs(fid_self) < 1e-3 * fid_noise and fid_noise > 0
    # Another sample of the same world sits far closer than noise does.
    other = to_tensor(generate(48, seed=8)[0])
    assert metrics.toy_fid(other, images, random_evaluator) < 0.5 * fid_noise
    kid_self, _ = metrics.toy_kid(images, images, random_evaluator, subsets=10, subset_size=32)
    kid_noise, _ = metrics.toy_kid(noise, images, random_evaluator, subsets=10, subset_size=32)
    assert abs(kid_self) < 0.05 * kid_noise and kid_noise > 0  # unbiased estimate: noisy around 0


def test_fid_accepts_uint8_hwc(images, random_evaluator):
    u8 = ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert metrics.toy_fid(u8, images, random_evaluator) == pytest.approx(
        metrics.toy_fid(images, images, random_evaluator), abs=0.05)


def test_inception_metrics_need_local_package_and_weights(monkeypatch, tmp_path, images):
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    # Without torch-fidelity: the error names the package and how to install it.
    monkeypatch.setattr(metrics, "_has_module", lambda name: False)
    with pytest.raises(metrics.MissingWeightsError, match="torch-fidelity"):
        metrics.inception_fid(images, images)
    with pytest.raises(FileNotFoundError, match="pip install torch-fidelity"):
        metrics.inception_score(images)
    # With the package but no weights: the error names the file and the environment variable.
    monkeypatch.setattr(metrics, "_has_module", lambda name: True)
    with pytest.raises(metrics.MissingWeightsError, match=metrics.INCEPTION_ENV) as e:
        metrics.inception_fid(images, images)
    assert metrics.INCEPTION_WEIGHTS_FILE in str(e.value) and "never downloads" in str(e.value)
    missing = tmp_path / "nope.pth"
    monkeypatch.setenv(metrics.INCEPTION_ENV, str(missing))
    with pytest.raises(metrics.MissingWeightsError, match="nope.pth"):
        metrics.inception_score(images)


def test_clip_score_needs_local_model(monkeypatch, tmp_path, images):
    monkeypatch.delenv(metrics.CLIP_ENV, raising=False)
    with pytest.raises(metrics.MissingWeightsError, match=metrics.CLIP_ENV):
        metrics.clip_score(images[:2], ["a", "b"])
    with pytest.raises(metrics.MissingWeightsError, match="config.json"):
        metrics.clip_score(images[:2], ["a", "b"], model_path=tmp_path)
