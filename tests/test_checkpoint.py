"""Safetensors I/O (`l2p.checkpoint`): round trips, sharding, atomic publishing, bad files, config inference."""
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from l2p.checkpoint import (DTYPES, CheckpointError, CheckpointReader, StreamingWriter, atomic_save, default_axes_dims,
                            infer_config, make_synthetic_checkpoint, model_shapes, parse_size, read_header,
                            read_state_dict, resolve_checkpoint_files)
from l2p.config import PRESETS, l2p_1k, tiny_latent, tiny_pixel, z_image_turbo

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def random_tensor(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    """Random values of any dtype (bit patterns for the exotic ones)."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point and dtype.itemsize >= 2:
        return torch.randn(shape, generator=g).to(dtype)
    raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw[: torch.Size(shape).numel() * dtype.itemsize].view(dtype).reshape(shape)


def write_raw(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file from a hand-written header, to craft broken ones."""
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (NaN-safe, any dtype)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------------
#                                       Round trips
# ----------------------------------------------------------------------------------------------

def test_every_dtype_round_trips_and_loads_with_safetensors(tmp_path):
    standard = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"]
    tensors = {f"t.{name}": random_tensor(DTYPES[name], (3, 5), i) for i, name in enumerate(standard)}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    out = atomic_save(tensors, tmp_path / "all.safetensors", metadata={"who": "test"})

    with CheckpointReader(out) as r:
        assert r.keys() == list(tensors) and r.metadata == {"who": "test"}
        for k, t in tensors.items():
            assert same(r.get(k), t) and r.shape(k) == tuple(t.shape) and r.dtype(k) == t.dtype
            assert r.nbytes(k) == t.numel() * t.dtype.itemsize
    for k, t in load_file(out).items():
        assert same(t, tensors[k])


def test_reader_reads_files_written_by_safetensors(tmp_path):
    tensors = {"b": torch.randn(4, 3), "a": torch.arange(6, dtype=torch.int64).reshape(2, 3)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    sd = read_state_dict(tmp_path / "x.safetensors")
    assert all(same(sd[k], tensors[k]) for k in tensors)
    assert read_state_dict(tmp_path, dtype=torch.float64, keys=["a"])["a"].dtype == torch.float64


def test_items_stream_in_file_offset_order(tmp_path):
    plan = [(k, torch.float32, (2,)) for k in ["z", "a", "m"]]
    with StreamingWriter(tmp_path / "o.safetensors", plan) as w:
        for k, _, s in plan:
            w.write(k, torch.full(s, float(ord(k))))
    with CheckpointReader(tmp_path / "o.safetensors") as r:
        assert [k for k, _ in r.items()] == ["z", "a", "m"]
        assert r.get("a", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_sharded_output_has_hf_layout(tmp_path):
    plan = [(f"w{i}", torch.float32, (100,)) for i in range(7)]  # 400 bytes each
    tensors = {k: torch.randn(s) for k, _, s in plan}
    with StreamingWriter(tmp_path / "m.safetensors", plan, max_shard_bytes=1000, metadata={"a": "b"}) as w:
        for k, t in tensors.items():
            w.write(k, t)
    assert files_in(tmp_path) == [f"m-0000{i}-of-00004.safetensors" for i in range(1, 5)] + ["m.safetensors.index.json"]
    index = json.loads((tmp_path / "m.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2800
    assert index["weight_map"]["w6"] == "m-00004-of-00004.safetensors"
    for source in [tmp_path, tmp_path / "m.safetensors.index.json", sorted(tmp_path.glob("*of*"))]:
        sd = read_state_dict(source)
        assert list(sd) == list(tensors) and all(same(sd[k], tensors[k]) for k in tensors)
    loaded = {}
    for shard in sorted(tmp_path.glob("*of*")):
        loaded.update(load_file(shard))
    assert all(same(loaded[k], tensors[k]) for k in tensors)


def test_overwrite_replaces_the_whole_output_family(tmp_path):
    plan = [(f"w{i}", torch.float32, (100,)) for i in range(3)]
    for max_shard in [500, None]:  # sharded first, then a single file over it
        with StreamingWriter(tmp_path / "m.safetensors", plan, max_shard, overwrite=True) as w:
            for k, _, s in plan:
                w.write(k, torch.zeros(s))
    assert files_in(tmp_path) == ["m.safetensors"]


def test_synthetic_checkpoint_is_deterministic_and_complete(tmp_path):
    a = make_synthetic_checkpoint(tiny_pixel(), tmp_path / "a" / "x.safetensors", torch.bfloat16, 100_000, seed=3)
    b = make_synthetic_checkpoint(tiny_pixel(), tmp_path / "b" / "x.safetensors", torch.bfloat16, None, seed=3)
    assert len(a) > 2 and a[-1].name.endswith(".index.json") and len(b) == 1
    sa, sb = read_state_dict(a[-1]), read_state_dict(b)
    assert {k: tuple(v.shape) for k, v in sa.items()} == model_shapes(tiny_pixel())
    assert all(same(sa[k], sb[k]) for k in sa)
    assert infer_config({k: v.shape for k, v in sa.items()}) == tiny_pixel()


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000 and parse_size("2GiB") == 2 << 30
    assert parse_size("1.5 mb") == 1_500_000 and parse_size("123") == 123 and parse_size(None) is None
    with pytest.raises(ValueError):
        parse_size("lots")


# ----------------------------------------------------------------------------------------------
#                                  Writer discipline
# ----------------------------------------------------------------------------------------------

PLAN = [("a", torch.float32, (2,)), ("b", torch.bfloat16, (3,))]


def test_writer_enforces_plan_order_dtype_and_shape(tmp_path):
    out = tmp_path / "o.safetensors"
    for key, tensor, msg in [("b", torch.zeros(3, dtype=torch.bfloat16), "expected 'a'"),
                             ("a", torch.zeros(2, dtype=torch.float16), "the plan says"),
                             ("a", torch.zeros(3), "the plan says")]:
        with pytest.raises(CheckpointError, match=msg):
            with StreamingWriter(out, PLAN) as w:
                w.write(key, tensor)
        assert files_in(tmp_path) == []


def test_exception_midway_leaves_nothing(tmp_path):
    out = tmp_path / "new_dir" / "sub" / "o.safetensors"
    with pytest.raises(RuntimeError):
        with StreamingWriter(out, PLAN, max_shard_bytes=8) as w:
            w.write("a", torch.zeros(2))
            raise RuntimeError("crash")
    assert files_in(tmp_path) == []  # not even the folders it created


def test_incomplete_plan_fails_on_close_and_leaves_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="1 planned tensors were not written, first 'b'"):
        with StreamingWriter(tmp_path / "o.safetensors", PLAN) as w:
            w.write("a", torch.zeros(2))
    assert files_in(tmp_path) == []


def test_existing_output_refused_without_overwrite(tmp_path):
    out = atomic_save({"x": torch.zeros(1)}, tmp_path / "o.safetensors")
    with pytest.raises(CheckpointError, match=str(out)):
        StreamingWriter(out, PLAN)
    (tmp_path / "s.safetensors.index.json").write_text("{}")  # a sharded output counts too
    with pytest.raises(CheckpointError, match="s.safetensors.index.json"):
        StreamingWriter(tmp_path / "s.safetensors", PLAN)
    assert files_in(tmp_path) == ["o.safetensors", "s.safetensors.index.json"]


# ----------------------------------------------------------------------------------------------
#                                       Bad inputs
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def shards(tmp_path):
    """A checkpoint in two shards with an index."""
    plan = [(k, torch.float32, (4,)) for k in ["a", "b", "c", "d"]]
    with StreamingWriter(tmp_path / "ck.safetensors", plan, max_shard_bytes=32) as w:
        for k, _, s in plan:
            w.write(k, torch.ones(s))
    return w.final_paths


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: checkpoint file does not exist"):
        CheckpointReader(tmp_path / "nope.safetensors")


def test_folder_without_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no .safetensors"):
        resolve_checkpoint_files(tmp_path)


def test_missing_shard_named_by_index(shards):
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=r"ck\.safetensors\.index\.json: shard 'ck-00002-of-00002.safetensors' "
                                              r"\(holding key 'c'\) does not exist"):
        CheckpointReader(shards[-1])


def test_index_promising_a_key_the_shard_lacks(shards):
    index = json.loads(shards[-1].read_text())
    index["weight_map"]["c"] = "ck-00001-of-00002.safetensors"
    shards[-1].write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ck-00001-of-00002.safetensors: index promises key 'c'"):
        CheckpointReader(shards[-1])


def test_shard_listed_twice(shards):
    with pytest.raises(CheckpointError, match="ck-00001-of-00002.safetensors: shard listed twice"):
        CheckpointReader([shards[0], shards[1], shards[0]])


def test_same_key_in_two_shards(tmp_path):
    atomic_save({"k": torch.zeros(1), "x": torch.zeros(1)}, tmp_path / "one.safetensors")
    atomic_save({"k": torch.zeros(1)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match=r"key 'k' is in two shards: .*one\.safetensors and .*two\.safetensors"):
        CheckpointReader(tmp_path)


def test_truncated_file(tmp_path):
    path = atomic_save({"a": torch.zeros(4), "big": torch.zeros(100)}, tmp_path / "t.safetensors")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"t\.safetensors: tensor 'big': data ends at byte .* \(truncated"):
        CheckpointReader(path)


@pytest.mark.parametrize("content, msg", [
    (b"hello", "only 5 bytes"),
    (b"\xff" * 64, "header length"),
    (struct.pack("<Q", 5) + b"{nope" + b"\0" * 8, "header is not JSON"),
    (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
])
def test_not_a_safetensors_file(tmp_path, content, msg):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"junk\.safetensors: not a safetensors file \(.*{msg}"):
        read_header(path)


@pytest.mark.parametrize("header, msg", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "tensors 'a' and 'b' overlap"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, "tensor 'a': data ends at byte"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "tensor 'a': data_offsets span 8 bytes but F32"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "tensor 'a': unknown dtype 'Q4'"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "tensor 'a': bad shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "tensor 'a': bad data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2]}}, "tensor 'a': header entry needs"),
    ({"__metadata__": {"n": 1}}, "__metadata__ must map strings"),
])
def test_header_lying_about_offsets(tmp_path, header, msg):
    path = write_raw(tmp_path / "liar.safetensors", header, bytes(16))
    with pytest.raises(CheckpointError, match=rf"liar\.safetensors: .*{msg}"):
        CheckpointReader(path)


