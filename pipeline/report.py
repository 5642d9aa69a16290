"""
The report stage: ``python -m pipeline.report``.

From the study results (the same rows and seeds as the tables, via ``pipeline.aggregate.collect``)
draws (matplotlib PNG, ``reports/figures/``):
- ``ap_rcf.png``: AP_r / AP_c / AP_f bars with error bars (std over seeds) per detector and loss;
- ``loss_curves.png``: training loss per study row (mean over seeds);
- ``accuracy_vs_runtime.png``: box AP against inference ms/image per detector, the report's beside.
and writes ``reports/runs.md``: every MLflow run the tables use, by id, with its AP as MLflow returns
it from ``mlflow.search_runs`` (so the tables can be checked against the tracking store).
"""
import json
from pathlib import Path
from typing import Any, Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from pipeline import params as P  # noqa: E402
from pipeline.aggregate import DETECTOR_NAMES, LOSS_NAMES, PAPER, collect  # noqa: E402
from pipeline.atomic import save_figure, write_text  # noqa: E402
from pipeline.runspec import study_rows  # noqa: E402
from pipeline.stage import RESULTS, params_main  # noqa: E402
from pipeline.tracking import tracking_uri  # noqa: E402

REPORTS = Path("reports")
FIGURES = REPORTS / "figures"


def _label(merged: Dict[str, Any]) -> str:
    return f"{DETECTOR_NAMES.get(merged['detector'])}\n{LOSS_NAMES.get(merged['loss'])}"


def ap_bars(params, summary, path: Path) -> None:
    study = "table2" if "table2" in summary else next(iter(summary), None)
    fig, ax = plt.subplots(figsize=(10, 4))
    rows = [(n, r) for n, r in (summary.get(study) or {}).items() if r and not n.endswith("_coco")]
    merged = study_rows(params, study) if study else {}
    x = np.arange(len(rows))
    for i, (metric, colour) in enumerate((("APr", "#d62728"), ("APc", "#ff7f0e"), ("APf", "#1f77b4"))):
        means = [r[metric]["mean"] or 0 for _, r in rows]
        stds = [r[metric]["std"] or 0 for _, r in rows]
        ax.bar(x + (i - 1) * 0.27, means, 0.27, yerr=stds, capsize=3, color=colour, label=metric)
    ax.set_xticks(x, [_label(merged[n]) for n, _ in rows], fontsize=7)
    ax.set_ylabel("box AP (%)")
    ax.set_title(f"AP by frequency bucket, mean ± std over seeds ({study or 'no study run'})", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def loss_curves(params, results: Dict[str, Any], path: Path) -> None:
    studies = [s for s in results if results[s]]
    fig, axes = plt.subplots(1, max(1, len(studies)), figsize=(6 * max(1, len(studies)), 4), squeeze=False)
    for ax, study in zip(axes[0], studies):
        for row, info in results[study].items():
            curves = []
            for seed in info["seeds"].values():
                log = Path(seed["run_dir"]) / "train_metrics.jsonl"
                if log.is_file():
                    curves.append({r["step"]: r["total_loss"] for r in map(json.loads, log.read_text().splitlines())})
            if curves:
                steps = sorted(set.intersection(*(set(c) for c in curves)))
                ax.plot(steps, [np.mean([c[s] for c in curves]) for s in steps], label=row, linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("total loss (mean over seeds)")
        ax.set_title(study, fontsize=10)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure(fig, path)


def accuracy_vs_runtime(params, summary, paper, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    rows = summary.get("table1") or {}
    for name, r in rows.items():
        if not r or name.endswith("_coco") or r["AP"]["mean"] is None:
            continue
        coco = rows.get(f"{name}_coco") or {}
        runtime = (coco.get("runtime_ms") or r["runtime_ms"])["mean"]
        ax.errorbar(runtime, r["AP"]["mean"], yerr=r["AP"]["std"], fmt="o", capsize=3)
        ax.annotate(DETECTOR_NAMES.get(name, name), (runtime, r["AP"]["mean"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("inference ms/image (batch 1, this machine)")
    ax.set_ylabel("box AP (%), LVIS-style labels")
    ax.set_title("Accuracy vs runtime (ours). Report, Titan X: 53/70/77/60 ms", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def runs_table(summary, uri: str) -> str:
    import mlflow

    ids: List[tuple] = [(study, row, seed, run_id) for study, rows in summary.items() for row, r in rows.items()
                        if r for seed, run_id in r["mlflow_run_ids"].items() if run_id]
    lines = ["# MLflow runs behind the tables", "",
             f"Tracking store: `{uri}`. Open it with `mlflow ui --backend-store-uri {uri}`.", "",
             "| study | row | seed | MLflow run id | box AP (MLflow) |", "|---|---|---|---|---|"]
    if not ids:
        return "\n".join(lines + ["", "No runs yet."]) + "\n"
    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(search_all_experiments=True,
                               filter_string="attributes.run_id IN ({})".format(
                                   ", ".join(f"'{i}'" for *_, i in ids)))
    ap = dict(zip(found["run_id"], found.get("metrics.bbox/AP", [None] * len(found))))
    for study, row, seed, run_id in ids:
        value = ap.get(run_id)
        lines.append(f"| {study} | {row} | {seed} | `{run_id}` | "
                     f"{'missing' if value is None or value != value else f'{value:.2f}'} |")
    return "\n".join(lines) + "\n"


def report(params) -> None:
    summary = collect(params)
    paper = yaml.safe_load(PAPER.read_text())
    results = {}
    for study in summary:
        f = RESULTS / "studies" / f"{study}.json"
        results[study] = json.loads(f.read_text())["rows"] if f.is_file() else {}
    ap_bars(params, summary, FIGURES / "ap_rcf.png")
    loss_curves(params, results, FIGURES / "loss_curves.png")
    accuracy_vs_runtime(params, summary, paper, FIGURES / "accuracy_vs_runtime.png")
    write_text(REPORTS / "runs.md", runs_table(summary, tracking_uri(P.get(params, "tracking.uri"))))


def main(argv=None) -> None:
    def work(params):
        report(params)
        return f"wrote {FIGURES}/ap_rcf.png, loss_curves.png, accuracy_vs_runtime.png and {REPORTS}/runs.md"

    params_main(argv, "python -m pipeline.report", __doc__, work)


if __name__ == "__main__":
    main()
