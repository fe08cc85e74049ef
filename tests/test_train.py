"""The training loop on tiny models: freeze policies, overfitting, exact resume, NaN stop, LoRA, the CLI."""
import math
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from l2p.checkpoint import make_synthetic_checkpoint, read_state_dict
from l2p.config import tiny_pixel
from l2p.flow import add_noise, flow_matching_loss
from l2p.model import ZImageDiT
from l2p.train import (TrainConfig, TrainingDiverged, latest_checkpoint, load_lora, merge_lora, prepare_trainable,
                       train)

CFG4 = tiny_pixel().replace(n_layers=4)  # paper n=1 then freezes layers 1-2, like 5-24 of 30


def make_model(cfg=CFG4, seed=0):
    torch.manual_seed(seed)  # the convs keep PyTorch's default init, drawn from the global RNG
    return ZImageDiT(cfg).init_for_training_from_scratch(torch.Generator().manual_seed(seed))


def pretrained_like(seed=0):
    """PyTorch's default init: unlike the from-scratch init, no zero output layer blocks the trunk's gradients."""
    torch.manual_seed(seed)
    return ZImageDiT(CFG4)


class ToyData(torch.utils.data.Dataset):
    """Smooth 32×32 / 32×48 images; `sizes()` lets the trainer bucket them; some rows have no seed."""

    def __init__(self, n=6, sizes=((32, 32), (32, 48))):
        self.items = []
        for i in range(n):
            h, w = sizes[i % len(sizes)]
            ramp = torch.linspace(-1, 1, w).expand(3, h, w) * (1 if i % 3 else -1)
            self.items.append({"x": ramp.clone() * (0.5 + 0.1 * i), "prompt": f"prompt {i % 4}",
                               "seed": None if i == 1 else 100 + i})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def sizes(self):
        return [tuple(it["x"].shape[1:]) for it in self.items]


def fake_encoder(dim=32):
    """Fixed features per prompt (a function of the text alone, like a real encoder)."""
    def encode(prompts):
        seeds = [zlib.crc32(p.encode()) for p in prompts]
        return [torch.randn(3 + s % 5, dim, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return encode


def quiet(**kw):
    return TrainConfig(**{"verbose": False, "lr": 1e-3, **kw})


# ----------------------------------------------------------------------------------------------
#                                       Freeze policies
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy,kw,frozen_if", [
    ("paper", {}, lambda n: n.startswith(("layers.1.", "layers.2."))),
    ("full", {}, lambda n: False),
    ("head-only", {}, lambda n: not n.startswith("local_decoder.")),
    ("embedder+head", {}, lambda n: not n.startswith(("local_decoder.", "all_x_embedder."))),
    ("paper", {"include": ["layers.1.*"], "exclude": ["t_embedder.*"]},
     lambda n: n.startswith(("layers.2.", "t_embedder."))),
])
def test_policy_trains_exactly_its_parameters(policy, kw, frozen_if):
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary = prepare_trainable(model, TrainConfig(policy=policy, n_keep=1, **kw))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == summary.trainable
    assert summary.trainable == {n for n, _ in model.named_parameters() if not frozen_if(n)}
    assert "trainable" in str(summary) and "total" in str(summary)  # the table train() prints

    train(model, ToyData(), fake_encoder(), quiet(steps=2, batch_size=2, policy=policy, n_keep=1, lr=1e-2, **kw))
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    # Zero-initialised tensors can keep a zero gradient for two steps; none outside the set may move.
    assert changed <= summary.trainable and len(changed) > 0.5 * len(summary.trainable)


def test_policy_that_trains_nothing_is_an_error():
    with pytest.raises(ValueError, match="leaves nothing to train"):
        train(make_model(), ToyData(), fake_encoder(), quiet(steps=1, policy="custom"))


# ----------------------------------------------------------------------------------------------
#                                  Learning, mixed sizes, text
# ----------------------------------------------------------------------------------------------

