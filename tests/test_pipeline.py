"""Pipelines: call shape, sizes, seeds, guidance passes, callbacks, latent side with a VAE."""

import numpy as np
import pytest
import torch
from PIL import Image

from l2p.config import tiny_latent, tiny_pixel
from l2p.model import ZImageDiT
from l2p.pipeline import L2PPipeline, LatentPipeline


class HashText:
    """A deterministic stand-in text encoder: a few tokens per prompt, derived from its characters."""

    dim = 32

    def __init__(self):
        self.calls = []

    def encode_list(self, prompts):
        self.calls.append(list(prompts))
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(map(ord, p)) + len(p))
            out.append(torch.randn(max(1, len(p.split())), self.dim, generator=g))
        return out


def pixel_pipe():
    torch.manual_seed(0)
    m = ZImageDiT(tiny_pixel())
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return L2PPipeline(m, HashText())


def test_returns_pil_with_rounded_size_and_warns():
    pipe = pixel_pipe()
    with pytest.warns(UserWarning, match="rounded up to 48×64"):
        img = pipe(prompt="a red circle", seed=1, num_inference_steps=2, cfg_scale=2.0, height=40, width=50)
    assert isinstance(img, Image.Image) and img.size == (64, 48)


def test_seed_determinism_and_batch_items_equal_single_calls():
    pipe = pixel_pipe()
    kw = dict(num_inference_steps=3, cfg_scale=2.0, height=32, width=32, output_type="pt")
    a = pipe("a blue square", seed=7, **kw)
    b = pipe("a blue square", seed=7, **kw)
    assert torch.equal(a, b)
    batch = pipe(["a blue square", "two green stars on stripes"], seed=7, **kw)
    single2 = pipe("two green stars on stripes", seed=8, **kw)
    assert torch.allclose(batch[0], a[0], atol=1e-5) and torch.allclose(batch[1], single2[0], atol=1e-5)
    imgs = pipe(["x", "y"], seed=0, num_inference_steps=1, height=16, width=16)
    assert isinstance(imgs, list) and len(imgs) == 2


def test_guidance_encodes_negative_prompt_only_when_needed():
    pipe = pixel_pipe()
    pipe("a cat", seed=0, num_inference_steps=1, cfg_scale=1.0, height=16, width=16)
    assert pipe.text_encoder.calls == [["a cat"]]
    pipe.text_encoder.calls.clear()
    pipe("a cat", seed=0, num_inference_steps=1, cfg_scale=2.0, height=16, width=16, negative_prompt="blurry")
    assert pipe.text_encoder.calls == [["a cat"], ["blurry"]]


def test_guidance_interval_guides_only_inside_and_skips_the_negative_pass():
    """cfg_interval: guided steps equal plain guidance, unguided ones the conditional velocity (one pass)."""
    pipe = pixel_pipe()
    kw = dict(seed=3, num_inference_steps=4, height=32, width=32, shift=1.0)  # σ = 1, 0.75, 0.5, 0.25
    runs = {}
    for name, extra in {"cfg": dict(cfg_scale=3.0), "cond": dict(cfg_scale=1.0),
                        "mid": dict(cfg_scale=3.0, cfg_interval=(0.4, 0.8)),
                        "all": dict(cfg_scale=3.0, cfg_interval=(0.0, 1.0))}.items():
        batches, seen = [], []
        hook = pipe.dit.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
        pipe.sample("a red circle", callback=seen.append, **kw, **extra)
        hook.remove()
        runs[name] = (batches, seen)
    assert runs["cfg"][0] == [2, 2, 2, 2] and runs["cond"][0] == [1, 1, 1, 1]
    assert runs["mid"][0] == [1, 2, 2, 1]  # guided at σ = 0.75 and 0.5 only
    assert all(torch.equal(a.x_next, b.x_next) for a, b in zip(runs["all"][1], runs["cfg"][1]))
    # the first step starts from the same noise: unguided there, it is the conditional step
    assert torch.equal(runs["mid"][1][0].velocity, runs["cond"][1][0].velocity)
    assert not torch.allclose(runs["mid"][1][1].velocity, runs["cond"][1][1].velocity)
    with pytest.raises(ValueError, match="cfg_interval"):
        pipe.sample("a red circle", cfg_scale=3.0, cfg_interval=(0.8, 0.4), **kw)


