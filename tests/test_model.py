"""The DiT: exact release layouts, parity with diffusers, and the release's bugs fixed."""
from pathlib import Path

import pytest
import torch

from l2p.config import DetailerConfig, l2p_1k, l2p_4k, tiny_latent, tiny_pixel, z_image_turbo
from l2p.model import ZImageDiT, patchify, unpatchify

REF = Path(__file__).resolve().parents[2] / "shared" / "reference"


def read_tsv(name):
    rows = [line.split("\t") for line in (REF / name).read_text().splitlines()[1:] if line.strip()]
    return {k: tuple(int(s) for s in shape.split("x")) for k, shape, _ in rows}


def meta_shapes(cfg):
    with torch.device("meta"):
        m = ZImageDiT(cfg)
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


@pytest.mark.skipif(not REF.exists(), reason="shared/reference not present")
@pytest.mark.parametrize("cfg,tsv,n_params", [(z_image_turbo(), "z_image_turbo_transformer.tsv", 6_154_908_736),
                                              (l2p_1k(), "l2p_1k_transformer.tsv", 6_166_464_515)])
def test_real_layouts_match_release(cfg, tsv, n_params):
    shapes = meta_shapes(cfg)
    assert shapes == read_tsv(tsv)
    assert sum(torch.Size(s).numel() for s in shapes.values()) == n_params


def test_4k_layout_adds_only_the_large_embedder():
    a, b = meta_shapes(l2p_1k()), meta_shapes(l2p_4k())
    assert set(b) - set(a) == {"all_x_embedder.64-1.weight", "all_x_embedder.64-1.bias"}
    assert b["all_x_embedder.64-1.weight"] == (3840, 64 * 64 * 3)


def test_patchify_roundtrip_and_order():
    x = torch.randn(3, 32, 48)
    tok = patchify(x, 16)
    assert tok.shape == (6, 768)
    # flat index (ph*16 + pw)*3 + c within the token of grid cell (1, 2)
    assert tok[1 * 3 + 2, (5 * 16 + 7) * 3 + 1] == x[1, 16 + 5, 32 + 7]
    assert torch.equal(unpatchify(tok, 16, 3, 32, 48), x)


# ----------------------------------------------------------------------------------------------
#                                   Parity with diffusers
# ----------------------------------------------------------------------------------------------

diffusers = pytest.importorskip("diffusers")


def diffusers_twin(cfg, seed=0):
    """diffusers' ZImageTransformer2DModel with random non-trivial weights, and our model with the same."""
    from diffusers import ZImageTransformer2DModel
    torch.manual_seed(seed)
    ref = ZImageTransformer2DModel(all_patch_size=cfg.all_patch_size, all_f_patch_size=cfg.all_f_patch_size,
                                   in_channels=cfg.in_channels, dim=cfg.dim, n_layers=cfg.n_layers,
                                   n_refiner_layers=cfg.n_refiner_layers, n_heads=cfg.n_heads,
                                   n_kv_heads=cfg.n_kv_heads, cap_feat_dim=cfg.cap_feat_dim,
                                   axes_dims=list(cfg.axes_dims), axes_lens=list(cfg.axes_lens)).eval()
    with torch.no_grad():  # zeros/ones defaults would hide mistakes in pads, norms and adaLN
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.1) + (1.0 if "norm" in name else 0.0))
    ours = ZImageDiT(cfg).eval()
    sd = ref.state_dict()
    ours_keys = set(ours.state_dict())
    ours.load_state_dict({k: v for k, v in sd.items() if k in ours_keys}, strict=not cfg.is_pixel)
    return ref, ours


@pytest.mark.parametrize("cap_lens", [[7], [7, 40], [33, 5]])
def test_latent_parity_with_diffusers(cap_lens):
    cfg = tiny_latent()
    ref, ours = diffusers_twin(cfg)
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(len(cap_lens), 16, 8, 12, generator=g)
    caps = [torch.randn(n, cfg.cap_feat_dim, generator=g) for n in cap_lens]
    sigma = torch.linspace(0.8, 0.3, len(cap_lens))
    with torch.no_grad():
        want = ref(list(lat.unsqueeze(2).unbind(0)), 1 - sigma, caps, patch_size=2, f_patch_size=1,
                   return_dict=False)[0]
        got = ours(lat, 1 - sigma, caps)
    for w, o in zip(want, got):
        assert (w.squeeze(1) - o).abs().max() <= 1e-5