def test_loss_decreases_when_overfitting(tmp_path):
    data = ToyData(n=2, sizes=((32, 32),))
    x0 = torch.stack([it["x"] for it in data.items])
    encode = fake_encoder()
    caps = encode([it["prompt"] for it in data.items])
    sigma = torch.tensor([0.3, 0.7])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))

    def held_out(model, step):  # fixed σ and ε, so the numbers are comparable across steps
        return {"fixed_loss": flow_matching_loss(model(add_noise(x0, eps, sigma), 1 - sigma, caps), x0, eps).item()}

    model = make_model()
    with torch.no_grad():
        start = held_out(model, 0)["fixed_loss"]
    hist = train(model, data, encode, quiet(steps=40, batch_size=2, lr=1e-2, policy="full", eval_every=10),
                 out_dir=tmp_path, eval_fn=held_out)
    assert hist.fixed_loss.dropna().iloc[-1] < 0.8 * start
    assert list(hist.step) == list(range(1, 41)) and hist.loss.notna().all()
    assert (tmp_path / "loss.csv").read_text().count("\n") == 41
    assert (tmp_path / "eval.csv").read_text().splitlines()[0] == "step,fixed_loss"


def test_mixed_sizes_in_one_batch_without_buckets():
    data = [{"x": torch.zeros(3, 32, 32), "prompt": "a", "seed": 1},
            {"x": torch.zeros(3, 32, 64), "prompt": "b", "seed": 2}]  # a plain list: no sizes()
    hist = train(make_model(), data, fake_encoder(), quiet(steps=2, batch_size=2, policy="head-only"))
    assert hist.loss.map(math.isfinite).all()


def test_text_encoder_runs_once_per_prompt_and_is_offloaded():
    from l2p.text import TextEncoder

    te = TextEncoder.toy()
    calls = []
    original = te.encode_list
    te.encode_list = lambda prompts, batch_size=None: calls.append(list(prompts)) or original(prompts, batch_size)
    train(make_model(CFG4.replace(cap_feat_dim=te.dim)), ToyData(), te,
          quiet(steps=4, batch_size=2, policy="head-only", offload_text_encoder=True))
    assert calls == [[f"prompt {i}" for i in range(4)]]  # one prefill, nothing per step
    assert te.device.type == "cpu"


# ----------------------------------------------------------------------------------------------
#                                   Resume and divergence
# ----------------------------------------------------------------------------------------------

def test_resume_after_kill_is_bit_identical(tmp_path, monkeypatch):
    from accelerate import Accelerator

    cfg = dict(batch_size=2, grad_accum=2, warmup_steps=2, policy="paper", n_keep=1, ema_decay=0.9, save_every=3,
               grad_clip=0.5)
    a = make_model()
    train(a, ToyData(), fake_encoder(), quiet(steps=6, **cfg), out_dir=tmp_path / "a",
          accelerator=Accelerator(cpu=True))

    out = tmp_path / "b"
    train(make_model(), ToyData(), fake_encoder(), quiet(steps=3, **cfg), out_dir=out)

    # A second run gets killed while writing the step-6 resume state: weights written, state half-written.
    def killed(obj, path, *args, **kwargs):
        open(path, "wb").write(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train(make_model(), ToyData(), fake_encoder(), quiet(steps=6, **cfg), out_dir=out)
    monkeypatch.undo()
    assert (out / "step-6.safetensors").is_file() and (out / ".state-6.pt.tmp").is_file()
    (out / ".step-9.safetensors.deadbeef.tmp").write_bytes(b"junk")  # atomic_save's temp name
    assert latest_checkpoint(out) == 3

    b = make_model()  # a fresh model from the same init
    hist = train(b, ToyData(), fake_encoder(), quiet(steps=6, **cfg), out_dir=out)
    assert list(hist.step) == [1, 2, 3, 4, 5, 6]
    assert not list(out.glob(".*.tmp"))
    for x, y in [(a.state_dict(), b.state_dict()),
                 (read_state_dict(tmp_path / "a/step-6.safetensors"), read_state_dict(out / "step-6.safetensors")),
                 (read_state_dict(tmp_path / "a/ema-6.safetensors"), read_state_dict(out / "ema-6.safetensors"))]:
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x), [k for k in x if not torch.equal(x[k], y[k])]
    assert sorted(p.name for p in out.glob("state-*.pt")) == ["state-6.pt"]  # keep_states=1
    with pytest.raises(ValueError, match="batch_size: saved 2, now 1"):
        train(make_model(), ToyData(), fake_encoder(), quiet(steps=9, **{**cfg, "batch_size": 1}), out_dir=out)


