"""Latent → pixel conversion and merge (`l2p.convert`, `l2p.merge`): release counts, round trips, bad inputs."""
import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import l2p.convert as convert_mod
from l2p.checkpoint import CheckpointError, atomic_save, make_synthetic_checkpoint, model_shapes, read_state_dict
from l2p.config import DetailerConfig, DiTConfig, l2p_1k, l2p_4k, tiny_latent, z_image_turbo
from l2p.convert import (TensorReport, add_convert_parser, convert, encode_samples, fit_vae_patch_map, main_convert,
                         paper_frozen_layers, plan_conversion, release_init)
from l2p.merge import add_merge_parser, main_merge, merge
from l2p.model import ZImageDiT, patchify

DETAILER = DetailerConfig(channels=(8, 8, 16, 32))  # tiny head: keeps the files small
PIXEL = tiny_latent().to_pixel((16,), DETAILER)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def latent(tmp_path_factory) -> list[Path]:
    """A tiny random latent Z-Image checkpoint in F32, sharded with an index."""
    out = tmp_path_factory.mktemp("latent") / "dit.safetensors"
    return make_synthetic_checkpoint(tiny_latent(), out, torch.float32, max_shard_bytes=150_000, seed=1)


@pytest.fixture(scope="module")
def converted(latent, tmp_path_factory):
    """The tiny latent checkpoint converted with the release init, and its report."""
    out = tmp_path_factory.mktemp("pixel") / "pixel_init.safetensors"
    report = convert(latent[-1], out, detailer=DETAILER, seed=7, progress=False)
    return out, report


# ----------------------------------------------------------------------------------------------
#                              The release's counts on shape plans
# ----------------------------------------------------------------------------------------------

def plan_report(source_cfg, target_cfg, dtype=torch.float32) -> TensorReport:
    """The conversion report for real-size configs, from shapes only (meta model, no memory)."""
    source = {k: (dtype, s) for k, s in model_shapes(source_cfg).items()}
    planned, dropped = plan_conversion(source, model_shapes(target_cfg), None)
    report = TensorReport()
    for t in planned:
        report.add(t.key, t.status, t.shape, t.dtype, target_cfg.n_layers)
    for key, shape, dt in dropped:
        report.add(key, "dropped", shape, dt, target_cfg.n_layers)
    return report


def test_z_image_turbo_to_l2p_1k_counts_match_the_release():
    target = z_image_turbo().to_pixel((16,))
    assert model_shapes(target) == model_shapes(l2p_1k())
    report = plan_report(z_image_turbo(), target)
    assert report.counts() == {"copied": (515, 6_153_426_432), "new": (30, 13_038_083), "dropped": (6, 1_482_304)}
    rows = report.rows
    assert {r["key"] for r in rows if r["status"] == "dropped"} == {
        "all_x_embedder.2-1.weight", "all_x_embedder.2-1.bias", "all_final_layer.2-1.linear.weight",
        "all_final_layer.2-1.linear.bias", "all_final_layer.2-1.adaLN_modulation.1.weight",
        "all_final_layer.2-1.adaLN_modulation.1.bias"}
    new = [r for r in rows if r["status"] == "new"]
    assert sum(r["group"] == "local_decoder" for r in new) == 28 and all(r["dtype"] == "F32" for r in new)
    # the paper's freeze policy: layers 5..24 frozen
    assert list(paper_frozen_layers(30)) == list(range(5, 25))
    kept = [r for r in rows if r["status"] != "dropped"]
    frozen = [r for r in kept if not r["trainable"]]
    assert (len(frozen), sum(r["numel"] for r in frozen)) == (300, 3_618_206_720)
    assert (len(kept) - len(frozen), sum(r["numel"] for r in kept if r["trainable"])) == (245, 2_548_257_795)
    summary = report.summary()
    assert summary.loc["total", ("params", "copied")] == 6_153_426_432
    assert summary.loc["local_decoder", ("tensors", "new")] == 28


