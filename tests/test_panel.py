"""The interactive panel, headless: controls → generation → image bytes and labels, scheduling, static figure."""
import time

import pytest
import torch
from matplotlib.figure import Figure

from l2p.panel import GenerationPanel, png_bytes, strip_png
from test_trajectory import tiny_pipes


@pytest.fixture(scope="module")
def pipes():
    return tiny_pipes()


def make_panel(pipes, **kw):
    kw = {"prompt": "a red disk", "cfg_scale": 2.0, "steps": 2, "seed": 0, "sigma_h": 0.5, "background": False, **kw}
    return GenerationPanel(*pipes, **kw)


def snapshot(panel):
    return {k: bytes(panel.images[k].value) for k in panel.images}, {k: panel.labels[k].value for k in panel.labels}


def test_generate_fills_images_labels_and_status(pipes):
    panel = make_panel(pipes)
    assert all(bytes(im.value) == b"" for im in panel.images.values()) and panel.generations == 0
    panel.button.click()
    images, labels = snapshot(panel)
    assert panel.generations == 1 and not panel.button.disabled
    assert all(v.startswith(b"\x89PNG") for v in images.values())
    assert "ms" in labels["latent"] and "latent model" in labels["latent"]
    assert "σ_h=0.50" in labels["handoff"] and "2 latent + 1 pixel steps" in labels["handoff"]  # σ: 1, .75, (.5), 0
    assert "a red disk" in panel.status.value
    assert set(panel.results) == {"latent", "pixel", "handoff"}
    assert panel.results["pixel"]["image"].shape == (3, 64, 64)


def test_moving_a_slider_then_generating_changes_images_and_labels(pipes):
    panel = make_panel(pipes)
    panel.generate()
    before_img, _ = snapshot(panel)
    panel.cfg.value = 4.0
    assert "changed" in panel.status.value and panel.generations == 1  # nothing runs until the button
    panel.button.click()
    after_img, after_lbl = snapshot(panel)
    assert panel.generations == 2 and panel.params()["cfg_scale"] == 4.0
    for k in ("latent", "handoff"):  # the latent model and the handoff's latent stage
        assert after_img[k] != before_img[k], k
    assert after_img["pixel"] == before_img["pixel"]  # the pixel model has its own scale
    # labels show the new run's wall times (comparing with the old labels flaked when two timings matched to the ms)
    assert all(f"{1000 * panel.results[k]['seconds']:.0f} ms" in after_lbl[k] for k in after_lbl)


def test_editing_the_prompt_changes_the_images(pipes):
    panel = make_panel(pipes)
    panel.generate()
    before, _ = snapshot(panel)
    panel.prompt.value = "three green triangles"
    panel.button.click()
    after, _ = snapshot(panel)
    assert after["pixel"] != before["pixel"] and after["latent"] != before["latent"]
    assert "three green triangles" in panel.status.value


def test_sigma_h_limits_reuse_the_pure_samples(pipes):
    panel = make_panel(pipes, sigma_h=0.0)
    panel.generate()
    assert panel.images["handoff"].value == panel.images["latent"].value
    assert panel.results["handoff"].get("reused")
    panel.set(sigma_h=1.0).generate()
    assert panel.images["handoff"].value == panel.images["pixel"].value
    assert "σ_h=1.00" in panel.labels["handoff"].value


def test_same_values_give_the_same_images(pipes):
    a, b = make_panel(pipes, seed=5), make_panel(pipes, seed=5)
    a.generate()
    b.generate()
    assert snapshot(a)[0] == snapshot(b)[0]
    b.set(seed=6).generate()
    assert snapshot(a)[0]["pixel"] != snapshot(b)[0]["pixel"]


def test_auto_mode_generates_on_change(pipes):
    panel = make_panel(pipes, auto=True, debounce=0)
    panel.steps.value = 3
    assert panel.generations == 1 and panel.params()["steps"] == 3
    panel.auto.value = False
    panel.steps.value = 2
    assert panel.generations == 1