def test_with_ema_the_last_evaluation_sees_the_averaged_weights(tmp_path):
    """Evaluations before the end see the raw weights; the one at the last step sees the average, once."""
    seen = []

    def eval_fn(m, step):
        seen.append((step, m.local_decoder.out_conv.weight.detach().clone()))
        return {"probe": float(step)}

    model = make_model()
    hist = train(model, ToyData(), fake_encoder(), quiet(steps=4, batch_size=2, ema_decay=0.5, eval_every=2),
                 out_dir=tmp_path, eval_fn=eval_fn)
    assert [s for s, _ in seen] == [2, 4]
    ema = read_state_dict(tmp_path / "ema-4.safetensors")["local_decoder.out_conv.weight"]
    raw = read_state_dict(tmp_path / "step-4.safetensors")["local_decoder.out_conv.weight"]
    assert torch.equal(seen[-1][1], ema) and not torch.equal(ema, raw)
    assert hist.probe.dropna().tolist() == [2.0, 4.0]
    assert (tmp_path / "eval.csv").read_text().splitlines()[-1].startswith("4,")


def test_cosine_decay_warms_up_then_reaches_zero_and_pins_the_run_length(tmp_path):
    from l2p.train import _lr_lambda
    f = _lr_lambda(4, "cosine", 20)
    lrs = [f(s) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0] and lrs[4] == 1.0
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.01
    assert [_lr_lambda(4, "constant", 20)(s) for s in (3, 10, 19)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="lr_decay 'linear'"):
        _lr_lambda(0, "linear", 10)
    with pytest.raises(ValueError, match="caption_dropout 10"):
        train(make_model(), ToyData(), fake_encoder(), quiet(steps=1, caption_dropout=10))
    hist = train(make_model(), ToyData(), fake_encoder(), quiet(steps=4, batch_size=2, lr_decay="cosine"),
                 out_dir=tmp_path)
    assert hist.lr.tolist() == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(4)])
    # extending a cosine run would silently change its schedule; a constant one may be extended
    with pytest.raises(ValueError, match="steps: saved 4, now 6"):
        train(make_model(), ToyData(), fake_encoder(), quiet(steps=6, batch_size=2, lr_decay="cosine"),
              out_dir=tmp_path)


def test_latent_matching_loss_goes_through_the_encoder_to_x0_hat():
    """x̂0 = x_σ − σ·v̂ is encoded with gradients; x0 without; an encoder that cuts the gradient is an error."""
    from l2p.flow import latent_matching_loss, x0_from_velocity
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.2, 0.9])
    x_t = add_noise(x0, eps, sigma)
    raw = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    pool = lambda x: torch.nn.functional.avg_pool2d(x, 4)  # noqa: E731  (a linear "encoder")
    loss = latent_matching_loss(raw, x_t, x0, sigma, pool)
    assert torch.allclose(loss, ((pool(x0_from_velocity(x_t, -raw, sigma)) - pool(x0)) ** 2).mean())
    loss.backward()
    assert raw.grad is not None and raw.grad.abs().sum() > 0
    oracle = (x0 - eps).requires_grad_(True)  # the DiT's x0 − ε output: x̂0 is x0 exactly
    assert latent_matching_loss(oracle, x_t, x0, sigma, pool).item() < 1e-10
    with pytest.raises(ValueError, match="cuts the gradient"):
        latent_matching_loss(raw, x_t, x0, sigma, torch.no_grad()(pool))


