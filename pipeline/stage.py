"""
The training stages of ``dvc.yaml``:

    python -m pipeline.stage main          # the main experiment: detector x loss, every seed
    python -m pipeline.stage study NAME    # every row of studies.NAME, every seed of each row

Each run lives in the run store ``runs/<training key>/seed<k>/`` at the repository root (DVC's
``--temp``/queued experiment copies use the same store), each of its evaluations in
``eval/<evaluation key>/`` inside it: the training key covers what changes the weights, the
evaluation key the image subset, timing warm-up and TTA (:meth:`RunSpec.eval_key`). Identical runs —
same training settings and seed, wherever they are asked for — are trained once; a changed
evaluation setting re-evaluates without training; Table 3's "+ test-aug" row is a second evaluation of
the "+ larger input" weights. An interrupted stage resumes its runs from their checkpoints. The stage
writes ``results/main.json`` (mean ± std over seeds: the DVC metrics that
``dvc exp show`` lists) with ``results/main_runs.json``, or ``results/studies/NAME.json``: the
metrics of exactly the runs the current params imply, with their run directories and MLflow ids.
"""
import argparse
import json
import logging
import statistics
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

from pipeline import params as P
from pipeline.atomic import write_text
from pipeline.launch import main_guard, run_all
from pipeline.paths import inside
from pipeline.runs.spec import METRICS_FILE, METRICS_LOG, RunSpec, eval_dir, resolve, study_specs
from pipeline.runs.tracking import RUN_ID_FILE, Tracker, repo_root

logger = logging.getLogger("pipeline.stage")
RESULTS = Path("results")
BOX_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
TABLE_KEYS = ("AP", "APr", "APc", "APf")  # the tables' columns: also on each row's parent MLflow run


def run_store() -> Path:
    return repo_root() / "runs"


def run_dir(spec: RunSpec) -> Path:
    return run_store() / spec.key() / f"seed{spec.seed}"


def _mean_std(values: List[float]) -> Dict[str, Any]:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 3), "std": round(std, 3), "n": len(values)}


def _summarise(rows: Dict[str, List[Tuple[RunSpec, Dict[str, Any]]]]) -> Dict[str, Any]:
    out = {}
    for row, runs in rows.items():
        seeds = {}
        for spec, metrics in runs:
            d = run_dir(spec)
            seeds[f"seed{spec.seed}"] = {
                "bbox": metrics.get("bbox", {}), "segm": metrics.get("segm"),
                "runtime_ms": metrics["runtime"]["ms_per_image"], "run_dir": str(d),
                "eval_dir": str(eval_dir(d, spec)), "images": (metrics.get("images") or {}).get("count"),
                "mlflow_run_id": (d / RUN_ID_FILE).read_text().strip() if (d / RUN_ID_FILE).is_file() else None,
            }
        summary = {"detector": runs[0][0].detector, "loss": runs[0][0].loss,
                   "annotations": runs[0][0].annotations, "seeds": seeds}
        for task in ("bbox", "segm"):
            if any(s.get(task) for s in seeds.values()):
                summary[f"{task}_mean"] = {k: _mean_std([s[task].get(k) for s in seeds.values() if s.get(task)])
                                           for k in BOX_KEYS}
        summary["runtime_ms"] = _mean_std([s["runtime_ms"] for s in seeds.values()])
        out[row] = summary
    return out


def parent_metrics(summary: Dict[str, Any], n_seeds: int) -> Dict[str, float]:
    """What a row's parent MLflow run shows: mean and std over seeds of each table metric, and n."""
    out = {"n_seeds": n_seeds}
    for task in ("bbox", "segm"):
        for key in TABLE_KEYS:
            stat = (summary.get(f"{task}_mean") or {}).get(key)
            if stat and stat["n"]:
                out[f"{task}/{key}_mean"], out[f"{task}/{key}_std"] = stat["mean"], stat["std"]
    out["runtime_ms_mean"], out["runtime_ms_std"] = summary["runtime_ms"]["mean"], summary["runtime_ms"]["std"]
    return out


def _execute(groups: Dict[str, List[RunSpec]], params: Dict[str, Any], study: str) -> Dict[str, Any]:
    """Run what ``groups`` (row -> one spec per seed) needs, with the rows' MLflow parent runs open
    meanwhile: ended FINISHED with their summaries, FAILED when a job failed, KILLED on Ctrl-C."""
    tracker = Tracker(P.get(params, "tracking.uri"))
    parents = {row: tracker.open_parent(study, specs[0].ablation) for row, specs in groups.items()}
    summary: Dict[str, Any] = {}
    status = "FAILED"
    try:
        summary = _run_rows(groups, params, study)
        status = "FINISHED"
        return summary
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        for row, run_id in parents.items():
            metrics = parent_metrics(summary[row], len(groups[row])) if row in summary else {}
            tracker.close_parent(run_id, metrics, status)


