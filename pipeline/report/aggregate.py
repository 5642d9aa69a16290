"""
The aggregate stage: ``python -m pipeline.report.aggregate``.

Reads the results of exactly the runs that ``params.yaml`` implies (each study row x its seeds; a
result of a seed no longer listed is ignored) and writes ``reports/summary.json`` (DVC metrics: per
row, mean/std/n of each metric), ``reports/comparisons.json`` and ``reports/table{1,2,3}.md``, laid
out like the report's tables: each cell mean ± std over seeds with n, the report's value beside it and
the difference; rows not run say so. Under each table, the comparisons the report draws
(``reports/paper_values.yaml``), with Welch's t-test across seeds.
"""
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from scipy import stats

from pipeline import params as P
from pipeline.atomic import write_text
from pipeline.paths import inside
from pipeline.stage import RESULTS, params_main

PAPER = P.ROOT / "reports" / "paper_values.yaml"
REPORTS = Path("reports")
TABLES = ("table1", "table2", "table3")
DETECTOR_NAMES = {"centernet": "CenterNet-FPN", "cascadercnn": "CascadeRCNN",
                  "centernet2_specific": "CenterNet2-specific", "centernet2_agnostic": "CenterNet2-agnostic"}
LOSS_NAMES = {"softmax": "Softmax-CE", "sigmoid": "Sigmoid-CE", "eql": "EQL", "fedloss": "FedLoss"}
BOX = ("AP", "APr", "APc", "APf")
MASK = tuple(f"mask_{k}" for k in BOX)
TITLES = {
    "table1": "Table 1: detectors (LVIS-style federated labels; COCO column: every object labelled)",
    "table2": "Table 2: classification losses of the RoI heads",
    "table3": "Table 3: steps of the challenge model (cumulative)",
}


def _values(seeds: Dict[str, Any], wanted: List[int], metric: str) -> List[float]:
    task, key = ("segm", metric[5:]) if metric.startswith("mask_") else ("bbox", metric)
    out = []
    for seed in wanted:
        run = seeds.get(f"seed{seed}")
        value = ((run or {}).get(task) or {}).get(key) if run else None
        if value is not None:
            out.append(float(value))
    return out


def _stat(values: List[float]) -> Dict[str, Any]:
    if not values:
        return {"mean": None, "std": None, "n": 0, "values": []}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": round(mean, 3), "std": round(std, 3), "n": len(values), "values": values}


def _paper(cell) -> Optional[float]:
    return cell[0] if isinstance(cell, list) else cell


def _fmt_paper(cell) -> str:
    if cell is None:
        return "—"
    return f"{cell[0]:.1f} ± {cell[1]:.2f}" if isinstance(cell, list) else f"{cell:.1f}"


def _cell(stat: Optional[Dict[str, Any]], paper_cell) -> str:
    if stat is None:
        return "not run"
    if not stat["n"]:
        return "—" if paper_cell is None else f"— · paper {_fmt_paper(paper_cell)}"
    ours = f"{stat['mean']:.1f} ± {stat['std']:.1f} (n={stat['n']})"
    if paper_cell is None:
        return ours
    return f"{ours} · paper {_fmt_paper(paper_cell)} · Δ {stat['mean'] - _paper(paper_cell):+.1f}"


def load_results(params: Dict[str, Any], study: str) -> Dict[str, Any]:
    """A study's rows as its stage wrote them to ``results/studies/<study>.json``; {} when it has not
    run, or is not in ``run_studies``: a file an earlier run left behind may hold other settings'
    numbers (other eval settings, seeds or code), and this run's stages did not check it."""
    if study not in (params.get("run_studies") or []):
        return {}
    results_file = inside(RESULTS / "studies", f"{study}.json")
    return json.loads(results_file.read_text())["rows"] if results_file.is_file() else {}


def collect(params: Dict[str, Any], loaded: Optional[Dict[str, Dict[str, Any]]] = None) -> Dict[str, Any]:
    """Per study and row: mean/std/n of each metric over the row's current seeds (None: not run).
    ``loaded``: the studies' :func:`load_results`, where the caller has read them already."""
    summary = {}
    for study in params.get("studies") or {}:
        results = loaded[study] if loaded is not None else load_results(params, study)
        rows = {}
        for name, merged in P.study_rows(params, study).items():
            if name not in results:
                rows[name] = None
                continue
            seeds = results[name]["seeds"]
            metrics = {m: _stat(_values(seeds, merged["seeds"], m)) for m in BOX + MASK}
            runtimes = [seeds[f"seed{s}"]["runtime_ms"] for s in merged["seeds"] if f"seed{s}" in seeds]
            metrics["runtime_ms"] = _stat(runtimes)
            metrics["mlflow_run_ids"] = {f"seed{s}": seeds[f"seed{s}"].get("mlflow_run_id")
                                         for s in merged["seeds"] if f"seed{s}" in seeds}
            rows[name] = metrics
        summary[study] = rows
    return summary