def test_latent_loss_option_changes_the_update_but_not_the_logged_flow_matching_loss(tmp_path):
    pool = lambda x: torch.nn.functional.avg_pool2d(x, 8)  # noqa: E731
    data = ToyData(sizes=((32, 32),))
    plain = train(make_model(), data, fake_encoder(), quiet(steps=2, batch_size=2))
    model = make_model()
    hist = train(model, data, fake_encoder(), quiet(steps=2, batch_size=2, latent_loss_weight=5.0),
                 latent_encoder=pool, out_dir=tmp_path)
    assert hist.loss.iloc[0] == plain.loss.iloc[0]  # same batch, same σ and ε: the logged term is the same
    assert hist.loss.iloc[1] != plain.loss.iloc[1]  # but the first update differed
    with pytest.raises(ValueError, match="needs a latent_encoder"):
        train(make_model(), data, fake_encoder(), quiet(steps=1, latent_loss_weight=1.0))
    with pytest.raises(ValueError, match="needs a latent_encoder"):
        train(make_model(), data, fake_encoder(), quiet(steps=1), latent_encoder=pool)
    mixed = [{"x": torch.zeros(3, 32, 32), "prompt": "a", "seed": 1},
             {"x": torch.zeros(3, 32, 64), "prompt": "b", "seed": 2}]  # a plain list: no buckets
    with pytest.raises(ValueError, match="mixed sizes"):
        train(make_model(), mixed, fake_encoder(), quiet(steps=1, batch_size=2, latent_loss_weight=1.0),
              latent_encoder=pool)
    with pytest.raises(ValueError, match="latent_loss_weight: saved 5.0, now 1.0"):  # resuming: same setting
        train(make_model(), data, fake_encoder(), quiet(steps=3, batch_size=2, latent_loss_weight=1.0),
              latent_encoder=pool, out_dir=tmp_path)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    model = make_model()
    calls = []

    def inject_nan(module, args, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 5 else output
    model.register_forward_hook(inject_nan)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 5.*step-4\.safetensors") as err:
        train(model, ToyData(), fake_encoder(), quiet(steps=8, save_every=2, policy="full"), out_dir=tmp_path)
    assert err.value.step == 5 and err.value.checkpoint == tmp_path / "step-4.safetensors"
    assert latest_checkpoint(tmp_path) == 4 and not (tmp_path / "step-5.safetensors").exists()
    saved = read_state_dict(tmp_path / "step-4.safetensors")
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in saved.items())  # the NaN step changed nothing
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert (tmp_path / "loss.csv").read_text().count("\n") == 5


# ----------------------------------------------------------------------------------------------
#                                            LoRA
# ----------------------------------------------------------------------------------------------

def test_lora_trains_adapters_only_and_merges_back(tmp_path):
    model = pretrained_like()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, ToyData(), fake_encoder(), quiet(steps=3, batch_size=2, lr=1e-2, lora_rank=2, lora_blocks=[1, 2]),
          out_dir=tmp_path)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trained) == 2 * 7 * 2 and all(".lora_" in n for n in trained)  # A, B × 7 Linears × 2 layers
    assert {n.split(".")[1] for n in trained} == {"1", "2"}
    sd = model.state_dict()
    for k, v in base.items():  # wrapped Linears keep their weight as `base_layer.weight`, unchanged
        stem, _, leaf = k.rpartition(".")
        assert torch.equal(sd[k] if k in sd else sd[f"{stem}.base_layer.{leaf}"], v), k

    step = read_state_dict(tmp_path / "step-3.safetensors")
    assert set(step) == {n.replace(".default.", ".") for n in trained}
    assert any(v.abs().max() > 0 for k, v in step.items() if "lora_B" in k)

    x, t, caps = torch.randn(1, 3, 32, 32), torch.tensor([0.4]), [torch.randn(4, 32)]
    with torch.no_grad():
        y_lora = model(x, t, caps)
        reloaded = load_lora(pretrained_like(), tmp_path / "step-3.safetensors")
        assert torch.equal(reloaded(x, t, caps), y_lora)
        merged = merge_lora(model)
        assert list(merged.state_dict()) == list(make_model().state_dict())  # the release's keys again
        assert torch.allclose(merged(x, t, caps), y_lora, atol=1e-5)
        assert not torch.equal(merged.state_dict()["layers.1.attention.to_q.weight"],
                               base["layers.1.attention.to_q.weight"])


