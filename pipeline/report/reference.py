"""
Your run against a reference run: ``python -m pipeline.report.reference [--reference DIR]``.

Compares ``reports/summary.json`` (what the last ``aggregate`` wrote) with a snapshot that
``tools/snapshot_reference.py`` made (default ``reports/reference/``), cell by cell: each row's AP,
AP_r, AP_c and AP_f as mean ± std over seeds on both sides, the difference, and Welch's two-sided
t-test from the two cells' mean, std and n (the test ``aggregate`` runs between rows). A cell
*differs* at p < 0.05. It also lists the settings in which the two runs differ — ``params.yaml``
against the snapshot's ``settings.json``, row by row, and the training recipe
(``model.presets.RECIPE``) — since a cell measured under other settings differs for that reason and
not by chance: the demo (2 seeds, the first 100 validation images) against the reference (3 seeds,
all 200) differs in ``eval.max_images``. Writes ``reports/vs_reference.md`` and prints a line per
study.
"""
import argparse
import ast
import json
import re
import shlex
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from scipy import stats

from pipeline import params as P
from pipeline.atomic import write_text
from pipeline.launch import main_guard
from pipeline.report.aggregate import BOX, MASK
from pipeline.runs.tracking import redact_uri

SETTINGS = "settings.json"
# Keys that do not change a run's numbers: where things live, how often it logs and checkpoints,
# how jobs are launched and tracked, which studies run. Seeds are reported apart: other seeds are
# other samples of the same experiment, which the t-test is there to weigh.
IGNORED = ("data.root", "train.keep_checkpoints", "train.log_period", "train.checkpoint_period",
           "launcher", "tracking", "run_studies", "studies", "seeds")
ALPHA = 0.05


def recipe_in(source: str) -> Optional[int]:
    """``RECIPE`` as assigned in the text of ``model/presets.py`` (read without importing torch);
    None where the file has none (commits before it)."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "RECIPE" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


def dvc_overrides(command: str) -> List[str]:
    """The ``KEY=VALUE`` params a ``dvc exp run`` command line sets (``-S``, ``--set-param``), in order:
    ``dvc exp run -S 'seeds=[0,1,2]' -S eval.max_images=null`` -> ``["seeds=[0,1,2]", "eval.max_images=null"]``.
    Another params file (``-S other.yaml:key=value``) is refused: only params.yaml holds the pipeline's."""
    words, out = shlex.split(command), []
    for i, word in enumerate(words):
        if word in ("-S", "--set-param") and i + 1 < len(words):
            value = words[i + 1]
        elif word.startswith("--set-param="):
            value = word.split("=", 1)[1]
        else:
            continue
        target, sep, rest = value.partition(":")
        if sep and "=" not in target:
            if Path(target).name != "params.yaml":
                raise ValueError(f"{command!r}: {value!r} sets a key of {target}; only params.yaml is read")
            value = rest
        out.append(value)
    return out


def redact_command(command: str) -> str:
    """``command`` with every URI in it (``-S tracking.uri=...``) passed through :func:`redact_uri`."""
    return re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"]+", lambda m: redact_uri(m.group(0)), command)


def settings(params: Dict[str, Any], command: str, commit: str, recipe: Optional[int]) -> Dict[str, Any]:
    """What ``settings.json`` holds: the params the reference ran with (the commit's params.yaml with the
    command's ``-S`` overrides applied, as ``dvc exp run`` applies them), the command, commit and recipe.
    The tracking URI is stored without credentials, in the params and in the command: the file is committed."""
    applied = P.apply_overrides(params, dvc_overrides(command), source=command)
    if (applied.get("tracking") or {}).get("uri"):
        applied["tracking"]["uri"] = redact_uri(applied["tracking"]["uri"])
    return {"command": redact_command(command), "commit": commit, "recipe": recipe, "params": applied}


def _flatten(node: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _relevant(flat: Dict[str, Any]) -> Dict[str, Any]:
    flat = {**P.ADDED_KEYS, **flat}  # a key a settings.json predates ran at the value it was added with
    return {k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in IGNORED)}