def test_4k_variant_adds_a_second_embedder():
    report = plan_report(z_image_turbo(), z_image_turbo().to_pixel((16, 64)))
    assert model_shapes(z_image_turbo().to_pixel((16, 64))) == model_shapes(l2p_4k())
    new = {r["key"]: r["shape"] for r in report.rows if r["status"] == "new"}
    assert new["all_x_embedder.64-1.weight"] == [3840, 12288] and report.counts()["new"][0] == 32


def test_release_init_is_pytorch_default_and_seeded():
    shapes = {"weight": (64, 3, 3, 3), "bias": (64,)}
    a, b = release_init("local_decoder.enc1.0", shapes, 0), release_init("local_decoder.enc1.0", shapes, 0)
    c = release_init("local_decoder.enc1.0", shapes, 1)
    assert torch.equal(a["weight"], b["weight"]) and not torch.equal(a["weight"], c["weight"])
    bound = 1 / math.sqrt(27)
    for t in a.values():
        assert t.dtype == torch.float32 and t.abs().max() <= bound and t.abs().max() > 0.9 * bound
    ref = torch.nn.Conv2d(3, 64, 3)  # same distribution as nn.Conv2d's reset_parameters
    assert abs(ref.weight.std().item() - a["weight"].std().item()) < 0.02
    with pytest.raises(CheckpointError, match="no default init"):
        release_init("x_pad_token", {"": (1, 4)}, 0)


# ----------------------------------------------------------------------------------------------
#                                     Convert → train → merge
# ----------------------------------------------------------------------------------------------

def test_convert_copies_bit_identically_and_matches_the_model(latent, converted):
    out, report = converted
    sd = load_file(out)
    assert list(sd) == list(ZImageDiT(PIXEL).state_dict())
    assert {k: tuple(v.shape) for k, v in sd.items()} == model_shapes(PIXEL)
    src = read_state_dict(latent[-1])
    copied = [r["key"] for r in report.rows if r["status"] == "copied"]
    assert len(copied) == report.verified == len(src) - 6
    assert all(same(sd[k], src[k]) for k in copied)
    assert report.counts()["dropped"][0] == 6 and report.counts()["new"][0] == 30  # as the release
    with safe_open(str(out), "pt") as f:
        assert DiTConfig.from_dict(json.loads(f.metadata()["l2p_config"])) == PIXEL
    ZImageDiT(PIXEL).load_state_dict(sd, strict=True)


def test_convert_is_reproducible_per_seed(latent, converted, tmp_path):
    out, _ = converted
    again = convert(latent[:-1], tmp_path / "again.safetensors", detailer=DETAILER, seed=7, progress=False)
    other = convert(latent[0].parent, tmp_path / "other.safetensors", detailer=DETAILER, seed=8, progress=False)
    a, b, c = load_file(out), load_file(again.output_files[0]), load_file(other.output_files[0])
    assert all(same(a[k], b[k]) for k in a)
    assert not torch.equal(a["local_decoder.out_conv.weight"], c["local_decoder.out_conv.weight"])


def test_convert_sharded_bf16_with_report(latent, tmp_path):
    report = convert(latent[-1], tmp_path / "o" / "px.safetensors", detailer=DETAILER, out_dtype="bf16",
                     max_shard_bytes="100kB", report_path=tmp_path / "report.json", progress=False)
    assert len(report.output_files) > 2 and report.output_files[-1].endswith("px.safetensors.index.json")
    sd = read_state_dict(tmp_path / "o")
    src = read_state_dict(latent[-1])
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    assert all(same(sd[r["key"]], src[r["key"]].bfloat16()) for r in report.rows if r["status"] == "copied")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["out_dtype"] == "bf16" and len(saved["rows"]) == len(report.rows)
    assert set(report.to_dataframe().columns) >= {"key", "status", "shape", "dtype", "numel", "group"}
    assert "local_decoder" in str(report)


