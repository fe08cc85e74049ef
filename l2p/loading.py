"""Strict, low-memory loading of checkpoints into a model built on the meta device."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn

from .config import DiTConfig


class LoadError(KeyError):
    """A checkpoint whose keys or shapes do not match the model; the message names keys and files."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


def config_for_checkpoint(files: list[Path], reader) -> DiTConfig:
    """The DiTConfig of a checkpoint: l2p metadata, else a diffusers-style config.json beside it, else its shapes."""
    from .checkpoint import checkpoint_config

    cfg = checkpoint_config(reader)
    cfg_json = Path(files[0]).parent / "config.json"
    if "l2p_config" in reader.metadata or not cfg_json.exists():
        return cfg
    try:
        d = json.loads(cfg_json.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_json}: not valid JSON ({e})") from None
    if "dim" not in d or "n_layers" not in d:
        return cfg
    # config.json knows what shapes cannot tell (axes_lens, rope_theta …); the shapes say which form.
    return DiTConfig.from_dict({**d, "detailer": cfg.detailer, "all_patch_size": cfg.all_patch_size,
                                "all_f_patch_size": cfg.all_f_patch_size, "in_channels": cfg.in_channels})


def _describe(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_keys(model: nn.Module, reader, strict: bool = True) -> list[str]:
    """Compare a model's state-dict keys/shapes with a checkpoint's; raise LoadError naming the culprits."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = set(reader.keys())
    missing, unexpected = set(expected) - found, found - set(expected)
    bad_shape = [k for k in set(expected) & found if tuple(reader.shape(k)) != expected[k]]
    problems = []
    if bad_shape:
        k = sorted(bad_shape)[0]
        problems.append(f"{len(bad_shape)} shape mismatch(es), first {k}: checkpoint {tuple(reader.shape(k))} "
                        f"in {reader.file_of(k)} vs model {expected[k]}; all: {_describe(bad_shape)}")
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): {_describe(missing)}")
    if strict and unexpected:
        files = sorted({str(reader.file_of(k)) for k in unexpected})
        problems.append(f"{len(unexpected)} unexpected key(s): {_describe(unexpected)} (from {', '.join(files)})")
    if problems:
        raise LoadError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    return sorted(missing)


def _assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Replace the parameter or buffer `key` of a (meta) model by `tensor` without copying."""
    mod_name, _, name = key.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if name in mod._parameters:
        mod._parameters[name] = nn.Parameter(tensor, requires_grad=mod._parameters[name].requires_grad)
    else:
        mod._buffers[name] = tensor


def load_into(model: nn.Module, reader, dtype: torch.dtype = torch.float32,
              device: Union[str, torch.device] = "cpu", strict: bool = True) -> nn.Module:
    """Read, cast and assign one tensor at a time (mixed-dtype files welcome: each is cast to `dtype`)."""
    missing = check_keys(model, reader, strict)
    expected = set(model.state_dict())
    for key in reader.keys():
        if key in expected:
            _assign(model, key, reader.get(key, dtype=dtype, device=device))
    if missing:  # non-strict: leave a usable (zero) tensor rather than a meta one
        sd = model.state_dict()
        for key in missing:
            _assign(model, key, torch.zeros(sd[key].shape, dtype=dtype, device=device))
    return model