def test_pixel_trunk_parity_with_diffusers():
    """Up to the last main layer, the L2P pixel trunk equals diffusers built with patch 16 and RGB input."""
    cfg = tiny_pixel()
    ref, ours = diffusers_twin(cfg)
    seen = {}
    ref.layers[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("u", o))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, 96, generator=g)
    caps = [torch.randn(9, cfg.cap_feat_dim, generator=g), torch.randn(45, cfg.cap_feat_dim, generator=g)]
    t = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        ref(list(x.unsqueeze(2).unbind(0)), t, caps, patch_size=16, f_patch_size=1)
        _, extra = ours(x, t, caps, return_features=True)
    for i in range(2):
        want = seen["u"][i, :24].T.reshape(cfg.dim, 4, 6)
        assert (extra["features"][i] - want).abs().max() <= 1e-5


# ----------------------------------------------------------------------------------------------
#                           Where the public code is wrong, we are right
# ----------------------------------------------------------------------------------------------

def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    m = ZImageDiT(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m


@pytest.mark.parametrize("multiple", [32, 16])
def test_batch_padding_is_masked(multiple):
    """A batch with unequal captions equals running each item alone (the release ignores the mask)."""
    cfg = tiny_pixel().replace(seq_multiple=multiple)
    m = random_model(cfg)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=g)
    caps = [torch.randn(3, cfg.cap_feat_dim, generator=g), torch.randn(70, cfg.cap_feat_dim, generator=g)]
    t = torch.tensor([0.4, 0.9])
    with torch.no_grad():
        both = m(x, t, caps)
        alone = [m(x[i : i + 1], t[i : i + 1], caps[i : i + 1])[0] for i in range(2)]
        # the same captions as a padded tensor + mask
        feats = torch.zeros(2, 70, cfg.cap_feat_dim)
        mask = torch.zeros(2, 70, dtype=torch.bool)
        for i, c in enumerate(caps):
            feats[i, : len(c)], mask[i, : len(c)] = c, True
        padded = m(x, t, feats, mask)
    for i in range(2):
        assert (both[i] - alone[i]).abs().max() <= 1e-5
        assert (padded[i] - alone[i]).abs().max() <= 1e-5


