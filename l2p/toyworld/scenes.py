"""Procedural captioned images: a few coloured shapes on a 3×3 grid over textured backgrounds.

Every image is a deterministic function of a seed (numpy Generator, per-item seed sequence), so the data
is unlimited and needs no storage. Captions name every attribute the image varies in, and
`parse_caption` recovers them, which is what makes the world scoreable ("toy GenEval").

Geometry lives in *base units* of a 64-pixel canvas; rendering at another size scales all content
(shapes, stripe periods, grain cells) with the image, so a 128² render is an up-sampled 64² scene.
The backgrounds carry 3–5 px textures on purpose: a stride-8 VAE cannot represent them, a pixel model can.
"""
from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Sequence

import numpy as np
import torch

BASE = 64.0  # the canvas size the geometry is defined on

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLORS = {  # saturated and far apart in hue, so they stay readable after a blurry decoder
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.67, 0.24),
    "blue": (0.16, 0.31, 0.86),
    "yellow": (0.92, 0.82, 0.16),
    "purple": (0.59, 0.24, 0.75),
    "cyan": (0.16, 0.78, 0.82),
    "orange": (0.96, 0.55, 0.12),
    "white": (0.96, 0.96, 0.96),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
BACKGROUNDS = ("plain", "gradient", "stripes", "checks", "grain")
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("single", "counting", "two_object", "mixed")

# GenEval-style prompt categories: which scene kind they draw and which attributes they check.
CATEGORY_KIND = {
    "single_object": "single", "colors": "single", "size": "single", "position": "single",
    "background": "single", "full": "single", "counting": "counting", "two_object": "two_object",
    "relation": "two_object", "mixed": "mixed",
}
CATEGORY_CHECKS = {
    "single_object": ("count", "shape"),
    "colors": ("count", "shape", "color"),
    "size": ("count", "shape", "size"),
    "position": ("count", "shape", "position"),
    "background": ("background",),
    "full": ("count", "shape", "color", "size", "position"),  # the prototype's "all attributes right"
    "counting": ("count", "shape", "color"),
    "two_object": ("count", "objects"),
    "relation": ("count", "objects", "relation"),
    "mixed": ("count", "objects"),  # every object right, in its cell (the judge's own training kind)
}
DEFAULT_CATEGORIES = ("single_object", "colors", "size", "position", "background", "counting", "two_object",
                      "relation")

_CELL = BASE / 3
# Base units. Small shapes stay ≥ 11 px across so circle vs square survives blur; large ones (plus jitter)
# still fit one 21.3-unit grid cell, so objects in neighbouring cells never touch.
_RADIUS = {"small": (5.4, 6.2), "large": (8.4, 9.4)}
_JITTER = 0.8  # ± position jitter (base units) around the cell centre


# ----------------------------------------------------------------------------------------------
#                                        Configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToyWorldConfig:
    """Which attributes vary, and how often each scene kind is drawn."""

    size: int = 64
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "cross")
    colors: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan")
    sizes: tuple[str, ...] = SIZES
    positions: tuple[str, ...] = POSITIONS
    backgrounds: tuple[str, ...] = BACKGROUNDS
    max_objects: int = 3
    # Scene-kind mix: single objects are the bulk; counting and two-object scenes a minority.
    mix: tuple[tuple[str, float], ...] = (("single", 0.8), ("counting", 0.1), ("two_object", 0.1))

    def __post_init__(self):
        for name, vals, known in (("shapes", self.shapes, SHAPES), ("colors", self.colors, tuple(COLORS)),
                                  ("sizes", self.sizes, SIZES), ("positions", self.positions, POSITIONS),
                                  ("backgrounds", self.backgrounds, BACKGROUNDS)):
            bad = set(vals) - set(known)
            if bad or not vals:
                raise ValueError(f"{name}: unknown or empty values {sorted(bad)}; known: {known}")
        if not 1 <= self.max_objects <= 3:
            raise ValueError("max_objects must be 1, 2 or 3")
        kinds = dict(self.mix)
        if set(kinds) - set(KINDS) or sum(kinds.values()) <= 0:
            raise ValueError(f"mix must weight kinds from {KINDS}")
        if self.max_objects < 2 and any(w > 0 for k, w in kinds.items() if k != "single"):
            raise ValueError("multi-object kinds in `mix` need max_objects >= 2")

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k, w in self.mix if w > 0)

    def categories(self) -> tuple[str, ...]:
        """The default prompt categories this world can produce."""
        return tuple(c for c in DEFAULT_CATEGORIES if CATEGORY_KIND[c] in self.kinds)

    def to_dict(self) -> dict:
        return asdict(self)

    def replace(self, **kw) -> "ToyWorldConfig":
        return replace(self, **kw)


