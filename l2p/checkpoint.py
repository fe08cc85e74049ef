"""Safetensors I/O that never holds a whole model in memory.

A safetensors file is `u64 little-endian header length | JSON header | raw tensor bytes`. The header fixes every
tensor's byte range, so reading one tensor is one `seek` + `readinto`, and writing a planned set of tensors can go
straight to disk in plan order. Nothing here uses mmap: the reader's peak memory is the tensor it returns, and raw
copies between files go through the kernel (`copy_file_range`) or a small reusable buffer.

Also here: `infer_config` (the DiTConfig a checkpoint's key shapes imply) and `make_synthetic_checkpoint`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from l2p.config import DetailerConfig, DiTConfig, l2p_1k, z_image_turbo

PathLike = Union[str, os.PathLike]
Plan = Sequence[tuple[str, torch.dtype, Sequence[int]]]

MAX_HEADER_BYTES = 100_000_000  # the limit the safetensors library enforces
COPY_CHUNK_BYTES = 16 << 20  # buffer size for user-space copies, casts and comparisons

# safetensors dtype name -> torch dtype; the float8 / unsigned variants only where this torch has them.
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "C64": "complex64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
}
DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _DTYPE_NAMES.items() if hasattr(torch, v)}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written as asked; the message names the file (and key) at fault."""


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("BF16")."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors") from None


def nbytes_of(dtype: torch.dtype, shape: Sequence[int]) -> int:
    """Bytes of a dense tensor of this dtype and shape."""
    return math.prod(shape) * dtype.itemsize


# ----------------------------------------------------------------------------------------------
#                                     Finding the files
# ----------------------------------------------------------------------------------------------

