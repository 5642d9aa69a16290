"""
The report stage: ``python -m pipeline.report.figures``.

From the study results (the same rows and seeds as the tables, via ``pipeline.report.aggregate.collect``)
draws (matplotlib PNG, ``reports/figures/``):
- ``ap_rcf.png``: AP_r / AP_c / AP_f bars with error bars (std over seeds) per detector and loss;
- ``loss_curves.png``: training loss per study row (mean over seeds);
- ``accuracy_vs_runtime.png``: box AP against inference ms/image per detector, the report's beside;
- ``predictions.png``: the main experiment's first seed on the first validation images
  (``pipeline.runs.predict``: detections scoring at least ``PREDICTION_THRESHOLD``, the best
  ``PREDICTION_MAX`` per image);
- ``ap_by_category.png``: per Table 2 row, each category's box AP (mean over seeds) against its
  training image count (log scale), coloured by LVIS frequency bucket: how a loss treats the tail.
  Per-category AP is computed here with the official ``lvis`` API (``LVISEval``, all IoUs, all areas,
  300 detections per image, as the evaluation) from each evaluation's saved detections
  (``<eval_dir>/lvis_instances_results.json``) against the validation images it evaluated
  (``<eval_dir>/metrics.json``: ``images.ids``), and cached in ``<eval_dir>/ap_by_category.json``;
and writes ``reports/runs.md``: every MLflow run the tables use, by id, with its AP as MLflow returns
it from ``mlflow.search_runs`` (so the tables can be checked against the tracking store).
"""
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from pipeline import params as P  # noqa: E402
from pipeline.atomic import save_figure, write_text  # noqa: E402
from pipeline.data.annotations import only_images  # noqa: E402
from pipeline.report.aggregate import DETECTOR_NAMES, LOSS_NAMES, PAPER, collect, load_results  # noqa: E402
from pipeline.runs.spec import METRICS_FILE, METRICS_LOG, RunSpec  # noqa: E402
from pipeline.runs.tracking import filter_value, redact_uri, tracking_uri  # noqa: E402
from pipeline.stage import RESULTS, params_main  # noqa: E402

REPORTS = Path("reports")
FIGURES = REPORTS / "figures"
# predictions.png: validation images shown, and which detections are drawn on them.
PREDICTION_IMAGES = 4
PREDICTION_THRESHOLD = 0.3
PREDICTION_MAX = 15
BUCKET_COLOURS = {"r": "#d62728", "c": "#ff7f0e", "f": "#1f77b4"}


def _label(merged: Dict[str, Any]) -> str:
    return f"{DETECTOR_NAMES.get(merged['detector'])}\n{LOSS_NAMES.get(merged['loss'])}"


def ap_bars(params, summary, path: Path) -> None:
    study = "table2" if "table2" in summary else next(iter(summary), None)
    fig, ax = plt.subplots(figsize=(10, 4))
    rows = [(n, r) for n, r in (summary.get(study) or {}).items() if r and not n.endswith("_coco")]
    merged = P.study_rows(params, study) if study else {}
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
                log = Path(seed["run_dir"]) / METRICS_LOG
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
    rows = summary.get("table1") or {}
    plotted = [name for name, r in rows.items() if r and not name.endswith("_coco") and r["AP"]["mean"] is not None]
    if not plotted:  # e.g. a re-scoring of Table 2 alone: say so rather than draw empty axes
        _placeholder(path, "Accuracy vs runtime: Table 1 not run\n(add table1 to params.yaml's run_studies)")
        return
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name in plotted:
        r = rows[name]
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


def _placeholder(path: Path, text: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 2))
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10)
    ax.axis("off")
    save_figure(fig, path)


def main_run_dir(results_dir: Path = RESULTS) -> Optional[Path]:
    """The main experiment's trained run of its lowest seed (``results/main_runs.json``), or None."""
    from pipeline.runs import predict

    return predict.main_run_dir(results_dir / "main_runs.json")


