"""The toy GenEval: a small CNN judge trained on procedural ground truth, and GenEval-style scoring.

The judge reads a scene as a 3×3 grid: for every cell it predicts empty-or-shape, colour and size, plus one
background type per image. Count, absolute position and relative position all follow from the grid, so
single- and multi-object prompts are scored by the same network. It trains on *independent* random
objects (no correlations between cells to lean on) with blur / noise / colour-jitter augmentation so it
can also read the softer images a generator makes. The background head only learns from lightly blurred
images: a flat decoded background should read as "plain", not as a guess at the lost texture.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .scenes import (BACKGROUNDS, CATEGORY_CHECKS, COLORS, POSITIONS, SHAPES, SIZES, Prompt, Scene,
                     ToyWorldConfig, _relation_holds, evaluator_world, generate, parse_caption, prompt_set, render,
                     scene_labels, to_tensor)

COLOR_NAMES = tuple(COLORS)
DEFAULT_CATEGORY = {"single": "full", "counting": "counting", "two_object": "relation", "mixed": "mixed"}
ALL_CHECKS = ("count", "shape", "color", "size", "position", "background", "objects", "relation")


# ----------------------------------------------------------------------------------------------
#                                          Network
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JudgeConfig:
    """Judge network sizes."""

    width: int = 16
    cell_dim: int = 32  # per-cell hidden features
    background_dim: int = 32
    image_size: int = 64  # inputs of other sizes are resized to this


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class JudgeNet(nn.Module):
    """Conv stack 64² → 8², read at the 3×3 cell centres by shared per-cell heads, plus a background head.

    Sharing one head over the nine cells makes each training image nine examples; the final map's
    receptive field (43 px) covers a whole object around each cell centre. The background head pools the
    stride-2 map, where the 3–5 px textures are still resolved, together with the final map.
    """

    def __init__(self, cfg: JudgeConfig = JudgeConfig()):
        super().__init__()
        w = cfg.width
        self.cfg = cfg
        self.early = nn.Sequential(_conv(3, w, 2), _conv(w, w, 1))  # 32²
        self.late = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w, 1), _conv(2 * w, 4 * w, 2),
                                  _conv(4 * w, 4 * w, 1))  # 8²
        self.cell_mlp = nn.Sequential(nn.Conv2d(4 * w, cfg.cell_dim, 1), nn.ReLU(inplace=True))
        self.cell_head = nn.Conv2d(cfg.cell_dim, len(SHAPES) + 1 + len(COLOR_NAMES) + len(SIZES), 1)
        self.bg_mlp = nn.Sequential(nn.Linear(5 * w, cfg.background_dim), nn.ReLU(inplace=True))
        self.bg_head = nn.Linear(cfg.background_dim, len(BACKGROUNDS))
        c = (torch.arange(3) + 0.5) / 3 * 2 - 1  # cell centres in grid_sample's [-1, 1] coordinates
        gy, gx = torch.meshgrid(c, c, indexing="ij")
        self.register_buffer("centres", torch.stack([gx, gy], -1)[None], persistent=False)  # (1, 3, 3, 2)

    @property
    def feature_dim(self) -> int:
        return 9 * self.cfg.cell_dim + self.cfg.background_dim

    def _hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-cell hidden (N, cell_dim, 3, 3), background hidden (N, background_dim))."""
        s = self.cfg.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        e = self.early(x)
        h = self.late(e)
        cells = F.grid_sample(h, self.centres.expand(len(x), -1, -1, -1), mode="bilinear", align_corners=False)
        bg = self.bg_mlp(torch.cat([e.mean(dim=(2, 3)), h.mean(dim=(2, 3))], 1))
        return self.cell_mlp(cells), bg

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N, feature_dim) of images in [-1, 1]: every cell's and the background's."""
        cells, bg = self._hidden(x)
        return torch.cat([cells.flatten(1), bg], 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        cells, bg = self._hidden(x)
        logits = self.cell_head(cells).flatten(2).transpose(1, 2)  # (N, 9, classes), cells row-major
        ns, nc = len(SHAPES) + 1, len(COLOR_NAMES)
        return {"cell_shape": logits[..., :ns], "cell_color": logits[..., ns:ns + nc],
                "cell_size": logits[..., ns + nc:], "background": self.bg_head(bg)}


# ----------------------------------------------------------------------------------------------
#                                       Augmentation
# ----------------------------------------------------------------------------------------------

def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """Separable Gaussian blur with one σ per image (σ≈0 leaves the image as is)."""
    n, c, h, w = x.shape
    d = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-d[None] ** 2 / (2 * sigma.clamp(min=1e-3)[:, None].to(x.dtype) ** 2))
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n·c, 2r+1)
    y = F.pad(x.reshape(1, n * c, h, w), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Blur / noise / colour jitter as a generator's images might show them; returns (x, background_readable)."""
    n = len(x)
    u = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    sigma = torch.where(u(n) < 0.5, 0.3 + 1.2 * u(n), torch.zeros(n))
    x = gaussian_blur(x, sigma)
    noise_std = torch.where(u(n) < 0.4, 0.03 * u(n), torch.zeros(n))
    x = x + noise_std.view(n, 1, 1, 1) * torch.randn(x.shape, generator=gen)
    gain = 1 + 0.12 * (u(n, 3, 1, 1) - 0.5)
    offset = 0.12 * (u(n, 1, 1, 1) - 0.5)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * gain + mean + offset
    return x.clamp(-1, 1), sigma < 0.6


