"""Merge a training checkpoint (trainable tensors only) into the pixel-init file, streamed.

The release's `merge_weights.py`: every key of the trained file A overwrites the same key of the init file B
(a plain overwrite, not a delta). Every output tensor is a raw byte copy from the file it came from, so dtypes
stay as stored: the released `model-1k-merge.safetensors` mixes F32 frozen layers (from B) with BF16 trained
tensors (from A), and nothing is widened or narrowed here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from tqdm.auto import tqdm

from l2p.checkpoint import (CheckpointError, CheckpointReader, StreamingWriter, check_not_input, parse_size,
                            same_bytes)
from l2p.convert import TensorReport


@dataclass
class MergeReport(TensorReport):
    """Where every output tensor came from: status "trained", "init", or "init (shape mismatch)"."""

    trained_files: list[str] = field(default_factory=list)
    init_files: list[str] = field(default_factory=list)
    output_files: list[str] = field(default_factory=list)
    removed_prefix: str = ""
    verified: int = 0  # output tensors re-read and found bit-identical to where they came from
    seconds: float = 0.0


def _strip(keys: list[str], prefix: str, source: str) -> dict[str, str]:
    """Output key -> key in the trained file, with `prefix` removed where present."""
    out: dict[str, str] = {}
    for key in keys:
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        if name in out:
            raise CheckpointError(f"{source}: keys {out[name]!r} and {key!r} both become {name!r} "
                                  f"after removing the prefix {prefix!r}")
        out[name] = key
    return out


def _n_layers(keys) -> int:
    """Number of main blocks, for report groups (0 when the file has none)."""
    return 1 + max((int(k.split(".")[1]) for k in keys if k.startswith("layers.")), default=-1)


def merge(trained_path, init_path, output_path, *, remove_prefix: str = "pipe.dit.", allow_shape_mismatch: bool = False,
          overwrite: bool = False, max_shard_bytes=None, progress: bool = True) -> MergeReport:
    """Write init (B) with every tensor of trained (A) put over it; keys and order are B's.

    A key of A unknown to B is an error (listing them all). A shape mismatch is an error unless
    `allow_shape_mismatch`, in which case B's tensor is kept and the row says so.
    """
    t0 = time.perf_counter()
    with CheckpointReader(trained_path) as a, CheckpointReader(init_path) as b:
        a_name, b_name = ", ".join(map(str, a.files)), ", ".join(map(str, b.files))
        check_not_input(output_path, a.files + b.files)
        trained = _strip(a.keys(), remove_prefix, a_name)
        unknown = sorted(set(trained) - set(b.keys()))
        if unknown:
            raise CheckpointError(f"{a_name}: {len(unknown)} trained keys are not in the init checkpoint {b_name}: "
                                  f"{unknown}")
        mismatched = sorted(k for k, ak in trained.items() if a.shape(ak) != b.shape(k))
        if mismatched and not allow_shape_mismatch:
            details = [f"{k}: trained {a.shape(trained[k])} vs init {b.shape(k)}" for k in mismatched]
            raise CheckpointError(f"{a_name}: shape mismatch with {b_name} (pass allow_shape_mismatch to keep "
                                  f"the init tensors): {details}")

        # source of every output tensor: (reader, key in that reader, status)
        sources = {}
        for key in b.keys():
            if key in trained and key not in mismatched:
                sources[key] = (a, trained[key], "trained")
            else:
                sources[key] = (b, key, "init (shape mismatch)" if key in mismatched else "init")
        plan = [(k, r.dtype(rk), r.shape(rk)) for k, (r, rk, _) in sources.items()]
        metadata = {**b.metadata, "l2p_merge": json.dumps({"trained": [f.name for f in a.files],
                                                           "init": [f.name for f in b.files]})}
        # The trained model's own config wins (e.g. what its head predicts), unless shapes were mismatched.
        if "l2p_config" in a.metadata and not mismatched:
            metadata["l2p_config"] = a.metadata["l2p_config"]
        report = MergeReport(trained_files=[str(f) for f in a.files], init_files=[str(f) for f in b.files],
                             removed_prefix=remove_prefix)
        with StreamingWriter(output_path, plan, parse_size(max_shard_bytes), metadata, overwrite) as w:
            bar = tqdm(total=sum(r.nbytes(rk) for r, rk, _ in sources.values()), unit="B", unit_scale=True,
                       desc="merge", disable=not progress)
            for key, (reader, src_key, _) in sources.items():
                w.copy_from(reader, key, src_key)
                bar.update(reader.nbytes(src_key))
            bar.close()
            with CheckpointReader(w.finish()) as out:
                bad = [k for k, (r, rk, _) in sources.items() if not same_bytes(r, rk, out, k)]
                if bad:
                    raise CheckpointError(f"{output_path}: tensors differ from their source after writing: {bad[:8]}")
                report.verified = len(sources)
        report.output_files = [str(p) for p in w.final_paths]

    n_layers = _n_layers(sources)
    for key, (reader, src_key, status) in sources.items():
        report.add(key, status, reader.shape(src_key), reader.dtype(src_key), n_layers)
    report.seconds = round(time.perf_counter() - t0, 3)
    return report


# ----------------------------------------------------------------------------------------------
#                                            CLI
# ----------------------------------------------------------------------------------------------

def _add_merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file_a", "--trained", required=True, dest="file_a", nargs="+", metavar="PATH",
                   help="trained checkpoint (A, wins): file(s), index json or folder")
    p.add_argument("--file_b", "--pixel-init", required=True, dest="file_b", nargs="+", metavar="PATH",
                   help="pixel-init checkpoint (B): file(s), index json or folder")
    p.add_argument("--file_out", "--output", required=True, dest="file_out", metavar="PATH", help="merged .safetensors")
    p.add_argument("--remove-prefix", default="pipe.dit.", help="prefix stripped from A's keys (default pipe.dit.)")
    p.add_argument("--allow-shape-mismatch", action="store_true", help="keep B's tensor where shapes differ")
    p.add_argument("--max-shard-size", default=None, help="e.g. 5GB; default one file, as the release")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--report", default=None, help="write the per-tensor report as JSON here")


def run_merge(a: argparse.Namespace) -> int:
    """Run the `merge` subcommand and print its summary."""
    try:
        report = merge(a.file_a, a.file_b, a.file_out, remove_prefix=a.remove_prefix,
                       allow_shape_mismatch=a.allow_shape_mismatch, overwrite=a.overwrite,
                       max_shard_bytes=parse_size(a.max_shard_size))
    except (CheckpointError, ValueError) as e:
        print(f"l2p merge: error: {e}", file=sys.stderr)
        return 2
    if a.report:
        report.save_json(a.report)
    print(report)
    return 0


def add_merge_parser(subparsers) -> argparse.ArgumentParser:
    """Register `merge` on an argparse subparsers object."""
    p = subparsers.add_parser("merge", help="put a training checkpoint over the pixel-init file (streaming)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_merge_args(p)
    p.set_defaults(func=run_merge)
    return p


def main_merge(argv=None) -> int:
    """`python -m l2p.merge ...`"""
    p = argparse.ArgumentParser(prog="l2p merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_merge_args(p)
    return run_merge(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main_merge())