@pytest.mark.parametrize("hw", [(48, 48), (16, 16), (80, 48), (208, 16)])
def test_any_multiple_of_16_works(hw):
    """Token counts that are not multiples of 32 (48² → 9 tokens) crash the release; not here."""
    cfg = tiny_pixel()
    m = random_model(cfg)
    x = torch.randn(1, 3, *hw)
    with torch.no_grad():
        out = m(x, torch.tensor([0.5]), [torch.randn(4, cfg.cap_feat_dim)])
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("multiple", [32, 16])
def test_mixed_sizes_in_one_batch_equal_items_alone(multiple):
    cfg = tiny_pixel().replace(seq_multiple=multiple)
    m = random_model(cfg)
    xs = [torch.randn(3, 48, 48), torch.randn(3, 32, 64)]
    caps = [torch.randn(5, cfg.cap_feat_dim), torch.randn(12, cfg.cap_feat_dim)]
    t = torch.tensor([0.3, 0.6])
    with torch.no_grad():
        out = m(xs, t, caps)
        for i in range(2):
            alone = m(xs[i][None], t[i : i + 1], caps[i : i + 1])[0]
            assert out[i].shape == xs[i].shape
            assert (out[i] - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("multiple", [32, 16, 8])
def test_sequence_padding_follows_seq_multiple(multiple):
    """Image and caption tokens are each padded to the config's multiple (32 as released; 16 in toy presets)."""
    m = random_model(tiny_pixel().replace(seq_multiple=multiple))
    tok, ids, valid, lens = m._embed_captions([torch.randn(5, m.cfg.cap_feat_dim), torch.randn(17, 32)])
    assert lens == [-(-5 // multiple) * multiple, -(-17 // multiple) * multiple] and tok.shape[1] == max(lens)
    img, img_ids, n, _ = m._embed_images(torch.randn(1, 3, 48, 48), 16, lens[:1])
    assert n == 9 and img.shape[1] == -(-9 // multiple) * multiple


def test_toy_presets_pad_to_16_and_real_ones_to_32():
    from l2p.config import toy_latent, toy_pixel
    assert toy_latent().seq_multiple == toy_pixel().seq_multiple == 16
    assert z_image_turbo().seq_multiple == l2p_1k().seq_multiple == l2p_4k().seq_multiple == 32


def test_rejects_sizes_not_divisible_by_patch():
    m = ZImageDiT(tiny_pixel())
    with pytest.raises(ValueError, match="not divisible"):
        m(torch.randn(1, 3, 40, 32), torch.tensor([0.5]), [torch.randn(2, 32)])


def test_fp32_and_bf16_both_run():
    """The release hard-codes bf16 in the time embedder, so fp32 crashes there; both work here."""
    cfg = tiny_pixel()
    for dtype in (torch.float32, torch.bfloat16):
        m = random_model(cfg).to(dtype)
        out = m(torch.randn(1, 3, 32, 32), torch.tensor([0.5]), [torch.randn(3, cfg.cap_feat_dim)])
        assert out.dtype == dtype and torch.isfinite(out.float()).all()


def test_large_patch_shares_detailer_head():
    """4K path: a 64-1 embedder's coarse token grid is resized into the same H/16 bottleneck."""
    cfg = tiny_pixel().replace(all_patch_size=(16, 64), all_f_patch_size=(1, 1))
    m = random_model(cfg)
    x = torch.randn(1, 3, 128, 192)
    with torch.no_grad():
        out, extra = m(x, torch.tensor([0.5]), [torch.randn(3, 32)], patch_size=64, return_features=True)
    assert out.shape == x.shape and extra["grids"] == [(2, 3)]


def test_detailer_depth_follows_config():
    cfg = tiny_latent().to_pixel((8,), DetailerConfig(channels=(8, 16, 16)))
    m = random_model(cfg)
    assert not hasattr(m.local_decoder, "enc4")
    out = m(torch.randn(1, 3, 32, 40), torch.tensor([0.5]), [torch.randn(3, 32)])
    assert out.shape == (1, 3, 32, 40)


def test_x_prediction_is_a_reparametrised_velocity_head():
    """prediction="x": the head's output is x̂0, returned as (x̂0 − x_σ)/max(σ, 0.05), the release's x0 − ε form."""
    from dataclasses import replace
    from l2p.config import X_PRED_SIGMA_MIN
    cfg_v = tiny_pixel()
    m_v = random_model(cfg_v)
    m_x = ZImageDiT(cfg_v.replace(detailer=replace(cfg_v.detailer, prediction="x")))
    m_x.load_state_dict(m_v.state_dict())
    x, t = torch.randn(3, 3, 32, 48), torch.tensor([0.0, 0.5, 0.99])  # σ = 1, 0.5, 0.01 (clamped)
    caps = [torch.randn(4, cfg_v.cap_feat_dim)] * 3
    with torch.no_grad():
        head, out = m_v(x, t, caps), m_x(x, t, caps)
        sigma = (1 - t).clamp_min(X_PRED_SIGMA_MIN).reshape(-1, 1, 1, 1)
        assert torch.allclose(out, (head - x) / sigma, atol=1e-5)
        # an Euler step to σ = 0 lands exactly on the head's x̂0 (σ ≥ the clamp)
        assert torch.allclose(x[1] - 0.5 * -out[1], head[1], atol=1e-5)
        # the mixed-size path applies the same per-item σ
        listed = m_x([x[0], x[1][:, :16]], t[:2], caps[:2])
        assert torch.allclose(listed[0], out[0], atol=1e-5)
        alone = m_x(x[1][None, :, :16], t[1:2], caps[:1])[0]
        assert torch.allclose(listed[1], alone, atol=1e-5)


def test_edm_prediction_interpolates_noise_and_clean_image_prediction():
    """prediction="edm": x̂0 = c_skip·x_σ + c_out·head, returned as (x̂0 − x_σ)/σ; exact at every σ, even near 0."""
    from dataclasses import replace
    from l2p.config import EDM_SIGMA_DATA as s
    cfg_v = tiny_pixel()
    m_v = random_model(cfg_v)
    m_e = ZImageDiT(cfg_v.replace(detailer=replace(cfg_v.detailer, prediction="edm")))
    m_e.load_state_dict(m_v.state_dict())
    x, t = torch.randn(4, 3, 32, 32), torch.tensor([0.0, 0.5, 0.9, 0.999])
    caps = [torch.randn(4, cfg_v.cap_feat_dim)] * 4
    with torch.no_grad():
        head, out = m_v(x, t, caps), m_e(x, t, caps)
    sig = (1 - t).reshape(-1, 1, 1, 1)
    d = (1 - sig) ** 2 * s ** 2 + sig ** 2
    x0_hat = (1 - sig) * s ** 2 / d * x + s * sig / d.sqrt() * head
    assert torch.allclose(out[:3], (x0_hat[:3] - x[:3]) / sig[:3], atol=1e-5)
    assert torch.allclose(out[0], -x[0] + s * head[0], atol=1e-5)  # σ = 1: −ε + x̂0, with x̂0 = s·head
    # σ → 0: the skip carries x_σ, the head predicts the noise, and nothing blows up
    assert torch.allclose(out[3], x[3] + head[3], atol=2e-2) and torch.isfinite(out).all()
    listed = m_e([x[1], x[2][:, :16]], t[1:3], caps[:2])
    assert torch.allclose(listed[0], out[1], atol=1e-5)


def test_detailer_prediction_is_validated_and_survives_a_checkpoint(tmp_path):
    import json
    from dataclasses import replace
    from l2p.checkpoint import atomic_save
    with pytest.raises(ValueError, match="prediction 'eps'"):
        DetailerConfig(prediction="eps")
    cfg = tiny_pixel()
    cfg = cfg.replace(detailer=replace(cfg.detailer, prediction="x"))
    m = random_model(cfg)
    atomic_save(m.state_dict(), tmp_path / "m.safetensors", metadata={"l2p_config": json.dumps(cfg.to_dict())})
    back = ZImageDiT.from_pretrained(tmp_path / "m.safetensors")
    assert back.cfg.detailer.prediction == "x" and back.cfg == cfg
    # without metadata the shapes cannot tell: the release's velocity head is assumed
    atomic_save(m.state_dict(), tmp_path / "bare.safetensors")
    assert ZImageDiT.from_pretrained(tmp_path / "bare.safetensors").cfg.detailer.prediction == "velocity"


def test_time_conditioned_head_starts_as_the_release_head_and_then_depends_on_sigma(tmp_path):
    """time_conditioning: FiLM after every head conv from the timestep embedding, zero at init, own keys."""
    from dataclasses import replace
    from l2p.checkpoint import atomic_save, infer_config
    cfg_r = tiny_pixel()
    cfg_t = cfg_r.replace(detailer=replace(cfg_r.detailer, time_conditioning=True))
    m_r, m_t = random_model(cfg_r), ZImageDiT(cfg_t)
    missing, unexpected = m_t.load_state_dict(m_r.state_dict(), strict=False)
    depth = cfg_r.detailer.depth
    assert not unexpected and sorted(missing) == sorted(
        f"local_decoder.film_{b}{k}.{leaf}" for b in ("enc", "dec") for k in range(1, depth + 1)
        for leaf in ("weight", "bias"))
    assert m_t.local_decoder.film_dec1.weight.shape == (2 * cfg_r.detailer.channels[0], cfg_r.adaln_dim)
    x, t = torch.randn(2, 3, 32, 48), torch.tensor([0.1, 0.9])
    caps = [torch.randn(4, cfg_r.cap_feat_dim)] * 2
    with torch.no_grad():
        assert torch.equal(m_t(x, t, caps), m_r(x, t, caps))  # zero FiLM: exactly the release head
        for name in m_t.local_decoder.film_names():
            torch.nn.init.normal_(getattr(m_t.local_decoder, f"film_{name}").weight, std=0.5)
        a, b = m_t(x[:1], t[:1], caps[:1]), m_t(x[:1], t[1:], caps[:1])
        ra, rb = m_r(x[:1], t[:1], caps[:1]), m_r(x[:1], t[1:], caps[:1])
        # σ changes the head's output beyond what it changes through the DiT tokens alone
        assert not torch.allclose(a - b, ra - rb, atol=1e-3)
        listed = m_t([x[0], x[1][:, :16]], t, caps)  # mixed sizes: each item its own embedding
        assert torch.allclose(listed[0], m_t(x[:1], t[:1], caps[:1])[0], atol=1e-5)
        assert torch.allclose(listed[1], m_t(x[1:, :, :16], t[1:], caps[:1])[0], atol=1e-5)
    with pytest.raises(ValueError, match="time-conditioned"):
        m_t.local_decoder(x, torch.randn(2, cfg_r.dim, 2, 3))
    # the option survives a checkpoint, and a file without metadata shows it by its keys
    atomic_save(m_t.state_dict(), tmp_path / "t.safetensors")
    back = ZImageDiT.from_pretrained(tmp_path / "t.safetensors", config=cfg_t)
    assert back.cfg.detailer.time_conditioning
    assert infer_config({k: tuple(v.shape) for k, v in m_t.state_dict().items()}).detailer.time_conditioning
    assert not infer_config({k: tuple(v.shape) for k, v in m_r.state_dict().items()}).detailer.time_conditioning
    # from scratch (no transfer), the FiLM layers start at zero too
    fresh = ZImageDiT(cfg_t).init_for_training_from_scratch(torch.Generator().manual_seed(0))
    assert not fresh.local_decoder.film_enc1.weight.any()


def test_learned_upsampling_head_starts_as_the_release_head_and_can_place_detail_inside_a_token(tmp_path):
    """upsample="learned": a 2×2 transposed conv at up{k}.0 (new keys), nearest at init, position-aware after."""
    from dataclasses import replace
    from l2p.checkpoint import atomic_save, infer_config
    from l2p.model import DetailerHead, nearest_upsample_weight
    cfg_r = tiny_pixel()
    cfg_l = cfg_r.replace(detailer=replace(cfg_r.detailer, upsample="learned"))
    m_r, m_l = random_model(cfg_r), ZImageDiT(cfg_l)
    missing, unexpected = m_l.load_state_dict(m_r.state_dict(), strict=False)
    depth, ch = cfg_r.detailer.depth, cfg_r.detailer.channels
    assert not unexpected and sorted(missing) == sorted(
        f"local_decoder.up{k}.0.{leaf}" for k in range(1, depth + 1) for leaf in ("weight", "bias"))
    assert m_l.local_decoder.up1[0].weight.shape == (ch[0], ch[0], 2, 2)
    x, t = torch.randn(2, 3, 32, 48), torch.tensor([0.1, 0.9])
    caps = [torch.randn(4, cfg_r.cap_feat_dim)] * 2
    with torch.no_grad():
        assert torch.allclose(m_l(x, t, caps), m_r(x, t, caps), atol=1e-6)  # nearest at init: the release head
        feat = torch.randn(1, 5, 3, 4)
        assert torch.equal(torch.nn.functional.conv_transpose2d(feat, nearest_upsample_weight(5), stride=2),
                           torch.nn.functional.interpolate(feat, scale_factor=2, mode="nearest"))
        # A lone bottleneck value: nearest gives its 2×2 children one value; a trained upsampler need not.
        head = DetailerHead(replace(cfg_r.detailer, upsample="learned"), dim=4)
        up = head.up1[0]
        torch.nn.init.normal_(up.weight, generator=torch.Generator().manual_seed(0))
        kids = up(torch.ones(1, up.in_channels, 1, 1))[0, 0]
        assert kids.shape == (2, 2) and kids.std() > 0
        listed = m_l([x[0], x[1][:, :16]], t, caps)  # mixed sizes still work
        assert torch.allclose(listed[1], m_l(x[1:, :, :16], t[1:], caps[:1])[0], atol=1e-5)
    with pytest.raises(ValueError, match="upsample"):
        DetailerConfig(upsample="bilinear")
    # the option survives a checkpoint, and a file without metadata shows it by its keys
    atomic_save(m_l.state_dict(), tmp_path / "l.safetensors")
    assert ZImageDiT.from_pretrained(tmp_path / "l.safetensors", config=cfg_l).cfg.detailer.upsample == "learned"
    assert infer_config({k: tuple(v.shape) for k, v in m_l.state_dict().items()}).detailer.upsample == "learned"
    assert infer_config({k: tuple(v.shape) for k, v in m_r.state_dict().items()}).detailer.upsample == "nearest"
    # from scratch (no transfer) the upsamplers start as nearest too
    fresh = ZImageDiT(cfg_l).init_for_training_from_scratch(torch.Generator().manual_seed(0))
    assert torch.equal(fresh.local_decoder.up2[0].weight, nearest_upsample_weight(ch[1]))


def test_channels_last_head_on_cpu_changes_only_rounding():
    """The CPU fast path (channels-last convs) gives the NCHW outputs and gradients up to fp32 rounding."""
    from l2p.model import DetailerHead
    m = random_model(tiny_pixel())
    x, t, caps = torch.randn(2, 3, 32, 48), torch.tensor([0.2, 0.7]), [torch.randn(4, 32)] * 2
    res = {}
    try:
        for cl in (False, True):
            DetailerHead.cpu_channels_last = cl
            m.zero_grad()
            out = m(x, t, caps)
            out.pow(2).mean().backward()
            res[cl] = (out.detach(), m.local_decoder.enc1[0].weight.grad.clone())
            assert out.is_contiguous()
    finally:
        DetailerHead.cpu_channels_last = True
    assert torch.allclose(res[True][0], res[False][0], atol=1e-5) and res[True][0].shape == x.shape
    assert torch.allclose(res[True][1], res[False][1], atol=1e-5, rtol=1e-4)


def test_head_layout_bench_runs(capsys):
    import runpy, sys
    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_head_layout.py"
    argv, threads = sys.argv, torch.get_num_threads()
    sys.argv = [str(bench), "--batch", "2", "--size", "32", "--reps", "1", "--threads", "1"]
    try:
        runpy.run_path(str(bench), run_name="__main__")
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "chan-last" in out and "max |output difference|" in out