def _read_index(index: Path) -> tuple[list[Path], dict[str, Path]]:
    """Shards named by an HF `*.safetensors.index.json`, in first-mention order, and its key -> shard map."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    shards: dict[Path, None] = {}
    key_to_shard = {}
    for key, name in weight_map.items():
        shard = (index.parent / name).resolve()
        if not shard.is_file():
            raise CheckpointError(f"{index}: shard {name!r} (holding key {key!r}) does not exist")
        shards[shard] = None
        key_to_shard[key] = shard
    if not shards:
        raise CheckpointError(f"{index}: weight_map is empty")
    return list(shards), key_to_shard


def _resolve(path_or_paths) -> tuple[list[Path], dict[str, Path]]:
    """Files and the key -> shard map promised by any index among the inputs."""
    items = [path_or_paths] if isinstance(path_or_paths, (str, os.PathLike)) else list(path_or_paths)
    if not items:
        raise CheckpointError("no checkpoint path given")
    files: list[Path] = []
    promised: dict[str, Path] = {}
    for item in map(Path, items):
        if item.is_dir():
            indexes = sorted(item.glob("*.safetensors.index.json"))
            if len(indexes) > 1:
                raise CheckpointError(f"{item}: several index files, pass one: {[p.name for p in indexes]}")
            if indexes:
                item = indexes[0]
            else:
                found = sorted(item.glob("*.safetensors"))
                if not found:
                    raise CheckpointError(f"{item}: no .safetensors file or index in this folder")
                files += [p.resolve() for p in found]
                continue
        if not item.is_file():
            raise CheckpointError(f"{item}: checkpoint file does not exist")
        if item.name.endswith(".json"):
            shards, key_map = _read_index(item)
            files += shards
            promised.update(key_map)
        else:
            files.append(item.resolve())
    seen = set()
    for f in files:
        if f in seen:
            raise CheckpointError(f"{f}: shard listed twice (directly, through an index or a folder)")
        seen.add(f)
    return files, promised


def resolve_checkpoint_files(path_or_paths) -> list[Path]:
    """The safetensors files behind a file, a list of files, an index json, or a folder holding either."""
    return _resolve(path_or_paths)[0]


# ----------------------------------------------------------------------------------------------
#                                         Headers
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, safetensors dtype name, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: tensor infos in header order, and `__metadata__`."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} with file size {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")

    data_start, data_size = 8 + n, size - 8 - n
    infos = {key: _tensor_info(path, key, entry, data_start, data_size) for key, entry in header.items()}
    ordered = sorted(infos.items(), key=lambda kv: (kv[1].start, kv[1].end))
    for (k0, a), (k1, b) in zip(ordered, ordered[1:]):
        if b.start < a.end:
            raise CheckpointError(f"{path}: tensors {k0!r} and {k1!r} overlap in the data buffer")
    return infos, metadata


def _tensor_info(path: Path, key: str, entry, data_start: int, data_size: int) -> TensorInfo:
    """Validate one header entry: dtype, shape, and offsets that agree with both and lie inside the file."""
    where = f"{path}: tensor {key!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{where}: header entry needs dtype, shape and data_offsets, got {entry!r}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: bad shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: bad data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise CheckpointError(f"{where}: data_offsets span {end - begin} bytes but {dtype}{shape} needs {expected}")
    if end > data_size:
        raise CheckpointError(f"{where}: data ends at byte {data_start + end} beyond the file's "
                              f"{data_start + data_size} bytes (truncated file?)")
    return TensorInfo(path, dtype, tuple(shape), data_start + begin, data_start + end)


# ----------------------------------------------------------------------------------------------
#                                          Reading
# ----------------------------------------------------------------------------------------------

def _readinto_exact(f, view: memoryview, offset: int, path: Path, key: str) -> None:
    """Fill `view` from `offset` with plain reads (raw files may return short reads)."""
    f.seek(offset)
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{path}: tensor {key!r} ends past end of file (file changed while reading?)")
        done += got


class CheckpointReader:
    """Random access to the tensors of one or more safetensors files, one tensor at a time."""

    def __init__(self, paths):
        self.files, promised = _resolve(paths)
        self._infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for path in self.files:
            infos, metadata = read_header(path)
            for key, info in infos.items():
                if key in self._infos:
                    raise CheckpointError(f"key {key!r} is in two shards: {self._infos[key].file} and {path}")
                self._infos[key] = info
            self.metadata.update(metadata)
        for key, shard in promised.items():
            if self._infos.get(key) is None or self._infos[key].file != shard:
                raise CheckpointError(f"{shard}: index promises key {key!r} but the shard does not hold it")
        self._handles: dict[Path, object] = {}

    # -- lookup --
    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, key: str) -> TensorInfo:
        try:
            return self._infos[key]
        except KeyError:
            raise KeyError(f"{key!r} is not in {[str(f) for f in self.files]}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        return self.info(key).torch_dtype

    def nbytes(self, key: str) -> int:
        return self.info(key).nbytes

    def file_of(self, key: str) -> Path:
        return self.info(key).file

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every key's shape, in header order."""
        return {k: v.shape for k, v in self._infos.items()}

    # -- reading --
    def _file(self, path: Path):
        """An unbuffered handle per file, opened once: reads go straight into the caller's buffer."""
        if path not in self._handles:
            self._handles[path] = open(path, "rb", buffering=0)
        return self._handles[path]

    def get(self, key: str, dtype: Optional[torch.dtype] = None, device="cpu") -> torch.Tensor:
        """Read exactly this tensor's bytes into a fresh buffer (then cast / move if asked)."""
        info = self.info(key)
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            _readinto_exact(self._file(info.file), memoryview(buf.numpy()), info.start, info.file, key)
        t = buf.view(info.torch_dtype).reshape(info.shape)
        if dtype is not None and dtype != t.dtype:
            t = t.to(dtype)
        return t if torch.device(device).type == "cpu" else t.to(device)

    def items(self, dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) pairs in file-offset order, so the disk is read sequentially."""
        for key in sorted(self._infos, key=lambda k: (self.files.index(self._infos[k].file), self._infos[k].start)):
            yield key, self.get(key, dtype)

    def iter_chunks(self, key: str, chunk_bytes: int = COPY_CHUNK_BYTES, skip: int = 0) -> Iterator[torch.Tensor]:
        """The tensor's raw bytes (after the first `skip`) as uint8 chunks; each chunk is overwritten by the next."""
        info = self.info(key)
        buf = torch.empty(min(chunk_bytes, info.nbytes - skip), dtype=torch.uint8)
        mv = memoryview(buf.numpy())
        for pos in range(info.start + skip, info.end, chunk_bytes):
            n = min(chunk_bytes, info.end - pos)
            _readinto_exact(self._file(info.file), mv[:n], pos, info.file, key)
            yield buf[:n]

    def copy_bytes(self, key: str, out) -> None:
        """Append this tensor's raw bytes to the open binary file `out` (in-kernel `sendfile` where available)."""
        info = self.info(key)
        out.flush()
        src, dst, pos = self._file(info.file).fileno(), out.fileno(), info.start
        try:  # sendfile, as shutil.copyfile uses: measured faster here than copy_file_range or user-space copies
            while pos < info.end:
                n = os.sendfile(dst, src, pos, info.end - pos)
                if n == 0:
                    raise CheckpointError(f"{info.file}: tensor {key!r} ends past end of file")
                pos += n
        except (AttributeError, OSError):  # no sendfile to a regular file on this platform
            for chunk in self.iter_chunks(key, skip=pos - info.start):
                _write_all(out, chunk.numpy())

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_state_dict(paths, dtype: Optional[torch.dtype] = None, keys: Optional[Iterable[str]] = None
                    ) -> dict[str, torch.Tensor]:
    """Load (some of) a checkpoint into a dict: for small models and tests."""
    with CheckpointReader(paths) as r:
        wanted = r.keys() if keys is None else list(keys)
        return {k: r.get(k, dtype) for k in wanted}


