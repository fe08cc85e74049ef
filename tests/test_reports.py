"""The main job in smoke mode: every numbered notebook runs headless and the index records it."""
import io
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_sources_have_no_outputs_and_a_parameters_cell(nb):
    cells = json.loads(nb.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), "commit notebooks without outputs"
    tagged = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and "smoke" in "".join(tagged[0]["source"])


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_has_no_undefined_names_or_unused_imports(nb):
    """pyflakes over the code cells joined in order (IPython magics left out): a name a cell uses but no
    cell defines fails here, not halfway through a report run."""
    from pyflakes.api import check
    from pyflakes.reporter import Reporter
    cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
    lines = (line for c in cells for line in "".join(c["source"]).splitlines())
    code = "\n".join(line for line in lines if not line.startswith(("%", "!")))
    out, err = io.StringIO(), io.StringIO()
    check(code, nb.name, Reporter(out, err))
    assert not (out.getvalue() + err.getvalue()), out.getvalue() + err.getvalue()


@pytest.mark.slow
def test_reports_smoke_run(tmp_path, monkeypatch):
    pytest.importorskip("papermill")
    from l2p import reports

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # smoke models are tiny: a second thread only adds barrier waits
    rows = reports.run("smoke", out=tmp_path / "reports")
    assert [r["stem"] for r in rows] == [nb.stem for nb in NOTEBOOKS]
    assert all(r["status"] == "ok" for r in rows)
    index = (tmp_path / "reports" / "README.md").read_text()
    for nb in NOTEBOOKS:
        assert f"| {nb.stem} | ok |" in index
        assert (tmp_path / "reports" / f"{nb.stem}.html").exists()
        assert (tmp_path / "reports" / f"{nb.stem}.md").exists()
        executed = json.loads((tmp_path / "reports" / nb.name).read_text())  # images live in NAME_files/ only
        assert not any(k.startswith("image/") for c in executed["cells"] for o in c.get("outputs", [])
                       for k in o.get("data", {}))
    assert any((tmp_path / "reports" / f"{nb.stem}_files").is_dir() for nb in NOTEBOOKS)
    from importlib.metadata import version
    env = rows[0]["environment"]  # what the results depend on, recorded once per distinct environment
    assert f"torch {version('torch')}" in env and "build threads 1" in env  # the test session's setting
    assert f"- {', '.join(nb.stem[:2] for nb in NOTEBOOKS)}: {env}" in index
    by_name = {r["stem"]: r["summary"] for r in rows}
    assert "copied tensors bit-identical" in by_name["01_weight_conversion"]
    ok, total = by_name["01_weight_conversion"]["copied tensors bit-identical"]["value"].split("/")
    assert ok == total
    # each report names the toy world build it used, so reports from different builds cannot pass as one
    builds = {r["stem"]: reports.world_builds(r) for r in rows}
    assert builds["00_toy_world"].endswith("(smoke)") and builds["03_finetune"] == builds["00_toy_world"]
    assert f"| {builds['03_finetune']} |" in index
    assert reports.world_cell(next(r for r in rows if r["stem"] == "06_efficiency")) == "none used"


def test_the_index_tells_a_report_without_a_world_from_an_older_row():
    from l2p import reports
    env = "torch 2.13.0; build threads 2, run threads 1; 2 cores; toy VAE trained in fp32"
    used = {"environment": env, "summary": {"world build (full)": {"value": "53dafa4e56"}}}
    assert reports.world_cell(used) == "`53dafa4e56` (full)"
    assert reports.world_cell({"environment": env, "summary": {}}) == "none used"
    assert reports.world_cell({"summary": {}}) == "not recorded"  # written before world builds were recorded


def test_failing_notebook_stops_the_run_and_is_marked(tmp_path, monkeypatch):
    """A failing notebook gives a non-zero exit naming it, and the index marks it FAILED."""
    pytest.importorskip("papermill")
    import nbformat
    from l2p import reports

    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    for i, src in enumerate(["x = 1", "raise RuntimeError('boom')", "y = 2"]):
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell("mode = 'full'\nsmoke = False")
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params, nbformat.v4.new_code_cell(src)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, nbdir / f"0{i}_case.ipynb")
    monkeypatch.setattr(reports, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match="01_case.ipynb failed"):
        reports.run("smoke", out=tmp_path / "out")
    index = (tmp_path / "out" / "README.md").read_text()
    assert "| 00_case | ok |" in index and "| 01_case | FAILED |" in index and "02_case" not in index.split("## ")[0]
    assert "boom" in index
    rows = json.loads((tmp_path / "out" / "index.json").read_text())
    if Path("/proc/stat").exists():  # each run records how busy other processes kept the machine
        assert all(r["others_busy_cores"] >= 0 for r in rows)