def single_object_world(**kw) -> ToyWorldConfig:
    """The prototype's world: one object per image (4 shapes × 6 colours × 2 sizes × 9 positions × 5 bgs)."""
    return ToyWorldConfig(mix=(("single", 1.0),), **kw)


def evaluator_world(**kw) -> ToyWorldConfig:
    """Training world for the judge: many independent multi-object scenes so no attribute correlations leak."""
    return ToyWorldConfig(mix=(("single", 0.3), ("mixed", 0.7)), **kw)


# ----------------------------------------------------------------------------------------------
#                                          Scenes
# ----------------------------------------------------------------------------------------------

@dataclass
class Obj:
    """One shape: named attributes plus the jittered geometry and colour the renderer uses."""

    shape: str
    color: str
    size: str
    position: str  # a 3×3 grid cell name
    cx: float  # centre, base units
    cy: float
    r: float  # nominal radius, base units
    rgb: tuple[float, float, float]

    @property
    def cell(self) -> int:
        return POSITIONS.index(self.position)


@dataclass
class Background:
    """A background type and its render parameters (base units)."""

    kind: str
    rgb: tuple[float, float, float]  # mean colour
    amp: float = 0.0  # texture / ramp amplitude
    period: float = 4.0  # stripe period or check cell size
    angle: float = 0.0  # stripe or gradient direction, radians
    phase: float = 0.0
    seed: int = 0  # grain noise seed


@dataclass
class Scene:
    """A full scene: the objects, the background, and (for two-object scenes) their spatial relation."""

    kind: str
    objects: list[Obj]
    background: Background
    relation: Optional[str] = None  # "objects[0] <relation> objects[1]"

    def attributes(self) -> dict:
        """The attributes a caption of this scene names (and `parse_caption` returns)."""
        named_pos = self.kind in ("single", "mixed")
        objs = self.objects[:1] if self.kind == "counting" else self.objects
        return {
            "kind": self.kind,
            "count": len(self.objects),
            "objects": [{"shape": o.shape, "color": o.color, "size": o.size,
                         "position": o.position if named_pos else None} for o in objs],
            "background": self.background.kind,
            "relation": self.relation,
        }


