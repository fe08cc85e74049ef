"""Regenerate every report headless: papermill runs the numbered notebooks in order.

    python -m l2p.reports --mode full      # or: make reports
    python -m l2p.reports --mode smoke --out /tmp/r

Each notebook gets the parameters `mode` and `smoke`; its executed copy, HTML and Markdown go to the
output folder, and `README.md` there indexes them with the key figures each notebook recorded through
`l2p.reports.record`, plus the date, commit and mode. A failing notebook stops the run (exit 1) and is
marked failed in the index.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_ENV = "L2P_REPORT_SUMMARY"
_recorded: dict[str, Any] = {}
WORLD_KEY = "world build"  # figures recorded under "world build (NAME)" name the toy world a report used


# ----------------------------------------------------------------------------------------------
#                                  Inside a notebook
# ----------------------------------------------------------------------------------------------

def record(key: str, value: Any, fmt: Optional[str] = None) -> Any:
    """Store a key figure for the report index (no-op storage when not run by the report runner)."""
    if hasattr(value, "item"):
        value = value.item()
    _recorded[key] = {"value": value, "fmt": fmt}
    path = os.environ.get(SUMMARY_ENV)
    if path:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(_recorded, indent=1, default=str))
        tmp.replace(path)
    return value


def share(part: float, whole: float) -> Any:
    """part / whole for the index, or a sentence where `whole` is 0 (smoke budgets: a baseline gets no check right)."""
    return float(part) / float(whole) if whole else "undefined: the reference is 0"


def _fmt(entry: dict) -> str:
    v, fmt = entry["value"], entry.get("fmt")
    if fmt and isinstance(v, (int, float)):
        return format(v, fmt)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ----------------------------------------------------------------------------------------------
#                                         Runner
# ----------------------------------------------------------------------------------------------

def notebooks(only: Optional[list[str]] = None) -> list[Path]:
    """notebooks/NN_*.ipynb in order (optionally only those whose NN or name is listed)."""
    nbs = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        nbs = [nb for nb in nbs if nb.name[:2] in only or nb.stem in only]
    return nbs


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        # the reports being written are not code: leave them out of "dirty"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!reports"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


IMAGE_TYPES = ("image/png", "image/jpeg")


def export(executed: Path) -> None:
    """HTML (with code) and Markdown beside the executed notebook; every image is saved once, in NAME_files/.

    The HTML and the Markdown link the files, and so does the executed notebook itself: each image output
    becomes a Markdown output naming its file (JupyterLab shows it from there). With images inline, the
    notebook, HTML and files held each image up to three times (04's notebook alone was 6.4 MB).
    Exporting a notebook whose images are linked already gives the same files again.
    """
    import nbformat
    from nbconvert import HTMLExporter, MarkdownExporter
    from nbconvert.writers import FilesWriter
    from traitlets.config import Config

    nb = nbformat.read(executed, as_version=4)
    files_dir = f"{executed.stem}_files"
    _inline_linked_images(nb, executed.parent)  # before the folder goes: an earlier export's files
    shutil.rmtree(executed.parent / files_dir, ignore_errors=True)  # no images from older runs
    writer = FilesWriter(build_directory=str(executed.parent))
    # the HTML template links an extracted image by its file name; SVG stays inline (its template would not)
    linked = Config({"ExtractOutputPreprocessor": {"enabled": True, "extract_output_types": set(IMAGE_TYPES)}})
    html = HTMLExporter(config=linked, exclude_input_prompt=True, exclude_output_prompt=True)
    for exporter in (html, MarkdownExporter()):
        body, resources = exporter.from_notebook_node(nb, resources={"output_files_dir": files_dir})
        writer.write(body, resources, notebook_name=executed.stem)
    _link_images(nb, executed.parent, files_dir)
    tmp = executed.with_name(executed.name + ".tmp")
    nbformat.write(nb, tmp)
    tmp.replace(executed)


def _image_outputs(nb):
    """(cell index, output index, output) for each output that shows an image, as nbconvert numbers them."""
    for c, cell in enumerate(nb.cells):
        for j, out in enumerate(cell.get("outputs", [])):
            if out.get("output_type") in ("display_data", "execute_result") and \
                    (any(t in out.get("data", {}) for t in IMAGE_TYPES) or "l2p_linked" in out.get("metadata", {})):
                yield c, j, out


def _link_images(nb, folder: Path, files_dir: str) -> None:
    """Replace each inline image by a Markdown link to the file the exporters wrote for it."""
    import copy

    from nbconvert.preprocessors import ExtractOutputPreprocessor

    # the exporters' own preprocessor, run again on a copy: it names each file as they did
    named, _ = ExtractOutputPreprocessor(extract_output_types=set(IMAGE_TYPES)).preprocess(
        copy.deepcopy(nb), {"output_files_dir": files_dir, "outputs": {}})
    for c, j, out in _image_outputs(nb):
        names = {t: f for t, f in named.cells[c].outputs[j].metadata.get("filenames", {}).items() if t in IMAGE_TYPES}
        for t, f in names.items():
            if not (folder / f).is_file():
                raise RuntimeError(f"export of {folder}: the image of cell {c}, output {j} was not written to {f}")
            del out.data[t]
        if names:
            out.data["text/markdown"] = "\n".join(f"![{t.split('/')[1]}]({f})" for t, f in names.items())
            out.metadata["l2p_linked"] = names


def _inline_linked_images(nb, folder: Path) -> None:
    """Undo `_link_images` where the files are still there, so a second export can write them again."""
    import base64

    for _, _, out in _image_outputs(nb):
        names = out.metadata.get("l2p_linked", {})
        if names and all((folder / f).is_file() for f in names.values()):
            for t, f in names.items():
                out.data[t] = base64.b64encode((folder / f).read_bytes()).decode()
            out.data.pop("text/markdown", None)
            del out.metadata["l2p_linked"]


def environment() -> str:
    """One line: library versions, build threads, cores, the CPU and the toy VAE's precision, as a report row records
    them (a toy build is bit-identical only where all of these are)."""
    from .cache import available_cores, build_threads, cpu_model, library_versions, run_threads, vae_precision
    libs = ", ".join(f"{k} {v}" for k, v in library_versions().items() if v)
    precision = {"bf16": "bf16 autocast", "no": "fp32"}[vae_precision()]
    return (f"{libs}; build threads {build_threads()}, run threads {run_threads()}; {available_cores()} cores of "
            f"{cpu_model()}; toy VAE trained in {precision}")


def write_index(out: Path, rows: list[dict], mode: str) -> Path:
    """README.md of the reports folder: status, mode, commit and key figures of every notebook.

    Rows of notebooks not re-run this time are kept from `index.json`, so a partial run (`--only`)
    updates its own entries and the index always says which commit and mode each report came from.
    """
    state = out / "index.json"
    known = {r["stem"]: r for r in (json.loads(state.read_text()) if state.exists() else [])}
    for r in rows:
        known[r["stem"]] = r
    order = [nb.stem for nb in notebooks()]
    merged = sorted(known.values(), key=lambda r: order.index(r["stem"]) if r["stem"] in order else len(order))
    state.write_text(json.dumps(merged, indent=1, default=str))
    lines = ["# Reports", "",
             f"Regenerated by `python -m l2p.reports --mode {{full,smoke}}` (`make reports`); last run "
             f"{_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} ({mode} mode) on {os.cpu_count()} CPU core(s).", "",
             "| notebook | status | mode | minutes | commit | date | toy world build | report |",
             "|---|---|---|---|---|---|---|---|"]
    for r in merged:
        links = f"[html]({r['stem']}.html) · [md]({r['stem']}.md) · [ipynb]({r['stem']}.ipynb)"
        lines.append(f"| {r['stem']} | {r['status']} | {r.get('mode', '?')} | {r['seconds'] / 60:.1f}{_busy_mark(r)} | "
                     f"`{r.get('commit', '?')}` | {r.get('date', '?')} | {world_cell(r)} | {links} |")
    if any(_busy_mark(r) for r in merged):
        lines += ["", f"⚠ other processes kept ≥ {BUSY_MARK} core(s) busy on average while that notebook ran "
                  "(its `others_busy_cores` in index.json): its minutes, and any wall times among its figures, are "
                  "not clean; the other figures do not depend on it."]
    envs: dict[str, list[str]] = {}
    for r in merged:
        envs.setdefault(r.get("environment") or "not recorded", []).append(r["stem"][:2])
    lines += ["", "Environment (toy results depend on library versions, the build thread count, the kind of CPU and "
              "the VAE precision):", ""]
    lines += [f"- {', '.join(stems)}: {env}" for env, stems in envs.items()]
    for r in merged:
        if r.get("summary"):
            lines += ["", f"## {r['stem']}", "", "| figure | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in r["summary"].items()]
        if r.get("error"):
            lines += ["", f"## {r['stem']}: FAILED", "", "```", r["error"], "```"]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


BUSY_MARK = 0.5  # cores kept busy by others, on average, from which a report's timings are marked as not clean


def _busy_mark(row: dict) -> str:
    return " ⚠" if (row.get("others_busy_cores") or 0) >= BUSY_MARK else ""


def world_builds(row: dict) -> str:
    """The toy world builds a report used, as `build_toy_world` recorded them: "fingerprint (name)", joined."""
    found = [(k[len(WORLD_KEY):].strip(" ()"), v["value"]) for k, v in (row.get("summary") or {}).items()
             if k.startswith(WORLD_KEY)]
    return ", ".join(f"`{fp}` ({name})" for name, fp in found)


def world_cell(row: dict) -> str:
    """The index's *toy world build* cell: the builds, "none used", or "not recorded" for older rows."""
    # rows whose environment names the VAE precision come from a runner that records world builds (ef96778 on)
    recorded = "toy VAE trained in" in (row.get("environment") or "")
    return world_builds(row) or ("none used" if recorded else "not recorded")


def _cpu_times() -> Optional[tuple[float, float]]:
    """(busy, total) CPU time of the whole machine so far, from /proc/stat; None where there is none."""
    try:
        return _parse_cpu_line(Path("/proc/stat").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def _parse_cpu_line(line: str) -> tuple[float, float]:
    """(busy, total) from /proc/stat's `cpu` line: user nice system idle iowait irq softirq steal [guest …]."""
    fields = [float(v) for v in line.split()[1:9]]  # guest time is already inside user time
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(interval: float = 0.5) -> Optional[float]:
    """How many cores other processes keep busy right now (/proc/stat over `interval` s; this one sleeps)."""
    a = _cpu_times()
    if a is None:
        return None
    time.sleep(interval)
    b = _cpu_times()
    if b is None or b[1] <= a[1]:
        return None
    return (b[0] - a[0]) / (b[1] - a[1]) * (os.cpu_count() or 1)  # /proc/stat counts every CPU of the machine


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (the notebook kernels papermill started and ended)."""
    import resource
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def others_busy(machine_before, machine_after, own_seconds: float, wall: float) -> Optional[float]:
    """Cores that other processes kept busy on average over `wall` s: the machine's busy CPU time (two
    `_cpu_times()` readings, in /proc/stat ticks) less this run's own CPU seconds. None without /proc/stat."""
    if machine_before is None or machine_after is None or wall <= 0:
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = (machine_after[0] - machine_before[0]) / ticks
    return max(0.0, (busy - own_seconds) / wall)


def busy_cores_note(threads: int) -> Optional[str]:
    """A warning when other processes keep the cores busy, else None.

    Torch's OpenMP threads stall when the cores are oversubscribed (bench/bench_oversubscription.py measured
    5.8–23× slowdowns for two 2-thread toy jobs on 2 cores), so a report run beside other work can take many
    times its usual time. Results are unchanged: only the wall time suffers. Busy means both the 1-min load
    average and a half-second sample say so: the average alone still counts work that just ended (`make
    reports` right after its own install), the sample alone can catch a passing blip.
    """
    from .cache import available_cores
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return None
    cores = available_cores()
    if load + threads <= cores + 0.5:
        return None
    now = busy_cores()
    if now is not None and now + threads <= cores + 0.5:
        return None
    busy = load if now is None else min(load, now)
    return (f"note: other processes keep {busy:.1f} of {cores} core(s) busy (load average {load:.1f}), and this "
            f"run's {threads} torch thread(s) on top oversubscribe them; it may take several times longer")


def run(mode: str = "full", out: Path = ROOT / "reports", only: Optional[list[str]] = None,
        timeout: Optional[int] = None, parameters: Optional[dict] = None, jobs: Optional[int] = None,
        order: str = "longest") -> list[dict]:
    """Execute the notebooks in order; stop at the first failure (raised as SystemExit naming it).

    With jobs > 1, first train the fine-tuning runs the notebooks will ask for in that many worker
    processes (`toyworld.prebuild`); the notebooks then load them from the cache. None: one worker per core
    in full mode (`prebuild.auto_jobs`), none in smoke mode. Not with `parameters`: the plan is the default
    parameters' runs. `order`: which runs the workers take up first (`prebuild.order_runs`).
    """
    import papermill as pm

    out.mkdir(parents=True, exist_ok=True)
    os.environ["L2P_HEADLESS"] = "1"  # inherited by the kernels: text progress bars
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    rows, failed = [], None
    nbs = notebooks(only)
    own = _own_parameters(nbs, parameters or {})  # before anything runs: a misspelt -p fails here
    from .cache import build_threads
    note = busy_cores_note(build_threads())
    if note:
        print(note, flush=True)
    if jobs is None:
        from .toyworld.prebuild import auto_jobs
        jobs = auto_jobs(mode)
    if jobs > 1 and parameters:
        # its plan is the runs of the notebooks' default parameters: with others it would train runs nobody asks for
        print(f"prebuild skipped: -p {parameters} changes what the notebooks train, so each trains its own runs "
              "in turn", flush=True)
    elif jobs > 1:
        from .toyworld.prebuild import prebuild
        done = prebuild(mode, jobs, notebooks=[nb.stem for nb in nbs], log=lambda m: print(m, flush=True),
                        order=order)
        print(f"prebuild: {done['built']} run(s) in {done['minutes']:.1f} min", flush=True)
    for i, nb in enumerate(nbs, 1):
        summary = out / f"{nb.stem}.summary.json"
        summary.unlink(missing_ok=True)
        os.environ[SUMMARY_ENV] = str(summary)
        print(f"[{i}/{len(nbs)}] {nb.name} ({mode}) …", flush=True)
        t0, cpu0, own0 = time.time(), _cpu_times(), _own_cpu_seconds()
        extra = "".join(f", {k}={v}" for k, v in own[nb.stem].items())
        row = {"stem": nb.stem, "status": "ok", "mode": mode + extra, "commit": _commit(),
               "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "environment": environment()}
        try:
            pm.execute_notebook(str(nb), str(out / nb.name), parameters={"mode": mode, "smoke": mode == "smoke",
                                                                          **own[nb.stem]},
                                cwd=str(ROOT), kernel_name="python3", progress_bar=False, log_output=False,
                                execution_timeout=timeout, coalesce_streams=True, stdout_file=sys.stdout, stderr_file=sys.stderr)
        except Exception as e:  # papermill writes the failing notebook too: keep it for reading
            row.update(status="FAILED", error=f"{type(e).__name__}: {e}"[:4000])
            failed = nb.name
        row["seconds"] = time.time() - t0
        others = others_busy(cpu0, _cpu_times(), _own_cpu_seconds() - own0, row["seconds"])
        if others is not None:
            row["others_busy_cores"] = round(others, 2)
        if (out / nb.name).exists():
            export(out / nb.name)
        row["summary"] = json.loads(summary.read_text()) if summary.exists() else {}
        summary.unlink(missing_ok=True)
        rows.append(row)
        print(f"    {row['status']} in {row['seconds'] / 60:.1f} min", flush=True)
        write_index(out, rows, mode)
        if failed:
            raise SystemExit(f"notebook {failed} failed; see {out / nb.name} and {out / 'README.md'}")
    return rows


def _own_parameters(nbs: list[Path], parameters: dict) -> dict:
    """{notebook stem: the `parameters` its parameters cell declares}: a notebook gets only its own, and a key no
    notebook of the run declares is an error naming the notebooks and what they take (papermill would inject it
    silently, so a misspelt `-p` would run the defaults)."""
    import papermill as pm
    declared = {nb.stem: set(pm.inspect_notebook(str(nb))) for nb in nbs}
    unknown = sorted(set(parameters) - set().union(*declared.values()))
    if unknown:
        takes = "; ".join(f"{stem}: {', '.join(sorted(keys)) or 'none'}" for stem, keys in declared.items())
        raise SystemExit(f"-p {', '.join(unknown)}: no notebook of this run has such a parameter ({takes})")
    return {stem: {k: v for k, v in parameters.items() if k in keys} for stem, keys in declared.items()}


def add_reports_parser(sub) -> None:
    p = sub.add_parser("reports", help="regenerate the reports headless (papermill)")
    _args(p)
    p.set_defaults(func=lambda a: _main(a))


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["full", "smoke"], default="full")
    p.add_argument("--out", type=Path, default=ROOT / "reports")
    p.add_argument("--only", nargs="*", help="notebook numbers or names, e.g. 00 03")
    p.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")
    p.add_argument("--jobs", type=_jobs, default=None,
                   help="train the notebooks' fine-tuning runs first in this many parallel workers, each on "
                        "L2P_RUN_THREADS threads (1), at most cores ÷ threads; 1: the notebooks train them "
                        "one by one; auto (default): one per core in full mode, 1 in smoke mode")
    p.add_argument("--order", choices=["longest", "shortest", "plan"], default="longest",
                   help="which runs the workers train first: longest (default; the shortest wall time), shortest "
                        "(the most runs cached early, for a session that may be cut off) or plan (planned order)")
    p.add_argument("--plan", action="store_true",
                   help="print which fine-tuning runs are cached and an estimate of what is left, then exit")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the notebooks that declare it, a Python literal or else a string, e.g. "
                        "-p steps=6000 -p experiments=transfer,freeze_policy; no prebuild with -p")


def _jobs(v: str) -> Optional[int]:
    if v == "auto":
        return None
    if not v.isdigit():
        raise argparse.ArgumentTypeError(f"--jobs {v!r}: a number of workers, or auto")
    return int(v)


def _param(kv: str) -> tuple[str, object]:
    """`-p KEY=VALUE`: a Python literal (6000, 1.0, True) where VALUE reads as one, else the string."""
    import ast
    key, sep, value = kv.partition("=")
    if not sep or not key:
        raise SystemExit(f"-p {kv!r}: expected KEY=VALUE")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _main(a) -> int:
    if a.plan:
        from .toyworld.prebuild import auto_jobs, plan_summary, plan_table
        nbs = [nb.stem for nb in notebooks(a.only)]
        print(plan_summary(plan_table(a.mode, nbs), a.jobs or auto_jobs(a.mode)))
        return 0
    params = dict(_param(kv) for kv in a.param)
    run(a.mode, a.out, a.only, a.timeout, params or None, a.jobs, a.order)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _args(ap)
    sys.exit(_main(ap.parse_args()))