def test_a_parameter_goes_only_to_the_notebooks_that_declare_it_and_an_unknown_one_stops_the_run(tmp_path, monkeypatch):
    """`-p compare_scratch=False` reaches 03, not 00; a key no notebook of the run declares (a typo) fails before any
    notebook runs, naming it and what the notebooks take, instead of running the defaults. With parameters there is
    no prebuild: it would train the default parameters' runs."""
    pytest.importorskip("papermill")
    import nbformat
    from l2p import reports

    nbdir = tmp_path / "notebooks"
    nbdir.mkdir()
    for i, own in enumerate(["a = 1", "b = 1"]):
        nb = nbformat.v4.new_notebook()
        params = nbformat.v4.new_code_cell(f"mode = 'full'\nsmoke = False\n{own}")
        params.metadata["tags"] = ["parameters"]
        nb.cells = [params, nbformat.v4.new_code_cell("print(sorted(k for k in ('a', 'b') if k in globals()), a if 'a' in globals() else b)")]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, nbdir / f"0{i}_case.ipynb")
    monkeypatch.setattr(reports, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match=r"-p c, d: no notebook of this run .*00_case: a, mode, smoke; 01_case: b, mode"):
        reports.run("smoke", out=tmp_path / "bad", parameters={"c": 1, "a": 2, "d": 3})
    assert not (tmp_path / "bad" / "00_case.ipynb").exists()
    from l2p.toyworld import prebuild
    monkeypatch.setattr(prebuild, "prebuild", lambda *a, **k: pytest.fail("prebuild plans the default parameters' runs"))
    rows = reports.run("smoke", out=tmp_path / "out", parameters={"a": 2}, jobs=2)
    assert [r["mode"] for r in rows] == ["smoke, a=2", "smoke"]
    printed = [nbformat.read(tmp_path / "out" / f"0{i}_case.ipynb", as_version=4).cells[-1].outputs[0].text
               for i in range(2)]
    assert printed == ["['a'] 2\n", "['b'] 1\n"]


def test_export_leaves_no_images_from_older_runs(tmp_path):
    """Cell numbers shift when a notebook changes; images the new Markdown and HTML do not name must not linger,
    and the HTML links the images the Markdown uses rather than holding copies."""
    import base64
    import io

    import nbformat
    from PIL import Image

    from l2p.reports import export
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(buf, format="PNG")
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("show()")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(buf.getvalue()).decode()})]
    nb.cells = [cell]
    executed = tmp_path / "07_demo.ipynb"
    nbformat.write(nb, executed)
    stale = tmp_path / "07_demo_files" / "output_9_0.png"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    export(executed)
    files = sorted(p.name for p in (tmp_path / "07_demo_files").iterdir())
    assert files and "output_9_0.png" not in files
    assert all(f in (tmp_path / "07_demo.md").read_text() for f in files)
    html = (tmp_path / "07_demo.html").read_text()
    assert all(f'src="07_demo_files/{f}"' in html for f in files)  # linked, not embedded a second time
    assert '<img src="data:' not in html


