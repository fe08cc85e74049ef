"""Artefact cache keyed by (name, config, seed, version): train once, load afterwards.

Artefacts are directories. A miss builds, saves into a temporary sibling directory and renames it into
place, so a crash or a concurrent build never leaves a half-written entry that later loads. Builders of
one key take turns (a lock file per key), so processes that need the same artefact at once (report
workers, two notebooks) build it once: the others wait, then load it.

Every build runs on a fixed number of torch threads, whatever the machine: float32 sums depend on the
thread count, and training amplifies the difference, so a key names one artefact only at one count. Worlds
and their parts build on `build_threads()` (2); fine-tuning runs, many small jobs, on `run_threads()` (1),
so that a report trains one per core side by side.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Union

import l2p

# Bump when a change to generators or training code makes old artefacts stale.
CACHE_VERSION = "1"
LOCKS = ".locks"  # one lock file per key that was ever built here (empty files, kept: unlinking one races)


def version_string() -> str:
    """The package-relevant version that enters every key."""
    return f"l2p-{l2p.__version__}/cache-{CACHE_VERSION}"


def library_versions() -> dict:
    """Versions of the libraries whose numerics a toy build depends on (recorded with every build and report)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for lib in ("torch", "diffusers", "transformers", "numpy"):
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


# Instruction-set extensions whose presence changes which float kernels oneDNN picks (bf16/fp16 matmuls, AMX tiles).
KERNEL_FLAGS = ("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")


def cpu_model(cpuinfo: Union[str, Path] = "/proc/cpuinfo") -> str:
    """The CPU's model name, family/model/stepping, the instruction set torch dispatches to and the matrix
    extensions present, e.g. "Intel(R) Xeon(R) Processor, family 6 model 143 stepping 8 (AVX512; avx512_bf16 amx_bf16)".

    Recorded with every build and report: a build is bit-identical only on the same kind of CPU, too. Session 28
    rebuilt the default world on an Intel Xeon as another world than the AMD EPYC's; session 29, on a Xeon of
    the same model name (this one with AMX), as a third. The name alone does not tell such machines apart.
    """
    import platform

    import torch
    info: dict = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                k, _, v = line.partition(":")
                info.setdefault(k.strip(), v.strip())
    except OSError:
        pass
    name = " ".join((info.get("model name") or platform.processor() or platform.machine() or "unknown CPU").split())
    if all(k in info for k in ("cpu family", "model", "stepping")):
        name += f", family {info['cpu family']} model {info['model']} stepping {info['stepping']}"
    extensions = " ".join(f for f in KERNEL_FLAGS if f in info.get("flags", "").split())
    dispatch = torch.backends.cpu.get_cpu_capability()
    return f"{name} ({dispatch}; {extensions})" if extensions else f"{name} ({dispatch})"


def build_threads() -> int:
    """Torch threads the world's artefacts are built with: $L2P_BUILD_THREADS, else 2 (the reference machine's).

    At one thread count a build is bit-identical run to run; at another it is not (40 steps of the toy VAE on
    1 and 2 threads already differ by 0.01 in the weights), and training amplifies the difference. A fixed
    count makes a build the same on any machine with the same CPU kind and library versions.
    """
    return _threads_env("L2P_BUILD_THREADS", 2)


def run_threads() -> int:
    """Torch threads a toy fine-tuning run trains on: $L2P_RUN_THREADS, else 1.

    A run's ops are small (batch 32 of 64² images): two 1-thread runs side by side take 0.63× the time of two
    2-thread runs one after the other (bench/bench_oversubscription.py), so the reports train one run per
    core (`make reports JOBS=auto`). One run alone on 1 thread is slower than on 2, the price of a fixed count.
    """
    return _threads_env("L2P_RUN_THREADS", 1)


def _threads_env(name: str, default: int) -> int:
    env = os.environ.get(name)
    if env is None or env == "":
        return default
    if not env.isdigit() or int(env) < 1:
        raise ValueError(f"{name}={env!r}: a positive number of threads")
    return int(env)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX tiles).

    Without it, bf16 autocast is emulated: on an AVX2-only 2-core machine a toy-VAE step took 14–15× the fp32
    time (bench/bench_vae_precision.py), which turns the toy world's 13-min VAE into 3 hours.
    """
    import torch
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                      "_is_amx_tile_supported"))


def vae_precision() -> str:
    """The toy VAE presets' `mixed_precision`: bf16 autocast where the CPU has it natively, fp32 ("no") elsewhere.

    `L2P_VAE_PRECISION=bf16|no` forces one, e.g. to rebuild on an AVX2 machine the VAE a bf16 machine built.
    The resolved value is part of the cache key, so the two kinds of build never mix.
    """
    forced = os.environ.get("L2P_VAE_PRECISION", "auto")
    if forced not in ("auto", "bf16", "no"):
        raise ValueError(f"L2P_VAE_PRECISION={forced!r}: expected auto, bf16 or no")
    return forced if forced != "auto" else ("bf16" if native_bf16() else "no")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block on n torch threads, then restore the caller's count."""
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def cache_dir() -> Path:
    """$L2P_CACHE, else <repo>/.cache/l2p for a source checkout, else ~/.cache/l2p."""
    env = os.environ.get("L2P_CACHE")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").exists():
        return repo / ".cache" / "l2p"
    return Path.home() / ".cache" / "l2p"