def _cell_center(position: str) -> tuple[float, float]:
    """Centre of a grid cell in base units (x, y)."""
    i = POSITIONS.index(position)
    return (i % 3 + 0.5) * _CELL, (i // 3 + 0.5) * _CELL


def _make_obj(rng: np.random.Generator, shape: str, color: str, size: str, position: str) -> Obj:
    """An object with jittered centre, radius and colour."""
    cx, cy = _cell_center(position)
    jx, jy = rng.uniform(-_JITTER, _JITTER, 2)
    r = rng.uniform(*_RADIUS[size])
    rgb = np.clip(np.asarray(COLORS[color]) + rng.uniform(-0.04, 0.04, 3), 0, 1)
    return Obj(shape, color, size, position, float(cx + jx), float(cy + jy), float(r), tuple(map(float, rgb)))


def _sample_background(rng: np.random.Generator, kind: str) -> Background:
    """Grey-ish mean colour with a faint tint; textures are ±12–20 % so objects stay readable."""
    level = rng.uniform(0.38, 0.62)
    rgb = tuple(map(float, np.clip(level + rng.uniform(-0.04, 0.04, 3), 0, 1)))
    amp = float(rng.uniform(0.12, 0.2))
    if kind == "plain":
        return Background(kind, rgb)
    if kind == "gradient":
        return Background(kind, rgb, amp=float(rng.uniform(0.15, 0.25)), angle=float(rng.uniform(0, 2 * np.pi)))
    if kind == "stripes":
        angle = float(rng.choice([0.0, 0.25, 0.5, 0.75])) * np.pi  # horizontal, vertical, two diagonals
        return Background(kind, rgb, amp=amp, period=float(rng.uniform(3.0, 5.0)), angle=angle,
                          phase=float(rng.uniform(0, 2 * np.pi)))
    if kind == "checks":
        return Background(kind, rgb, amp=amp, period=float(rng.uniform(3.0, 5.0)),
                          phase=float(rng.uniform(0, 1)))
    if kind == "grain":
        return Background(kind, rgb, amp=amp, seed=int(rng.integers(2**31)))
    raise ValueError(kind)


def _pick(rng: np.random.Generator, values: Sequence[str]) -> str:
    return values[int(rng.integers(len(values)))]


def _relation_holds(rel: str, a: str, b: str) -> bool:
    """Whether grid cell `a` stands in `rel` to cell `b` (strictly, by column or row)."""
    ia, ib = POSITIONS.index(a), POSITIONS.index(b)
    return {"left of": ia % 3 < ib % 3, "right of": ia % 3 > ib % 3,
            "above": ia // 3 < ib // 3, "below": ia // 3 > ib // 3}[rel]


def sample_scene(rng: np.random.Generator, cfg: ToyWorldConfig = ToyWorldConfig(), kind: Optional[str] = None) -> Scene:
    """Draw a scene; `kind` overrides the config's mix."""
    if kind is None:
        kinds, w = zip(*[(k, w) for k, w in cfg.mix if w > 0])
        kind = kinds[int(rng.choice(len(kinds), p=np.asarray(w) / sum(w)))]
    bg = _sample_background(rng, _pick(rng, cfg.backgrounds))
    relation = None
    if kind == "single":
        objs = [_make_obj(rng, _pick(rng, cfg.shapes), _pick(rng, cfg.colors), _pick(rng, cfg.sizes),
                          _pick(rng, cfg.positions))]
    elif kind == "counting":
        n = int(rng.integers(2, cfg.max_objects + 1))
        shape, color, size = _pick(rng, cfg.shapes), _pick(rng, cfg.colors), _pick(rng, cfg.sizes)
        cells = rng.choice(len(cfg.positions), n, replace=False)
        objs = [_make_obj(rng, shape, color, size, cfg.positions[c]) for c in cells]
    elif kind == "two_object":
        # Two objects that differ in (shape, colour), so the caption binds each colour to one shape.
        while True:
            a = (_pick(rng, cfg.shapes), _pick(rng, cfg.colors))
            b = (_pick(rng, cfg.shapes), _pick(rng, cfg.colors))
            if a != b:
                break
        relation = _pick(rng, RELATIONS)
        pairs = [(p, q) for p in cfg.positions for q in cfg.positions if p != q and _relation_holds(relation, p, q)]
        pa, pb = pairs[int(rng.integers(len(pairs)))]
        objs = [_make_obj(rng, *a, _pick(rng, cfg.sizes), pa), _make_obj(rng, *b, _pick(rng, cfg.sizes), pb)]
    elif kind == "mixed":
        n = int(rng.integers(1, cfg.max_objects + 1))
        cells = rng.choice(len(cfg.positions), n, replace=False)
        objs = [_make_obj(rng, _pick(rng, cfg.shapes), _pick(rng, cfg.colors), _pick(rng, cfg.sizes),
                          cfg.positions[c]) for c in cells]
        kind = "single" if n == 1 else kind  # a one-object mixed scene is a single scene
    else:
        raise ValueError(f"unknown scene kind {kind!r}")
    return Scene(kind, objs, bg, relation)


# ----------------------------------------------------------------------------------------------
#                                         Rendering
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in base units, each (H, W) float32."""
    u = ((np.arange(size, dtype=np.float32) + 0.5) * (BASE / size)).astype(np.float32)
    return np.meshgrid(u, u, indexing="xy")


def _sdf(obj: Obj, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (base units, negative inside) to the object's outline; exact enough for anti-aliasing."""
    dx, dy, r = x - obj.cx, y - obj.cy, obj.r
    if obj.shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if obj.shape == "square":  # half-side 0.85 r: about the area of the circle
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    if obj.shape == "triangle":  # equilateral, pointing up, circumradius 1.15 r, bounding box centred
        R = 1.15 * r
        py = dy - 0.25 * R
        return np.maximum.reduce([py, 0.866 * dx - 0.5 * py, -0.866 * dx - 0.5 * py]) - 0.5 * R
    if obj.shape == "cross":  # a plus sign: two bars of half-width 0.33 r
        ax, ay = np.abs(dx), np.abs(dy)
        w = 0.33 * r
        return np.minimum(np.maximum(ax - r, ay - w), np.maximum(ax - w, ay - r))
    if obj.shape == "star":  # five points; radial distance to a piecewise-linear outline, scaled ≈ Euclidean
        rho = np.sqrt(dx * dx + dy * dy)
        t = (np.arctan2(dx, -dy) / (2 * np.pi / 5)) % 1.0  # 0 at a point facing up
        edge = 0.45 * r + (1.1 * r - 0.45 * r) * np.abs(1 - 2 * t)
        return 0.6 * (rho - edge)
    raise ValueError(obj.shape)


def _render_background(bg: Background, size: int) -> np.ndarray:
    """Background as float32 (H, W, 3) in [0, 1]."""
    x, y = _grid(size)
    rgb = np.asarray(bg.rgb, np.float32)
    if bg.kind == "plain":
        v = np.zeros_like(x)
    elif bg.kind == "gradient":
        t = ((x - BASE / 2) * np.cos(bg.angle) + (y - BASE / 2) * np.sin(bg.angle)) / (BASE / 2)
        v = bg.amp * np.clip(t, -1, 1)
    elif bg.kind == "stripes":
        t = x * np.cos(bg.angle) + y * np.sin(bg.angle)
        # A softened square wave: crisp stripes with less aliasing than a hard sign().
        v = bg.amp * np.clip(2.5 * np.sin(2 * np.pi * t / bg.period + bg.phase), -1, 1)
    elif bg.kind == "checks":
        ix = np.floor(x / bg.period + bg.phase).astype(np.int32)
        iy = np.floor(y / bg.period + bg.phase).astype(np.int32)
        v = bg.amp * (2.0 * ((ix + iy) % 2) - 1.0)
    elif bg.kind == "grain":
        # One noise value per base-unit pixel, up-sampled: the grain scales with the image.
        noise = np.random.default_rng(bg.seed).uniform(-1, 1, (int(BASE), int(BASE))).astype(np.float32)
        idx = np.minimum((np.arange(size) * (BASE / size)).astype(np.int64), int(BASE) - 1)
        v = bg.amp * noise[np.ix_(idx, idx)]
    else:
        raise ValueError(bg.kind)
    return np.clip(rgb[None, None, :] + v[..., None].astype(np.float32), 0, 1)


def render(scene: Scene, size: int = 64) -> np.ndarray:
    """The scene as uint8 (size, size, 3); shapes are anti-aliased from their signed distance."""
    img = _render_background(scene.background, size)
    x, y = _grid(size)
    pix = BASE / size  # one pixel in base units
    for obj in scene.objects:
        a = np.clip(0.5 - _sdf(obj, x, y) / pix, 0, 1)[..., None]
        img = img * (1 - a) + a * np.asarray(obj.rgb, np.float32)
    return (img * 255 + 0.5).astype(np.uint8)


def object_mask(scene: Scene, size: int = 64) -> np.ndarray:
    """(size, size) float32 coverage of the scene's objects in [0, 1], anti-aliased as `render` draws them."""
    x, y = _grid(size)
    pix = BASE / size
    cover = np.zeros((size, size), np.float32)
    for obj in scene.objects:
        cover = np.maximum(cover, np.clip(0.5 - _sdf(obj, x, y) / pix, 0, 1))
    return cover


# ----------------------------------------------------------------------------------------------
#                                     Captions and parsing
# ----------------------------------------------------------------------------------------------

# First entry of every list is the canonical word; parsing accepts all of them.
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
SHAPE_WORDS = {  # (singular, plural)
    "circle": [("circle", "circles"), ("disk", "disks"), ("dot", "dots")],
    "square": [("square", "squares")],
    "triangle": [("triangle", "triangles")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")],
    "star": [("star", "stars")],
}
COLOR_WORDS = {c: [c] for c in COLORS} | {"purple": ["purple", "violet"], "cyan": ["cyan", "turquoise"]}
POSITION_PHRASES = {
    "top left": ["in the top left", "in the upper left", "in the top left corner"],
    "top": ["at the top", "at the top center", "in the upper middle"],
    "top right": ["in the top right", "in the upper right", "in the top right corner"],
    "left": ["on the left", "at the left", "in the middle left"],
    "center": ["in the center", "in the middle", "at the center"],
    "right": ["on the right", "at the right", "in the middle right"],
    "bottom left": ["in the bottom left", "in the lower left", "in the bottom left corner"],
    "bottom": ["at the bottom", "at the bottom center", "in the lower middle"],
    "bottom right": ["in the bottom right", "in the lower right", "in the bottom right corner"],
}
BACKGROUND_WORDS = {
    "plain": ["plain", "flat", "solid"],
    "gradient": ["gradient", "shaded"],
    "stripes": ["striped", "stripy"],
    "checks": ["checkered", "checkerboard"],
    "grain": ["grainy", "noisy", "speckled"],
}
BACKGROUND_TEMPLATES = ["on a {} background", "over a {} background", "against a {} backdrop",
                        "on a {} backdrop"]
RELATION_PHRASES = {"left of": ["to the left of", "left of"], "right of": ["to the right of", "right of"],
                    "above": ["above", "over"], "below": ["below", "under", "beneath"]}
COUNT_WORDS = {1: ["a", "one"], 2: ["two", "2"], 3: ["three", "3"]}


def _choice(rng: Optional[np.random.Generator], options: Sequence[str]) -> str:
    """A random synonym, or the canonical one without an rng."""
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _np(o: Obj, rng, count: int = 1) -> str:
    """Noun phrase: '<count> <size> <colour> <shape>(s)'."""
    size, color = _choice(rng, SIZE_WORDS[o.size]), _choice(rng, COLOR_WORDS[o.color])
    sing, plur = SHAPE_WORDS[o.shape][0 if rng is None else int(rng.integers(len(SHAPE_WORDS[o.shape])))]
    if count == 1:
        det = _choice(rng, COUNT_WORDS[1])
        det = _article(size) if det == "a" else det
        return f"{det} {size} {color} {sing}"
    return f"{_choice(rng, COUNT_WORDS[count])} {size} {color} {plur}"


def caption(scene: Scene, rng: Optional[np.random.Generator] = None) -> str:
    """A plain-English caption naming every varied attribute; wording varies with `rng` (canonical if None)."""
    bg_word = _choice(rng, BACKGROUND_WORDS[scene.background.kind])
    bg = _choice(rng, BACKGROUND_TEMPLATES).format(bg_word)
    bg = bg.replace(" a ", f" {_article(bg_word)} ", 1)
    o = scene.objects
    if scene.kind == "single":
        np_, pos = _np(o[0], rng), _choice(rng, POSITION_PHRASES[o[0].position])
        form = 0 if rng is None else int(rng.integers(3))
        text = [f"{np_} {pos} {bg}", f"{pos}, {np_} {bg}", f"{bg}, {np_} {pos}"][form]
    elif scene.kind == "counting":
        text = f"{_np(o[0], rng, len(o))} {bg}"
    elif scene.kind == "two_object":
        text = f"{_np(o[0], rng)} {_choice(rng, RELATION_PHRASES[scene.relation])} {_np(o[1], rng)} {bg}"
    elif scene.kind == "mixed":
        parts = [f"{_np(x, rng)} {_choice(rng, POSITION_PHRASES[x.position])}" for x in o]
        objs = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        text = f"{objs} {bg}"
    else:
        raise ValueError(scene.kind)
    return text[0].upper() + text[1:] if rng is not None and rng.random() < 0.5 else text


def _alternation(phrases: Sequence[str]) -> str:
    """Regex alternation, longest first so 'top left' wins over 'top'."""
    return "|".join(re.escape(p) for p in sorted(set(phrases), key=len, reverse=True))


_LOOKUP = {}
for _attr, _table in (("size", SIZE_WORDS), ("color", COLOR_WORDS), ("position", POSITION_PHRASES),
                      ("background", BACKGROUND_WORDS), ("relation", RELATION_PHRASES)):
    _LOOKUP[_attr] = {w: k for k, ws in _table.items() for w in ws}
_LOOKUP["shape"] = {w: k for k, ws in SHAPE_WORDS.items() for pair in ws for w in pair}
_PLURALS = {p for ws in SHAPE_WORDS.values() for _, p in ws}
_LOOKUP["count"] = {w: n for n, ws in COUNT_WORDS.items() for w in ws} | {"an": 1}
_RE = {k: re.compile(rf"\b({_alternation(v)})\b") for k, v in _LOOKUP.items()}
_RE_BG = re.compile(rf",?\s*\b(?:on|over|against) an? ({_alternation(_LOOKUP['background'])}) "
                    rf"(?:background|backdrop)\b,?")
_RE_REL = re.compile(rf"\s({_alternation(_LOOKUP['relation'])})\s(?=(?:a|an|one)\s)")


def _parse_np(text: str) -> dict:
    """Attributes of one noun phrase (with an optional position phrase)."""
    out = {}
    pos = _RE["position"].search(text)
    out["position"] = _LOOKUP["position"][pos.group(1)] if pos else None
    if pos:
        text = text[:pos.start()] + " " + text[pos.end():]
    for attr in ("count", "size", "color", "shape"):
        m = _RE[attr].search(text)
        if m is None:
            raise ValueError(f"no {attr} in {text!r}")
        out[attr] = _LOOKUP[attr][m.group(1)]
        if attr == "shape" and m.group(1) in _PLURALS and out["count"] == 1:
            raise ValueError(f"plural shape without a count in {text!r}")
    return out


def parse_caption(text: str) -> dict:
    """Caption → the attribute dict `Scene.attributes()` gives (kind, count, objects, background, relation)."""
    t = " ".join(text.lower().strip().rstrip(".").split())
    m = _RE_BG.search(t)
    if m is None:
        raise ValueError(f"no background phrase in {text!r}")
    background = _LOOKUP["background"][m.group(1)]
    t = (t[:m.start()] + " " + t[m.end():]).strip(" ,")
    rel = _RE_REL.search(t)
    relation = None
    if rel:
        relation = _LOOKUP["relation"][rel.group(1)]
        phrases = [t[:rel.start()], t[rel.end():]]
    else:
        phrases = [p for p in re.split(r",\s*(?:and\s+)?|\s+and\s+", t) if p.strip()]
    # A leading position phrase ("in the center, a red circle") stands apart after the split.
    if len(phrases) == 2 and relation is None and _RE["shape"].search(phrases[0]) is None:
        phrases = [phrases[1] + " " + phrases[0]]
    objs = [_parse_np(p) for p in phrases]
    count = sum(o.pop("count") for o in objs)
    if relation is not None:
        kind = "two_object"
        for o in objs:
            o["position"] = None
    elif len(objs) == 1 and count > 1:
        kind = "counting"
    elif len(objs) == 1:
        kind = "single"
    else:
        kind = "mixed"
    return {"kind": kind, "count": count, "objects": objs, "background": background, "relation": relation}


# ----------------------------------------------------------------------------------------------
#                                    Datasets and prompts
# ----------------------------------------------------------------------------------------------

def item_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of item `index` in stream `seed`: any item is reproducible on its own."""
    return np.random.default_rng([int(seed), int(index)])


def sample_item(seed: int, index: int, cfg: ToyWorldConfig = ToyWorldConfig(), kind: Optional[str] = None
                ) -> tuple[Scene, str]:
    """Scene and caption of one item of a stream."""
    rng = item_rng(seed, index)
    scene = sample_scene(rng, cfg, kind)
    return scene, caption(scene, rng)


def generate(n: int, seed: int = 0, cfg: ToyWorldConfig = ToyWorldConfig(), start: int = 0,
             kind: Optional[str] = None) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Items start..start+n of stream `seed`: (uint8 N×H×W×3 images, captions, scenes)."""
    scenes, caps = zip(*[sample_item(seed, start + i, cfg, kind) for i in range(n)]) if n else ((), ())
    images = np.stack([render(s, cfg.size) for s in scenes]) if n else np.zeros((0, cfg.size, cfg.size, 3), np.uint8)
    return images, list(caps), list(scenes)


def scene_labels(scene: Scene) -> dict[str, np.ndarray]:
    """Per-grid-cell targets: cell_shape (0 empty, 1+shape index), cell_color / cell_size (-100 where empty)."""
    shape = np.zeros(9, np.int64)
    color = np.full(9, -100, np.int64)
    size = np.full(9, -100, np.int64)
    for o in scene.objects:
        shape[o.cell] = SHAPES.index(o.shape) + 1
        color[o.cell] = list(COLORS).index(o.color)
        size[o.cell] = SIZES.index(o.size)
    return {"cell_shape": shape, "cell_color": color, "cell_size": size,
            "background": np.int64(BACKGROUNDS.index(scene.background.kind)),
            "count": np.int64(len(scene.objects))}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N,)H×W×3 → float32 (N,)3×H×W in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1)
    return x.movedim(-1, -3)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N,)3×H×W in [-1, 1] → uint8 (N,)H×W×3."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