def _cast_chunks(reader: CheckpointReader, key: str, dtype: torch.dtype, elems: int) -> Iterator[torch.Tensor]:
    """The tensor cast to `dtype`, as raw bytes, `elems` elements at a time (bounded memory)."""
    src = reader.dtype(key)
    for chunk in reader.iter_chunks(key, elems * src.itemsize):
        yield chunk.view(src).to(dtype).view(torch.uint8)


def same_bytes(src: CheckpointReader, key: str, out: CheckpointReader, out_key: Optional[str] = None) -> bool:
    """Whether `out`'s tensor is bit-identical to `src`'s, cast to out's dtype where they differ (chunk by chunk)."""
    out_key = key if out_key is None else out_key
    if src.shape(key) != out.shape(out_key):
        return False
    dtype = out.dtype(out_key)
    elems = COPY_CHUNK_BYTES // max(src.dtype(key).itemsize, dtype.itemsize)
    return all(_equal_bytes(x, y) for x, y in zip(_cast_chunks(src, key, dtype, elems),
                                                  _cast_chunks(out, out_key, dtype, elems)))


def _equal_bytes(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Equality of two uint8 buffers, compared 8 bytes at a time where the length allows (4× faster)."""
    if len(x) != len(y):
        return False
    if len(x) % 8 == 0:
        x, y = x.view(torch.int64), y.view(torch.int64)
    return torch.equal(x, y)


# ----------------------------------------------------------------------------------------------
#                                          Writing
# ----------------------------------------------------------------------------------------------

def _write_all(f, data) -> None:
    """Write a whole buffer to a (possibly raw) file, looping over short writes."""
    mv = memoryview(data).cast("B")
    while mv:
        mv = mv[f.write(mv):]


def tensor_bytes(t: torch.Tensor):
    """A tensor's bytes as a numpy uint8 view (no copy when it is already contiguous on the CPU)."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def _header_blob(entries: Plan, metadata: Optional[dict]) -> bytes:
    """The length-prefixed JSON header for tensors stored back to back in this order."""
    header = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key, dtype, shape in entries:
        n = nbytes_of(dtype, shape)
        header[key] = {"dtype": dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the tensor data then starts 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


def _split_shards(plan: Plan, max_shard_bytes: Optional[int]) -> list[list]:
    """Cut the plan greedily into consecutive shards of at most max_shard_bytes (a bigger tensor stands alone)."""
    shards, size = [[]], 0
    for entry in plan:
        n = nbytes_of(entry[1], entry[2])
        if max_shard_bytes is not None and shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += n
    return shards


def output_family(out_path: PathLike) -> list[Path]:
    """Existing files that belong to this output name: the file itself, its index, and its numbered shards."""
    out = Path(out_path)
    stem = out.name.removesuffix(".safetensors")
    pattern = re.compile(re.escape(stem) + r"-\d{5}-of-\d{5}\.safetensors")
    family = [out, out.with_name(stem + ".safetensors.index.json")]
    if out.parent.is_dir():
        family += sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name))
    return [p for p in family if p.exists()]