def _jsonable(obj: Any) -> Any:
    """Dataclasses, tuples, paths and numpy scalars → plain JSON types (a `to_dict()` is the object's own say)."""
    if hasattr(obj, "to_dict") and not isinstance(obj, type):
        return _jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    return str(obj)


def without_late_defaults(config: Any, late: dict) -> dict:
    """A dataclass as a key dict, leaving out fields added later while they hold their defaults (`late`:
    name → default), so cache keys written before those fields existed stay valid."""
    d = dataclasses.asdict(config)
    return {k: v for k, v in d.items() if not (k in late and v == late[k])}


def key_for(name: str, config: Any, seed: int, version: Optional[str] = None) -> str:
    """`<name>-<16 hex>`: a stable hash of the canonical JSON of (name, config, seed, version)."""
    payload = {"name": name, "config": _jsonable(config), "seed": int(seed), "version": version or version_string()}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{name}-{digest[:16]}"


def cached(name: str, config: Any, seed: int, build_fn: Callable[[], Any],
           save_fn: Callable[[Any, Path], None], load_fn: Callable[[Path], Any],
           root: Optional[Union[str, Path]] = None, rebuild: bool = False, version: Optional[str] = None,
           threads: Optional[int] = None) -> Any:
    """Load the artefact for this key, or build it on `threads` torch threads (default `build_threads()`), save
    it atomically and return it (as loaded back)."""
    root = Path(root) if root is not None else cache_dir()
    final = root / key_for(name, config, seed, version)
    threads = threads or build_threads()
    if final.is_dir() and not rebuild:
        return _load(final, load_fn, threads)
    root.mkdir(parents=True, exist_ok=True)
    with _key_lock(root / LOCKS / f"{final.name}.lock"):
        if final.is_dir() and not rebuild:  # built by another process while this one waited
            return _load(final, load_fn, threads)
        with torch_threads(threads):
            _build_and_save(name, config, seed, version, final, build_fn, save_fn, rebuild, threads)
    # Return what a later call would load, so a hit and a miss give the same object type.
    return load_fn(final)


_warned: set = set()  # (cache folder, kind, built on, would build on): the thread warning is said once for each


def _load(final: Path, load_fn: Callable[[Path], Any], threads: int) -> Any:
    """Load an entry; warn if it was built on another thread count than this process would build it on.

    Once per kind of artefact and pair of counts: a report loads dozens of runs, and one line says it.
    """
    meta = final / "cache_meta.json"
    built = json.loads(meta.read_text()).get("threads") if meta.is_file() else None
    said = (str(final.parent), final.name.rsplit("-", 1)[0], built, threads)
    if built is not None and built != threads and said not in _warned:
        import warnings
        _warned.add(said)
        warnings.warn(f"{final.name} was built on {built} thread(s); this process builds it on {threads} "
                      "(L2P_BUILD_THREADS / L2P_RUN_THREADS), so a rebuild here would not give the same artefact "
                      f"(said once: other {said[1]} entries may be in the same case)", stacklevel=3)
    return load_fn(final)


@contextlib.contextmanager
def _key_lock(path: Path):
    """An exclusive lock on `path` for one build (POSIX flock; released when the process dies, too)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent builders may duplicate work, never corrupt an entry
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_and_save(name, config, seed, version, final: Path, build_fn, save_fn, rebuild: bool,
                    threads: int) -> None:
    root = final.parent
    t0 = time.perf_counter()
    artefact = build_fn()
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_fn(artefact, tmp)
        meta = {"name": name, "config": _jsonable(config), "seed": int(seed), "version": version or version_string(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "build_seconds": round(time.perf_counter() - t0, 2),  # build + save: what a cache hit saves
                "threads": threads, "libraries": library_versions(), "cpu": cpu_model()}
        (tmp / "cache_meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if final.is_dir() and rebuild:
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_meta(name: str, config: Any, seed: int, root: Optional[Union[str, Path]] = None,
               version: Optional[str] = None) -> Optional[dict]:
    """The cached artefact's `cache_meta.json` (build time, threads, library versions); None if not cached."""
    root = Path(root) if root is not None else cache_dir()
    meta = root / key_for(name, config, seed, version) / "cache_meta.json"
    return json.loads(meta.read_text()) if meta.is_file() else None


def build_seconds(name: str, config: Any, seed: int, root: Optional[Union[str, Path]] = None,
                  version: Optional[str] = None) -> Optional[float]:
    """Wall time the cached artefact took to build and save (None: not cached, or cached before this was kept)."""
    meta = build_meta(name, config, seed, root, version)
    return None if meta is None else meta.get("build_seconds")


def is_cached(name: str, config: Any, seed: int, root: Optional[Union[str, Path]] = None,
              version: Optional[str] = None) -> bool:
    """Whether an entry exists for this key."""
    root = Path(root) if root is not None else cache_dir()
    return (root / key_for(name, config, seed, version)).is_dir()