# ----------------------------------------------------------------------------------------------
#                                    Config inference
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_infer_config_recovers_every_preset(name):
    cfg = PRESETS[name]()
    inferred = infer_config(model_shapes(cfg))
    # axes_lens and the padding multiple leave no trace in the shapes: they come from l2p metadata
    assert inferred.replace(axes_lens=cfg.axes_lens, seq_multiple=cfg.seq_multiple) == cfg
    assert infer_config(model_shapes(cfg), base=cfg) == cfg


def test_infer_config_real_presets_exactly():
    assert infer_config(model_shapes(z_image_turbo())) == z_image_turbo()
    assert infer_config(model_shapes(l2p_1k())) == l2p_1k()
    assert default_axes_dims(128) == (32, 48, 48) and default_axes_dims(32) == (8, 12, 12)


@pytest.mark.skipif(not REFERENCE.is_dir(), reason="shared/reference not present")
def test_infer_config_from_reference_key_lists():
    for name, cfg in [("z_image_turbo_transformer.tsv", z_image_turbo()), ("l2p_1k_transformer.tsv", l2p_1k())]:
        rows = [line.split("\t") for line in (REFERENCE / name).read_text().splitlines()[1:]]
        shapes = {k: tuple(int(d) for d in s.split("x")) for k, s, _ in rows}
        assert shapes == model_shapes(cfg)
        assert infer_config(shapes) == cfg


