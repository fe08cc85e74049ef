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
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
SUMMARY_ENV = "L2P_REPORT_SUMMARY"
_recorded: dict[str, Any] = {}


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
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def export(executed: Path) -> None:
    """HTML (with code) and Markdown (with images in NAME_files/) beside the executed notebook."""
    import nbformat
    from nbconvert import HTMLExporter, MarkdownExporter
    from nbconvert.writers import FilesWriter

    nb = nbformat.read(executed, as_version=4)
    writer = FilesWriter(build_directory=str(executed.parent))
    for exporter in (HTMLExporter(exclude_input_prompt=True, exclude_output_prompt=True), MarkdownExporter()):
        body, resources = exporter.from_notebook_node(nb, resources={"output_files_dir": f"{executed.stem}_files"})
        writer.write(body, resources, notebook_name=executed.stem)


def write_index(out: Path, rows: list[dict], mode: str) -> Path:
    """README.md of the reports folder: status, time and key figures of every notebook."""
    lines = [f"# Reports ({mode} mode)", "",
             f"Generated {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')} from commit `{_commit()}` by "
             f"`python -m l2p.reports --mode {mode}` on {os.cpu_count()} CPU core(s).", "",
             "| notebook | status | minutes | report |", "|---|---|---|---|"]
    for r in rows:
        links = f"[html]({r['stem']}.html) · [md]({r['stem']}.md) · [ipynb]({r['stem']}.ipynb)"
        lines.append(f"| {r['stem']} | {r['status']} | {r['seconds'] / 60:.1f} | {links} |")
    for r in rows:
        if r.get("summary"):
            lines += ["", f"## {r['stem']}", "", "| figure | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in r["summary"].items()]
        if r.get("error"):
            lines += ["", f"## {r['stem']}: FAILED", "", "```", r["error"], "```"]
    path = out / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(mode: str = "full", out: Path = ROOT / "reports", only: Optional[list[str]] = None,
        timeout: Optional[int] = None, parameters: Optional[dict] = None) -> list[dict]:
    """Execute the notebooks in order; stop at the first failure (raised as SystemExit naming it)."""
    import papermill as pm

    out.mkdir(parents=True, exist_ok=True)
    os.environ["L2P_HEADLESS"] = "1"  # inherited by the kernels: text progress bars
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    rows, failed = [], None
    nbs = notebooks(only)
    for i, nb in enumerate(nbs, 1):
        summary = out / f"{nb.stem}.summary.json"
        summary.unlink(missing_ok=True)
        os.environ[SUMMARY_ENV] = str(summary)
        print(f"[{i}/{len(nbs)}] {nb.name} ({mode}) …", flush=True)
        t0 = time.time()
        row = {"stem": nb.stem, "status": "ok"}
        try:
            pm.execute_notebook(str(nb), str(out / nb.name), parameters={"mode": mode, "smoke": mode == "smoke",
                                                                          **(parameters or {})},
                                cwd=str(ROOT), kernel_name="python3", progress_bar=False, log_output=False,
                                execution_timeout=timeout, coalesce_streams=True, stdout_file=sys.stdout, stderr_file=sys.stderr)
        except Exception as e:  # papermill writes the failing notebook too: keep it for reading
            row.update(status="FAILED", error=f"{type(e).__name__}: {e}"[:4000])
            failed = nb.name
        row["seconds"] = time.time() - t0
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


def add_reports_parser(sub) -> None:
    p = sub.add_parser("reports", help="regenerate the reports headless (papermill)")
    _args(p)
    p.set_defaults(func=lambda a: _main(a))


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["full", "smoke"], default="full")
    p.add_argument("--out", type=Path, default=ROOT / "reports")
    p.add_argument("--only", nargs="*", help="notebook numbers or names, e.g. 00 03")
    p.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds")


def _main(a) -> int:
    run(a.mode, a.out, a.only, a.timeout)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _args(ap)
    sys.exit(_main(ap.parse_args()))
