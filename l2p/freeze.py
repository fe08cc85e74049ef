"""Freeze policies: which DiT parameters are trained, chosen by parameter name.

Names follow the release's state dict (z_image_facts.md, l2p_key_mapping.md): ``x_pad_token``, ``cap_pad_token``,
``all_x_embedder.*``, ``t_embedder.*``, ``cap_embedder.*``, ``noise_refiner.*``, ``context_refiner.*``,
``layers.{i}.*``, ``local_decoder.*`` (pixel model) and ``all_final_layer.*`` (latent model). Leading wrapper
prefixes (``module.`` from DDP, ``_orig_mod.`` from torch.compile) are ignored when matching.

Policies:

* ``paper``: what the release's code trains (``freeze_except(["dit"])`` in ``base_pipeline_L2P.py``): unfreeze
  the whole DiT, then freeze the main layers n … N−n−1 (n = 5: layers 5–24 of 30). **Note:** the paper's summary
  says "input projection, first and last DiT blocks, Detailer Head", but the code also trains both noise refiners,
  both context refiners, ``t_embedder``, ``cap_embedder`` and the two pad tokens. We follow the code: for L2P 1K
  that is 245 tensors / 2,548,257,795 parameters trained, 300 / 3,618,206,720 frozen. With 2n ≥ N nothing is frozen
  (the release's slice ``layers[n:N-n]`` is then empty).
* ``full``: everything.
* ``head-only``: the Detailer Head (``local_decoder``); for a latent model, the final layer.
* ``embedder+head``: the patch embedder (``all_x_embedder``) plus the head as above.
* ``custom``: nothing, before ``include``/``exclude``.

``include`` / ``exclude`` are glob patterns (fnmatch, ``*`` also crosses dots) applied after any policy:
trainable = (policy ∪ include) − exclude. A pattern that matches no parameter is an error (it is usually a typo).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Iterable, Mapping, Optional, Sequence

import torch.nn as nn

POLICIES = ("paper", "full", "head-only", "embedder+head", "custom")
_ALIASES = {"head_only": "head-only", "headonly": "head-only", "embedder_head": "embedder+head",
            "embedder-head": "embedder+head", "release": "paper"}
_WRAPPERS = ("module.", "_orig_mod.")
_LAYER = re.compile(r"layers\.(\d+)\.")

# Row order of the parameter table; "layers" rows are inserted as ranges.
GROUPS = ("pad_tokens", "x_embedder", "t_embedder", "cap_embedder", "noise_refiner", "context_refiner", "layers",
          "local_decoder", "final_layer", "other")
_PREFIXES = (("x_pad_token", "pad_tokens"), ("cap_pad_token", "pad_tokens"), ("all_x_embedder.", "x_embedder"),
             ("t_embedder.", "t_embedder"), ("cap_embedder.", "cap_embedder"), ("noise_refiner.", "noise_refiner"),
             ("context_refiner.", "context_refiner"), ("local_decoder.", "local_decoder"),
             ("all_final_layer.", "final_layer"))


# ----------------------------------------------------------------------------------------------
#                                       Name parsing
# ----------------------------------------------------------------------------------------------

def canonical(name: str) -> str:
    """The name without DDP / torch.compile wrapper prefixes."""
    changed = True
    while changed:
        changed = False
        for w in _WRAPPERS:
            if name.startswith(w):
                name, changed = name[len(w):], True
    return name


def param_group(name: str) -> tuple[str, Optional[int]]:
    """(group, main-layer index or None) of a parameter name."""
    name = canonical(name)
    m = _LAYER.match(name)
    if m:
        return "layers", int(m.group(1))
    for prefix, group in _PREFIXES:
        if name == prefix or name.startswith(prefix):
            return group, None
    return "other", None


def infer_n_layers(names: Iterable[str]) -> int:
    """Number of main layers: the largest ``layers.{i}`` index + 1 (0 if there are none)."""
    idx = [i for g, i in map(param_group, names) if g == "layers"]
    return max(idx) + 1 if idx else 0


def normalize_policy(policy: str) -> str:
    """The canonical policy name; errors list the known ones."""
    p = _ALIASES.get(policy.lower(), policy.lower())
    if p not in POLICIES:
        raise ValueError(f"unknown freeze policy {policy!r}; known: {list(POLICIES)}")
    return p


# ----------------------------------------------------------------------------------------------
#                                         Policies
# ----------------------------------------------------------------------------------------------

def _head(names: Sequence[str]) -> set[str]:
    """The output head: local_decoder for the pixel model, the final layer for a latent one."""
    groups = {n: param_group(n)[0] for n in names}
    head = {n for n, g in groups.items() if g == "local_decoder"}
    head = head or {n for n, g in groups.items() if g == "final_layer"}
    if not head:
        raise ValueError("no head parameters: neither local_decoder.* nor all_final_layer.* is present")
    return head


def paper_frozen_layers(n_layers: int, n: int = 5) -> range:
    """The main layers the release freezes: n … N−n−1 (empty when 2n ≥ N)."""
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    return range(n, max(n, n_layers - n))


def _matching(names: Sequence[str], patterns: Sequence[str], what: str) -> set[str]:
    """Names matching any glob pattern; a pattern without a match raises."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out = set()
    for pat in patterns:
        hit = {n for n in names if fnmatchcase(canonical(n), pat)}
        if not hit:
            raise ValueError(f"{what} pattern {pat!r} matches no parameter "
                             f"(names look like {sorted(names)[:3]}…)")
        out |= hit
    return out


