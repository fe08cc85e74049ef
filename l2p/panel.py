"""An ipywidgets panel: one prompt through the latent model, the pixel model and the two-stage handoff.

    panel = GenerationPanel(latent_pipe, pixel_pipe, prompt="a big red disk in the middle")
    panel.generate()   # once, synchronously, so there is something to show
    panel              # in a notebook: the live panel;  panel.figure(): a static Figure of it for reports

Generation runs when the button is pressed (or, with "auto", after the controls have been still for
`debounce` seconds) in a worker thread, so the kernel keeps serving the widgets meanwhile; requests made
during a run are coalesced into one more run with the latest values. `background=False` runs inline,
which is what headless tests want.
"""
from __future__ import annotations

import html
import io
import threading
import time
from typing import Optional

import torch
from PIL import Image

from .handoff import handoff_sample
from .pipeline import FlowPipeline, LatentPipeline, to_pil
from .trajectory import pick_steps

RESULTS = ("latent", "pixel", "handoff")
TITLES = {"latent": "latent model + VAE", "pixel": "pixel model (L2P)", "handoff": "handoff"}


def png_bytes(x: torch.Tensor, size: Optional[int] = None) -> bytes:
    """[-1, 1] CHW image → PNG bytes, enlarged with nearest neighbours to `size` px (small images stay crisp)."""
    im = to_pil(x)
    if size and im.size != (size, size):
        im = im.resize((size, size), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def strip_png(rows: list[list[torch.Tensor]], size: int = 64, gap: int = 2) -> bytes:
    """Rows of [-1, 1] CHW images → one PNG grid, each tile `size` px, on a white background."""
    ncols = max(len(r) for r in rows)
    canvas = Image.new("RGB", (ncols * (size + gap) - gap, len(rows) * (size + gap) - gap), "white")
    for r, row in enumerate(rows):
        for c, x in enumerate(row):
            canvas.paste(to_pil(x).resize((size, size), Image.NEAREST), (c * (size + gap), r * (size + gap)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


class GenerationPanel:
    """Prompt, cfg, steps, seed, shift and handoff σ_h → latent, pixel and handoff samples with wall times.

    Each model has its own guidance slider (`cfg` for the latent model and the handoff's latent stage,
    `pixel_cfg` for the pixel model and the handoff's pixel stage; it starts at `cfg_scale` unless
    `pixel_cfg_scale` is given), since a pixel model may sample best at another scale than its source.
    """

    def __init__(self, latent_pipe: LatentPipeline, pixel_pipe: FlowPipeline, prompt: str = "",
                 cfg_scale: float = 3.0, steps: int = 8, seed: int = 0, shift: float = 3.0, sigma_h: float = 0.5,
                 size: int = 64, preview: int = 160, trajectory: bool = False, strip_steps: int = 6,
                 background: bool = True, auto: bool = False, debounce: float = 0.5, max_steps: int = 50,
                 pixel_cfg_scale: Optional[float] = None):
        import ipywidgets as W

        self.latent_pipe, self.pixel_pipe = latent_pipe, pixel_pipe
        self.size, self.preview, self.strip_steps = size, preview, strip_steps
        self.background, self.debounce = background, debounce
        self.results: dict[str, dict] = {}  # name -> {"image": (3, H, W), "seconds": float}
        self.used: dict = {}  # the parameters the current results were made with
        self.trajectory: dict[str, list[torch.Tensor]] = {}  # name -> x0 (pixels) at the strip's steps
        self.generations = 0
        self.last_error: Optional[BaseException] = None
        self._lock = threading.Lock()
        self._running = self._pending = False
        self._thread: Optional[threading.Thread] = None
        self._timer: Optional[threading.Timer] = None

        # continuous_update=False: a value arrives when the user lets go / presses Enter, not on every tick.
        wide = W.Layout(width="98%")
        self.prompt = W.Text(value=prompt, description="prompt", continuous_update=False, layout=wide)
        self.cfg = W.FloatSlider(value=cfg_scale, min=1.0, max=8.0, step=0.25, description="latent cfg",
                                 continuous_update=False, style={"description_width": "initial"})
        self.pixel_cfg = W.FloatSlider(value=cfg_scale if pixel_cfg_scale is None else pixel_cfg_scale, min=1.0,
                                       max=8.0, step=0.25, description="pixel cfg", continuous_update=False,
                                       style={"description_width": "initial"})
        self.steps = W.IntSlider(value=steps, min=1, max=max_steps, description="steps", continuous_update=False)
        self.seed = W.IntText(value=seed, description="seed", layout=W.Layout(width="180px"))
        self.shift = W.FloatSlider(value=shift, min=1.0, max=8.0, step=0.25, description="shift",
                                   continuous_update=False)
        self.sigma_h = W.FloatSlider(value=sigma_h, min=0.0, max=1.0, step=0.05, description="handoff σ_h",
                                     continuous_update=False, style={"description_width": "initial"})
        self.show_trajectory = W.Checkbox(value=trajectory, description="trajectory strip", indent=False)
        self.auto = W.Checkbox(value=auto, description="auto", indent=False,
                               tooltip=f"generate {debounce:g} s after the last change")
        self.button = W.Button(description="Generate", button_style="primary", icon="play")
        self.status = W.HTML("press Generate")
        self.images = {k: W.Image(format="png", width=preview, height=preview) for k in RESULTS}
        self.labels = {k: W.HTML(f"<b>{TITLES[k]}</b>") for k in RESULTS}
        # Stable CSS hooks for the browser test (descriptions and DOM structure may change).
        for k, im in self.images.items():
            im.add_class(f"l2p-{k}")
        for name in ("prompt", "cfg", "pixel_cfg", "steps", "seed", "shift", "sigma_h", "button", "status"):
            getattr(self, name).add_class(f"l2p-{name.replace('_', '-')}")
        self.strip = W.Image(format="png")
        self.strip_label = W.HTML()
        self.strip_box = W.VBox([self.strip_label, self.strip],
                                layout=W.Layout(display="flex" if trajectory else "none"))

        self.button.on_click(lambda _: self.request())
        for w in self.controls:
            w.observe(self._on_change, names="value")
        self.show_trajectory.observe(
            lambda ch: setattr(self.strip_box.layout, "display", "flex" if ch["new"] else "none"), names="value")

        cols = [W.VBox([self.images[k], self.labels[k]]) for k in RESULTS]
        self.widget = W.VBox([
            self.prompt, W.HBox([self.cfg, self.pixel_cfg, self.seed]), W.HBox([self.steps, self.shift, self.sigma_h]),
            W.HBox([self.button, self.auto, self.show_trajectory, self.status]), W.HBox(cols), self.strip_box])

    @property
    def controls(self) -> list:
        return [self.prompt, self.cfg, self.pixel_cfg, self.steps, self.seed, self.shift, self.sigma_h,
                self.show_trajectory]

    def _repr_mimebundle_(self, **kw):
        bundle = self.widget._repr_mimebundle_(**kw)
        # What exported reports show instead of the widget (its scripts cannot load offline).
        bundle["text/plain"] = "GenerationPanel: a live widget; `panel.figure()` draws its current state."
        return bundle

    # -- parameters ------------------------------------------------------------------------------
    def params(self) -> dict:
        """The controls' current values."""
        return {"prompt": self.prompt.value, "cfg_scale": float(self.cfg.value),
                "pixel_cfg_scale": float(self.pixel_cfg.value), "steps": int(self.steps.value),
                "seed": int(self.seed.value), "shift": float(self.shift.value),
                "sigma_h": float(self.sigma_h.value), "trajectory": bool(self.show_trajectory.value)}

    def set(self, **values) -> "GenerationPanel":
        """Set controls by name (prompt, cfg, pixel_cfg, steps, seed, shift, sigma_h, show_trajectory, auto)."""
        for k, v in values.items():
            getattr(self, k).value = v
        return self

    # -- scheduling ------------------------------------------------------------------------------
    def _on_change(self, change) -> None:
        self.status.value = "changed: press Generate" if not self.auto.value else "changed…"
        if not self.auto.value:
            return
        if self.debounce <= 0:
            self.request()
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(self.debounce, self.request)
        self._timer.daemon = True
        self._timer.start()

    def request(self) -> None:
        """Generate now, or once more after the current run if one is in progress."""
        if not self.background:
            self._safe_generate()
            return
        with self._lock:
            if self._running:
                self._pending = True
                return
            self._running = True
        self._thread = threading.Thread(target=self._worker, name="l2p-panel", daemon=True)
        self._thread.start()

    def _worker(self) -> None:
        while True:
            self._safe_generate()
            with self._lock:
                if not self._pending:
                    self._running = False
                    return
                self._pending = False

    def wait(self, timeout: Optional[float] = None) -> "GenerationPanel":
        """Block until a background run (and any coalesced follow-up) has finished."""
        if self._timer is not None:
            self._timer.join(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        return self

    def _safe_generate(self) -> None:
        try:
            self.generate()
        except Exception as e:  # a widget callback has nowhere to raise to: show it
            self.last_error = e
            self.status.value = f"<span style='color:#b00'>error: {html.escape(repr(e))[:300]}</span>"

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def warmup(self) -> "GenerationPanel":
        """One 1-step sample per pipeline, so lazy initialisation does not show up in the first wall times."""
        for pipe in (self.latent_pipe, self.pixel_pipe):
            pipe.sample(self.prompt.value, seed=0, num_inference_steps=1, height=self.size, width=self.size)
        return self

    @torch.no_grad()
    def generate(self) -> dict:
        """Sample all three with the current values, update the images and labels; returns the results."""
        p = self.params()
        kw = dict(seed=p["seed"], num_inference_steps=p["steps"], cfg_scale=p["cfg_scale"], shift=p["shift"],
                  height=self.size, width=self.size)
        self.button.disabled = True
        self.status.value = "generating…"
        try:
            results, traj = {}, {}
            for name, pipe in (("latent", self.latent_pipe), ("pixel", self.pixel_pipe)):
                x0s = []
                scale = p["cfg_scale"] if name == "latent" else p["pixel_cfg_scale"]
                t0 = time.perf_counter()
                img = pipe.sample(p["prompt"], callback=x0s.append if p["trajectory"] else None,
                                  **{**kw, "cfg_scale": scale})[0]
                results[name] = {"image": img.float().cpu(), "seconds": time.perf_counter() - t0}
                if p["trajectory"]:
                    chosen = [x0s[i].x0 for i in pick_steps(len(x0s), self.strip_steps)]
                    traj[name] = list(pipe.to_pixels(torch.cat(chosen)).float().cpu())
            s_h = p["sigma_h"]
            if s_h in (0.0, 1.0):  # the limits are the pure samplers exactly: reuse them
                src = results["latent" if s_h == 0.0 else "pixel"]
                results["handoff"] = dict(src, reused=True)
            else:
                res = handoff_sample(self.latent_pipe, self.pixel_pipe, p["prompt"], s_h,
                                     pixel_cfg_scale=p["pixel_cfg_scale"], **kw)
                results["handoff"] = {"image": res.images[0].cpu(), "seconds": res.seconds,
                                      "latent_steps": res.latent_steps, "pixel_steps": res.pixel_steps}
            self.results, self.trajectory, self.used = results, traj, p
            self.generations += 1
            self._show(p)
        finally:
            self.button.disabled = False
        return results

    def _label(self, name: str, p: dict) -> str:
        r = self.results[name]
        title = TITLES[name]
        if name == "handoff":
            title = f"handoff σ_h={p['sigma_h']:.2f}"
            if "latent_steps" in r:
                title += f" ({r['latent_steps']} latent + {r['pixel_steps']} pixel steps)"
        return f"<b>{title}</b><br>{1000 * r['seconds']:.0f} ms"

    def _show(self, p: dict) -> None:
        for k in RESULTS:
            self.images[k].value = png_bytes(self.results[k]["image"], self.preview)
            self.labels[k].value = self._label(k, p)
        if self.trajectory:
            tile = max(self.preview // 2, 32)
            self.strip.value = strip_png([self.trajectory["latent"], self.trajectory["pixel"]], size=tile)
            self.strip.width = str(len(self.trajectory["latent"]) * (tile + 2) - 2)  # natural size, not stretched
            self.strip_label.value = "predicted x̂0 over the steps: latent (top), pixel (bottom)"
        self.status.value = f"generation {self.generations}: “{html.escape(p['prompt'][:60])}”"

    # -- static rendering --------------------------------------------------------------------------
    def figure(self, size: float = 2.4):
        """A matplotlib Figure of the panel's current state (exported widget HTML cannot render offline)."""
        from matplotlib.figure import Figure

        from .viz import to_hwc

        if not self.results:
            raise RuntimeError("nothing generated yet: call generate() first")
        p = self.used
        strip = len(self.trajectory.get("latent", []))
        fig = Figure(figsize=(size * 3, size * 1.15 + (size * 0.9 if strip else 0)), layout="constrained")
        top, bottom = (fig.subfigures(2, 1, height_ratios=[1.25, 1]) if strip else (fig, None))
        axes = top.subplots(1, 3)
        for ax, k in zip(axes, RESULTS):
            ax.imshow(to_hwc(self.results[k]["image"]), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            label = self._label(k, p).replace("<b>", "").replace("</b>", "").replace("<br>", "\n")
            ax.set_title(label, fontsize=8)
        if bottom is not None:
            ax = bottom.subplots(2, strip, squeeze=False)
            for r, name in enumerate(("latent", "pixel")):
                for c, x in enumerate(self.trajectory[name]):
                    ax[r, c].imshow(to_hwc(x), interpolation="nearest")
                    ax[r, c].set_xticks([])
                    ax[r, c].set_yticks([])
                ax[r, 0].set_ylabel(f"{name} x̂0", fontsize=8)
        fig.suptitle(f"“{p['prompt']}”\ncfg {p['cfg_scale']:g} (pixel {p['pixel_cfg_scale']:g}) · {p['steps']} "
                     f"steps · seed {p['seed']} · "
                     f"shift {p['shift']:g} · σ_h {p['sigma_h']:.2f}", fontsize=9)
        return fig
