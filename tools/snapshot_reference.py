"""
Copy a finished run's tables, comparisons, summary and figures to ``reports/reference/`` with where
and how they were made, so a user can compare their run with it (README "Reference run").

    python tools/snapshot_reference.py --command "dvc exp run ..." --wall "2h 51m" [--started ISO] [--notes TEXT]
                                       [--out reports/reference]

Records the git commit the run started from (``--commit``, default HEAD), the params it trained with
(``settings.json``: that commit's params.yaml with the command's ``-S`` overrides, which
``python -m pipeline.report.reference`` compares a user's run with), the training recipe's version at
that commit (``model.presets.RECIPE``), the machine (CPU model, cores, memory, GPU if any, torch
threads), and the inputs the runs read: each prepared dataset's checksum (``data/*/prepare.json``) and
the pretrained backbone's sha256 (``data/pretrain/pretrain.json``).
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.report.reference import SETTINGS, recipe_in, redact_command, settings

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "reports"
FILES = ("table1.md", "table2.md", "summary.json", "comparisons.json")
FIGURES = ("ap_rcf.png", "loss_curves.png", "accuracy_vs_runtime.png", "ap_by_category.png", "data_frequency.png")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB memory"
    except (OSError, ValueError, IndexError):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {cores} cores{mem}, {gpu}; {platform.system()} {platform.release()}, torch {torch.__version__}"


def inputs() -> str:
    """The prepared datasets' checksums and the pretrained backbone's sha256 found under ``data/``: with
    them a user can tell inputs that differ from training that diverged on other hardware."""
    found = []
    for record in sorted((ROOT / "data").glob("*/prepare.json")):
        found.append(f"dataset `{record.parent.name}` checksum `{json.loads(record.read_text())['checksum']}`")
    backbone = ROOT / "data" / "pretrain" / "pretrain.json"
    sha = json.loads(backbone.read_text()).get("sha256") if backbone.is_file() else None
    if sha:  # absent where the scale starts from no pretrained backbone
        found.append(f"pretrained backbone sha256 `{sha}`")
    return "; ".join(found) or "none recorded (no data/*/prepare.json)"


def _at_commit(commit: str, path: str) -> str | None:
    shown = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else None


def recipe(commit: str) -> int | None:
    """``model.presets.RECIPE`` as the commit holds it (read from git, not from the working tree, which
    may have moved on since the run); None where the commit predates it."""
    source = _at_commit(commit, "model/presets.py")
    return recipe_in(source) if source is not None else None


def run_settings(commit: str, command: str, version: int | None) -> dict | None:
    """settings.json: the commit's params.yaml with the command's ``-S`` overrides (what ``dvc exp run``
    trained with), for ``python -m pipeline.report.reference``; None where the commit has no params.yaml."""
    text = _at_commit(commit, "params.yaml")
    return settings(yaml.safe_load(text), command, commit, version) if text is not None else None


TABLES = tuple(f.removesuffix(".md") for f in FILES if f.startswith("table"))  # the studies FILES holds tables of


def tables_run(recorded: dict | None) -> list[str]:
    """Which of TABLES the run made: those in the recorded ``run_studies`` (another table's file then
    holds only "not run" cells); all of them where nothing is recorded."""
    if recorded is None:
        return list(TABLES)
    studies = recorded["params"].get("run_studies") or []
    return [t for t in TABLES if t in studies]


def _named(tables: list[str]) -> str:
    """["table1", "table2"] -> "Tables 1-2"; ["table2"] -> "Table 2"."""
    numbers = [t.removeprefix("table") for t in tables]
    if not numbers:
        return "no table"
    return f"Table {numbers[0]}" if len(numbers) == 1 else f"Tables {numbers[0]}-{numbers[-1]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--command", required=True, help="the command that produced the run")
    parser.add_argument("--wall", required=True, help="its wall time, e.g. '2h 51m'")
    parser.add_argument("--commit", default="HEAD", help="the commit it ran on (default: HEAD)")
    parser.add_argument("--started", default="", help="when it started (ISO date/time)")
    parser.add_argument("--notes", default="", help="anything else a reader needs (resumed across sessions, ...)")
    parser.add_argument("--out", default="reports/reference",
                        help="where to write it, a folder under reports/ (default: reports/reference; another "
                             "for a second view of the same runs, e.g. re-evaluated with other eval settings)")
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    if out == REPORTS.resolve() or REPORTS.resolve() not in out.parents:
        sys.exit(f"error: --out {args.out}: must be a folder under {REPORTS} (not reports/ itself)")
    missing = [f for f in FILES if not (REPORTS / f).is_file()]
    if missing:
        sys.exit(f"error: reports/{missing[0]} not found: run the pipeline first")
    commit = subprocess.run(["git", "rev-parse", args.commit], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    version = recipe(commit)
    recorded = run_settings(commit, args.command, version)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copy2(REPORTS / f, out / f)
    (out / SETTINGS).unlink(missing_ok=True)
    if recorded is not None:
        (out / SETTINGS).write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    copied, shared = [], []
    for f in FIGURES:
        src = REPORTS / "figures" / f
        if not src.is_file():
            continue
        # A second view of the same runs (e.g. re-scored with other eval settings) leaves some figures
        # unchanged, the loss curves always: point at the main snapshot's copy instead of a duplicate.
        main_copy = REPORTS / "reference" / "figures" / f
        if out != (REPORTS / "reference").resolve() and main_copy.is_file() \
                and main_copy.read_bytes() == src.read_bytes():
            (out / "figures" / f).unlink(missing_ok=True)
            shared.append(os.path.relpath(main_copy, out))
            continue
        shutil.copy2(src, out / "figures" / f)
        copied.append(f)
    summary = json.loads((REPORTS / "summary.json").read_text())
    seeds = len(recorded["params"]["seeds"]) if recorded else "its"
    tables = tables_run(recorded)
    skipped = [t for t in TABLES if t not in tables]
    lines = ["# Reference run", "",
             f"The synthetic {_named(tables)} at {seeds} seeds, as produced by the command below; compare your run's",
             "`reports/` with these files: `python -m pipeline.report.reference --reference "
             f"{os.path.relpath(out, ROOT)}`",
             "tests each cell of your `reports/summary.json` against this one and lists the settings in which",
             "the runs differ. Same params, code and inputs (below) on the same machine give the same numbers",
             "up to thread-count nondeterminism; on other hardware training diverges, for some detectors by",
             "more than the seeds' spread (reports/reference/experiments.md sec. 4), so compare rows measured",
             "on one machine.", "",
             f"- command: `{redact_command(args.command)}`",
             f"- commit: `{commit}`",
             *([f"- recipe: {version} (`model.presets.RECIPE` at that commit)"] if version is not None else []),
             f"- machine: {machine()}",
             f"- inputs: {inputs()}",
             f"- wall time: {args.wall}" + (f" (started {args.started})" if args.started else ""),
             *( [f"- notes: {args.notes}"] if args.notes else []), "",
             "Files: " + ", ".join(f"`{f}`" for f in FILES + ((SETTINGS,) if recorded else ()))
             + "; figures: " + ", ".join(f"`figures/{f}`" for f in copied)
             + ("; unchanged from the main reference: " + ", ".join(f"`{f}`" for f in shared) if shared else ""),
             *(["", f"Not run: {_named(skipped)} (`run_studies` is {recorded['params'].get('run_studies')}); "
                    "its file holds only the aggregate's 'not run' cells."] if skipped else []),
             *(line for t in tables for line in ("", f"## {_named([t])}", "", (out / f"{t}.md").read_text()))]
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"reference: {len(FILES)} files and {len(copied)} figures ({len(shared)} unchanged, not copied) in {out} "
          f"({len(summary.get('rows', summary))} summary entries)")


if __name__ == "__main__":
    main()