def test_heun_solver_calls_the_model_2n_minus_1_times_and_rejects_unknown_names():
    pipe = pixel_pipe()
    kw = dict(seed=1, num_inference_steps=4, height=32, width=32, cfg_scale=1.0)
    batches = []
    hook = pipe.dit.register_forward_pre_hook(lambda m, a: batches.append(a[0].shape[0]))
    heun = pipe.sample("a red circle", solver="heun", **kw)
    hook.remove()
    assert len(batches) == 7
    euler = pipe.sample("a red circle", **kw)
    assert heun.shape == euler.shape and not torch.allclose(heun, euler)
    with pytest.raises(ValueError, match="unknown solver 'rk4'"):
        pipe.sample("a red circle", solver="rk4", **kw)


def test_empty_prompt_and_callback_sees_every_step():
    pipe = pixel_pipe()
    seen = []
    pipe("", seed=0, num_inference_steps=4, cfg_scale=2.0, height=32, width=48, callback=seen.append)
    assert [s.step for s in seen] == [0, 1, 2, 3]
    assert all(s.x_t.shape == s.x0.shape == s.velocity.shape == (1, 3, 32, 48) for s in seen)
    assert seen[0].sigma == 1.0 and seen[-1].sigma_next == 0.0
    # x0 is exactly x_t − σ·v
    s = seen[1]
    assert torch.allclose(s.x0, s.x_t - s.sigma * s.velocity)


def test_latent_pipeline_with_vae():
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, scaling_factor=0.5, shift_factor=0.1)
    torch.manual_seed(0)
    pipe = LatentPipeline(ZImageDiT(tiny_latent()), HashText(), vae)
    assert pipe.noise_shape(64, 32) == (16, 8, 4)
    img = pipe("a circle", seed=0, num_inference_steps=2, cfg_scale=2.0, height=64, width=32)
    assert img.size == (32, 64)
    x = torch.rand(1, 3, 64, 32) * 2 - 1
    z = pipe.encode_pixels(x)
    assert z.shape == (1, 16, 8, 4) and pipe.to_pixels(z).shape == x.shape


def test_cli_generate_passes_the_guidance_options(tmp_path, monkeypatch):
    """`l2p generate --cfg-interval LO HI --cfg-norm-cap K` reaches the sampler; a PNG is written whole."""
    from l2p import cli
    seen = {}
    real = L2PPipeline.velocity_fn

    def spy(self, *a, **kw):
        seen.update(kw)
        fn = real(self, *a, **kw)

        def counted(x, sigma):
            nonlocal calls
            calls += 1
            return fn(x, sigma)
        return counted

    calls = 0

    monkeypatch.setattr(L2PPipeline, "velocity_fn", spy)
    out = tmp_path / "img.png"
    assert cli.main(["generate", "--random-init", "tiny_pixel", "--prompt", "a red circle", "--steps", "2",
                     "--height", "32", "--width", "32", "--device", "cpu", "--dtype", "fp32", "--cfg", "3",
                     "--cfg-interval", "0.5", "1", "--cfg-norm-cap", "1.5", "--solver", "heun",
                     "-o", str(out)]) == 0
    assert seen == {"cfg_interval": (0.5, 1.0), "cfg_norm_cap": 1.5}
    assert calls == 3  # heun, 2 steps: 2·2 − 1 velocity calls
    assert Image.open(out).size == (32, 32) and not list(tmp_path.glob("*.tmp"))


def test_cli_loads_a_text_encoder_folder_or_shards_with_the_tokenizer_beside(tmp_path):
    """`--text-encoder DIR` and `--text-encoder shard1 shard2` (tokenizer in ../tokenizer, the Hub layout) both
    load; until session 28 the CLI took a one-folder list for shards and a shard file for the tokenizer."""
    from test_text import _write_shards, make_model, make_tokenizer

    from l2p import cli
    from l2p.checkpoint import make_synthetic_checkpoint

    enc = make_model()
    enc.save_pretrained(tmp_path / "enc")
    make_tokenizer().save_pretrained(tmp_path / "enc")
    shards = _write_shards(enc, tmp_path / "repo" / "text_encoder")
    make_tokenizer().save_pretrained(tmp_path / "repo" / "tokenizer")
    ckpt = make_synthetic_checkpoint(tiny_pixel(), tmp_path / "pixel.safetensors", torch.float32)[0]
    images = []
    for te in ([str(tmp_path / "enc")], [str(f) for f in shards]):
        out = tmp_path / f"{len(images)}.png"
        assert cli.main(["generate", "--model", str(ckpt), "--text-encoder", *te, "--prompt", "a red cube",
                         "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--dtype", "fp32",
                         "-o", str(out)]) == 0
        images.append(np.asarray(Image.open(out)))
    assert np.array_equal(*images)  # one encoder, two layouts: the same image
    # the release's call shape (README): the same model and seed give the same image
    from l2p.pipeline import ModelConfig
    pipe = L2PPipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                       model_configs=[ModelConfig(path=[str(ckpt)]), ModelConfig(path=shards)],
                                       tokenizer_config=ModelConfig(path=str(tmp_path / "repo" / "tokenizer")))
    image = pipe(prompt="a red cube", seed=42, num_inference_steps=2, cfg_scale=2.0, height=32, width=32)
    assert np.array_equal(np.asarray(image), images[0])
    latent = make_synthetic_checkpoint(tiny_latent(), tmp_path / "latent.safetensors", torch.float32)[0]
    with pytest.raises(ValueError, match="is a latent checkpoint"):
        L2PPipeline.from_pretrained(torch_dtype=torch.float32, device="cpu",
                                    model_configs=[ModelConfig(path=str(latent)), ModelConfig(path=shards)])


