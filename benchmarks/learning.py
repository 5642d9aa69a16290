"""
How fast the Table 1 detectors learn at a scale: seconds per iteration and box AP per detector.

    python benchmarks/learning.py [--detectors NAME ...] [--max-iter N] [--seed 0] [--set KEY=VALUE ...]
                                  [--json FILE] [--keep DIR]

Each detector trains one run of params.yaml's settings (``--set`` overrides them as ``pipeline.runs.train``
does; ``--max-iter`` defaults to params.yaml's ``train.max_iter``) into a temporary run directory,
without MLflow, then is evaluated on the whole validation split. Prints, per detector: iterations,
seconds per iteration (training wall time / iterations, this machine, ``torch`` threads as set),
training minutes, AP, AP50, APr/c/f, and the seconds the evaluation took. Needs the prepared dataset
and, at the synthetic scale, the pretrained backbone (``dvc repro pretrain``). Runs one detector at
a time: do not time two things at once on a small machine.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# isort: off
import model  # noqa: E402,F401  (first: model.compat must run before detectron2 loads)
import torch  # noqa: E402
from model.presets import DETECTORS  # noqa: E402
from pipeline import params as P  # noqa: E402
from pipeline.atomic import write_text  # noqa: E402
from pipeline.runs.evaluate import evaluate  # noqa: E402
from pipeline.runs.spec import DONE_FILE, resolve  # noqa: E402
from pipeline.runs.train import run  # noqa: E402
# isort: on


def measure(detector: str, overrides, seed: int, root: Path) -> dict:
    spec = resolve(P.load(), [*overrides, f"detector={detector}", "eval.max_images=null"], seed=seed,
                   study="benchmark", row=detector)
    run_dir = root / detector
    start = time.perf_counter()
    run(run_dir, spec, track=False)
    train_s = time.perf_counter() - start
    iters = json.loads((run_dir / DONE_FILE).read_text())["iterations"]
    start = time.perf_counter()
    metrics = evaluate(run_dir, spec)
    eval_s = time.perf_counter() - start
    box = metrics["bbox"]
    return {"detector": detector, "iterations": iters, "s_per_iter": round(train_s / iters, 3),
            "train_min": round(train_s / 60, 1), "AP": box["AP"], "AP50": box["AP50"], "APr": box.get("APr"),
            "APc": box.get("APc"), "APf": box.get("APf"), "eval_s": round(eval_s, 1),
            "scale": spec.scale, "ims_per_batch": spec.train.get("ims_per_batch"), "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detectors", nargs="+", default=list(DETECTORS), choices=list(DETECTORS))
    parser.add_argument("--max-iter", type=int, help="iterations per run (default: params.yaml train.max_iter)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a params.yaml key (repeatable), e.g. --set train.ims_per_batch=8")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--keep", type=Path, help="keep the run directories here (default: a temporary "
                                                  "directory, deleted at the end)")
    args = parser.parse_args()
    overrides = list(args.overrides) + ([f"train.max_iter={args.max_iter}"] if args.max_iter else [])
    rows = []
    with tempfile.TemporaryDirectory(prefix="cn2-learning-") as tmp:
        root = args.keep or Path(tmp)
        for name in args.detectors:
            rows.append(measure(name, overrides, args.seed, root))
            r = rows[-1]
            aps = "  ".join(f"{k} {r[k]:5.1f}" if r[k] is not None else f"{k}     -"
                            for k in ("AP", "AP50", "APr", "APc", "APf"))
            print(f"{r['detector']:22s} {r['iterations']:6d} it  {r['s_per_iter']:6.3f} s/it  "
                  f"{r['train_min']:5.1f} min  {aps}  (eval {r['eval_s']:.0f} s)", flush=True)
    if args.json:
        write_text(args.json, json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except P.ParamError as e:  # bad --set values, a stale dataset: one line
        sys.exit(f"error: {e}")