def _run_rows(groups: Dict[str, List[RunSpec]], params: Dict[str, Any], study: str) -> Dict[str, Any]:
    # Per training run, the evaluations asked of it (rows differing only in evaluation settings share
    # the run): one job trains it once and runs its missing evaluations; finished ones are read.
    evals: Dict[Path, Dict[str, RunSpec]] = {}
    for specs in groups.values():
        for spec in specs:
            evals.setdefault(run_dir(spec), {}).setdefault(spec.eval_key(), spec)
    metrics: Dict[Path, Dict[str, Any]] = {}
    todo: List[Tuple[Path, List[RunSpec]]] = []
    for d, by_key in evals.items():
        missing = []
        for spec in by_key.values():
            done = eval_dir(d, spec) / METRICS_FILE
            if done.is_file():
                metrics[done.parent] = json.loads(done.read_text())
            else:
                missing.append(spec)
        if missing:
            todo.append((d, missing))
    launcher = params.get("launcher") or {}
    logs = repo_root() / "slurm-logs" if launcher.get("cluster") == "slurm" else run_store() / "_jobs"
    for (d, specs), results in zip(todo, run_all(todo, launcher, logs, name=f"cn2-{study}")):
        metrics.update((eval_dir(d, spec), m) for spec, m in zip(specs, results))
    _tag_usage(groups, params, study)
    return _summarise({row: [(s, metrics[eval_dir(run_dir(s), s)]) for s in specs] for row, specs in groups.items()})


def _tag_usage(groups: Dict[str, List[RunSpec]], params: Dict[str, Any], study: str) -> None:
    """Mark each MLflow run with the study rows that use it (a shared run is trained once)."""
    ids = [(run_dir(s) / RUN_ID_FILE, row) for row, specs in groups.items() for s in specs]
    ids = [(f.read_text().strip(), row) for f, row in ids if f.is_file()]
    if not ids:
        return
    tracker = Tracker(P.get(params, "tracking.uri"))
    for run_id, row in ids:
        tracker.run_id = run_id
        tracker.set_tags({f"cn2.study.{study}": row})


def _write(path: Path, payload: Dict[str, Any]) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def stage_main(params: Dict[str, Any]) -> Path:
    specs = [resolve(params, seed=s, study="main") for s in params.get("seeds", [0])]
    row = specs[0].ablation
    summary = _execute({row: specs}, params, "main")[row]
    # Top-level numbers for `dvc exp show` / `dvc metrics diff`: mean over seeds.
    payload = {"bbox": {k: v["mean"] for k, v in summary["bbox_mean"].items() if k in ("AP", "APr", "APc", "APf")},
               "bbox_std": {k: v["std"] for k, v in summary["bbox_mean"].items() if k in ("AP", "APr", "APc", "APf")},
               "runtime_ms": summary["runtime_ms"]["mean"], "n_seeds": len(specs)}
    out = RESULTS / "main.json"
    _write(out, payload)
    _write(RESULTS / "main_runs.json", {"row": row, **summary})
    _write_curve(specs, RESULTS / "main_loss.csv")
    return out


def _write_curve(specs: List[RunSpec], path: Path) -> None:
    """step,total_loss (mean over seeds at the steps all seeds logged), for DVC plots."""
    curves = []
    for spec in specs:
        log = run_dir(spec) / METRICS_LOG
        rows = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
        curves.append({r["step"]: r["total_loss"] for r in rows})
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    lines = ["step,total_loss"] + [f"{s},{statistics.fmean(c[s] for c in curves):.6f}" for s in steps]
    write_text(path, "\n".join(lines) + "\n")


def stage_study(params: Dict[str, Any], study: str) -> Path:
    groups = study_specs(params, study)
    out = inside(RESULTS / "studies", f"{study}.json")
    _write(out, {"study": study, "rows": _execute(groups, params, study)})
    return out


def params_main(argv, prog: str, doc: str, work: Callable[[Dict[str, Any]], str]) -> None:
    """The command line of a stage that reads params.yaml only: ``--params FILE``; the whole file is
    checked before ``work(params)`` runs; ``work`` returns the line to print."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=P.PARAMS_FILE)
    args = parser.parse_args(argv)

    def go():
        params = P.load(args.params)
        P.check(params, args.params)
        print(work(params))

    main_guard(go)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.stage", description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["main", "study"])
    parser.add_argument("study", nargs="?", help="the study's name (with `study`)")
    parser.add_argument("--params", type=Path, default=P.PARAMS_FILE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")

    def go():
        params = P.load(args.params)
        P.check(params, args.params)
        out = stage_main(params) if args.what == "main" else stage_study(params, args.study)
        print(f"wrote {out}")

    if args.what == "study" and not args.study:
        parser.error("study: give the study's name, e.g. `python -m pipeline.stage study table1`")
    main_guard(go)


if __name__ == "__main__":
    main()