def predictions(run_dir: Path, path: Path) -> None:
    """The run's detections on its first validation images, drawn by ``pipeline.runs.predict``."""
    from detectron2.data import DatasetCatalog

    from pipeline.runs import predict

    if run_dir is None:
        _placeholder(path, "no trained main run yet (dvc repro main)")
        return
    predictor = predict.Predictor(run_dir)
    records = DatasetCatalog.get(predict.val_split(run_dir).name)[:PREDICTION_IMAGES]
    cols = min(len(records), 2) or 1
    rows = -(-len(records) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, record in zip(axes.flat, records):
        image = predictor.read(Path(record["file_name"]))
        instances = predict.keep_above(predictor(image), PREDICTION_THRESHOLD)[:PREDICTION_MAX]
        ax.imshow(predict.draw(predictor.rgb(image), instances, predictor.categories))
        ax.set_title(f"{Path(record['file_name']).name}: {len(instances)} detections", fontsize=8)
    spec = RunSpec.from_json((run_dir / "run.json").read_text())
    name = f"{DETECTOR_NAMES.get(spec.detector, spec.detector)} + {LOSS_NAMES.get(spec.loss, spec.loss)}"
    fig.suptitle(f"{name}, seed {spec.seed}: detections scoring >= {PREDICTION_THRESHOLD} "
                 f"(at most {PREDICTION_MAX})", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def category_ap(eval_dir: Path, run_dir: Path) -> Dict[int, float]:
    """
    Box AP (%) of each category of the evaluated validation images that has ground truth, from the
    evaluation in ``eval_dir`` of the run in ``run_dir``,
    by dataset category id: LVISEval's precision (IoU x recall x category x area) averaged over IoU
    thresholds and recall points for the category, area "all" (the mean over categories of these
    is the run's AP). Cached in ``ap_by_category.json`` beside the detections.
    """
    import tempfile

    from lvis import LVIS, LVISEval, LVISResults

    from pipeline.runs import predict

    results_file = eval_dir / "lvis_instances_results.json"
    cache = eval_dir / "ap_by_category.json"
    stamp = f"{results_file.stat().st_mtime_ns}:{results_file.stat().st_size}"
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp:
            return {int(k): v for k, v in cached["ap"].items()}
    gt = json.loads(predict.val_split(run_dir).json_file.read_text())
    ids = (json.loads((eval_dir / METRICS_FILE).read_text()).get("images") or {}).get("ids")
    if ids:  # the evaluation scored these images only (max_images)
        gt = only_images(gt, ids)
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(gt, f)
        f.flush()
        lvis_gt = LVIS(f.name)
    with_gt = sorted({a["category_id"] for a in gt["annotations"]})
    detections = json.loads(results_file.read_text())
    ap = {c: 0.0 for c in with_gt}
    if detections:
        evaluator = LVISEval(lvis_gt, LVISResults(lvis_gt, detections, max_dets=300), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        precision = evaluator.eval["precision"]  # (IoU thresholds, recall points, categories, areas)
        for k, cat in enumerate(evaluator.params.cat_ids):
            p = precision[:, :, k, 0]
            if cat in ap:
                ap[cat] = float(p[p > -1].mean() * 100) if (p > -1).any() else 0.0
    write_text(cache, json.dumps({"stamp": stamp, "ap": ap}) + "\n")
    return ap


def ap_by_category(params, results: Dict[str, Any], path: Path, study: str = "table2") -> None:
    """Per row of ``study``: category AP (mean over seeds) against training image count, log x."""
    def evaluations(info):
        """(eval_dir, run_dir) of each seed whose evaluation saved LVIS-style detections."""
        pairs = [(Path(s.get("eval_dir") or Path(s["run_dir"]) / "eval"), Path(s["run_dir"]))
                 for s in info["seeds"].values()]
        return [(e, r) for e, r in pairs if (e / "lvis_instances_results.json").is_file()]

    rows = {name: evaluations(info) for name, info in (results.get(study) or {}).items()}
    rows = {name: pairs for name, pairs in rows.items() if pairs}
    if not rows:
        _placeholder(path, f"no evaluated {study} run with LVIS-style labels yet (dvc repro study@{study})")
        return
    merged = P.study_rows(params, study)
    cols = min(len(rows), 4)
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.2 * nrows), squeeze=False, sharey=True)
    for ax in axes.flat[len(rows):]:
        ax.axis("off")
    for ax, (name, pairs) in zip(axes.flat, rows.items()):
        per_seed = [category_ap(e, r) for e, r in pairs]
        spec = RunSpec.from_json((pairs[0][1] / "run.json").read_text())
        cats = {c["id"]: c for c in json.loads((spec.data_dir / "cat_info.json").read_text())}
        for bucket, colour in BUCKET_COLOURS.items():
            ids = [c for c in per_seed[0] if cats.get(c, {}).get("frequency") == bucket]
            if ids:
                ax.scatter([max(cats[c]["image_count"], 1) for c in ids],
                           [np.mean([s[c] for s in per_seed if c in s]) for c in ids],
                           s=14, color=colour, label=f"{bucket} ({len(ids)})", alpha=0.8)
        ax.set_xscale("log")
        ax.set_title(_label(merged[name]).replace("\n", " + ") + f" (n={len(per_seed)})", fontsize=8)
        ax.set_xlabel("training images of the category", fontsize=7)
        ax.legend(fontsize=6, title="frequency", title_fontsize=6)
    for ax in axes[:, 0]:
        ax.set_ylabel("box AP (%), mean over seeds", fontsize=7)
    fig.suptitle(f"AP by category against training image count ({study})", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def runs_table(summary, uri: str) -> str:
    import mlflow

    ids: List[tuple] = [(study, row, seed, run_id) for study, rows in summary.items() for row, r in rows.items()
                        if r for seed, run_id in r["mlflow_run_ids"].items() if run_id]
    lines = ["# MLflow runs behind the tables", "",
             # Credentials in the URI stay out of this file (DVC and git track it).
             f"Tracking store: `{redact_uri(uri)}`. Open it with `mlflow ui --backend-store-uri {redact_uri(uri)}`.",
             "",
             "| study | row | seed | MLflow run id | box AP (MLflow) |", "|---|---|---|---|---|"]
    if not ids:
        return "\n".join(lines + ["", "No runs yet."]) + "\n"
    mlflow.set_tracking_uri(uri)
    found = mlflow.search_runs(search_all_experiments=True,
                               filter_string="attributes.run_id IN ({})".format(
                                   ", ".join(filter_value(i) for *_, i in ids)))
    ap = dict(zip(found["run_id"], found.get("metrics.bbox/AP", [None] * len(found))))
    for study, row, seed, run_id in ids:
        value = ap.get(run_id)
        lines.append(f"| {study} | {row} | {seed} | `{run_id}` | "
                     f"{'missing' if value is None or value != value else f'{value:.2f}'} |")
    return "\n".join(lines) + "\n"


def report(params) -> None:
    results = {study: load_results(params, study) for study in params.get("studies") or {}}
    summary = collect(params, results)
    paper = yaml.safe_load(PAPER.read_text())
    ap_bars(params, summary, FIGURES / "ap_rcf.png")
    loss_curves(params, results, FIGURES / "loss_curves.png")
    accuracy_vs_runtime(params, summary, paper, FIGURES / "accuracy_vs_runtime.png")
    predictions(main_run_dir(), FIGURES / "predictions.png")
    ap_by_category(params, results, FIGURES / "ap_by_category.png")
    write_text(REPORTS / "runs.md", runs_table(summary, tracking_uri(P.get(params, "tracking.uri"))))


def main(argv=None) -> None:
    def work(params):
        report(params)
        return (f"wrote {FIGURES}/ap_rcf.png, loss_curves.png, accuracy_vs_runtime.png, predictions.png, "
                f"ap_by_category.png and {REPORTS}/runs.md")

    params_main(argv, "python -m pipeline.report.figures", __doc__, work)


if __name__ == "__main__":
    main()
