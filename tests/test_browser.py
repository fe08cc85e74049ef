"""End to end in a real browser: JupyterLab serves notebook 05, headless Chromium runs it and drives the panel.

Needs Debian's Chromium (/usr/bin/chromium) and the `playwright` Python package (its own browser download
is not used). The server gets a temporary copy of the notebook (parameterised to smoke mode), a token, a
free port on 127.0.0.1 and the smoke toy world in L2P_CACHE; it is shut down even when the test fails.
The screenshot lands in the test's temporary folder, so that `make test` leaves the tree as it was; with
L2P_SCREENSHOT_DIR set (`make test-browser` sets reports/browser, the committed one) it lands there.
"""
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def _missing() -> str:
    if not Path(CHROMIUM).exists():
        return f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install playwright; no `playwright install` needed)"
    return ""


pytestmark = [pytest.mark.browser, pytest.mark.skipif(bool(_missing()), reason=_missing() or "ok")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, token: str, path: str, method: str = "GET"):
    req = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        body = r.read()
    return json.loads(body) if body else None


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a temporary copy of notebook 05: yields (base url, token, folder)."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    from l2p.cache import cache_dir
    from l2p.toyworld.recipe import FINETUNE_MODES, finetune
    from l2p.toyworld.world import build_toy_world

    # Build (or load) the smoke world here, so the kernel only loads it.
    world = build_toy_world("smoke", progress=False)
    finetune(world, FINETUNE_MODES["smoke"], progress=False)

    root = tmp_path_factory.mktemp("lab")
    nb = load_notebook_node(str(ROOT / "notebooks" / "05_interactive.ipynb"))  # fills the metadata papermill needs
    nb = parameterize_notebook(nb, {"smoke": True, "prompt": "a big green disk in the middle"})
    nbformat.write(nb, root / "05_interactive.ipynb")

    settings = root / ".settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false",
                                                                           "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "L2P_CACHE": str(cache_dir()), "OMP_NUM_THREADS": "1",
           "JUPYTER_CONFIG_DIR": str(root / ".jupyter"), "JUPYTER_RUNTIME_DIR": str(root / ".runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / ".workspaces"),
           "JUPYTERLAB_SETTINGS_DIR": str(root / ".settings")}
    log = open(root / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", "--LabApp.expose_app_in_browser=True", f"--ServerApp.root_dir={root}",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                _api(base, token, "/api/status")
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"JupyterLab did not start:\n{(root / 'lab.log').read_text()[-3000:]}")
                time.sleep(0.3)
        yield base, token, root
    finally:
        try:  # kernels run in their own sessions: ask the server to stop them before stopping it
            for k in _api(base, token, "/api/kernels") or []:
                _api(base, token, f"/api/kernels/{k['id']}", method="DELETE")
        except Exception:
            pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()


# A digest of what an <img> currently shows (ipywidgets serves each new value as a new blob: URL).
IMAGE_DIGEST = """async (sel) => {
  const img = document.querySelector(sel);
  if (!img || !img.src || !img.src.startsWith('blob:') || !img.complete || img.naturalWidth === 0) return null;
  const bytes = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
  let h = 0;
  for (const b of bytes) h = (Math.imul(h, 31) + b) >>> 0;
  return `${bytes.length}:${h}`;
}"""

# "error" as soon as a cell fails (run-all then stops), "done" once every code cell ran and the kernel is idle.
RUN_STATE = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const k = w.sessionContext.session && w.sessionContext.session.kernel;
  const cells = w.content.widgets.filter(c => c.model.type === 'code');
  const outs = cells.flatMap(c => Array.from({length: c.model.outputs.length}, (_, i) => c.model.outputs.get(i)));
  if (outs.some(o => o.type === 'error')) return 'error';
  return k && k.status === 'idle' && cells.every(c => c.model.executionCount !== null) ? 'done' : null;
}"""


def test_panel_in_jupyterlab(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    base, token, _ = lab
    shots = Path(os.environ.get("L2P_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    screenshot = shots / "05_interactive.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            page.goto(f"{base}/lab/tree/05_interactive.ipynb?token={token}")
            page.wait_for_function("() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
                                   " return !!(w && w.sessionContext); }")
            page.evaluate("""async () => {
              const w = window.jupyterapp.shell.currentWidget;
              await w.context.ready;
              await w.sessionContext.ready;
              await w.sessionContext.session.kernel.info;
            }""")
            # Fire and forget: the command's promise resolves only when every cell has run.
            page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
            state = page.wait_for_function(RUN_STATE, timeout=90_000, polling=250).json_value()
            assert state == "done", page.locator(".jp-OutputArea-output").all_inner_texts()[-3:]
            page.wait_for_function(f"({IMAGE_DIGEST})('img.l2p-pixel')", polling=250)
            before = {k: page.evaluate(IMAGE_DIGEST, f"img.l2p-{k}") for k in ("latent", "pixel", "handoff")}
            assert "generation 1" in page.locator(".l2p-status").inner_text()

            # Move the cfg slider two ticks and edit the prompt, then press Generate.
            readout = page.locator(".l2p-cfg .widget-readout")
            cfg_before = readout.inner_text()
            handle = page.locator(".l2p-cfg .noUi-handle")
            handle.scroll_into_view_if_needed()
            handle.focus()
            handle.press("ArrowRight")
            handle.press("ArrowRight")
            page.wait_for_function("(v) => document.querySelector('.l2p-cfg .widget-readout').textContent.trim() !== v",
                                   arg=cfg_before.strip())
            prompt = page.locator(".l2p-prompt input")
            prompt.fill("a small blue square at the top left")
            prompt.press("Enter")
            page.wait_for_function("() => document.querySelector('.l2p-status').textContent.includes('changed')")
            # The smoke models have barely trained and ignore prompt and cfg; a new seed changes every image.
            seed = page.locator(".l2p-seed input")
            seed.fill("7")
            seed.press("Enter")
            page.locator(".l2p-button").click()
            page.wait_for_function("() => document.querySelector('.l2p-status').textContent.includes('generation 2')",
                                   timeout=60_000, polling=250)
            status = page.locator(".l2p-status").inner_text()
            after = {k: page.evaluate(IMAGE_DIGEST, f"img.l2p-{k}") for k in ("latent", "pixel", "handoff")}
            assert "a small blue square" in status
            assert float(readout.inner_text()) == pytest.approx(float(cfg_before) + 0.5)
            assert all(after[k] != before[k] for k in after), (before, after)
            page.locator("img.l2p-pixel").scroll_into_view_if_needed()
            page.screenshot(path=str(screenshot))
        except Exception:
            page.screenshot(path=str(shots / "05_interactive_failure.png"))
            raise
        finally:
            browser.close()
    assert screenshot.stat().st_size > 10_000