class ToyWorldDataset(torch.utils.data.Dataset):
    """Items 0..n-1 of stream `seed`: (image [-1,1] 3×H×W, caption, labels dict of tensors)."""

    def __init__(self, n: int, seed: int = 0, cfg: ToyWorldConfig = ToyWorldConfig()):
        self.n, self.seed, self.cfg = n, seed, cfg

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        scene, cap = sample_item(self.seed, i, self.cfg)
        labels = {k: torch.as_tensor(v) for k, v in scene_labels(scene).items()}
        return to_tensor(render(scene, self.cfg.size)), cap, labels


@dataclass
class Prompt:
    """An evaluation prompt: its text, its GenEval-style category and the ground-truth scene it was drawn from."""

    text: str
    category: str
    scene: Scene = field(repr=False)

    @property
    def checks(self) -> tuple[str, ...]:
        return CATEGORY_CHECKS[self.category]


def prompt_set(n: int, seed: int = 1234, cfg: ToyWorldConfig = ToyWorldConfig(),
               categories: Optional[Sequence[str]] = None) -> list[Prompt]:
    """`n` prompts spread evenly over categories (default: those the world's mix can produce)."""
    cats = tuple(categories) if categories is not None else cfg.categories()
    if not cats:
        raise ValueError("no prompt categories")
    out = []
    for i in range(n):
        cat = cats[i % len(cats)]
        scene, text = sample_item(seed, i, cfg, kind=CATEGORY_KIND[cat])
        out.append(Prompt(text, cat, scene))
    return out