def test_background_debounce_coalesces_changes(pipes):
    panel = make_panel(pipes, auto=True, debounce=0.2, background=True)
    for v in (1.5, 2.5, 3.5):  # three quick moves: one generation with the last value
        panel.cfg.value = v
    time.sleep(0.05)
    assert panel.generations == 0
    t0 = time.time()
    while panel.generations == 0 and time.time() - t0 < 30:
        time.sleep(0.05)
    panel.wait(30)
    assert panel.generations == 1 and panel.last_error is None
    assert panel.used["cfg_scale"] == 3.5 and "cfg 3.5" in panel.figure().texts[0].get_text()


def test_background_requests_during_a_run_are_coalesced(pipes):
    panel = make_panel(pipes, background=True)
    panel.request()
    panel.request()  # while the first runs: queued once
    panel.request()
    panel.wait(60)
    assert 1 <= panel.generations <= 2 and not panel._running and panel.last_error is None


def test_trajectory_strip(pipes):
    panel = make_panel(pipes, steps=3, strip_steps=3)
    assert panel.strip_box.layout.display == "none"
    panel.show_trajectory.value = True
    assert panel.strip_box.layout.display == "flex"
    panel.generate()
    assert bytes(panel.strip.value).startswith(b"\x89PNG")
    assert [len(panel.trajectory[k]) for k in ("latent", "pixel")] == [3, 3]
    assert panel.trajectory["latent"][0].shape == (3, 64, 64)
    fig = panel.figure()
    assert isinstance(fig, Figure) and len(fig.axes) == 3 + 2 * 3


def test_static_figure_and_errors(pipes):
    panel = make_panel(pipes)
    with pytest.raises(RuntimeError):
        panel.figure()
    panel.generate()
    fig = panel.figure()
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    assert "a red disk" in fig.texts[0].get_text()

    class Broken:
        def sample(self, *a, **k):
            raise RuntimeError("out of memory, say")

    bad = GenerationPanel(Broken(), pipes[1], prompt="x", steps=1, background=False)
    bad.button.click()
    assert "out of memory" in bad.status.value and not bad.button.disabled and bad.generations == 0


def test_png_helpers():
    x = torch.rand(3, 8, 8) * 2 - 1
    from PIL import Image
    import io
    assert Image.open(io.BytesIO(png_bytes(x, 32))).size == (32, 32)
    assert Image.open(io.BytesIO(strip_png([[x, x, x], [x]], size=16, gap=2))).size == (52, 34)


def test_the_pixel_model_has_its_own_guidance_slider(pipes):
    from l2p.handoff import handoff_sample
    panel = make_panel(pipes, pixel_cfg_scale=1.0)
    assert panel.params()["pixel_cfg_scale"] == 1.0 and panel.params()["cfg_scale"] == 2.0
    panel.generate()
    before, _ = snapshot(panel)
    latent_pipe, pixel_pipe = pipes
    alone = pixel_pipe.sample("a red disk", seed=0, num_inference_steps=2, cfg_scale=1.0, height=64, width=64)[0]
    assert torch.equal(panel.results["pixel"]["image"], alone.float())
    hand = handoff_sample(latent_pipe, pixel_pipe, "a red disk", 0.5, seed=0, num_inference_steps=2, cfg_scale=2.0,
                          shift=3.0, pixel_cfg_scale=1.0)
    assert torch.equal(panel.results["handoff"]["image"], hand.images[0])
    panel.pixel_cfg.value = 5.0
    panel.button.click()
    after, _ = snapshot(panel)
    assert after["latent"] == before["latent"]
    assert after["pixel"] != before["pixel"] and after["handoff"] != before["handoff"]
    assert "pixel 5" in panel.figure().texts[0].get_text()
    assert make_panel(pipes).params()["pixel_cfg_scale"] == 2.0  # by default it starts at the latent scale