def check_not_input(out_path: PathLike, inputs: Sequence[Path]) -> None:
    """Refuse an output whose files would replace one of the input files."""
    clash = {p.resolve() for p in output_family(out_path)} & {Path(p).resolve() for p in inputs}
    if clash:
        raise CheckpointError(f"{sorted(clash)[0]}: the output would replace an input file; choose another path")


class StreamingWriter:
    """Write planned tensors straight to disk in plan order, then publish the files atomically.

    The plan fixes every header up front. Files are written under hidden temporary names in the target folder
    and renamed on `close()`; an exception (or `abort()`) deletes them, leaving nothing behind. Above
    `max_shard_bytes` the output becomes `name-0000i-of-0000N.safetensors` plus `name.safetensors.index.json`.
    """

    def __init__(self, out_path: PathLike, plan: Plan, max_shard_bytes: Optional[int] = None,
                 metadata: Optional[dict] = None, overwrite: bool = False):
        self.out_path = Path(out_path)
        self.plan = [(k, dt, tuple(int(d) for d in shape)) for k, dt, shape in plan]
        self.metadata = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise CheckpointError(f"{self.out_path}: metadata must map strings to strings")
        keys = [k for k, _, _ in self.plan]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise CheckpointError(f"{self.out_path}: plan lists keys twice: {dup}")
        for _, dt, _ in self.plan:
            dtype_name(dt)
        existing = output_family(self.out_path)
        if existing and not overwrite:
            raise CheckpointError(f"{existing[0]}: output exists (pass overwrite=True to replace it)")

        self._shards = _split_shards(self.plan, max_shard_bytes)
        n = len(self._shards)
        stem = self.out_path.name.removesuffix(".safetensors")
        self.final_paths = ([self.out_path] if n == 1 else
                            [self.out_path.with_name(f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors") for i in range(n)])
        self.index_path = None if n == 1 else self.out_path.with_name(stem + ".safetensors.index.json")
        parent = self.out_path.parent
        self._made_dirs = [d for d in [parent, *parent.parents] if not d.exists()]  # deepest first
        parent.mkdir(parents=True, exist_ok=True)
        tag = uuid.uuid4().hex[:8]
        self.temp_paths = [p.with_name(f".{p.name}.{tag}.tmp") for p in self.final_paths]
        self._next = 0  # index into self.plan
        self._shard = -1  # index of the open shard
        self._shard_end = 0  # plan index where the open shard ends
        self._f = None
        self._state = "open"

    # -- progress through the plan --
    def _advance(self, key: str, dtype: torch.dtype, shape: tuple) -> None:
        """Check that `key` is due next with this dtype and shape, opening the next shard when needed."""
        if self._state != "open":
            raise CheckpointError(f"{self.out_path}: writer is {self._state}")
        if self._next >= len(self.plan):
            raise CheckpointError(f"{self.out_path}: {key!r} written after the whole plan")
        pkey, pdtype, pshape = self.plan[self._next]
        if key != pkey:
            raise CheckpointError(f"{self.out_path}: expected {pkey!r} next in the plan, got {key!r}")
        if (dtype, tuple(shape)) != (pdtype, pshape):
            raise CheckpointError(f"{self.out_path}: tensor {key!r} is {dtype}{list(shape)}, "
                                  f"the plan says {pdtype}{list(pshape)}")
        if self._next == self._shard_end:
            self._open_next_shard()
        self._next += 1

    def _open_next_shard(self) -> None:
        if self._f is not None:
            self._f.close()
        self._shard += 1
        entries = self._shards[self._shard]
        self._shard_end += len(entries)
        self._f = open(self.temp_paths[self._shard], "xb", buffering=0)
        _write_all(self._f, _header_blob(entries, self.metadata))

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor; dtype and shape must equal the plan's (no silent casts)."""
        self._advance(key, tensor.dtype, tuple(tensor.shape))
        _write_all(self._f, tensor_bytes(tensor))

    def copy_from(self, reader: CheckpointReader, key: str, src_key: Optional[str] = None,
                  dtype: Optional[torch.dtype] = None) -> None:
        """Write the next planned tensor from a stored one: a raw byte copy, or a chunked cast to `dtype`."""
        src_key = key if src_key is None else src_key
        src_dtype = reader.dtype(src_key)
        dtype = dtype or src_dtype
        self._advance(key, dtype, reader.shape(src_key))
        if dtype == src_dtype:
            reader.copy_bytes(src_key, self._f)
        else:
            elems = COPY_CHUNK_BYTES // max(src_dtype.itemsize, dtype.itemsize)
            for chunk in _cast_chunks(reader, src_key, dtype, elems):
                _write_all(self._f, chunk.numpy())

    # -- finishing --
    def finish(self) -> list[Path]:
        """Close the temporary files once every planned tensor is written; returns their paths (not yet published)."""
        if self._state == "finished":
            return self.temp_paths
        if self._next != len(self.plan):
            missing = [k for k, _, _ in self.plan[self._next:]]
            raise CheckpointError(f"{self.out_path}: {len(missing)} planned tensors were not written, "
                                  f"first {missing[0]!r}")
        if self._shard < 0:  # an empty plan still makes one valid file
            self._open_next_shard()
        self._f.close()
        self._state = "finished"
        return self.temp_paths

    def close(self) -> list[Path]:
        """Finish, then rename the temporaries onto the final names (index last); returns the published files."""
        try:
            self.finish()
            for stale in output_family(self.out_path):
                if stale not in self.final_paths:
                    stale.unlink()
            if self.index_path is not None:
                tmp_index = self.index_path.with_name(f".{self.index_path.name}.{uuid.uuid4().hex[:8]}.tmp")
                tmp_index.write_text(json.dumps(self._index(), indent=2))
                self.temp_paths.append(tmp_index)
                self.final_paths = self.final_paths + [self.index_path]
            for tmp, final in zip(self.temp_paths, self.final_paths):
                os.replace(tmp, final)
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return self.final_paths

    def _index(self) -> dict:
        """The HF index: total data size and key -> shard file name."""
        total = sum(nbytes_of(dt, shape) for _, dt, shape in self.plan)
        weight_map = {k: path.name for path, entries in zip(self.final_paths, self._shards) for k, _, _ in entries}
        return {"metadata": {"total_size": total, **self.metadata}, "weight_map": weight_map}

    def abort(self) -> None:
        """Delete every temporary file (and the folders this writer created, if still empty)."""
        if self._f is not None:
            self._f.close()
        for tmp in self.temp_paths:
            tmp.unlink(missing_ok=True)
        for d in self._made_dirs:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        self._state = "aborted"

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state in ("open", "finished"):
            self.close()


def parse_size(text: Union[str, int, None]) -> Optional[int]:
    """Bytes from "5GB" (decimal, as HF counts), "512MiB" (binary) or a plain integer; None stays None."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read size {text!r} (try 5GB, 500MB, 2GiB or a byte count)")
    power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
    return int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)


def atomic_save(tensors: dict[str, torch.Tensor], path: PathLike, metadata: Optional[dict] = None) -> Path:
    """Save a small state dict as one safetensors file, replacing `path` atomically (temp name + rename)."""
    plan = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with StreamingWriter(path, plan, metadata=metadata, overwrite=True) as w:
        for k, t in tensors.items():
            w.write(k, t)
    return Path(path)


# ----------------------------------------------------------------------------------------------
#                                Configs from checkpoint shapes
# ----------------------------------------------------------------------------------------------

_EMBEDDER = re.compile(r"all_x_embedder\.(\d+)-(\d+)\.weight")


def _indices(shapes: dict, prefix: str) -> set[int]:
    """The block indices N present as `prefix.N.*`."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return {int(m.group(1)) for k in shapes if (m := pat.match(k))}


def default_axes_dims(head_dim: int) -> tuple[int, int, int]:
    """RoPE split of head_dim over (frame, h, w) in Z-Image's 1/4, 3/8, 3/8 proportions (128 → 32, 48, 48)."""
    hw = 2 * round(3 * head_dim / 16)
    return head_dim - 2 * hw, hw, hw


def infer_config(shapes: dict[str, Sequence[int]], base: Optional[DiTConfig] = None,
                 source: str = "checkpoint") -> DiTConfig:
    """The DiTConfig implied by a latent (Z-Image) or pixel (L2P) checkpoint's key -> shape map.

    Sizes come from the shapes; what shapes cannot tell (norm_eps, rope_theta, t_scale, axes_lens) comes from
    `base`, by default the Z-Image-Turbo config for latent checkpoints and the L2P 1K one for pixel checkpoints.
    axes_dims come from `base` when its head_dim matches, else from `default_axes_dims`.
    """
    shapes = {k: tuple(v) for k, v in shapes.items()}
    if "x_pad_token" not in shapes or not _indices(shapes, "layers"):
        some = sorted(shapes)[:5]
        raise CheckpointError(f"{source}: not a Z-Image / L2P DiT checkpoint (no x_pad_token and layers.N.* keys; "
                              f"{len(shapes)} keys such as {some})")

    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{source}: Z-Image key {key!r} is missing")
        return shapes[key]

    dim = need("x_pad_token")[-1]
    n_layers = max(_indices(shapes, "layers")) + 1
    n_refiner = len(_indices(shapes, "noise_refiner"))
    patches = sorted((int(m.group(1)), int(m.group(2))) for k in shapes if (m := _EMBEDDER.fullmatch(k)))
    if not patches:
        raise CheckpointError(f"{source}: no all_x_embedder.P-F.weight key")
    p, f = patches[0]
    in_channels = need(f"all_x_embedder.{p}-{f}.weight")[1] // (p * p * f)
    for p_, f_ in patches:
        if need(f"all_x_embedder.{p_}-{f_}.weight") != (dim, p_ * p_ * f_ * in_channels):
            raise CheckpointError(f"{source}: all_x_embedder.{p_}-{f_}.weight has shape "
                                  f"{shapes[f'all_x_embedder.{p_}-{f_}.weight']}, expected "
                                  f"{(dim, p_ * p_ * f_ * in_channels)}")

    detailer = None
    if "local_decoder.enc1.0.weight" in shapes:
        depth = len({i for k in shapes if (m := re.match(r"local_decoder\.enc(\d+)\.0\.weight$", k))
                     for i in [int(m.group(1))]})
        channels = tuple(need(f"local_decoder.enc{i}.0.weight")[0] for i in range(1, depth + 1))
        # Fields the shapes cannot show (what the head predicts) come from the metadata (base) when there is one.
        known = base.detailer if base is not None and base.detailer is not None else DetailerConfig()
        detailer = replace(known, channels=channels, out_channels=need("local_decoder.out_conv.weight")[0],
                           time_conditioning="local_decoder.film_enc1.weight" in shapes,
                           upsample="learned" if "local_decoder.up1.0.weight" in shapes else "nearest")

    base = base or (l2p_1k() if detailer else z_image_turbo())
    q_norm = shapes.get("layers.0.attention.norm_q.weight")
    head_dim = q_norm[0] if q_norm else base.head_dim
    n_kv_heads = need("layers.0.attention.to_k.weight")[0] // head_dim
    axes_dims = base.axes_dims if base.head_dim == head_dim else default_axes_dims(head_dim)
    try:
        cfg = base.replace(all_patch_size=tuple(p for p, _ in patches), all_f_patch_size=tuple(f for _, f in patches),
                           in_channels=in_channels, dim=dim, n_layers=n_layers, n_refiner_layers=n_refiner,
                           n_heads=dim // head_dim, n_kv_heads=n_kv_heads, qk_norm=q_norm is not None,
                           cap_feat_dim=need("cap_embedder.1.weight")[1], axes_dims=axes_dims, detailer=detailer)
    except ValueError as e:
        raise CheckpointError(f"{source}: inconsistent sizes: {e}") from None
    if need("layers.0.feed_forward.w1.weight")[0] != cfg.ffn_dim:
        raise CheckpointError(f"{source}: feed-forward width {shapes['layers.0.feed_forward.w1.weight'][0]} is not "
                              f"the {cfg.ffn_dim} that dim {dim} implies")
    return cfg


def checkpoint_config(reader: CheckpointReader) -> DiTConfig:
    """A checkpoint's config: its `l2p_config` metadata (written by l2p) if the shapes agree, else `infer_config`.

    The metadata keeps what shapes cannot tell (axes_lens, rope_theta, ...).
    """
    source = ", ".join(str(f) for f in reader.files)
    inferred = infer_config(reader.shapes(), source=source)
    if "l2p_config" not in reader.metadata:
        return inferred
    try:
        stored = DiTConfig.from_dict(json.loads(reader.metadata["l2p_config"]))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: unreadable l2p_config metadata ({e})") from None
    if infer_config(reader.shapes(), base=stored, source=source) != stored:
        raise CheckpointError(f"{source}: l2p_config metadata disagrees with the tensor shapes")
    return stored


# ----------------------------------------------------------------------------------------------
#                                  Model plans, synthetic files
# ----------------------------------------------------------------------------------------------

def model_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of `ZImageDiT(cfg).state_dict()`, built on the meta device (no memory)."""
    from l2p.model import ZImageDiT

    with torch.device("meta"):
        model = ZImageDiT(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def key_seed(seed: int, key: str) -> int:
    """A per-tensor seed: the same key gets the same numbers whatever else is in the file."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "little") >> 1


def make_synthetic_checkpoint(cfg: DiTConfig, out_path: PathLike, dtype: torch.dtype = torch.bfloat16,
                              max_shard_bytes: Optional[int] = None, seed: int = 0,
                              overwrite: bool = False) -> list[Path]:
    """A random checkpoint with the model's exact keys and shapes, generated and written one tensor at a time."""
    shapes = model_shapes(cfg)
    plan = [(k, dtype, s) for k, s in shapes.items()]
    meta = {"format": "pt", "l2p_config": json.dumps(cfg.to_dict()), "l2p_synthetic_seed": str(seed)}
    with StreamingWriter(out_path, plan, max_shard_bytes, metadata=meta, overwrite=overwrite) as w:
        for key, shape in shapes.items():
            g = torch.Generator().manual_seed(key_seed(seed, key))
            w.write(key, (torch.randn(shape, generator=g) * 0.02).to(dtype))
    return w.final_paths