def test_infer_config_rejects_other_models():
    with pytest.raises(CheckpointError, match="bert.bin: not a Z-Image / L2P DiT checkpoint"):
        infer_config({"encoder.layer.0.weight": (4, 4)}, source="bert.bin")
    shapes = model_shapes(tiny_latent())
    del shapes["cap_embedder.1.weight"]
    with pytest.raises(CheckpointError, match="'cap_embedder.1.weight' is missing"):
        infer_config(shapes)


def test_raw_copy_falls_back_to_buffered_reads(tmp_path, monkeypatch):
    tensors = {"a": torch.randn(1000), "b": torch.randn(3, 7).bfloat16()}
    src = atomic_save(tensors, tmp_path / "src.safetensors")
    real, calls = os.sendfile, []

    def flaky(fd_out, fd_in, offset, count):  # the kernel copies one chunk, then gives up
        calls.append(count)
        if len(calls) == 1:
            return real(fd_out, fd_in, offset, min(count, 1000))
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr("l2p.checkpoint.os.sendfile", flaky)
    with CheckpointReader(src) as r, StreamingWriter(tmp_path / "dst.safetensors",
                                                     [(k, t.dtype, t.shape) for k, t in tensors.items()]) as w:
        for k in tensors:
            w.copy_from(r, k)
    out = read_state_dict(tmp_path / "dst.safetensors")
    assert all(same(out[k], tensors[k]) for k in tensors) and len(calls) == 3