def test_the_executed_notebook_links_its_images_and_a_second_export_keeps_them(tmp_path):
    """Images live once, in NAME_files/: the executed notebook shows each through a Markdown output naming the
    file; exporting it again (a user re-running export) must not lose a file nor change the notebook."""
    import base64
    import io

    import nbformat
    from PIL import Image

    from l2p.reports import export

    def png(colour):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), colour).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    nb = nbformat.v4.new_notebook()
    plot = nbformat.v4.new_code_cell("plot()")
    plot.outputs = [nbformat.v4.new_output("stream", text="training…\n"),
                    nbformat.v4.new_output("display_data", data={"image/png": png("red"), "text/plain": "<Figure>"})]
    table = nbformat.v4.new_code_cell("table")
    table.outputs = [nbformat.v4.new_output("execute_result", data={"text/html": "<table></table>"}, execution_count=1)]
    grid = nbformat.v4.new_code_cell("grid()")
    grid.outputs = [nbformat.v4.new_output("display_data", data={"image/png": png("blue")})]
    nb.cells = [nbformat.v4.new_markdown_cell("# demo"), plot, table, grid]
    executed = tmp_path / "04_demo.ipynb"
    nbformat.write(nb, executed)

    export(executed)
    linked = nbformat.read(executed, as_version=4)
    nbformat.validate(linked)
    assert not any("image/png" in o.get("data", {}) for c in linked.cells for o in c.get("outputs", []))
    shown = [o for c in linked.cells for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})]
    assert [o.data["text/markdown"] for o in shown] == ["![png](04_demo_files/output_1_1.png)",
                                                       "![png](04_demo_files/output_3_0.png)"]
    assert shown[0].data["text/plain"] == "<Figure>"
    assert linked.cells[2].outputs == table.outputs  # no image: untouched
    files = {p.name: p.read_bytes() for p in (tmp_path / "04_demo_files").iterdir()}
    assert files["output_1_1.png"] == base64.b64decode(png("red"))
    assert files["output_3_0.png"] == base64.b64decode(png("blue"))

    text, html = executed.read_text(), (tmp_path / "04_demo.html").read_text()
    export(executed)
    assert executed.read_text() == text and (tmp_path / "04_demo.html").read_text() == html
    assert {p.name: p.read_bytes() for p in (tmp_path / "04_demo_files").iterdir()} == files
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("load,now,cores,threads,warned", [
    (0.1, 2.0, 2, 2, False), (1.0, 1.0, 2, 2, True), (1.2, 1.2, 2, 1, False), (2.0, 2.0, 2, 1, True),
    (6.0, 6.0, 16, 2, False),
    (1.9, 0.1, 2, 2, False),  # work that just ended (the install before `make reports`): the average still counts it
    (1.9, None, 2, 2, True),  # no /proc/stat: the load average alone decides
])
def test_a_report_run_warns_when_other_processes_keep_the_cores_busy(monkeypatch, load, now, cores, threads, warned):
    from l2p import cache, reports
    monkeypatch.setattr(reports.os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(reports, "busy_cores", lambda interval=0.5: now)
    monkeypatch.setattr(cache, "available_cores", lambda: cores)
    note = reports.busy_cores_note(threads)
    assert (note is not None) == warned
    if warned:
        assert f"keep {min(load, now if now is not None else load):.1f} of {cores} core(s) busy" in note
        assert f"load average {load:.1f}" in note


def test_busy_cores_counts_the_non_idle_share_of_cpu_time(monkeypatch):
    from l2p import reports
    # /proc/stat's cpu line: user nice system idle iowait irq softirq steal
    lines = iter(["cpu  100 0 0 900 0 0 0 0 0 0", "cpu  250 0 50 1000 0 0 0 0 0 0"])
    monkeypatch.setattr(reports, "_cpu_times", lambda: reports._parse_cpu_line(next(lines)))
    monkeypatch.setattr(reports.os, "cpu_count", lambda: 2)
    assert reports.busy_cores(interval=0) == pytest.approx(200 / 300 * 2)
    assert reports._parse_cpu_line("cpu  1 2 3 4 5 6 7 8 9 10") == (1 + 2 + 3 + 6 + 7 + 8, 36)


def test_a_report_timed_beside_other_work_is_marked_in_the_index(tmp_path, monkeypatch):
    """Machine busy time less the run's own CPU time, per wall second: cores others kept busy."""
    from l2p import reports
    monkeypatch.setattr(reports.os, "sysconf", lambda name: 100)  # ticks per second
    # 60 s of wall time; the machine was busy for 100 s, 40 of them this run's own: 1 core for others
    assert reports.others_busy((1000, 5000), (11000, 17000), 40.0, 60.0) == pytest.approx(1.0)
    assert reports.others_busy((1000, 5000), (3000, 17000), 40.0, 60.0) == 0.0  # never below zero
    assert reports.others_busy(None, (3000, 17000), 40.0, 60.0) is None
    rows = [{"stem": "00_a", "status": "ok", "seconds": 60, "others_busy_cores": 1.0},
            {"stem": "01_b", "status": "ok", "seconds": 60, "others_busy_cores": 0.1},
            {"stem": "02_c", "status": "ok", "seconds": 60}]  # an older row: nothing recorded, no mark
    monkeypatch.setattr(reports, "notebooks", lambda only=None: [])
    index = reports.write_index(tmp_path, rows, "full").read_text()
    assert "| 00_a | ok | ? | 1.0 ⚠ |" in index and "| 01_b | ok | ? | 1.0 |" in index
    assert "| 02_c | ok | ? | 1.0 |" in index and "⚠ other processes kept" in index


def test_notebook_parameters_from_the_command_line_are_literals_where_they_read_as_one():
    from l2p import reports
    assert reports._param("steps=6000") == ("steps", 6000)
    assert reports._param("vae_fit_gain=1.0") == ("vae_fit_gain", 1.0)
    assert reports._param("head_time=True") == ("head_time", True)
    assert reports._param("init=vae_fit") == ("init", "vae_fit")
    assert reports._param("experiments=transfer,freeze_policy") == ("experiments", "transfer,freeze_policy")
    assert reports._param("note=a=b") == ("note", "a=b")
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        reports._param("steps")


def test_share_is_a_ratio_or_says_why_there_is_none():
    """Smoke budgets leave baselines at 0 shape checks right: the index gets a sentence, not 0/0 and a warning."""
    import warnings
    import numpy as np
    from l2p.reports import _fmt, share
    assert share(np.float64(0.3), np.float64(0.6)) == pytest.approx(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's 0/0 RuntimeWarning would fail here
        none = share(np.float64(0.0), np.float64(0.0))
    assert none == "undefined: the reference is 0" and _fmt({"value": none, "fmt": ".2f"}) == none