# ----------------------------------------------------------------------------------------------
#                                         Training
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvaluatorTrainConfig:
    """How to train the judge (fresh procedural data every step)."""

    steps: int = 1000
    batch_size: int = 32  # more, smaller steps beat fewer large ones here (0.88 vs 0.69 at equal compute)
    lr: float = 3e-3
    warmup: int = 30
    seed: int = 0
    augment: bool = True
    net: JudgeConfig = field(default_factory=JudgeConfig)
    world: ToyWorldConfig = field(default_factory=evaluator_world)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **kw) -> "EvaluatorTrainConfig":
        return replace(self, **kw)


EVALUATOR_MODES = {
    "full": EvaluatorTrainConfig(),
    "smoke": EvaluatorTrainConfig(steps=10, batch_size=16, net=JudgeConfig(width=8, cell_dim=8, background_dim=8)),
}


def evaluator_train_config(mode: Union[str, EvaluatorTrainConfig] = "full") -> EvaluatorTrainConfig:
    """A preset by mode name ("full", "smoke"), or the config passed through."""
    return mode if isinstance(mode, EvaluatorTrainConfig) else EVALUATOR_MODES[mode]


def _batch(cfg: EvaluatorTrainConfig, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Training batch `step` of the judge's stream."""
    imgs, _, scenes = generate(cfg.batch_size, cfg.seed, cfg.world, start=step * cfg.batch_size)
    labels = [scene_labels(s) for s in scenes]
    return to_tensor(imgs), {k: torch.as_tensor(np.stack([lab[k] for lab in labels])) for k in labels[0]}


def judge_loss(out: dict, y: dict, bg_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of the per-cell cross-entropies and the (masked) background cross-entropy."""
    loss = F.cross_entropy(out["cell_shape"].flatten(0, 1), y["cell_shape"].flatten())
    loss = loss + F.cross_entropy(out["cell_color"].flatten(0, 1), y["cell_color"].flatten(), ignore_index=-100)
    loss = loss + F.cross_entropy(out["cell_size"].flatten(0, 1), y["cell_size"].flatten(), ignore_index=-100)
    bg = y["background"] if bg_mask is None else torch.where(bg_mask, y["background"], -100)
    if (bg != -100).any():
        loss = loss + F.cross_entropy(out["background"], bg, ignore_index=-100)
    return loss


def train_evaluator(cfg: Union[str, EvaluatorTrainConfig] = "full", progress: bool = True, eval_every: int = 0,
                    eval_n: int = 200) -> tuple["Evaluator", pd.DataFrame]:
    """Train the judge; returns (Evaluator, history). `eval_every` > 0 logs held-out accuracy on the way."""
    cfg = evaluator_train_config(cfg)
    torch.manual_seed(cfg.seed)
    net = JudgeNet(cfg.net).train()
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / cfg.steps))))
    gen = torch.Generator().manual_seed(cfg.seed)
    rows, t0 = [], time.perf_counter()
    for step in tqdm(range(cfg.steps), desc="toy judge", disable=not progress):
        x, y = _batch(cfg, step)
        mask = None
        if cfg.augment:
            x, mask = augment(x, gen)
        out = net(x)
        loss = judge_loss(out, y, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        rows.append(dict(step=step, loss=loss.item(), time=time.perf_counter() - t0))
        if eval_every and ((step + 1) % eval_every == 0 or step + 1 == cfg.steps):
            _, summ = held_out_accuracy(Evaluator(net.eval(), cfg.world), eval_n)
            net.train()
            rows[-1].update({f"acc/{k}": v for k, v in summ["accuracy"].items()})
            if progress:
                tqdm.write(f"step {step + 1}: loss {np.mean([r['loss'] for r in rows[-eval_every:]]):.3f} "
                           + " ".join(f"{k[:6]} {v:.2f}" for k, v in summ["accuracy"].items()))
    return Evaluator(net.eval().requires_grad_(False), cfg.world), pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
#                                          Scoring
# ----------------------------------------------------------------------------------------------

def _target(p) -> tuple[dict, Optional[str], str]:
    """(attribute dict, category or None, text) of a Prompt, Scene, caption or attribute dict."""
    if isinstance(p, Prompt):
        return p.scene.attributes(), p.category, p.text
    if isinstance(p, Scene):
        return p.attributes(), None, ""
    if isinstance(p, str):
        return parse_caption(p), None, p
    if isinstance(p, dict):
        return p, None, ""
    raise TypeError(f"cannot score against {type(p).__name__}")


def _check(pred: dict, tgt: dict) -> dict:
    """Every check that applies to the target's kind (True/False); the rest are absent."""
    objs, kind, n = pred["objects"], tgt["kind"], tgt["count"]
    t = tgt["objects"]
    c = {"count": pred["count"] == n, "background": pred["background"] == tgt["background"]}
    if kind == "single":
        o = max(objs, key=lambda o: o["confidence"]) if objs else None  # the most confident object
        for a in ("shape", "color", "size", "position"):
            c[a] = o is not None and o[a] == t[0][a]
    elif kind == "counting":
        for a in ("shape", "color", "size"):
            c[a] = bool(objs) and all(o[a] == t[0][a] for o in objs)
    elif kind == "two_object":
        pairs = lambda os: sorted((o["shape"], o["color"]) for o in os)  # noqa: E731
        c["shape"] = sorted(o["shape"] for o in objs) == sorted(o["shape"] for o in t)
        c["color"] = sorted(o["color"] for o in objs) == sorted(o["color"] for o in t)
        c["objects"] = len(objs) == 2 and pairs(objs) == pairs(t)
        if c["objects"]:
            find = lambda a: next(o for o in objs if (o["shape"], o["color"]) == (a["shape"], a["color"]))  # noqa
            a, b = find(t[0]), find(t[1])
            c["size"] = a["size"] == t[0]["size"] and b["size"] == t[1]["size"]
            c["relation"] = _relation_holds(tgt["relation"], a["position"], b["position"])
        else:
            c["size"] = c["relation"] = False
    elif kind == "mixed":
        key = lambda os: sorted((o["position"], o["shape"], o["color"], o["size"]) for o in os)  # noqa: E731
        c["objects"] = key(objs) == key(t)
    return c


class Evaluator:
    """A trained judge: predictions, GenEval-style scores, and features for FID/KID."""

    def __init__(self, net: JudgeNet, world: ToyWorldConfig = ToyWorldConfig(), batch_size: int = 256):
        self.net, self.world, self.batch_size = net.eval(), world, batch_size

    @property
    def feature_dim(self) -> int:
        return self.net.feature_dim

    @torch.no_grad()
    def _forward(self, images) -> dict[str, torch.Tensor]:
        from ..metrics import to_float

        x = to_float(images)
        outs = [self.net(xb) for xb in x.split(self.batch_size)]
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        """Penultimate-layer features (N, D) for FID / KID."""
        from ..metrics import to_float

        x = to_float(images)
        return torch.cat([self.net.features(xb) for xb in x.split(self.batch_size)])

    def predict(self, images) -> list[dict]:
        """Read each image as an attribute dict (count, objects with cell positions, background)."""
        out = self._forward(images)
        p_shape = out["cell_shape"].softmax(-1)
        shape_id = p_shape.argmax(-1)  # 0 = empty
        color_id, size_id = out["cell_color"].argmax(-1), out["cell_size"].argmax(-1)
        bg_id = out["background"].argmax(-1)
        preds = []
        for i in range(len(shape_id)):
            objs = [{"shape": SHAPES[int(shape_id[i, j]) - 1], "color": COLOR_NAMES[int(color_id[i, j])],
                     "size": SIZES[int(size_id[i, j])], "position": POSITIONS[j],
                     "confidence": float(1 - p_shape[i, j, 0])}
                    for j in range(9) if shape_id[i, j] > 0]
            preds.append({"count": len(objs), "objects": objs, "background": BACKGROUNDS[int(bg_id[i])]})
        return preds

    def score(self, images, prompts: Sequence, categories: Optional[Sequence[str]] = None) -> pd.DataFrame:
        """One row per image: category, `correct` (all of the category's checks), every applicable check.

        `prompts` are `Prompt`s (category included), `Scene`s, captions or attribute dicts; without a
        category, single scenes are scored as "full", counting as "counting", two-object as "relation".
        `categories` (one name, or one per image) overrides the prompts' own.
        """
        preds = self.predict(images)
        if isinstance(categories, str):
            categories = [categories] * len(preds)
        if len(preds) != len(prompts):
            raise ValueError(f"{len(preds)} images but {len(prompts)} prompts")
        rows = []
        for i, (pred, p) in enumerate(zip(preds, prompts)):
            tgt, cat, text = _target(p)
            cat = (categories[i] if categories is not None else None) or cat or DEFAULT_CATEGORY[tgt["kind"]]
            checks = _check(pred, tgt)
            row = {"index": i, "category": cat, "prompt": text,
                   "correct": all(checks[k] for k in CATEGORY_CHECKS[cat])}
            row.update({k: checks.get(k) for k in ALL_CHECKS})
            row.update(pred_count=pred["count"], pred_background=pred["background"],
                       pred_objects="; ".join(f"{o['size']} {o['color']} {o['shape']} @ {o['position']}"
                                             for o in pred["objects"]))
            rows.append(row)
        return pd.DataFrame(rows)

    @staticmethod
    def summary(df: pd.DataFrame) -> pd.DataFrame:
        """Accuracy and count per category, then "overall" = mean of the category accuracies (as GenEval)."""
        s = df.groupby("category", sort=False)["correct"].agg(accuracy="mean", n="size")
        overall = pd.DataFrame({"accuracy": [s["accuracy"].mean()], "n": [int(s["n"].sum())]}, index=["overall"])
        return pd.concat([s, overall])

    @staticmethod
    def attribute_accuracy(df: pd.DataFrame) -> pd.Series:
        """Accuracy of every individual check over the rows it applies to."""
        return pd.Series({k: df[k].dropna().astype(bool).mean() for k in ALL_CHECKS if df[k].notna().any()})

    @staticmethod
    def scorecard(df: pd.DataFrame) -> dict:
        """Toy-GenEval overall ("geneval") and the accuracy of every check, as one flat dict (a table row)."""
        return {"geneval": float(Evaluator.summary(df).loc["overall", "accuracy"]),
                **Evaluator.attribute_accuracy(df).to_dict()}

    @staticmethod
    def accuracy_by_size(df: pd.DataFrame, prompts: Sequence) -> pd.DataFrame:
        """Shape and whole-prompt accuracy grouped by the size of the prompt's objects ("mixed" if they differ).

        At 64² an object spans about one 16-px patch, so its outline is drawn inside a token: this split shows
        whether small objects are where a model loses its shapes.
        """
        sizes = [{o.size for o in p.scene.objects} for p in prompts]
        group = pd.Series([s.pop() if len(s) == 1 else "mixed" for s in sizes], name="objects")
        rows = df.assign(objects=group.reindex(df["index"].values).values)
        return rows.groupby("objects").agg(shape=("shape", lambda s: s.dropna().astype(bool).mean()),
                                           correct=("correct", "mean"), n=("correct", "size"))

    @staticmethod
    def side_by_side(frames: dict) -> pd.DataFrame:
        """Several score frames (label -> `score` rows) as one table: accuracy per category, "overall", then
        every individual check ("check: shape", …); a row missing from a frame is NaN."""
        cols = {}
        for label, df in frames.items():
            checks = Evaluator.attribute_accuracy(df)
            cols[label] = pd.concat([Evaluator.summary(df)["accuracy"], checks.rename(lambda k: f"check: {k}")])
        seen = list(dict.fromkeys(k for c in cols.values() for k in c.index))  # first-seen order, not sorted
        categories = [k for k in seen if k != "overall" and not k.startswith("check: ")]
        return pd.DataFrame(cols).reindex(categories + ["overall"] + [k for k in seen if k.startswith("check: ")])

    @staticmethod
    def ceiling_readout(limits: pd.DataFrame, best_cfg: float, goal: float = 0.8) -> list[str]:
        """What holds a latent source below `goal`, in words, from `side_by_side` of (ground truth, VAE
        reconstructions of it, the source, the source at its best cfg), in that column order."""
        gt, ceiling, best = (limits.loc["overall"].iloc[i] for i in (0, 1, 3))
        checks = limits[limits.index.str.startswith("check: ")].rename(lambda k: k[len("check: "):])
        held = checks.iloc[:, 1][checks.iloc[:, 1] < 0.9].sort_values()  # what the VAE itself costs
        short = (checks.iloc[:, 1] - checks.iloc[:, 3]).sort_values(ascending=False).head(2)  # what the source adds
        return [f"goal {goal:.2f}: the source scores {best:.3f} at its best cfg {best_cfg:g}; the ceiling of any "
                f"latent model through this VAE is {ceiling:.3f} ({'below' if ceiling < goal else 'above'} the goal), "
                f"ground truth {gt:.3f}.",
                "checks the VAE reconstructions fail most: " + ", ".join(f"{k} {v:.2f}" for k, v in held.items()),
                "checks where the source falls furthest below the ceiling: "
                + ", ".join(f"{k} ({checks.loc[k].iloc[3]:.2f} vs {checks.loc[k].iloc[1]:.2f})" for k in short.index)]

    # ---- persistence ----
    def save(self, path: Union[str, Path]) -> None:
        """Weights (safetensors-free torch file) and configs as JSON."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        torch.save(self.net.state_dict(), path / "judge.pt")
        (path / "judge.json").write_text(json.dumps({"net": asdict(self.net.cfg), "world": self.world.to_dict()}))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Evaluator":
        """Inverse of `save`."""
        path = Path(path)
        meta = json.loads((path / "judge.json").read_text())
        world = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                 for k, v in meta["world"].items()}
        net = JudgeNet(JudgeConfig(**meta["net"]))
        net.load_state_dict(torch.load(path / "judge.pt", weights_only=True))
        return cls(net.eval().requires_grad_(False), ToyWorldConfig(**world))


def held_out_accuracy(evaluator: Evaluator, n: int = 800, seed: int = 4321,
                      world: ToyWorldConfig = ToyWorldConfig(), categories: Optional[Sequence[str]] = None
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score the judge on ground-truth renders of a prompt set: (per-image scores, summary)."""
    prompts = prompt_set(n, seed, world, categories)
    imgs = np.stack([render(p.scene, world.size) for p in prompts])
    df = evaluator.score(imgs, prompts)
    return df, Evaluator.summary(df)


def load_or_train_evaluator(mode: Union[str, EvaluatorTrainConfig] = "full", progress: bool = True,
                            rebuild: bool = False) -> Evaluator:
    """The cached judge for this config (trained and stored on a miss)."""
    from ..cache import cached

    cfg = evaluator_train_config(mode)

    def save(art, p):
        art[0].save(p)
        art[1].to_csv(Path(p) / "history.csv", index=False)

    return cached("toy_evaluator", cfg.to_dict(), cfg.seed, build_fn=lambda: train_evaluator(cfg, progress),
                  save_fn=save, load_fn=Evaluator.load, rebuild=rebuild)