def test_lora_with_trained_head():
    model = make_model()
    train(model, ToyData(), fake_encoder(), quiet(steps=1, lora_rank=2, lora_train_head=True))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    heads = {n for n in trained if n.startswith("local_decoder.")}
    assert len(heads) == 28 and all(".lora_" in n for n in trained - heads)


# ----------------------------------------------------------------------------------------------
#                                            CLI
# ----------------------------------------------------------------------------------------------

@pytest.fixture()
def tiny_run(tmp_path):
    """A pixel-init file for the toy text encoder (D = 384) and a folder of four 32×32 PNGs + a bad row."""
    from l2p.data import write_metadata

    init = tmp_path / "init.safetensors"
    make_synthetic_checkpoint(CFG4.replace(cap_feat_dim=384), init, dtype=torch.float32)
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for i in range(4):
        a = np.zeros((32, 32, 3), np.uint8)
        a[..., i % 3] = np.linspace(0, 255, 32, dtype=np.uint8)
        Image.fromarray(a).save(data / f"{i}.png")
        rows.append((f"{i}.png", f"a picture {i}", i))
    rows.append(("missing.png", "gone", 9))
    write_metadata(data, rows)
    return tmp_path, init, data


def test_cli_train_reads_a_text_encoder_folder_or_its_shards(tiny_run):
    """`--text-encoder DIR` and `--text-encoder shard1 shard2` (the release's layout, tokenizer in ../tokenizer)
    train the same first step from the same init: one encoder, two layouts, one loader (`TextEncoder.from_pretrained`)."""
    from test_text import _write_shards, make_model as make_encoder, make_tokenizer

    from l2p.cli import main

    root, _, data = tiny_run
    enc = make_encoder()
    enc.save_pretrained(root / "enc")
    make_tokenizer().save_pretrained(root / "enc")
    shards = _write_shards(enc, root / "repo" / "text_encoder")
    make_tokenizer().save_pretrained(root / "repo" / "tokenizer")
    init = root / "init-qwen.safetensors"
    make_synthetic_checkpoint(CFG4.replace(cap_feat_dim=enc.config.hidden_size), init, dtype=torch.float32)
    steps = []
    for i, te in enumerate(([str(root / "enc")], [str(f) for f in shards])):
        out = root / f"te{i}"
        assert main(["train", "--init", str(init), "--data", str(data), "--skip-bad", "--text-encoder", *te,
                     "--out", str(out), "--steps", "1", "--batch-size", "2", "--lr", "1e-3", "--device", "cpu"]) == 0
        steps.append(read_state_dict(out / "step-1.safetensors"))
    assert steps[0].keys() == steps[1].keys() and "cap_embedder.1.weight" in steps[0]
    assert all(torch.equal(steps[0][k], steps[1][k]) for k in steps[0])
    assert not torch.equal(steps[0]["cap_embedder.1.weight"], read_state_dict(init)["cap_embedder.1.weight"])


def test_cli_train_then_merge(tiny_run, capsys):
    from l2p.cli import main

    root, init, data = tiny_run
    out = root / "run"
    args = ["train", "--init", str(init), "--data", str(data), "--toy-text", "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--lr", "1e-3", "--policy", "paper", "--n", "1", "--save-every", "1",
            "--device", "cpu"]
    assert main(args) == 2  # a bad row without --skip-bad: refused before any training
    assert "row 5" in capsys.readouterr().err and not out.exists()

    assert main(args + ["--skip-bad"]) == 0
    printed = capsys.readouterr().out
    assert "layers 1-2" in printed and "frozen" in printed  # the freeze table
    assert "missing.png" in (out / "skipped_rows.csv").read_text()
    step = read_state_dict(out / "step-2.safetensors")
    assert not any(k.startswith("layers.1.") or k.startswith("layers.2.") for k in step)
    assert "local_decoder.out_conv.weight" in step and not any(k.startswith("pipe.") for k in step)
    assert latest_checkpoint(out) == 2

    merge = pytest.importorskip("l2p.merge")
    report = merge.merge(out / "step-2.safetensors", init, root / "merged.safetensors", progress=False)
    merged, base = read_state_dict(root / "merged.safetensors"), read_state_dict(init)
    assert merged.keys() == base.keys() and report.verified == len(base)
    assert all(torch.equal(merged[k], step.get(k, base[k])) for k in base)
    assert ZImageDiT.from_pretrained(root / "merged.safetensors").cfg == ZImageDiT.from_pretrained(init).cfg

    out2 = root / "run2"  # the options beyond the release reach the loop
    assert main([str(out2) if a == str(out) else a for a in args] +
                ["--skip-bad", "--lr-decay", "cosine", "--caption-dropout", "0.5", "--no-seeded-noise"]) == 0
    saved = torch.load(out2 / "state-2.pt", weights_only=False)["config"]
    assert (saved["lr_decay"], saved["caption_dropout"], saved["seeded_noise"]) == ("cosine", 0.5, False)