class ModuleText(torch.nn.Module):
    """`HashText` as a module with a weight, so offload has something to move and the device must be right."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(HashText.dim, HashText.dim)
        self.hash = HashText()

    def encode_list(self, prompts):
        w = self.proj.weight
        return [self.proj(f.to(w.device)) for f in self.hash.encode_list(prompts)]


def _latent_parts():
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, scaling_factor=0.5, shift_factor=0.1)
    return ZImageDiT(tiny_latent()), ModuleText(), vae


def test_model_cpu_offload_runs_each_model_alone_on_the_device_and_changes_no_output():
    """Under offload each model is sent to the device just before it runs, after every other one went to the CPU,
    and all are back on the CPU after the call. The device here is "cpu:0", so the two destinations differ."""
    kw = dict(seed=3, num_inference_steps=2, cfg_scale=2.0, height=32, width=32, output_type="pt")
    plain = LatentPipeline(*_latent_parts())("a red circle", **kw)

    dit, te, vae = _latent_parts()
    names = {id(dit): "dit", id(te): "text", id(vae): "vae"}
    moves, runs = [], []
    for m in (dit, te, vae):
        real_to = m.to

        def to(device, _real=real_to, _m=m):
            moves.append((names[id(_m)], str(device)))
            return _real(device)
        m.to = to
    for m, name in ((dit, "dit"), (te.proj, "text"), (vae.decoder, "vae")):
        m.register_forward_pre_hook(lambda mod, args, _n=name: runs.append((_n, dict(_where(moves)))))
    pipe = LatentPipeline(dit, te, vae, device="cpu:0", cpu_offload=True)
    assert dict(_where(moves)) == {"dit": "cpu", "text": "cpu", "vae": "cpu"}  # parked from the start
    out = pipe("a red circle", **kw)
    assert torch.equal(out, plain)
    assert [n for n, _ in runs] == ["text", "text"] + ["dit"] * 2 + ["vae"]  # prompt, negative, 2 steps, decode
    for name, where in runs:
        assert where == {m: ("cpu:0" if m == name else "cpu") for m in ("dit", "text", "vae")}, (name, where)
    assert dict(_where(moves)) == {"dit": "cpu", "text": "cpu", "vae": "cpu"}
    for k in range(len(moves)):  # never two on the device, even between one model's move and the next's
        assert sum(d == "cpu:0" for _, d in _where(moves[:k + 1])) <= 1, moves[:k + 1]
    assert sum(1 for n, d in moves if (n, d) == ("dit", "cpu:0")) == 1  # moved in once per call, not per step


def _where(moves):
    """The last destination of each model."""
    last = {}
    for name, device in moves:
        last[name] = device
    return last.items()


def test_cli_cpu_offload_gives_the_same_image(tmp_path):
    from l2p import cli
    images = []
    for extra in ([], ["--cpu-offload"]):
        out = tmp_path / f"{len(images)}.png"
        assert cli.main(["generate", "--random-init", "tiny_pixel", "--prompt", "a red circle", "--steps", "2",
                         "--height", "32", "--width", "32", "--device", "cpu", "--dtype", "fp32", *extra,
                         "-o", str(out)]) == 0
        images.append(np.asarray(Image.open(out)))
    assert np.array_equal(*images)


def test_python_dash_m_l2p_is_the_command_line():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "l2p", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: l2p ") and "generate" in r.stdout and "reports" in r.stdout
    r = subprocess.run([sys.executable, "-m", "l2p", "no-such-command"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "invalid choice" in r.stderr