def test_round_trip_convert_train_merge(latent, converted, tmp_path):
    init_path, report = converted
    init = load_file(init_path)
    trainable = [r["key"] for r in report.rows if r["status"] != "dropped" and r["trainable"]]
    # fake training on the first half of the trainable tensors: saved in bf16 with the trainer's prefix
    trained = {f"pipe.dit.{k}": (init[k].float() + 1).bfloat16() for k in trainable[: len(trainable) // 2]}
    atomic_save(trained, tmp_path / "step-100.safetensors")

    m = merge(tmp_path / "step-100.safetensors", init_path, tmp_path / "merged.safetensors", progress=False)
    merged = load_file(tmp_path / "merged.safetensors")
    assert list(merged) == list(ZImageDiT(PIXEL).state_dict())
    for k, t in merged.items():
        expected = trained.get(f"pipe.dit.{k}", init[k])
        assert same(t, expected), k  # trained tensors stay bf16, the rest keeps the init dtype (F32)
    assert m.counts()["trained"][0] == len(trained) and m.verified == len(merged)
    assert {r["dtype"] for r in m.rows} == {"BF16", "F32"}


def test_merge_keeps_the_trained_models_config(converted, tmp_path):
    """A step file's l2p_config (here: an x-prediction head trained from a velocity init) is what the merge keeps."""
    from dataclasses import replace
    init_path, report = converted
    cfg = ZImageDiT.from_pretrained(init_path).cfg
    assert cfg.detailer.prediction == "velocity"
    x_cfg = cfg.replace(detailer=replace(cfg.detailer, prediction="x"))
    key = "local_decoder.out_conv.bias"
    atomic_save({key: load_file(init_path)[key] + 1}, tmp_path / "step-1.safetensors",
                metadata={"l2p_config": json.dumps(x_cfg.to_dict())})
    merge(tmp_path / "step-1.safetensors", init_path, tmp_path / "merged.safetensors", progress=False)
    assert ZImageDiT.from_pretrained(tmp_path / "merged.safetensors").cfg == x_cfg


def test_merge_shape_mismatch(converted, tmp_path):
    init_path, _ = converted
    atomic_save({"pipe.dit.x_pad_token": torch.zeros(1, 3), "pipe.dit.cap_pad_token": torch.zeros(1, 64)},
                tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=r"a\.safetensors: shape mismatch .*x_pad_token: trained \(1, 3\)"):
        merge(tmp_path / "a.safetensors", init_path, tmp_path / "m.safetensors", progress=False)
    assert not (tmp_path / "m.safetensors").exists()
    m = merge(tmp_path / "a.safetensors", init_path, tmp_path / "m.safetensors", allow_shape_mismatch=True,
              progress=False)
    status = {r["key"]: r["status"] for r in m.rows}
    assert status["x_pad_token"] == "init (shape mismatch)" and status["cap_pad_token"] == "trained"
    assert same(load_file(tmp_path / "m.safetensors")["x_pad_token"], load_file(init_path)["x_pad_token"])


def test_merge_unknown_keys_are_listed(converted, tmp_path):
    init_path, _ = converted
    atomic_save({"pipe.dit.foo": torch.zeros(1), "pipe.dit.bar": torch.zeros(1), "pipe.dit.x_pad_token":
                 torch.zeros(1, 64)}, tmp_path / "a.safetensors")
    with pytest.raises(CheckpointError, match=r"2 trained keys are not in the init checkpoint .*\['bar', 'foo'\]"):
        merge(tmp_path / "a.safetensors", init_path, tmp_path / "m.safetensors", progress=False)
    assert files_in(tmp_path) == ["a.safetensors"]


# ----------------------------------------------------------------------------------------------
#                                         vae_fit
# ----------------------------------------------------------------------------------------------

class LinearPatchVAE(torch.nn.Module):
    """A stand-in VAE whose encoder is exactly linear per 8×8 patch (stride-8 conv), so the fit must be exact."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 8, stride=8)
        self.config = SimpleNamespace(scaling_factor=0.5, shift_factor=0.1)

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=self.conv(x)))


def test_vae_fit_recovers_a_linear_encoder(latent, tmp_path):
    torch.manual_seed(0)
    vae = LinearPatchVAE()
    images = torch.rand(7, 3, 256, 256) * 2 - 1
    fit = fit_vae_patch_map(encode_samples(vae, images), 16, 2)
    assert fit.r2 > 0.999999 and fit.samples == 7 * 256
    with pytest.raises(ValueError, match="64 sample patches for 769 unknowns"):
        fit_vae_patch_map(encode_samples(vae, images[:4, :, :64, :64]), 16, 2)
    report = convert(latent[-1], tmp_path / "v.safetensors", detailer=DETAILER, init="vae_fit", vae=vae,
                     sample_images=images, progress=False)
    assert report.vae_fit["16-1"]["r2"] > 0.999999
    px, src = load_file(tmp_path / "v.safetensors"), read_state_dict(latent[-1])
    x = torch.rand(3, 32, 48) * 2 - 1  # unseen image: the pixel embedder equals the latent one on VAE latents
    with torch.no_grad():
        z = (vae.encode(x[None]).latent_dist.mean[0] - 0.1) * 0.5
    tok_px = patchify(x, 16) @ px["all_x_embedder.16-1.weight"].T + px["all_x_embedder.16-1.bias"]
    tok_lat = patchify(z, 2) @ src["all_x_embedder.2-1.weight"].T + src["all_x_embedder.2-1.bias"]
    torch.testing.assert_close(tok_px, tok_lat, atol=1e-4, rtol=1e-4)


def test_vae_fit_can_target_a_noise_gain(latent, tmp_path):
    """A fit above the cap takes the ridge that brings the noise gain down to it; a quieter fit is left alone."""
    torch.manual_seed(0)
    vae = LinearPatchVAE()
    with torch.no_grad():
        vae.conv.weight.mul_(10.0)  # a loud encoder: the plain fit's gain is far above 1
    images = torch.rand(7, 3, 256, 256) * 2 - 1
    pairs = encode_samples(vae, images)
    plain = fit_vae_patch_map(pairs, 16, 2)
    assert plain.noise_gain > 2
    for target in (1.0, 0.25):
        fit = fit_vae_patch_map(pairs, 16, 2, noise_gain=target)
        assert fit.noise_gain == pytest.approx(target, rel=1e-3)
        assert fit.ridge > plain.ridge and fit.r2 < plain.r2  # the price: a worse clean fit
        assert fit.noise_gain == pytest.approx(float((fit.A ** 2).sum(1).mean()))
    loose = fit_vae_patch_map(pairs, 16, 2, noise_gain=plain.noise_gain * 10)
    assert loose.ridge == plain.ridge and torch.equal(loose.A, plain.A)
    with pytest.raises(ValueError, match="noise_gain must be > 0"):
        fit_vae_patch_map(pairs, 16, 2, noise_gain=0)
    report = convert(latent[-1], tmp_path / "v.safetensors", detailer=DETAILER, init="vae_fit", vae=vae,
                     sample_images=images, vae_fit_noise_gain=1.0, progress=False)
    assert report.vae_fit["16-1"]["noise_gain"] == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(ValueError, match="init='vae_fit' only"):
        convert(latent[-1], tmp_path / "r.safetensors", detailer=DETAILER, vae_fit_noise_gain=1.0, progress=False)


def test_vae_fit_cli_with_a_diffusers_autoencoder(latent, tmp_path, capsys):
    from diffusers import AutoencoderKL
    from PIL import Image
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, norm_num_groups=4, layers_per_block=1,
                  scaling_factor=0.3611, shift_factor=0.1159).save_pretrained(tmp_path / "vae")
    for i in range(2):
        pixels = (torch.rand(500, 460, 3) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
    assert main_convert(["--latent-ckpt-files", str(latent[-1]), "--output-path", str(tmp_path / "v.safetensors"),
                         "--detailer-channels", "8", "8", "16", "32", "--init", "vae_fit", "--vae",
                         str(tmp_path / "vae"), "--sample-images", str(tmp_path / "img0.png"), str(tmp_path / "img1.png"),
                         "--image-size", "448", "--report", str(tmp_path / "r.json"), "--vae-fit-noise-gain", "0.01"]) == 0
    fit = json.loads((tmp_path / "r.json").read_text())["vae_fit"]["16-1"]
    assert 0 < fit["r2"] <= 1 and fit["samples"] == 2 * 28 * 28 and fit["noise_gain"] == pytest.approx(0.01, rel=1e-3)


def test_vae_fit_needs_a_vae(latent, tmp_path):
    with pytest.raises(ValueError, match="needs a VAE encoder"):
        convert(latent[-1], tmp_path / "v.safetensors", init="vae_fit", progress=False)
    assert files_in(tmp_path) == []


# ----------------------------------------------------------------------------------------------
#                                 Bad inputs leave no output
# ----------------------------------------------------------------------------------------------

def test_convert_rejects_other_models(tmp_path):
    atomic_save({"encoder.weight": torch.zeros(2, 2)}, tmp_path / "in" / "bert.safetensors")
    with pytest.raises(CheckpointError, match=r"bert\.safetensors: not a Z-Image / L2P DiT checkpoint"):
        convert(tmp_path / "in", tmp_path / "out.safetensors", progress=False)
    assert files_in(tmp_path) == ["in"]


def test_convert_rejects_pixel_checkpoints(converted, tmp_path):
    with pytest.raises(CheckpointError, match=r"pixel_init\.safetensors: already a pixel"):
        convert(converted[0], tmp_path / "out.safetensors", progress=False)


def test_convert_refuses_existing_output_and_inputs(latent, tmp_path):
    out = tmp_path / "px.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match=r"px\.safetensors: output exists"):
        convert(latent[-1], out, detailer=DETAILER, progress=False)
    assert out.read_bytes() == b"keep me" and files_in(tmp_path) == ["px.safetensors"]
    with pytest.raises(CheckpointError, match="would replace an input"):
        convert(latent[-1], latent[0], detailer=DETAILER, overwrite=True, progress=False)


@pytest.mark.parametrize("damage", ["missing_shard", "truncated"])
def test_convert_bad_source_leaves_nothing(latent, tmp_path, damage):
    folder = tmp_path / "src"
    folder.mkdir()
    for f in latent:
        (folder / f.name).write_bytes(f.read_bytes())
    shard = folder / latent[1].name
    if damage == "missing_shard":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=latent[1].name):
        convert(folder, tmp_path / "out" / "px.safetensors", progress=False)
    assert files_in(tmp_path) == ["src"]


def test_failed_verification_publishes_nothing(latent, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_mod, "same_bytes", lambda *a: False)
    with pytest.raises(CheckpointError, match="differ from the source after writing"):
        convert(latent[-1], tmp_path / "px.safetensors", detailer=DETAILER, progress=False)
    assert files_in(tmp_path) == []


# ----------------------------------------------------------------------------------------------
#                                            CLI
# ----------------------------------------------------------------------------------------------

def test_cli_with_release_flags(latent, tmp_path, capsys):
    out = str(tmp_path / "p.safetensors")
    assert main_convert(["--latent_ckpt_files", *map(str, latent[:-1]), "--output_path", out,
                         "--detailer-channels", "8", "8", "16", "32", "--seed", "3", "--report",
                         str(tmp_path / "r.json")]) == 0
    assert "copied" in capsys.readouterr().out and (tmp_path / "r.json").exists()
    atomic_save({"pipe.dit.x_pad_token": torch.ones(1, 64, dtype=torch.bfloat16)}, tmp_path / "a.safetensors")
    assert main_merge(["--file_a", str(tmp_path / "a.safetensors"), "--file_b", str(tmp_path / "p.safetensors"),
                       "--file_out", str(tmp_path / "m.safetensors")]) == 0
    assert load_file(tmp_path / "m.safetensors")["x_pad_token"].dtype == torch.bfloat16
    # an error is one line on stderr and exit status 2, and nothing is written
    assert main_merge(["--file_a", str(tmp_path / "a.safetensors"), "--file_b", str(tmp_path / "p.safetensors"),
                       "--file_out", str(tmp_path / "m.safetensors")]) == 2
    assert "output exists" in capsys.readouterr().err


def test_cli_prediction_is_stored_in_the_pixel_init(latent, tmp_path):
    out = tmp_path / "x.safetensors"
    assert main_convert(["--latent-ckpt-files", str(latent[-1]), "--output-path", str(out),
                         "--detailer-channels", "8", "8", "16", "32", "--prediction", "x"]) == 0
    cfg = ZImageDiT.from_pretrained(out).cfg
    assert cfg.detailer.prediction == "x" and cfg.detailer.channels == (8, 8, 16, 32)


def test_cli_head_time_conditioning_converts_with_zero_film(latent, tmp_path):
    """--head-time-conditioning: the FiLM layers are new tensors, written as zeros; the rest as without it."""
    from safetensors.torch import load_file
    plain, timed = tmp_path / "p.safetensors", tmp_path / "t.safetensors"
    base = ["--latent-ckpt-files", str(latent[-1]), "--detailer-channels", "8", "8", "16", "32", "--seed", "1"]
    assert main_convert(base + ["--output-path", str(plain)]) == 0
    assert main_convert(base + ["--output-path", str(timed), "--head-time-conditioning"]) == 0
    p, t = load_file(plain), load_file(timed)
    film = sorted(set(t) - set(p))
    assert film and all(k.startswith("local_decoder.film_") for k in film) and not any(t[k].any() for k in film)
    assert all(torch.equal(p[k], t[k]) for k in p)
    assert ZImageDiT.from_pretrained(timed).cfg.detailer.time_conditioning


def test_cli_head_upsample_learned_converts_with_nearest_upsamplers(latent, tmp_path):
    """--head-upsample learned: up{k}.0 are new tensors written as nearest ×2; the rest as without it."""
    from safetensors.torch import load_file
    from l2p.model import nearest_upsample_weight
    plain, learned = tmp_path / "p.safetensors", tmp_path / "l.safetensors"
    base = ["--latent-ckpt-files", str(latent[-1]), "--detailer-channels", "8", "8", "16", "32", "--seed", "1"]
    assert main_convert(base + ["--output-path", str(plain)]) == 0
    assert main_convert(base + ["--output-path", str(learned), "--head-upsample", "learned"]) == 0
    p, q = load_file(plain), load_file(learned)
    new = sorted(set(q) - set(p))
    assert new == sorted(f"local_decoder.up{k}.0.{leaf}" for k in range(1, 5) for leaf in ("bias", "weight"))
    assert all(torch.equal(q[k], nearest_upsample_weight(q[k].shape[0])) for k in new if k.endswith("weight"))
    assert not any(q[k].any() for k in new if k.endswith("bias"))
    assert all(torch.equal(p[k], q[k]) for k in p)
    assert ZImageDiT.from_pretrained(learned).cfg.detailer.upsample == "learned"


def test_subparsers_register():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_convert_parser(sub)
    add_merge_parser(sub)
    a = parser.parse_args(["convert", "--latent-ckpt-files", "x", "--output-path", "y", "--max-shard-size", "5GB",
                           "--init", "vae_fit", "--dtype", "bf16", "--patch-sizes", "16", "64"])
    assert a.func.__name__ == "run_convert" and a.patch_sizes == [16, 64] and a.max_shard_size == "5GB"
    a = parser.parse_args(["merge", "--file_a", "a", "--file_b", "b", "--file_out", "c", "--overwrite"])
    assert a.func.__name__ == "run_merge" and a.file_a == ["a"] and a.overwrite