def test_large_patch_path_trains_only_its_embedder():
    """The 4K path: a second, larger RGB embedder trains through the shared Detailer Head."""
    cfg = CFG4.replace(all_patch_size=(16, 32), all_f_patch_size=(1, 1))
    torch.manual_seed(0)
    model = ZImageDiT(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = ToyData(n=4, sizes=((64, 64),))
    train(model, data, fake_encoder(), quiet(steps=2, batch_size=2, policy="paper", n_keep=1, patch_size=32, shift=6.0))
    after = model.state_dict()
    assert not torch.equal(before["all_x_embedder.32-1.weight"], after["all_x_embedder.32-1.weight"])
    assert torch.equal(before["all_x_embedder.16-1.weight"], after["all_x_embedder.16-1.weight"])
    assert not torch.equal(before["local_decoder.out_conv.weight"], after["local_decoder.out_conv.weight"])


def test_an_idle_embedder_is_frozen_and_left_out_of_the_step_file(tmp_path):
    """Training at patch 32 never calls 16-1: it must not count as trainable (DDP would stop on it)."""
    cfg = CFG4.replace(all_patch_size=(16, 32), all_f_patch_size=(1, 1))
    model = ZImageDiT(cfg)
    summary = prepare_trainable(model, quiet(policy="full", patch_size=32))
    assert not any(k.startswith("all_x_embedder.16-1") for k in summary.trainable)
    assert {"all_x_embedder.32-1.weight", "all_x_embedder.32-1.bias"} <= summary.trainable
    train(model, ToyData(n=4, sizes=((64, 64),)), fake_encoder(), quiet(steps=1, batch_size=2, patch_size=32),
          out_dir=tmp_path)
    keys = set(read_state_dict(tmp_path / "step-1.safetensors"))
    assert "all_x_embedder.32-1.weight" in keys and not any(k.startswith("all_x_embedder.16-1") for k in keys)
    assert "all_x_embedder.16-1.weight" in prepare_trainable(ZImageDiT(CFG4), quiet()).trainable  # one embedder
    with pytest.raises(ValueError, match="patch_size 8"):
        prepare_trainable(ZImageDiT(cfg), quiet(patch_size=8))


def test_cli_latent_loss_loads_a_vae_folder_and_changes_the_update(tiny_run, capsys):
    from diffusers import AutoencoderKL
    from l2p.cli import main

    root, init, data = tiny_run
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=32).save_pretrained(root / "vae")
    base = ["train", "--init", str(init), "--data", str(data), "--toy-text", "--steps", "2", "--batch-size", "2",
            "--lr", "1e-3", "--n", "1", "--skip-bad", "--device", "cpu"]
    assert main(base + ["--out", str(root / "plain")]) == 0
    assert main(base + ["--out", str(root / "lat"), "--latent-loss", "1.0", "--latent-loss-vae", str(root / "vae")]) == 0
    plain, lat = (read_state_dict(root / r / "step-2.safetensors") for r in ("plain", "lat"))
    assert plain.keys() == lat.keys() and any(not torch.equal(plain[k], lat[k]) for k in plain)
    capsys.readouterr()
    assert main(base + ["--out", str(root / "bad"), "--latent-loss", "1.0"]) == 2
    assert "go together" in capsys.readouterr().err
