"""Efficiency measurements on tiny presets: the sweep table, memory meters, ratios, the figure, the GPU script, 06."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from l2p import efficiency as eff
from l2p.config import tiny_pixel
from l2p.model import RMSNorm

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
#                                   Arms and random models
# ----------------------------------------------------------------------------------------------

def test_real_arms_describe_the_released_architectures():
    """Counted on meta: the Z-Image-Turbo trunk and the Flux VAE decoder of the facts file; 4K keeps 4096 tokens."""
    d = eff.describe_arms(eff.real_arms(), [1024, 4096, (720, 1280)]).set_index("arm")
    assert d.loc["latent + VAE", "dit_params"] == 6_154_908_736
    assert d.loc["latent + VAE", "vae_decoder_params"] == 49_545_475
    assert d.loc["pixel p16", "model"] == "l2p_1k" and d.loc["pixel p64", "model"] == "l2p_4k"
    assert list(d["tokens 1024²"]) == [4096, 4096, 256]
    assert d.loc["pixel p64", "tokens 4096²"] == 4096
    assert d.loc["pixel p16", "tokens 720×1280"] == 3600 and pd.isna(d.loc["pixel p64", "tokens 720×1280"])


def test_with_patch_and_grid():
    cfg = eff.with_patch(tiny_pixel(), 64)
    assert cfg.all_patch_size == (16, 64) and cfg.all_f_patch_size == (1, 1)
    assert eff.with_patch(cfg, 64) is cfg
    lat, p16, p64 = eff.tiny_arms()
    assert lat.stride == 8 and p16.stride == 1
    assert lat.grid(64, 96) == (4, 6) == p16.grid(64, 96)
    assert p64.grid(64, 96) is None and p64.grid(128, 64) == (2, 1)


def test_random_models_are_built_in_place():
    dit = eff.build_dit(tiny_pixel(), "cpu", torch.bfloat16, seed=0)
    params = list(dit.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 and not p.requires_grad for p in params)
    assert all(torch.isfinite(p.float()).all() for p in params)
    assert all(bool((m.weight == 1).all()) for m in dit.modules() if isinstance(m, RMSNorm))
    assert dit.x_pad_token.float().std() > 0  # no module init for it: filled by hand
    again = eff.build_dit(tiny_pixel(), "cpu", torch.bfloat16, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(params, again.parameters()))  # seeded
    lat = eff.tiny_arms()[0]
    vae = eff.build_vae(lat.vae, "cpu", torch.float32)
    assert vae.encoder is None and eff.param_mb(vae) > 0


def test_peak_memory_sees_a_cpu_allocation():
    if not eff.reset_cpu_peak():
        pytest.skip("/proc/self/clear_refs is not writable here")
    with eff.PeakMemory("cpu") as mem:
        x = torch.ones(16 * 2**20)  # 64 MiB, touched
        del x
    assert mem.peak_mb > 48


# ----------------------------------------------------------------------------------------------
#                                         The sweep
# ----------------------------------------------------------------------------------------------

def test_measure_tiny_in_process():
    df = eff.measure(eff.tiny_arms(), [32, (32, 48)], isolate=False, repeats=1, num_steps=4, cap_len=8,
                     progress=False)
    assert list(df.columns) == eff.COLUMNS and len(df) == 6
    by = df.set_index(["arm", "resolution"])
    assert by.loc[("pixel p64", "32²"), "status"].startswith("skipped")
    ok = df[df.status == "ok"]
    assert len(ok) == 4 and (ok.step_ms > 0).all() and (ok.peak_mb >= ok.weights_mb).all()
    lat = ok[ok.arm == "latent + VAE"]
    assert (lat.decode_ms > 0).all() and lat.decode_share.between(0, 1).all()
    assert ((lat.per_step_ms - (lat.step_ms + lat.decode_ms / 4)).abs() < 1e-9).all()
    assert ((lat.sample_ms - (4 * lat.step_ms + lat.decode_ms)).abs() < 1e-9).all()
    pix = ok[ok.arm == "pixel p16"]
    assert pix.decode_ms.isna().all() and (pix.per_step_ms == pix.step_ms).all()
    assert list(ok.tokens) == [4, 6, 4, 6] and (ok.dtype == "float32").all() and not ok.cfg.any()
    assert set(ok.mem_method) == {"VmHWM, shared process"}


def test_measure_isolated_with_guidance_and_token_limit():
    p16 = eff.tiny_arms()[1]
    df = eff.measure([p16], [32, 64], isolate=True, guidance=True, repeats=1, cap_len=8, max_tokens=4,
                     threads=1, timeout=120, progress=False)
    assert df.status.tolist()[0] == "ok", df.status.tolist()
    assert df.status.tolist()[1].startswith("skipped: 16 tokens")
    r = df.iloc[0]
    assert r.cfg and r.passes == 2 and r.step_ms > 0 and r.mem_method == "VmHWM, own process"


def test_a_failing_part_is_reported_and_the_other_measured(monkeypatch):
    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 80 GiB")
    monkeypatch.setattr(eff, "denoise_step", oom)
    lat = eff.tiny_arms()[0]
    out = eff.measure_parts(lat, 32, 32, eff.BenchOptions(repeats=1, cap_len=8))
    assert out["status"] == "step OOM" and out["decode_ms"] > 0 and "step_ms" not in out


# ----------------------------------------------------------------------------------------------
#                                   Ratios and the figure
# ----------------------------------------------------------------------------------------------

def _synthetic():
    """A hand-made sweep: latent step 10 ms + decode 40 ms at 64², pixel arms 12 and 8 ms."""
    rows = []
    for side, k in ((64, 1), (128, 4)):
        common = dict(resolution=f"{side}²", height=side, width=side, side=float(side), batch=1, cfg=False,
                      passes=1, num_steps=8, device="cpu", dtype="float32", status="ok")
        rows.append(dict(arm="latent + VAE", step_ms=10.0 * k, decode_ms=40.0 * k, per_step_ms=15.0 * k,
                         decode_share=40 / 120, peak_mb=100.0 * k, **common))
        rows.append(dict(arm="pixel p16", step_ms=12.0 * k, per_step_ms=12.0 * k, peak_mb=50.0 * k, **common))
        rows.append(dict(arm="pixel p64", step_ms=8.0 * k, per_step_ms=8.0 * k, peak_mb=60.0 * k, **common))
    return pd.DataFrame(rows).reindex(columns=eff.COLUMNS)


def test_ratios():
    rt = eff.ratios(_synthetic())
    assert list(rt.resolution) == ["64²", "64²", "128²", "128²"] and list(rt.arm) == ["pixel p16", "pixel p64"] * 2
    r = rt.iloc[0]
    assert math.isclose(r.step_vs_latent_step, 1.2) and math.isclose(r.step_vs_latent_per_step, 0.8)
    assert math.isclose(r.peak_vs_latent_peak, 0.5) and math.isclose(r.latent_decode_share, 1 / 3)
    assert eff.ratios(_synthetic().query("arm != 'latent + VAE'")).empty


def test_figure_builds():
    from matplotlib.figure import Figure
    fig = eff.plot_efficiency(_synthetic(), title="synthetic")
    assert isinstance(fig, Figure)
    t, m = fig.axes
    assert len(t.lines) == 4 and len(m.lines) == 3  # the latent model has a DiT-only curve too
    assert [x.get_text() for x in t.get_xticklabels()] == ["64²", "128²"]
    fig.savefig(Path("/dev/null"), format="png")


# ----------------------------------------------------------------------------------------------
#                              The GPU script and the notebook
# ----------------------------------------------------------------------------------------------

def test_gpu_check_tiny_runs_every_section(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert {r["section"] for r in rows} == {"env", "sweep", "train", "bf16", "odd-grid", "cfg", "offload", "sweep+"}
    assert all(r["status"] == "ok" or r["status"].startswith("skipped") for r in rows), rows
    by = {(r["section"], r["what"]): r for r in rows}
    assert by[("sweep", "pixel p64 64²")]["status"] == "ok"  # the "4K" large-patch step
    assert by[("sweep", "latent + VAE 32²")]["note"].count("decode") == 1
    assert "mod 32 = 15" in by[("odd-grid", "forward 80×48")]["note"]
    assert any(r["section"] == "cfg" and r["what"].endswith("CFG") for r in rows)
    assert "trainable" in next(r for r in rows if r["section"] == "train")["note"]
    offload = [r for r in rows if r["section"] == "offload"]
    assert [r["what"] for r in offload] == ["2-step CFG sample 32², resident", "2-step CFG sample 32², cpu offload"]
    assert offload[1]["note"] == "output max |Δ| vs resident 0"  # the same weights on the same CPU: bit-identical
    assert res["headline"] and res["sweep"]


def test_committed_notebook_is_clean_and_parameterised():
    pm = pytest.importorskip("papermill")
    import nbformat
    path = ROOT / "notebooks" / "06_efficiency.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    params = pm.inspect_notebook(str(path))
    assert params["mode"]["default"] == '"full"' and params["smoke"]["inferred_type_name"] == "bool"
    assert params["device"]["default"] == '"cpu"' and "resolutions" in params and "presets" in params
    assert nb.cells[2].source.startswith("%matplotlib inline")


@pytest.mark.slow
def test_notebook_06_smoke(tmp_path, monkeypatch):
    pm = pytest.importorskip("papermill")
    summary = tmp_path / "summary.json"
    monkeypatch.setenv("L2P_REPORT_SUMMARY", str(summary))  # the kernel inherits it: record() writes here
    monkeypatch.setenv("L2P_HEADLESS", "1")
    out = tmp_path / "06.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / "06_efficiency.ipynb"), str(out),
                        parameters={"mode": "smoke", "smoke": True}, kernel_name="python3", cwd=str(ROOT),
                        progress_bar=False, execution_timeout=300)
    rec = json.loads(summary.read_text())
    for arm in ("pixel p16", "pixel p64"):
        for res in ("64²", "128²"):
            assert rec[f"{arm} / latent step time @ {res}"]["value"] > 0
    assert 0 < rec["VAE decode share of a 8-step latent sample @ 128²"]["value"] < 1
    import nbformat
    nb = nbformat.read(out, as_version=4)
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