def trainable_names(names: Iterable[str], policy: str = "paper", n_layers: Optional[int] = None, n: int = 5,
                    include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None) -> set[str]:
    """The names a policy trains, then ∪ include, − exclude (glob patterns)."""
    names = list(names)
    policy = normalize_policy(policy)
    found = infer_n_layers(names)
    if n_layers is None:
        n_layers = found
    elif found > n_layers:
        raise ValueError(f"names contain layers.{found - 1} but n_layers={n_layers}")

    if policy == "paper":
        frozen = {("layers", i) for i in paper_frozen_layers(n_layers, n)}
        chosen = {x for x in names if param_group(x) not in frozen}
    elif policy == "full":
        chosen = set(names)
    elif policy == "head-only":
        chosen = _head(names)
    elif policy == "embedder+head":
        emb = {x for x in names if param_group(x)[0] == "x_embedder"}
        if not emb:
            raise ValueError("embedder+head: no all_x_embedder.* parameters")
        chosen = emb | _head(names)
    else:  # custom
        chosen = set()
    if include:
        chosen |= _matching(names, include, "include")
    if exclude:
        chosen -= _matching(names, exclude, "exclude")
    return chosen


# ----------------------------------------------------------------------------------------------
#                                      Tables and summary
# ----------------------------------------------------------------------------------------------

def _named_shapes(params) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) pairs from a module, a {name: shape or tensor} mapping, or an iterable of pairs."""
    if isinstance(params, nn.Module):
        items = params.named_parameters()
    elif isinstance(params, Mapping):
        items = params.items()
    else:
        items = params
    return [(name, tuple(getattr(s, "shape", s))) for name, s in items]


def _status(n_trainable: int, n_total: int) -> str:
    return "trainable" if n_trainable == n_total else "frozen" if n_trainable == 0 else "partial"


def parameter_table(params, trainable: Iterable[str]):
    """Per-group tensor and parameter counts, trainable vs frozen, with a ``total`` row (a pandas DataFrame).

    Main layers are shown as contiguous ranges of equal status, e.g. ``layers 0-4`` trainable,
    ``layers 5-24`` frozen, ``layers 25-29`` trainable.
    """
    import pandas as pd

    trainable = set(trainable)
    acc: dict[tuple, list[int]] = {}  # key → [tensors, params, trainable tensors, trainable params]
    for name, shape in _named_shapes(params):
        group, layer = param_group(name)
        a = acc.setdefault((group, layer), [0, 0, 0, 0])
        numel, on = math.prod(shape), name in trainable
        a[0] += 1
        a[1] += numel
        a[2] += on
        a[3] += numel * on

    rows = []
    def add(label, a):
        rows.append(dict(group=label, status=_status(a[2], a[0]), tensors=a[0], params=a[1],
                         trainable_tensors=a[2], trainable_params=a[3], frozen_params=a[1] - a[3]))

    for group in GROUPS:
        if group != "layers":
            if (group, None) in acc:
                add(group, acc[(group, None)])
            continue
        layers = sorted(i for g, i in acc if g == "layers")
        start = 0
        while start < len(layers):  # merge consecutive layers of equal status into one range row
            end, st = start, _status(acc[("layers", layers[start])][2], acc[("layers", layers[start])][0])
            while (end + 1 < len(layers) and layers[end + 1] == layers[end] + 1
                   and _status(acc[("layers", layers[end + 1])][2], acc[("layers", layers[end + 1])][0]) == st):
                end += 1
            total = [sum(acc[("layers", layers[k])][j] for k in range(start, end + 1)) for j in range(4)]
            add(f"layers {layers[start]}-{layers[end]}", total)
            start = end + 1
    grand = [sum(v[j] for v in acc.values()) for j in range(4)]
    add("total", grand)
    return pd.DataFrame(rows, columns=["group", "status", "tensors", "params", "trainable_tensors",
                                       "trainable_params", "frozen_params"])


def format_table(table) -> str:
    """The parameter table as aligned text with thousands separators."""
    fmt = {c: "{:,}".format for c in ("tensors", "params", "trainable_tensors", "trainable_params", "frozen_params")}
    return table.to_string(index=False, formatters=fmt)


@dataclass
class FreezeSummary:
    """What apply_policy did: the trainable names and the per-group table."""

    policy: str
    trainable: set
    table: object  # pandas DataFrame

    def _total(self, col: str) -> int:
        return int(self.table.loc[self.table.group == "total", col].iloc[0])

    @property
    def trainable_params(self) -> int:
        return self._total("trainable_params")

    @property
    def frozen_params(self) -> int:
        return self._total("frozen_params")

    @property
    def trainable_tensors(self) -> int:
        return self._total("trainable_tensors")

    def __str__(self) -> str:
        total = self.trainable_params + self.frozen_params
        pct = 100.0 * self.trainable_params / max(total, 1)
        head = (f"freeze policy {self.policy!r}: {self.trainable_params:,} trainable ({pct:.1f}%), "
                f"{self.frozen_params:,} frozen, {self.trainable_tensors} / {self._total('tensors')} tensors")
        return head + "\n" + format_table(self.table)


def apply_policy(model: nn.Module, policy: str = "paper", n: int = 5, include: Optional[Sequence[str]] = None,
                 exclude: Optional[Sequence[str]] = None, n_layers: Optional[int] = None) -> FreezeSummary:
    """Set requires_grad on every parameter of ``model`` by the policy; return the summary (print it)."""
    names = [name for name, _ in model.named_parameters()]
    if n_layers is None and isinstance(getattr(model, "layers", None), nn.ModuleList):
        n_layers = len(model.layers)
    chosen = trainable_names(names, policy, n_layers=n_layers, n=n, include=include, exclude=exclude)
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
    label = normalize_policy(policy) + (f" n={n}" if normalize_policy(policy) == "paper" else "")
    return FreezeSummary(policy=label, trainable=chosen, table=parameter_table(model, chosen))
