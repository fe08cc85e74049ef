"""Loading checkpoints: one file, shards, index json; mixed dtypes; strict errors that name keys and files."""
import json

import pytest
import torch
from safetensors.torch import save_file

from l2p.config import tiny_latent, tiny_pixel
from l2p.loading import LoadError
from l2p.model import ZImageDiT


def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    m = ZImageDiT(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    return m


def save(m, path, metadata=None):
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path), metadata=metadata)


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("cfg", [tiny_latent(), tiny_pixel()])
def test_single_file_infers_config_and_loads_exactly(tmp_path, cfg):
    m = random_model(cfg)
    save(m, tmp_path / "m.safetensors")
    loaded = ZImageDiT.from_pretrained(tmp_path / "m.safetensors")
    assert loaded.cfg.replace(axes_lens=cfg.axes_lens) == cfg  # axes_lens only sizes a RoPE table
    assert_same(m, loaded)
    x, cap = torch.randn(1, cfg.in_channels, 32, 32), [torch.randn(3, 32)]
    with torch.no_grad():
        assert torch.equal(m.eval()(x, torch.tensor([0.5]), cap), loaded(x, torch.tensor([0.5]), cap))


def test_shards_index_and_folder(tmp_path):
    m = random_model(tiny_pixel())
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    keys = sorted(sd)
    half = len(keys) // 2
    parts = {"a-00001-of-00002.safetensors": keys[:half], "a-00002-of-00002.safetensors": keys[half:]}
    for name, ks in parts.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / name))
    index = {"metadata": {}, "weight_map": {k: n for n, ks in parts.items() for k in ks}}
    (tmp_path / "a.safetensors.index.json").write_text(json.dumps(index))
    for src in [sorted(tmp_path.glob("*.safetensors")), tmp_path / "a.safetensors.index.json", tmp_path]:
        assert_same(m, ZImageDiT.from_pretrained(src))


def test_mixed_dtype_file_is_cast(tmp_path):
    """The released file mixes F32 (frozen layers) and BF16 (trained tensors)."""
    m = random_model(tiny_pixel())
    sd = {k: (v.bfloat16() if not k.startswith("layers.1.") else v).contiguous() for k, v in m.state_dict().items()}
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    for dtype in (torch.float32, torch.bfloat16):
        loaded = ZImageDiT.from_pretrained(tmp_path / "mixed.safetensors", dtype=dtype)
        assert {p.dtype for p in loaded.parameters()} == {dtype}
        assert torch.equal(loaded.layers[1].attention.to_q.weight.float(),
                           m.layers[1].attention.to_q.weight.to(dtype).float())


def test_meta_tensors_never_remain(tmp_path):
    m = random_model(tiny_pixel())
    save(m, tmp_path / "m.safetensors")
    loaded = ZImageDiT.from_pretrained(tmp_path / "m.safetensors")
    assert not any(p.is_meta for p in loaded.parameters())


def test_strict_errors_name_keys_and_files(tmp_path):
    m = random_model(tiny_pixel())
    sd = {k: v.contiguous() for k, v in m.state_dict().items()}
    # missing key
    bad = dict(sd)
    del bad["layers.1.feed_forward.w2.weight"]
    save_file(bad, str(tmp_path / "missing.safetensors"))
    with pytest.raises(LoadError, match=r"missing key.*layers\.1\.feed_forward\.w2\.weight"):
        ZImageDiT.from_pretrained(tmp_path / "missing.safetensors", config=tiny_pixel())
    # unexpected key, reported with its file
    extra = dict(sd, **{"layers.0.extra.weight": torch.zeros(2)})
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(LoadError, match=r"unexpected key.*layers\.0\.extra\.weight.*extra\.safetensors"):
        ZImageDiT.from_pretrained(tmp_path / "extra.safetensors", config=tiny_pixel())
    # wrong shape
    wrong = dict(sd, **{"cap_embedder.1.bias": torch.zeros(7)})
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(LoadError, match=r"cap_embedder\.1\.bias.*wrong\.safetensors"):
        ZImageDiT.from_pretrained(tmp_path / "wrong.safetensors", config=tiny_pixel())
    # a latent checkpoint loaded as a pixel model
    save(random_model(tiny_latent()), tmp_path / "latent.safetensors")
    with pytest.raises(LoadError, match="all_final_layer"):
        ZImageDiT.from_pretrained(tmp_path / "latent.safetensors", config=tiny_pixel())


def test_non_strict_fills_missing_with_zeros(tmp_path):
    m = random_model(tiny_pixel())
    sd = {k: v.contiguous() for k, v in m.state_dict().items() if not k.startswith("local_decoder.")}
    save_file(sd, str(tmp_path / "trunk.safetensors"))
    loaded = ZImageDiT.from_pretrained(tmp_path / "trunk.safetensors", config=tiny_pixel(), strict=False)
    assert torch.count_nonzero(loaded.local_decoder.out_conv.weight) == 0
    assert torch.equal(loaded.layers[0].attention.to_q.weight, m.layers[0].attention.to_q.weight)