def row_differences(yours: Dict[str, Any], reference: Dict[str, Any], study: str
                    ) -> Dict[str, List[Tuple[str, Any, Any]]]:
    """Per row of ``study`` in both params: the (key, yours, reference) of each setting that changes
    its numbers and differs (a row's own overrides merged in, as the stage trains it)."""
    ours, theirs = P.study_rows(yours, study), P.study_rows(reference, study)
    out = {}
    for row in [r for r in ours if r in theirs]:  # params.yaml's order: the output is stable
        a, b = _relevant(_flatten(ours[row])), _relevant(_flatten(theirs[row]))
        out[row] = [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return out


def cell_test(yours: Dict[str, Any], reference: Dict[str, Any]) -> Dict[str, Any]:
    """``{"mean", "std", "n"}`` on each side -> the difference, Welch's p and a verdict: ``same``
    (equal means), ``consistent`` (p >= 0.05), ``differs`` (p < 0.05), or ``n/a`` (a side with one
    seed, or no spread on either: nothing to test with)."""
    diff = yours["mean"] - reference["mean"]
    if diff == 0:
        return {"diff": 0.0, "p": None, "verdict": "same"}
    if min(yours["n"], reference["n"]) < 2 or not (yours["std"] or reference["std"]):
        return {"diff": diff, "p": None, "verdict": "n/a"}
    p = float(stats.ttest_ind_from_stats(yours["mean"], yours["std"], yours["n"], reference["mean"],
                                         reference["std"], reference["n"], equal_var=False).pvalue)
    return {"diff": diff, "p": p, "verdict": "differs" if p < ALPHA else "consistent"}


def _cells(row: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """summary.json's flat ``AP``, ``AP_std``, ``AP_n`` keys -> ``{"AP": {"mean", "std", "n"}}``."""
    return {k: {"mean": row[k], "std": row.get(f"{k}_std", 0.0), "n": row.get(f"{k}_n", 1)}
            for k in BOX + MASK if k in row}


def compare(summary: Dict[str, Any], reference_summary: Dict[str, Any], params: Dict[str, Any],
            reference_settings: Dict[str, Any]) -> Dict[str, Any]:
    """Every cell of every study in both summaries, tested; the settings that differ per row."""
    ref_params = reference_settings["params"]
    out = {"studies": {}}
    for study in sorted(summary.keys() | reference_summary.keys()):
        ours, theirs = summary.get(study) or {}, reference_summary.get(study) or {}
        if not ours or not theirs:
            if ours or theirs:
                out["studies"][study] = {"only": "yours" if ours else "reference"}
            continue
        known = (study in (params.get("studies") or {})) and (study in (ref_params.get("studies") or {}))
        differences = row_differences(params, ref_params, study) if known else {}
        # The study's own row order where params.yaml defines it (summary.json sorts its keys).
        order = list(P.study_rows(params, study)) if known else []
        names = [r for r in order if r in ours or r in theirs]
        names += sorted((ours.keys() | theirs.keys()) - set(names))
        rows = []
        for row in names:
            if row not in ours or row not in theirs:
                rows.append({"row": row, "only": "reference" if row not in ours else "yours"})
                continue
            a, b = _cells(ours[row]), _cells(theirs[row])
            for metric in [m for m in a if m in b]:
                rows.append({"row": row, "metric": metric, "yours": a[metric], "reference": b[metric],
                             **cell_test(a[metric], b[metric]), "settings_differ": bool(differences.get(row))})
        out["studies"][study] = {"cells": rows, "differences": differences}
    return out


def _stat(cell: Dict[str, Any]) -> str:
    return f"{cell['mean']:.2f} ± {cell['std']:.2f} (n={cell['n']})"


def _listing(differences: List[Tuple[str, Any, Any]]) -> str:
    return "; ".join(f"`{k}` {json.dumps(a)}; {json.dumps(b)}" for k, a, b in differences)


def render(result: Dict[str, Any], reference_dir: str, reference_settings: Dict[str, Any],
           params: Dict[str, Any], recipe: Optional[int], summary_path: str = "reports/summary.json") -> str:
    ref_params = reference_settings["params"]
    lines = ["# Your run against the reference", "",
             f"Reference: `{reference_dir}` — `{reference_settings['command']}` on commit "
             f"`{reference_settings['commit'][:10]}`, recipe {reference_settings['recipe']}. "
             f"Yours: `{summary_path}` with its params, recipe {recipe}. Generated by "
             "`python -m pipeline.report.reference`.", "",
             "Each cell: mean ± std over seeds (n) on each side; Δ = yours − reference; p: Welch's two-sided "
             f"t-test from the two cells' mean, std and n; *differs*: p < {ALPHA}. The same settings on the same "
             "machine give the same numbers; on other hardware training diverges, for some detectors by more "
             "than the seeds' spread (`reports/reference/experiments.md` sec. 4).", ""]
    if recipe != reference_settings["recipe"]:
        lines += [f"**Other training recipe**: yours {recipe}, the reference's {reference_settings['recipe']} "
                  "(`model.presets.RECIPE`): the code trains the same params differently; every cell may differ "
                  "for that reason.", ""]
    seeds, ref_seeds = params.get("seeds"), ref_params.get("seeds")
    if seeds != ref_seeds:
        lines += [f"Seeds: yours {json.dumps(seeds)}, the reference's {json.dumps(ref_seeds)} (rows that set their "
                  "own keep them).", ""]
    for study, item in result["studies"].items():
        lines += [f"## {study}", ""]
        if "only" in item:
            lines += [f"Run in {item['only']} only.", ""]
            continue
        differences = item["differences"]
        shared = set.intersection(*(set(d) for d in differences.values())) if differences else set()
        if shared:
            lines += [f"Settings that differ in every row (yours; reference): {_listing(sorted(shared))}.", ""]
        for row, diffs in differences.items():
            own = [d for d in diffs if d not in shared]
            if own:
                lines += [f"Settings that differ in `{row}`: {_listing(own)}.", ""]
        lines += ["| row | metric | yours | reference | Δ | p | verdict |", "|---|---|---|---|---:|---:|---|"]
        for c in item["cells"]:
            if "only" in c:
                lines.append(f"| {c['row']} | | {'—' if c['only'] == 'reference' else 'run'} | "
                             f"{'—' if c['only'] == 'yours' else 'run'} | | | only in {c['only']} |")
                continue
            p = "—" if c["p"] is None else f"{c['p']:.3g}"
            verdict = c["verdict"] + (" (settings differ)" if c["settings_differ"] else "")
            lines.append(f"| {c['row']} | {c['metric']} | {_stat(c['yours'])} | {_stat(c['reference'])} | "
                         f"{c['diff']:+.2f} | {p} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def headline(result: Dict[str, Any]) -> List[str]:
    """One line per study: how many cells are the same, consistent, differ or untestable."""
    out = []
    for study, item in result["studies"].items():
        if "only" in item:
            out.append(f"{study}: run in {item['only']} only")
            continue
        cells = [c for c in item["cells"] if "only" not in c]
        counts = {v: sum(c["verdict"] == v for c in cells) for v in ("same", "consistent", "differs", "n/a")}
        differs = [f"{c['row']} {c['metric']} {c['diff']:+.2f}" for c in cells if c["verdict"] == "differs"]
        keys = sorted({k for diffs in item["differences"].values() for k, _, _ in diffs})
        out.append(f"{study}: {len(cells)} cells, " + ", ".join(f"{n} {v}" for v, n in counts.items() if n)
                   + (f" ({'; '.join(differs[:4])}{f'; {len(differs) - 4} more' if len(differs) > 4 else ''})"
                      if differs else "")
                   + (f"; settings differ: {', '.join(keys)}" if keys else "; same settings"))
    return out


def load_reference(directory: Path) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """A snapshot's summary.json and settings.json; one error naming the missing file otherwise."""
    files = {name: directory / name for name in ("summary.json", SETTINGS)}
    for name, path in files.items():
        if not path.is_file():
            hint = " (snapshots made before settings.json was recorded cannot be compared)" if name == SETTINGS else ""
            raise P.ParamError(f"{path}: not found: --reference must be a folder written by "
                               f"tools/snapshot_reference.py{hint}")
    return json.loads(files["summary.json"].read_text()), json.loads(files[SETTINGS].read_text())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.report.reference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, default=Path("reports/reference"),
                        help="a snapshot folder (default: reports/reference)")
    parser.add_argument("--summary", type=Path, default=Path("reports/summary.json"),
                        help="your run's summary (default: reports/summary.json)")
    parser.add_argument("--params", type=Path, default=P.PARAMS_FILE, help="the params it ran with")
    parser.add_argument("--out", type=Path, default=Path("reports/vs_reference.md"))
    args = parser.parse_args(argv)

    def go():
        params = P.load(args.params)
        P.check(params, args.params)
        if not args.summary.is_file():
            raise P.ParamError(f"{args.summary}: not found: run the pipeline first (dvc repro)")
        reference_summary, reference_settings = load_reference(args.reference)
        recipe = recipe_in((P.ROOT / "model" / "presets.py").read_text())
        try:
            result = compare(json.loads(args.summary.read_text()), reference_summary, params, reference_settings)
        except P.ParamError as e:  # the reference's params, checked by today's schema
            raise P.ParamError(f"{args.reference / SETTINGS}: {e}") from None
        write_text(args.out, render(result, str(args.reference), reference_settings, params, recipe,
                                       str(args.summary)) + "\n")
        print("\n".join(headline(result) + [f"wrote {args.out}"]))

    main_guard(go)


if __name__ == "__main__":
    main()
