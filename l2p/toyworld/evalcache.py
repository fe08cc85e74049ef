"""A cache of toy evaluations: what `ToyWorld.evaluate` computed once, a re-run loads instead of re-sampling.

Sampling and judging hundreds of prompts is most of what the report notebooks do on a full run cache (03 and
04 re-score the same finished runs at the same guidance scales). An evaluation is keyed by what decides its
result: the world's weights, the pipeline's weights and config, the prompts, every sampling setting, the
torch thread count and the library versions. A hit returns exactly what the computation returned (images
bit for bit, the judge's rows, FID/KID/spectral as the same floats), so a report reads the same either way.
`cached_table` does the same for analyses that return a table (the shape readout of 03).

Set L2P_EVAL_CACHE=0 to compute every evaluation afresh (nothing is read or written).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import pandas as pd
import torch

NAME = "toy_eval"
_PLAIN = (str, int, float, bool, type(None))


def enabled() -> bool:
    """False when $L2P_EVAL_CACHE is 0/no/false/off."""
    return os.environ.get("L2P_EVAL_CACHE", "1").strip().lower() not in {"0", "no", "false", "off"}


def _plain(obj) -> bool:
    """JSON made of plain values only: anything else (a callback, a tensor) cannot be keyed faithfully."""
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in obj.items())
    return isinstance(obj, _PLAIN)


def _prompts_digest(prompts: Sequence) -> str:
    from ..cache import _jsonable
    blob = json.dumps([_jsonable(p) for p in prompts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _context(world) -> dict:
    """What decides every cached result besides its own inputs: the world's weights, threads, libraries."""
    from ..cache import library_versions
    return {"world": world.fingerprint, "threads": torch.get_num_threads(), "libraries": library_versions()}


def _model(*modules) -> dict:
    """A model's identity: its weights, and the first module's config (what it predicts changes no weight)."""
    from .world import weights_fingerprint
    return {"weights": weights_fingerprint(*modules), "config": modules[0].cfg.to_dict()}


def _cached(name: str, key: dict, compute: Callable, save: Callable, load: Callable):
    from ..cache import cached
    return cached(name, key, 0, build_fn=compute, save_fn=save, load_fn=load, threads=torch.get_num_threads())


def evaluation_key(world, pipe, prompts: Sequence, settings: dict) -> Optional[dict]:
    """The key of one evaluation, or None when it cannot be keyed (then it is computed, never cached).

    Only the world's own pipelines qualify: a latent or pixel pipeline over the world's text encoder, with
    plain-valued settings.
    """
    from ..pipeline import L2PPipeline, LatentPipeline

    if type(pipe) not in (L2PPipeline, LatentPipeline) or pipe.text_encoder is not world.text:
        return None
    if not _plain(settings):
        return None
    modules = [pipe.dit] + ([pipe.vae] if isinstance(pipe, LatentPipeline) else [])
    return {**_context(world), "pipeline": type(pipe).__name__, **_model(*modules), "dtype": str(pipe.dtype),
            "device": str(pipe.device), "prompts": _prompts_digest(prompts), "n_prompts": len(prompts),
            "settings": settings}


def _save(result: dict, path: Path) -> None:
    from safetensors.torch import save_file
    save_file({"images": result["images"].contiguous()}, str(path / "images.safetensors"))
    scalars = {k: result[k] for k in ("geneval", "fid", "kid", "spectral")}
    (path / "result.json").write_text(json.dumps({"scalars": scalars,
                                                  "scores": result["scores"].to_dict("records")}))


def _load(path: Path, reference: Callable[[], torch.Tensor]) -> dict:
    from safetensors.torch import load_file
    from .evaluator import Evaluator
    data = json.loads((path / "result.json").read_text())
    scores = pd.DataFrame(data["scores"])  # the judge builds its frame from the same records
    return {"images": load_file(str(path / "images.safetensors"))["images"], "reference": reference(),
            "scores": scores, "summary": Evaluator.summary(scores), **data["scalars"]}


def cached_evaluation(world, pipe, prompts: Sequence, settings: dict, compute: Callable[[], dict],
                      reference: Callable[[], torch.Tensor]) -> dict:
    """`compute()`'s result, from the cache when this evaluation was done before (`reference()` re-renders the
    ground truth, which is cheap, instead of storing it)."""
    key = evaluation_key(world, pipe, prompts, settings) if enabled() else None
    if key is None:
        return compute()
    return _cached(NAME, key, compute, _save, lambda p: _load(p, reference))


def cached_table(world, name: str, models: dict, params: dict, compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """`compute()`'s table, cached under `name` by the world's and each model's weights and `params` (plain
    values); the floats come back exactly, the index (one level or several) with its names. Models that are
    not the project's DiTs (a test's lambda) cannot be keyed: then the table is computed and not stored."""
    if not enabled() or not _plain(params) or not all(hasattr(m, "cfg") and hasattr(m, "state_dict")
                                                       for m in models.values()):
        return compute()
    key = {**_context(world), "params": params, "models": {label: _model(m) for label, m in models.items()}}

    def save(df: pd.DataFrame, path: Path) -> None:
        split = df.to_dict("split")
        (path / "table.json").write_text(json.dumps({**split, "index_names": list(df.index.names)}))

    def load(path: Path) -> pd.DataFrame:
        d = json.loads((path / "table.json").read_text())
        names = d.get("index_names") or [d.get("index_name")]  # one name in entries written before session 21
        index = (pd.MultiIndex.from_tuples([tuple(i) for i in d["index"]], names=names) if len(names) > 1
                 else pd.Index(d["index"], name=names[0]))
        return pd.DataFrame(d["data"], index=index, columns=d["columns"])

    return _cached(f"toy_{name}", key, compute, save, load)
