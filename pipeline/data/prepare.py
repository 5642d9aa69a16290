"""
The prepare stage: ``python -m pipeline.data.prepare [flags]``.

Reads ``params.yaml`` (``data:``; the whole file is checked first, as every stage checks it); flags
override it. For ``data.name: synthetic`` it generates the built-in dataset (see
``pipeline/data/synthetic.py``) under ``data/synthetic``; for ``lvis_v1`` / ``coco_2017`` it validates the
annotation files and opens every image under ``data.root`` (``pipeline/data/validate.py``; cached in
``data/<name>/validated/``, so a second run only stats the files) and writes
``data/<name>/cat_info.json``. Either way it writes ``data/<name>/prepare.json`` (settings, counts and
a sha256 checksum of the dataset) and the two data figures under ``reports/figures/``.

Nothing partial is left behind: the output is built in a temporary directory next to its target and
renamed into place only when complete; on an error, Ctrl-C or SIGTERM the temporary directory is
removed and the previous output, if any, is untouched. An existing output directory is replaced only
when it holds an earlier run's ``prepare.json`` (``--force``: whatever it holds).
"""
import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional

from pipeline import params as P
from pipeline.data.synthetic import SyntheticSpec, frequency_bucket
from pipeline.data.validate import DataError, validate_instances

FIGURES_DIR = Path("reports/figures")
# Under a real dataset's output: which files passed validation (pipeline.data.validate's cache).
VALIDATION_CACHE = "validated"


def data_settings(params: Dict[str, Any]) -> Dict[str, Any]:
    """The ``data:`` section of checked params (:func:`pipeline.params.check`): name, root (Path or
    None) and the SyntheticSpec."""
    data = params.get("data") or {}
    synthetic = dict(data.get("synthetic") or {})
    if "image_size" in synthetic:
        synthetic["image_size"] = tuple(synthetic["image_size"])
    root = data.get("root")
    return {"name": data.get("name", "synthetic"), "root": Path(root) if root else None,
            "spec": SyntheticSpec(**synthetic)}


def output_dir(name: str) -> Path:
    return Path("data") / name