def compare(summary: Dict[str, Any], paper: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
    out = {}
    for study, pairs in (paper.get("comparisons") or {}).items():
        rows = summary.get(study) or {}
        out[study] = []
        for a, b, metric in pairs:
            ra, rb = rows.get(a), rows.get(b)
            pa, pb = (paper.get(study, {}).get(a, {}).get(metric), paper.get(study, {}).get(b, {}).get(metric))
            paper_diff = _paper(pa) - _paper(pb) if pa is not None and pb is not None else None
            item = {"a": a, "b": b, "metric": metric, "paper_diff": paper_diff, "diff": None, "p": None,
                    "n": [0, 0], "holds": None}
            if ra and rb and ra[metric]["n"] and rb[metric]["n"]:
                va, vb = ra[metric]["values"], rb[metric]["values"]
                item["diff"] = round(ra[metric]["mean"] - rb[metric]["mean"], 3)
                item["n"] = [len(va), len(vb)]
                if len(va) >= 2 and len(vb) >= 2 and (stats.tstd(va) > 0 or stats.tstd(vb) > 0):
                    item["p"] = float(stats.ttest_ind(va, vb, equal_var=False).pvalue)
                    same_sign = paper_diff is None or (item["diff"] > 0) == (paper_diff > 0)
                    item["holds"] = bool(same_sign and item["p"] < 0.05)
            out[study].append(item)
    return out


def _row_label(study: str, name: str, merged: Dict[str, Any], paper: Dict[str, Any]) -> str:
    if study == "table3":
        return (paper.get("table3", {}).get(name, {}).get("source", name)).replace("Table 3, ", "")
    label = DETECTOR_NAMES.get(merged["detector"], merged["detector"])
    if study != "table1":
        label += f" · {LOSS_NAMES.get(merged['loss'], merged['loss'])}"
    return label


def render(study: str, params: Dict[str, Any], summary: Dict[str, Any], comparisons, paper) -> str:
    lines = [f"# {TITLES.get(study, study)}", "",
             "Each cell: ours, mean ± std over seeds (n) · the report's value · Δ = ours − report. "
             f"Scale `{params.get('scale')}`, dataset `{P.get(params, 'data.name')}`. Generated by "
             "`python -m pipeline.report.aggregate`; the report's values come from `reports/paper_values.yaml`.", ""]
    if study not in summary:
        lines += [f"Not run: params.yaml has no study `{study}`.", ""]
        return "\n".join(lines)
    if study not in (params.get("run_studies") or []):
        lines += [f"Not run: `{study}` is not in params.yaml's `run_studies` "
                  f"(`dvc exp run -S 'run_studies=[...,{study}]'` runs it).", ""]
    rows = summary[study]
    merged_rows = P.study_rows(params, study)
    paper_rows = paper.get(study, {})
    if study == "table1":
        header = ["Detector", "AP box", "AP r", "AP c", "AP f", "COCO AP box", "runtime ms (COCO model)"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, merged in merged_rows.items():
            if name.endswith("_coco"):
                continue
            lvis, coco = rows.get(name), rows.get(f"{name}_coco")
            cells = [_row_label(study, name, merged, paper)]
            cells += [_cell(lvis and lvis[m], paper_rows.get(name, {}).get(m)) for m in BOX]
            coco_paper = paper_rows.get(f"{name}_coco", {})
            cells.append(_cell(coco and coco["AP"], coco_paper.get("AP")) if f"{name}_coco" in merged_rows
                         else "not in study")
            cells.append(_cell(coco and coco["runtime_ms"], coco_paper.get("runtime_ms"))
                         if f"{name}_coco" in merged_rows else "not in study")
            lines.append("| " + " | ".join(cells) + " |")
    else:
        with_mask = study == "table3" or any(r and r["mask_AP"]["n"] for r in rows.values())
        metrics = (MASK if with_mask else ()) + BOX
        header = ["Row"] + [m.replace("mask_", "mask ") for m in metrics]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, merged in merged_rows.items():
            row = rows.get(name)
            cells = [_row_label(study, name, merged, paper)]
            cells += [_cell(row and row[m], paper_rows.get(name, {}).get(m)) for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
    if comparisons.get(study):
        lines += ["", "## Comparisons the report draws", "",
                  "Holds: same direction as the report and Welch's t-test p < 0.05 across seeds "
                  "(needs at least 2 seeds per row).", "",
                  "| A vs B | metric | ours A − B | p (Welch) | n | report A − B | holds across seeds |",
                  "|---|---|---|---|---|---|---|"]
        for c in comparisons[study]:
            ours = "not run" if c["diff"] is None else f"{c['diff']:+.2f}"
            p = "n/a" if c["p"] is None else f"{c['p']:.3f}"
            holds = "n/a" if c["holds"] is None else ("yes" if c["holds"] else "no")
            paper_diff = "—" if c["paper_diff"] is None else f"{c['paper_diff']:+.1f}"
            lines.append(f"| {c['a']} vs {c['b']} | {c['metric']} | {ours} | {p} | {c['n'][0]}/{c['n'][1]} "
                         f"| {paper_diff} | {holds} |")
    return "\n".join(lines) + "\n"


def aggregate(params: Dict[str, Any]) -> Dict[str, Any]:
    paper = yaml.safe_load(PAPER.read_text())
    summary = collect(params)
    comparisons = compare(summary, paper)
    for study in TABLES:
        write_text(REPORTS / f"{study}.md", render(study, params, summary, comparisons, paper))
    # DVC metrics: per row, the mean, std and n of each metric that has values (dvc exp show columns).
    compact = {study: {row: {f"{m}{suffix}": r[m][key] for m in BOX + MASK + ("runtime_ms",) if r[m]["n"]
                             for suffix, key in (("", "mean"), ("_std", "std"), ("_n", "n"))}
                       for row, r in rows.items() if r} for study, rows in summary.items()}
    write_text(REPORTS / "summary.json", json.dumps(compact, indent=2, sort_keys=True) + "\n")
    write_text(REPORTS / "comparisons.json", json.dumps(comparisons, indent=2, sort_keys=True) + "\n")
    return {"summary": summary, "comparisons": comparisons}


def main(argv=None) -> None:
    def work(params):
        aggregate(params)
        return f"wrote {REPORTS}/summary.json and {', '.join(f'{REPORTS}/{t}.md' for t in TABLES)}"

    params_main(argv, "python -m pipeline.report.aggregate", __doc__, work)


if __name__ == "__main__":
    main()
