"""Notebooks 02 (denoising stages, handoff sweep) and 05 (interactive panel), run by papermill in smoke mode."""
import json
import math
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ("02_denoising_stages", "05_interactive")


def run_notebook(name: str, tmp_path: Path, monkeypatch, **params) -> tuple[dict, nbformat.NotebookNode]:
    """Execute notebooks/NAME.ipynb as the report runner does; (recorded figures, executed notebook)."""
    import papermill as pm

    summary = tmp_path / f"{name}.summary.json"
    monkeypatch.setenv("L2P_REPORT_SUMMARY", str(summary))
    monkeypatch.setenv("L2P_HEADLESS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # smoke models are tiny: a second thread only adds barrier waits
    out = tmp_path / f"{name}.ipynb"
    pm.execute_notebook(str(ROOT / "notebooks" / f"{name}.ipynb"), str(out), parameters={"smoke": True, **params},
                        cwd=str(ROOT), kernel_name="python3", progress_bar=False, execution_timeout=300)
    return {k: v["value"] for k, v in json.loads(summary.read_text()).items()}, nbformat.read(out, as_version=4)


def outputs(nb, mime: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if mime in o.get("data", {})]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_notebook_is_clean_and_parameterised(name):
    import papermill as pm

    path = ROOT / "notebooks" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert not any(c.get("outputs") or c.get("execution_count") for c in nb.cells if c.cell_type == "code")
    params = pm.inspect_notebook(str(path))
    assert params["mode"]["default"] == '"full"' and params["smoke"]["inferred_type_name"] == "bool"
    assert nb.cells[2].source.startswith("%matplotlib inline")


@pytest.mark.slow
def test_02_denoising_stages_smoke(tmp_path, monkeypatch):
    rec, nb = run_notebook("02_denoising_stages", tmp_path, monkeypatch)
    for key in ("latent sampling + VAE (s / image, captured)", "pixel sampling (s / image, captured)"):
        assert 0 < rec[key] < 60
    for side in ("latent", "pixel"):
        assert 0 < rec[f"{side}: spectral distance of the final x̂0 to ground truth"] < 10
    assert math.isfinite(rec["linear readout vs Detailer Head PSNR, last step (dB)"])
    assert rec["head output energy a linear readout misses, last step"] >= 0
    assert rec["handoff: pixel / latent wall time (σ_h = 1 vs 0)"] > 0
    for key in ("handoff: toy-GenEval at σ_h = 0 (latent + VAE)", "handoff: toy-GenEval at σ_h = 1 (pixel)",
                "handoff: toy-GenEval at best σ_h"):
        assert 0 <= rec[key] <= 1
    assert rec["handoff: best σ_h by toy-GenEval"] in (0.0, 0.5, 1.0)  # the smoke sweep
    # trajectories (2 prompts × 2 seeds), spectra ×2, PCA ×2, head, sweep, sweep samples
    assert len(outputs(nb, "image/png")) >= 11


@pytest.mark.slow
def test_05_interactive_smoke(tmp_path, monkeypatch):
    rec, nb = run_notebook("05_interactive", tmp_path, monkeypatch, prompt="a big red disk in the middle")
    assert len(rec.pop("world build (smoke)")) == 10  # build_toy_world names the build it loaded
    assert set(rec) == {"latent: wall time (s)", "pixel: wall time (s)", "handoff: wall time (s)"}
    assert all(0 < v < 60 for v in rec.values())
    assert len(outputs(nb, "application/vnd.jupyter.widget-view+json")) == 1  # the live panel
    assert len(outputs(nb, "image/png")) == 1  # its static figure, for reports