def dataset_checksum(directory: Path, exclude=("prepare.json",)) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel in exclude:
            continue
        digest.update(rel.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def cat_info_from(lvis_or_coco_json: Path) -> list:
    """Per-category training image and instance counts (the federated loss's and RFS's input)."""
    data = json.loads(Path(lvis_or_coco_json).read_text())
    images = {c["id"]: set() for c in data["categories"]}
    instances = {c["id"]: 0 for c in data["categories"]}
    for a in data["annotations"]:
        images[a["category_id"]].add(a["image_id"])
        instances[a["category_id"]] += 1
    return [{"id": c["id"], "name": c["name"], "image_count": len(images[c["id"]]),
             "instance_count": instances[c["id"]], "frequency": frequency_bucket(len(images[c["id"]]))}
            for c in sorted(data["categories"], key=lambda c: c["id"])]


def check_replaceable(out: Path, force: bool = False) -> None:
    """Refuse to replace ``out`` unless it is absent, empty, or an earlier prepare's output (it holds
    ``prepare.json``); ``force`` replaces any directory."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise P.ParamError(f"--out {out}: exists and is not a directory; refusing to replace it")
    if force or (out / "prepare.json").is_file() or not any(out.iterdir()):
        return
    raise P.ParamError(f"--out {out}: exists and holds no prepare.json (not an earlier prepare's output); "
                       f"refusing to replace it: move it away, or pass --force to replace it")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; a previous ``out`` goes into a fresh private directory first, then is
    deleted (a name chosen by mkdtemp: a pre-existing ``.<out>.old`` is never touched)."""
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        if out.exists() or out.is_symlink():
            out.rename(old / out.name)
        tmp.rename(out)
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _validate_splits(splits, cache_dir: Optional[Path] = None) -> Dict[str, Dict[str, int]]:
    counts = {}
    for flavour in splits.values():
        for split in flavour:
            counts[split.name] = validate_instances(split.json_file, split.kind, split.image_file, cache_dir)
    return counts


def _figures(splits, cat_info: Path, figures_dir: Path) -> None:
    from pipeline.data.figures import frequency_histogram, sample_grid

    coco_train = splits["coco"][0] if "coco" in splits else None
    labels = splits["lvis"][0] if "lvis" in splits else coco_train
    exhaustive = coco_train.json_file if coco_train and coco_train is not labels else None
    sample_grid(labels.json_file, exhaustive, labels.image_file, figures_dir / "data_samples.png")
    frequency_histogram(cat_info, figures_dir / "data_frequency.png")


def prepare(name: str, root: Optional[Path], spec: SyntheticSpec, out: Path,
            figures_dir: Optional[Path] = FIGURES_DIR, force: bool = False) -> Dict[str, Any]:
    """Build ``out`` (see module docstring); returns what is written to ``out/prepare.json``. An
    existing ``out`` is replaced only when :func:`check_replaceable` allows it."""
    from pipeline.data import datasets

    start = time.time()
    out = Path(out)
    check_replaceable(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if name == "synthetic":
            from pipeline.data.synthetic import generate

            summary = generate(spec, tmp)
            splits = datasets.layout(name, tmp)
            counts = _validate_splits(splits)
            settings = {"synthetic": asdict(spec)}
        else:
            root = Path(root) if root else datasets.default_root()
            splits = datasets.layout(name, root)
            # The validation cache lives in the output, so it is replaced (or kept) with it.
            if (out / VALIDATION_CACHE).is_dir():
                shutil.copytree(out / VALIDATION_CACHE, tmp / VALIDATION_CACHE)
            counts = _validate_splits(splits, tmp / VALIDATION_CACHE)
            train_json = splits.get("lvis", splits.get("coco"))[0].json_file
            (tmp / "cat_info.json").write_text(json.dumps(cat_info_from(train_json)))
            summary = {}
            settings = {"root": str(root.resolve())}
        cat_info = json.loads((tmp / "cat_info.json").read_text())
        summary["frequency_buckets"] = {b: sum(c["frequency"] == b for c in cat_info) for b in "rcf"}
        if name == "synthetic":
            checksum = dataset_checksum(tmp)
        else:  # the dataset itself stays under root: checksum its annotation files
            digest = hashlib.sha256()
            for flavour in splits.values():
                for split in flavour:
                    digest.update(split.json_file.read_bytes())
            checksum = digest.hexdigest()
        record = {"dataset": name, **settings, "splits": counts, "summary": summary,
                  "checksum": checksum, "seconds": round(time.time() - start, 1)}
        (tmp / "prepare.json").write_text(json.dumps(record, indent=2) + "\n")
        if figures_dir is not None:
            _figures(splits, tmp / "cat_info.json", figures_dir)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record


def _image_size(text: str):
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("expected integers S or MIN,MAX") from None
    if len(parts) == 1:
        return [parts[0], parts[0]]
    if len(parts) == 2:
        return parts
    raise argparse.ArgumentTypeError("expected S or MIN,MAX")


SYNTHETIC_FLAGS = ("num_train", "num_val", "num_classes", "image_size", "seed")


def with_flags(params: Dict[str, Any], args: argparse.Namespace) -> Dict[str, Any]:
    """``params`` with the command line's data flags applied, each checked as its params key is."""
    synthetic_rules = P.schema()["data"]["synthetic"]
    data = dict(params.get("data") or {})
    synthetic = dict(data.get("synthetic") or {})
    for flag in SYNTHETIC_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            problem = synthetic_rules[flag](value)
            if problem:
                raise P.ParamError(f"--{flag.replace('_', '-')} {value}: {problem}")
            synthetic[flag] = value
    if args.synthetic:
        data["name"] = "synthetic"
    if args.name:
        data["name"] = args.name
    if args.root:
        data["root"] = str(args.root)
    if synthetic:
        data["synthetic"] = synthetic
    params = {**params, "data": data}
    P.validate(params, source="the command line")
    return params


def _terminated(signum, frame):
    print("error: terminated (SIGTERM); the partial output was removed", file=sys.stderr)
    sys.exit(128 + signum)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.data.prepare", description=__doc__.split("\n\n")[1])
    parser.add_argument("--params", type=Path, default=P.PARAMS_FILE, help="params file (default: %(default)s)")
    parser.add_argument("--synthetic", action="store_true", help="the built-in synthetic dataset (data.name=synthetic)")
    parser.add_argument("--name", choices=P.DATASETS, help="data.name")
    parser.add_argument("--root", type=Path, help="data.root: detectron2 dataset root for lvis_v1/coco_2017")
    parser.add_argument("--out", type=Path, help="output directory (default: data/<name>); an existing one is "
                        "replaced only when it holds an earlier prepare's prepare.json")
    parser.add_argument("--force", action="store_true", help="replace --out whatever it holds")
    parser.add_argument("--num-train", type=int, help="data.synthetic.num_train")
    parser.add_argument("--num-val", type=int, help="data.synthetic.num_val")
    parser.add_argument("--num-classes", type=int, help="data.synthetic.num_classes")
    parser.add_argument("--image-size", type=_image_size, help="data.synthetic.image_size: S or MIN,MAX")
    parser.add_argument("--seed", type=int, help="data.synthetic.seed")
    parser.add_argument("--figures", type=Path, default=FIGURES_DIR, help="figure directory (default: %(default)s)")
    parser.add_argument("--no-figures", action="store_true", help="skip the figures")
    args = parser.parse_args(argv)
    try:
        params = P.load(args.params)
        P.check(params, args.params)  # the whole file, as every stage checks it
        settings = data_settings(with_flags(params, args))
        out = args.out or output_dir(settings["name"])
        # A SIGTERM (kill, Slurm, a CI timeout) unwinds like Ctrl-C: the temporary output is removed.
        previous = signal.signal(signal.SIGTERM, _terminated)
        try:
            record = prepare(settings["name"], settings["root"], settings["spec"], out,
                             None if args.no_figures else args.figures, force=args.force)
        finally:
            signal.signal(signal.SIGTERM, previous)
    except (P.ParamError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"prepared {record['dataset']} in {out} ({record['seconds']} s): "
          f"{json.dumps(record['splits'])}; r/c/f categories {record['summary']['frequency_buckets']}; "
          f"sha256 {record['checksum'][:16]}")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
