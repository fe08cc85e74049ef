"""`l2p eval` (scoring a rendered folder offline) and `l2p synth` with an L2P model."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from l2p import metrics
from l2p.cli import main
from l2p.data import DatasetError, write_metadata
from l2p.evaluate import evaluate_folder, pair_rows, read_folder
from l2p.toyworld.evaluator import gaussian_blur
from l2p.toyworld.scenes import generate


def _write(root, images, prompts, seeds, order=None):
    """A folder as `l2p synth` writes it: images/NNNNNN.png + metadata.csv (rows in `order`)."""
    (root / "images").mkdir(parents=True)
    rows = []
    for i in order if order is not None else range(len(images)):
        name = f"images/{i:06d}.png"
        Image.fromarray(images[i]).save(root / name)
        rows.append({"image": name, "prompt": prompts[i], "seed": seeds[i]})
    write_metadata(root, rows)
    return root


def _u8(x: torch.Tensor) -> np.ndarray:
    return metrics.to_uint8_nchw(x).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def scenes():
    images, captions, _ = generate(12, seed=5)
    return images, captions


@pytest.fixture()
def folders(tmp_path, scenes):
    """ref: ground truth; gen: the same scenes blurred, rows in another order (pairs go by prompt and seed)."""
    images, captions = scenes
    seeds = list(range(100, 112))
    blurred = _u8(gaussian_blur(metrics.to_float(images), torch.full((len(images),), 1.2)))
    ref = _write(tmp_path / "ref", images, captions, seeds)
    gen = _write(tmp_path / "gen", blurred, captions, seeds, order=list(reversed(range(12))))
    return gen, ref, blurred, images


def _table(df):
    return {r.metric: r for r in df.itertuples()}


def test_spectrum_meter_streams_the_whole_set_spectrum(scenes):
    x = metrics.to_float(scenes[0])
    y = gaussian_blur(x, torch.ones(len(x)))
    mx, my = metrics.SpectrumMeter(), metrics.SpectrumMeter()
    for i in range(0, len(x), 5):  # uneven batches: 5, 5, 2
        mx.update(x[i:i + 5])
        my.update(y[i:i + 5])
    assert mx.high_frequency_energy() == pytest.approx(metrics.high_frequency_energy(x), rel=1e-9)
    assert my.distance(mx) == pytest.approx(metrics.spectral_fidelity(y, x), rel=1e-9)
    with pytest.raises(ValueError, match="differs from the first batch"):
        mx.update(x[:2, :, :32, :32])
    with pytest.raises(ValueError, match="no images"):
        metrics.SpectrumMeter().spectrum()


def test_eval_compares_with_the_reference_pair_by_pair(folders, monkeypatch):
    gen, ref, blurred, images = folders
    monkeypatch.delenv(metrics.INCEPTION_ENV, raising=False)
    monkeypatch.delenv(metrics.CLIP_ENV, raising=False)
    t = _table(evaluate_folder(gen, ref, batch_size=5, progress=False))
    assert t["images"].value == 12 and "64×64" in t["images"].note
    assert t["HF energy ratio to reference"].value < 0.5  # blurred: detail lost
    assert t["spectral distance to reference (decades)"].value == pytest.approx(
        metrics.spectral_fidelity(blurred, images), rel=1e-6)
    # rows are paired by prompt and seed, not by position: gen's rows run in reverse order
    assert "12 pairs" in t["paired PSNR to reference (dB)"].note
    assert t["paired PSNR to reference (dB)"].value == pytest.approx(metrics.psnr(blurred, images), rel=1e-6)
    for name, env in [("Inception score", metrics.INCEPTION_ENV), ("Inception FID to reference", metrics.INCEPTION_ENV),
                      ("CLIP score", metrics.CLIP_ENV)]:
        assert np.isnan(t[name].value) and env in t[name].note
    # against itself: ratio 1, distance 0
    t = _table(evaluate_folder(ref, ref, progress=False))
    assert t["HF energy ratio to reference"].value == pytest.approx(1.0)
    assert t["spectral distance to reference (decades)"].value == pytest.approx(0.0, abs=1e-9)


def test_pairs_need_the_same_prompt_and_seed(tmp_path, scenes):
    images, captions = scenes
    a = read_folder(_write(tmp_path / "a", images[:4], captions[:4], [1, 2, 3, None]))
    b = read_folder(_write(tmp_path / "b", images[:4], captions[:4], [1, 2, 30, None]))
    assert sorted(pair_rows(a, b)) == [1, 2]  # row 3: another seed; row 4: no seed
    t = _table(evaluate_folder(tmp_path / "a", tmp_path / "b", progress=False))
    assert "2 pairs" in t["paired PSNR to reference (dB)"].note


def test_bad_rows_and_mixed_sizes_are_named(tmp_path, scenes):
    images, captions = scenes
    root = _write(tmp_path / "mixed", images[:3], captions[:3], [0, 1, 2])
    Image.fromarray(images[1]).resize((48, 64)).save(root / "images/000001.png")
    with pytest.raises(DatasetError, match=r"row 2 \(images/000001.png\) is 48×64, but row 1"):
        read_folder(root)
    small = _write(tmp_path / "small", images[:2, :32, :32], captions[:2], [0, 1])
    t = _table(evaluate_folder(small, _write(tmp_path / "big", images[:2], captions[:2], [0, 1]), progress=False))
    for metric in ("HF energy ratio to reference", "spectral distance to reference (decades)",
                   "paired PSNR to reference (dB)"):
        assert np.isnan(t[metric].value) and "differ" in t[metric].note
    root = _write(tmp_path / "bad", images[:3], captions[:3], [0, 1, 2])
    (root / "images/000002.png").unlink()
    with pytest.raises(DatasetError, match=r"row 3 .*file not found[\s\S]*--skip-bad"):
        evaluate_folder(root, progress=False)
    t = _table(evaluate_folder(root, skip_bad=True, progress=False))
    assert t["images"].value == 2


def test_inception_and_clip_metrics_stream_batches(folders, monkeypatch):
    """With stand-in networks (the real ones need local weights): the batched FID equals the whole-set one, and
    CLIP sees every prompt with its image."""
    gen, ref, blurred, images = folders
    proj = torch.randn(3 * 8 * 8, 2048, generator=torch.Generator().manual_seed(0))

    class Net(torch.nn.Module):  # pool3 features (2048) or 10 logits from a fixed projection
        def __init__(self, features, weights_path):
            super().__init__()
            self.features = features

        def forward(self, x):  # uint8 N×3×H×W
            f = torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 8).flatten(1) @ proj
            return f.double() if self.features == "2048" else f[:, :10]

    monkeypatch.setattr(metrics, "_inception", lambda features, weights_path: Net(features, weights_path))
    seen = []

    class FakeClip:
        def update(self, imgs, prompts):
            assert len(imgs) == len(prompts) and imgs[0].dtype == torch.uint8
            seen.extend(prompts)

        def compute(self):
            return torch.tensor(31.0)

    monkeypatch.setattr(metrics, "clip_score_metric", lambda path: FakeClip())
    t = _table(evaluate_folder(gen, ref, inception="w.pth", clip="clip/", batch_size=5, progress=False))
    assert t["Inception FID to reference"].value == pytest.approx(metrics.inception_fid(blurred, images), rel=1e-6)
    assert t["Inception score"].value > 0 and t["CLIP score"].value == 31.0
    # gen's rows are written in reverse order: CLIP pairs each image with its own row's prompt
    assert seen == [e.prompt for e in reversed(read_folder(ref).entries)]


def test_named_weights_that_are_missing_fail_before_reading(folders, monkeypatch, tmp_path):
    gen, ref, _, _ = folders
    monkeypatch.setattr(metrics, "_has_module", lambda name: True)
    with pytest.raises(metrics.MissingWeightsError, match="nope.pth"):
        evaluate_folder(gen, ref, inception=tmp_path / "nope.pth", progress=False)
    monkeypatch.setenv(metrics.CLIP_ENV, str(tmp_path / "no_clip"))
    with pytest.raises(metrics.MissingWeightsError, match="no_clip"):
        evaluate_folder(gen, progress=False)


def test_toy_judge_scores_captions(folders):
    gen, ref, _, _ = folders
    t = _table(evaluate_folder(ref, gen, toy="smoke", progress=False))
    assert 0 <= t["toy-GenEval"].value <= 1 and t["toy-FID to reference (judge features)"].value >= 0
    from l2p.toyworld.evaluator import load_or_train_evaluator
    judge = _table(evaluate_folder(ref, gen, toy=load_or_train_evaluator("smoke", progress=False), progress=False))
    assert judge["toy-GenEval"].value == t["toy-GenEval"].value  # a world's own judge, passed in
    images, captions = folders[3], [e.prompt for e in read_folder(ref).entries]
    other = _write(gen.parent / "other", images[:3], captions[:2] + ["a cat in a spacesuit"], [0, 1, 2])
    with pytest.raises(DatasetError, match=r"row 3 \(images/000002.png\): --toy scores toy captions only"):
        evaluate_folder(other, toy="smoke", progress=False)


def test_cli_synth_renders_with_an_l2p_checkpoint_then_eval(tmp_path, capsys):
    from l2p.checkpoint import make_synthetic_checkpoint
    from l2p.config import tiny_latent, toy_pixel
    from l2p.text import toy_text_encoder_folder

    ckpt = make_synthetic_checkpoint(toy_pixel(), tmp_path / "pixel.safetensors", torch.float32, seed=1)[0]
    te = str(toy_text_encoder_folder())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle at the top left on a striped background\n\na cat in a spacesuit\n")
    common = ["--text-encoder", te, "--prompts", str(prompts), "--size", "64", "--steps", "2", "--batch-size", "1"]
    assert main(["synth", "--model", str(ckpt), "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["synth", "--model", str(ckpt), "--out", str(tmp_path / "b"), "--cfg", "1", *common]) == 0
    rows = (tmp_path / "a" / "metadata.csv").read_text().splitlines()
    assert rows[0] == "image,prompt,seed" and rows[2].endswith(",1") and len(rows) == 3
    assert Image.open(tmp_path / "a" / "images" / "000001.png").size == (64, 64)
    out = tmp_path / "scores.json"
    assert main(["eval", str(tmp_path / "a"), "--reference", str(tmp_path / "b"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "paired PSNR to reference (dB)" in printed and "2 pairs" in printed
    saved = json.loads(out.read_text())
    assert saved["reference"] == str(tmp_path / "b")
    assert {m["metric"] for m in saved["metrics"]} >= {"images", "high-frequency energy", "Inception score"}
    assert main(["eval", str(tmp_path / "a"), "--toy", "smoke"]) == 2  # not toy captions
    assert "row 2 (images/000001.png): --toy scores toy captions only" in capsys.readouterr().err
    # a latent checkpoint needs its VAE, and a pixel one takes none
    latent = make_synthetic_checkpoint(tiny_latent(), tmp_path / "latent.safetensors", torch.float32)[0]
    with pytest.raises(SystemExit, match="latent checkpoint: give its VAE"):
        main(["synth", "--model", str(latent), "--out", str(tmp_path / "c"), *common])
    with pytest.raises(SystemExit, match="without a VAE"):
        main(["synth", "--model", str(ckpt), "--vae", "vae/", "--out", str(tmp_path / "c"), *common])
    with pytest.raises(SystemExit, match="pixel patch sizes are"):
        main(["synth", "--model", str(ckpt), "--patch-size", "64", "--out", str(tmp_path / "c"), *common])
