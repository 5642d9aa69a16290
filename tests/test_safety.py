"""
Failing safely on bad input (issue 17): malformed params files, names and synthetic sizes.

Each test feeds a hand-made bad input to a stage's command line and checks that it stops before any
work with exit code 1 and one line naming the file given and the key.
"""
import json
import os
from pathlib import Path

import pytest
import yaml

from pipeline import params as P
from pipeline import stage
from pipeline.data import prepare as prep
from tests.helpers import load_script

GOOD = yaml.safe_load(P.PARAMS_FILE.read_text())


def _write(tmp_path: Path, text: str, name: str = "my-params.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _with(**changes) -> str:
    """The repository's params.yaml with dotted keys changed, as YAML text."""
    params = yaml.safe_load(P.PARAMS_FILE.read_text())
    for key, value in changes.items():
        node = params
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return yaml.safe_dump(params)


def _exit(main, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr().err.strip()


def _prepare(params_file, capsys, *flags):
    return _exit(prep.main, ["--params", str(params_file), "--no-figures", *flags], capsys)


def _stage_main(params_file, capsys):
    return _exit(stage.main, ["main", "--params", str(params_file)], capsys)


# --- 6. params that are not what they say ---------------------------------------------------------

@pytest.mark.parametrize("text, where, problem", [
    # Line 2 is "  name: [synthetic"; the flow sequence is still open at the end of the file (line 3, col 1).
    ("data:\n  name: [synthetic\n", ":3:1:", "expected ',' or ']', but got '<stream end>'"),
    # A tab indents line 2: PyYAML stops at its first character.
    ("data:\n\tname: synthetic\n", ":2:1:", "found character '\\t' that cannot start any token"),
])
def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, monkeypatch, capsys, text, where, problem):
    """Both the prepare stage and a training stage print one line ``<file>:<line>:<col>: YAML syntax
    error: ...`` (line and column counted from 1 by hand in the texts above). Broken deliberately:
    with ``load`` letting ``yaml.YAMLError`` through, this test failed (a traceback, no SystemExit 1)."""
    monkeypatch.chdir(tmp_path)
    bad = _write(tmp_path, text)
    for code, err in (_prepare(bad, capsys), _stage_main(bad, capsys)):
        assert code == 1
        assert err == f"error: {bad}{where} YAML syntax error: {problem}", err


def test_prepare_checks_the_whole_file_and_names_the_file_given(tmp_path, monkeypatch, capsys):
    """``train.max_iter: "abc"`` is outside ``data:`` but prepare refuses it, naming my-params.yaml
    (not params.yaml), and writes nothing. Broken deliberately: with prepare checking only ``data:``
    (as before), it prepared the dataset and exited 0."""
    monkeypatch.chdir(tmp_path)
    bad = _write(tmp_path, _with(**{"train.max_iter": "abc"}))
    code, err = _prepare(bad, capsys)
    assert code == 1
    assert err == f"error: {bad}: train.max_iter='abc': must be an integer >= 1 or null"
    assert not (tmp_path / "data").exists()


def test_data_as_a_string_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """``data: synthetic`` (a string where a mapping belongs). Broken deliberately: with prepare
    reading ``data`` before the check, it raised ``ValueError`` from ``dict('synthetic')``."""
    monkeypatch.chdir(tmp_path)
    bad = _write(tmp_path, _with(data="synthetic"))
    code, err = _prepare(bad, capsys)
    assert code == 1
    assert err == f"error: {bad}: data must be a mapping with keys: name, root, annotations, synthetic"


def test_stage_main_checks_the_synthetic_sizes(tmp_path, monkeypatch, capsys):
    """``data.synthetic.num_train: -1`` stops ``stage main`` before any job (its bounds are
    [20, 120000], pipeline.data.synthetic.LIMITS). Broken deliberately: with the schema accepting any
    value under data.synthetic (as before) the stage went on to submit training."""
    monkeypatch.chdir(tmp_path)
    bad = _write(tmp_path, _with(**{"data.synthetic.num_train": -1}))
    code, err = _stage_main(bad, capsys)
    assert code == 1
    assert err == f"error: {bad}: data.synthetic.num_train=-1: must be an integer in [20, 120000]"


@pytest.mark.parametrize("opts, problem", [
    (["SOLVER.FOO", 1], "Non-existent key: SOLVER.FOO (detector centernet2_agnostic, scale synthetic)"),
    (["MODEL.PIXEL_STD", "abc"], "Type mismatch"),
    (["OUTPUT_DIR", "/tmp/elsewhere"], "OUTPUT_DIR is set by the pipeline: the run store"),
    (["DATASETS.TRAIN", ["x"]], "DATASETS.TRAIN is set by the pipeline: use data.name and data.annotations instead"),
    (["MODEL.WEIGHTS", "/x.pkl"], "MODEL.WEIGHTS is set by the pipeline: use train.weights instead"),
    (["SEED", 3], "SEED is set by the pipeline: use seeds instead"),
])
def test_train_opts_are_checked_against_the_detectron2_config(tmp_path, monkeypatch, capsys, opts, problem):
    """An unknown key or a wrongly typed value fails up front (not 27 lines into the job), and keys the
    pipeline sets from params are refused naming the parameter to use. Broken deliberately: without
    ``_check_opts_keys``, SOLVER.FOO passed the check; without ``OWNED_OPTS`` OUTPUT_DIR passed."""
    monkeypatch.chdir(tmp_path)
    bad = _write(tmp_path, _with(**{"train.opts": opts}))
    code, err = _stage_main(bad, capsys)
    assert code == 1
    assert err.startswith(f"error: {bad}: train.opts=") and problem in err, err
    assert len(err.splitlines()) == 1


def test_valid_opts_pass():
    """A real key with a value of its type passes (the NaN test in test_run.py relies on it)."""
    P.check(yaml.safe_load(_with(**{"train.opts": ["MODEL.PIXEL_STD", [1.0, 1.0, 1.0]]})))


@pytest.mark.parametrize("edit, problem", [
    (lambda p: p["studies"].__setitem__("/abs/x", {"r": {"detector": "centernet", "loss": "softmax"}}),
     "studies: study name '/abs/x': must be a name of letters, digits"),
    (lambda p: p["studies"].__setitem__("../../x", {"r": {"detector": "centernet", "loss": "softmax"}}),
     "studies: study name '../../x'"),
    (lambda p: p["studies"]["table2"].__setitem__("row'; x", {"detector": "centernet", "loss": "softmax"}),
     "studies: row name table2.\"row'; x\""),
    (lambda p: p.__setitem__("run_studies", ["table1", "a/b"]), "run_studies=['table1', 'a/b']: must be a list"),
])
def test_study_and_row_names_must_be_plain_names(tmp_path, monkeypatch, capsys, edit, problem):
    """Names become file and MLflow names, so only ``[A-Za-z0-9_][A-Za-z0-9_.-]*`` is accepted.
    Broken deliberately: with ``_studies`` accepting any mapping (as before) all four passed."""
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load(P.PARAMS_FILE.read_text())
    edit(params)
    bad = _write(tmp_path, yaml.safe_dump(params))
    code, err = _stage_main(bad, capsys)
    assert code == 1 and err.startswith(f"error: {bad}: ") and problem in err, err


@pytest.mark.parametrize("flags, problem", [
    (["--num-train", "300000000"], "--num-train 300000000: must be an integer in [20, 120000]"),
    (["--image-size", "64,2000000"],
     "--image-size [64, 2000000]: must be [min, max] side in pixels, integers with 64 <= min <= max <= 512"),
    (["--num-classes", "1000"], "--num-classes 1000: must be an integer in [3, 192]"),
])
def test_synthetic_size_flags_are_bounded(tmp_path, monkeypatch, capsys, flags, problem):
    """The caps of pipeline.data.synthetic.LIMITS hold for prepare's flags too (192 = 8 shapes x 8
    colours x 3 patterns). Broken deliberately: without the flag check (only ``>= 20``, as before),
    --num-train 300000000 started generating."""
    monkeypatch.chdir(tmp_path)
    code, err = _prepare(P.PARAMS_FILE, capsys, *flags)
    assert code == 1 and err == f"error: {problem}", err
    assert not (tmp_path / "data").exists()


def test_synthetic_class_cap_is_the_generators_vocabulary():
    """params.py's cap on data.synthetic.num_classes (kept there so that params imports no data module)
    is every (shape, colour, pattern) the generator can draw: a category beyond it has no look."""
    from pipeline.data.synthetic import COLOURS, PATTERNS, SHAPES

    assert P.SYNTHETIC_LIMITS["num_classes"][2] == len(SHAPES) * len(COLOURS) * len(PATTERNS)


# --- 5. data that is not what it says -------------------------------------------------------------

def _tiny_lvis(root: Path, fmt: str = "PNG") -> Path:
    """A hand-made LVIS v1 layout: 3 categories (ids 1..3), per split 3 images of 64x48 (solid grey,
    written by PIL) and one box each. ``fmt`` PNG or JPEG."""
    from PIL import Image

    ext = "png" if fmt == "PNG" else "jpg"
    (root / "lvis").mkdir(parents=True)
    cats = [{"id": k, "name": f"c{k}", "frequency": "r", "synset": f"c{k}.n.01"} for k in (1, 2, 3)]
    for split in ("train", "val"):
        (root / "coco" / f"{split}2017").mkdir(parents=True)
        images, anns = [], []
        for k in (1, 2, 3):
            Image.new("RGB", (64, 48), (k * 40, 90, 90)).save(root / "coco" / f"{split}2017" / f"{k:012d}.{ext}", fmt)
            images.append({"id": k, "width": 64, "height": 48, "neg_category_ids": [],
                           "not_exhaustive_category_ids": [],
                           "coco_url": f"http://images.example.org/{split}2017/{k:012d}.{ext}"})
            anns.append({"id": k, "image_id": k, "category_id": k, "bbox": [4.0, 4.0, 20.0, 10.0], "area": 200.0,
                         "segmentation": [[4, 4, 24, 4, 24, 14, 4, 14]]})
        (root / "lvis" / f"lvis_v1_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _prepare_lvis(root: Path, capsys, *flags):
    return _exit(prep.main, ["--name", "lvis_v1", "--root", str(root), "--no-figures", *flags], capsys)


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


@pytest.mark.parametrize("fmt, damage, field, problem", [
    ("PNG", lambda r, im: im.write_text("not an image\n"), "coco_url", "is not an image (no known image header)"),
    # 100 bytes of a PNG hold its signature and IHDR (size 64x48) but not its IDAT/IEND chunks.
    ("PNG", lambda r, im: _truncate(im, 100), "coco_url", "is damaged or truncated"),
    # A JPEG without its last 10 bytes keeps its header; its end-of-image marker FF D9 is gone.
    ("JPEG", lambda r, im: _truncate(im, len(im.read_bytes()) - 10), "coco_url",
     "is truncated (no JPEG end-of-image marker)"),
    ("PNG", lambda r, im: _edit_json(r / "lvis" / "lvis_v1_val.json",
                                     lambda d: d["images"][1].__setitem__("width", 65)),
     "coco_url", "is 64x48, the record says 65x48"),
])
def test_prepare_opens_every_image(tmp_path, monkeypatch, capsys, fmt, damage, field, problem):
    """val image 2 (images[1]) damaged four ways: each gets one line naming the JSON, the record,
    the field and the image file, exit 1 and no output. Broken deliberately: with only the
    ``os.path.isfile`` check (as before), all four prepared with exit 0."""
    monkeypatch.chdir(tmp_path)
    root = _tiny_lvis(tmp_path / "datasets", fmt)
    image = next((root / "coco" / "val2017").glob("000000000002.*"))
    damage(root, image)
    code, err = _prepare_lvis(root, capsys)
    assert code == 1
    (line,) = err.splitlines()
    assert line.startswith(f"error: {root / 'lvis' / 'lvis_v1_val.json'}: images[1] (id 2): field '{field}': "
                           f"image file {image} "), line
    assert problem in line, line
    assert not (tmp_path / "data" / "lvis_v1").exists()


@pytest.mark.parametrize("edit, problem", [
    (lambda d: d.__setitem__("images", []), "field 'images': empty list (a split needs at least one image)"),
    # Category 3 renumbered 998 (and its annotation): 998 is outside 1..3, which detectron2 maps to classes 0..2.
    (lambda d: (d["categories"][2].__setitem__("id", 998), d["annotations"][2].__setitem__("category_id", 998)),
     "categories[2] (id 998): field 'id': 998 is outside 1..3 (LVIS numbers its N categories 1..N)"),
])
def test_prepare_refuses_an_empty_split_and_category_ids_out_of_range(tmp_path, monkeypatch, capsys, edit, problem):
    """Broken deliberately: without the two checks, both prepared with exit 0 (0 images; a category
    training then refused with ``Got an invalid category_id=998 for a dataset of 3 classes``)."""
    monkeypatch.chdir(tmp_path)
    root = _tiny_lvis(tmp_path / "datasets")
    _edit_json(root / "lvis" / "lvis_v1_train.json", edit)
    code, err = _prepare_lvis(root, capsys)
    assert code == 1 and err == f"error: {root / 'lvis' / 'lvis_v1_train.json'}: {problem}", err


def test_validation_is_cached_on_size_and_mtime(tmp_path, monkeypatch, capsys):
    """First run opens all 6 images (3 per split); a second run opens none; after one image's
    modification time changes, only that one is opened again. Counted by wrapping
    ``validate.check_image``. Broken deliberately: with both cache lookups removed, the second run
    opened the images again and this test failed."""
    from pipeline.data import validate

    monkeypatch.chdir(tmp_path)
    root = _tiny_lvis(tmp_path / "datasets")
    opened = []
    real = validate.check_image
    monkeypatch.setattr(validate, "check_image", lambda f, w, h: opened.append(f) or real(f, w, h))
    monkeypatch.setattr(validate, "PLAIN_PROGRESS_MIN", 1)  # progress lines without a terminal
    prep.main(["--name", "lvis_v1", "--root", str(root), "--no-figures"])
    assert len(opened) == 6
    assert "checking the images of lvis_v1_train.json: 3/3 images" in capsys.readouterr().err
    opened.clear()
    prep.main(["--name", "lvis_v1", "--root", str(root), "--no-figures"])
    assert opened == []
    image = root / "coco" / "train2017" / "000000000003.png"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    prep.main(["--name", "lvis_v1", "--root", str(root), "--no-figures"])
    assert opened == [str(image)]


def test_images_are_checked_by_a_process_pool_and_the_first_bad_one_is_named(tmp_path, monkeypatch):
    """With a pool of 2 processes and one image per task, images[1] and images[2] both bad: the
    message names images[1] (the lowest index), whichever process finishes first. Broken
    deliberately: with the pool replaced by a plain loop, ``ProcessPoolExecutor`` was not called and
    the assertion on ``pools`` failed."""
    from pipeline.data import validate

    root = _tiny_lvis(tmp_path / "datasets")
    for k in (2, 3):
        (root / "coco" / "val2017" / f"{k:012d}.png").write_text("text")
    monkeypatch.setattr(validate, "CHUNK", 1)
    monkeypatch.setattr(validate, "MIN_PARALLEL", 1)
    monkeypatch.setattr(validate, "_workers", lambda: 2)
    pools = []
    real_pool = validate.ProcessPoolExecutor
    monkeypatch.setattr(validate, "ProcessPoolExecutor", lambda n: pools.append(n) or real_pool(n))
    split = datasets_layout(root)["lvis"][1]
    with pytest.raises(validate.DataError, match=r"images\[1\] \(id 2\): field 'coco_url': image file .*000000000002"):
        validate.validate_instances(split.json_file, "lvis", split.image_file)
    assert pools == [2]


def datasets_layout(root: Path):
    from pipeline.data import datasets

    return datasets.layout("lvis_v1", root)


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_names_an_image_that_broke_after_validation(tmp_path, workers):
    """An image truncated after prepare: the training data loader (detectron2's DatasetMapper
    inside ``PositionSeededDataset``) raises one line naming the file, in the process and from a
    worker process. Broken deliberately: without the wrapper the error was
    ``OSError: image file is truncated`` (in the process) and ``OSError: Caught OSError in DataLoader
    worker process 0`` followed by a traceback (from a worker), neither naming the file."""
    from detectron2.config import get_cfg
    from detectron2.data import DatasetMapper
    from torch.utils.data import DataLoader

    from pipeline.data.loader import ImageReadError, PositionSeededDataset

    root = _tiny_lvis(tmp_path / "datasets")
    image = root / "coco" / "train2017" / "000000000001.png"
    _truncate(image, 100)
    dicts = [{"file_name": str(image), "image_id": 1, "height": 48, "width": 64, "annotations": []}]
    dataset = PositionSeededDataset(dicts, DatasetMapper(get_cfg(), is_train=True), seed=0)
    loader = DataLoader(dataset, batch_size=None, sampler=[(0, 0)], num_workers=workers)
    with pytest.raises(ImageReadError) as exc:
        next(iter(loader))
    message = str(exc.value)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"{image}: image 1 cannot be read ("), message


# --- 7. untrusted paths ---------------------------------------------------------------------------

def test_prepare_out_replaces_only_an_earlier_output(tmp_path, monkeypatch, capsys):
    """``--out`` holding a user's file is refused (exit 1, file intact); ``--force`` replaces it; an
    earlier output (with prepare.json) is replaced without --force; a pre-existing ``.out.old``
    with a user's file survives. Broken deliberately: with the old ``_swap_into_place`` (rename to
    ``.out.old``, then delete it) and no check, prepare replaced the user's directory with exit 0."""
    monkeypatch.chdir(tmp_path)
    root = _tiny_lvis(tmp_path / "datasets")
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "keep.txt").write_text("mine")
    code, err = _prepare_lvis(root, capsys, "--out", str(out))
    assert code == 1
    assert err == (f"error: --out {out}: exists and holds no prepare.json (not an earlier prepare's output); "
                   "refusing to replace it: move it away, or pass --force to replace it")
    assert (out / "thesis.tex").read_text() == "years of work"
    prep.main(["--name", "lvis_v1", "--root", str(root), "--no-figures", "--out", str(out), "--force"])
    assert (out / "prepare.json").is_file() and not (out / "thesis.tex").exists()
    prep.main(["--name", "lvis_v1", "--root", str(root), "--no-figures", "--out", str(out)])  # an earlier output
    assert (out / "prepare.json").is_file()
    assert (tmp_path / ".out.old" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old", "datasets", "out"]  # no temp dirs left


def test_sigterm_removes_the_partial_output(tmp_path):
    """SIGTERM while the synthetic set is being generated (2000 images: tens of seconds): the process
    exits with 143 (128 + SIGTERM), no ``.out.tmp-*`` directory is left and ``out`` was never
    created. Broken deliberately: without the SIGTERM handler the process died with -15 (no
    clean-up ran)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.data.prepare", "--synthetic", "--num-train", "2000",
                             "--no-figures", "--out", str(out)], cwd=P.ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.tmp-*/images")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert list(tmp_path.glob(".out.tmp-*")), "generation did not start"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "error: terminated (SIGTERM); the partial output was removed"
    assert list(tmp_path.iterdir()) == []


def test_output_paths_stay_inside_their_directory(tmp_path):
    """``paths.inside`` (used for results/studies/<study>.json and MLflow's mlruns/<experiment>): a
    plain name passes; '..', an absolute path and a symbolic link out of the directory are refused.
    Broken deliberately: with ``inside`` returning ``directory / name`` unchecked, the three
    ``raises`` failed."""
    from pipeline.paths import UnsafePath, inside

    studies = tmp_path / "results" / "studies"
    studies.mkdir(parents=True)
    assert inside(studies, "table1.json") == studies / "table1.json"
    (studies / "link").symlink_to(tmp_path)
    for name in ("../../x.json", "/abs/x.json", "link/x.json"):
        with pytest.raises(UnsafePath, match="outside"):
            inside(studies, name)


def test_tracking_uri_credentials_are_not_written(tmp_path):
    """``redact_uri`` drops user and token, keeps host, port and path (worked by hand from RFC 3986's
    ``userinfo@host``); ``reports/runs.md``'s text holds no token. Broken deliberately: with
    runs_table writing ``uri`` as given, the token appeared in its text."""
    from pipeline.report.figures import runs_table
    from pipeline.runs.tracking import redact_uri

    assert redact_uri("https://alice:s3cret@mlflow.example.org:5000/x?y=1") == "https://mlflow.example.org:5000/x?y=1"
    assert redact_uri("http://token@host/") == "http://host/"
    assert redact_uri("sqlite:////repo/mlflow.db") == "sqlite:////repo/mlflow.db"
    assert redact_uri(None) is None
    text = runs_table({}, "https://alice:s3cret@mlflow.example.org")
    assert "s3cret" not in text and "alice" not in text and "https://mlflow.example.org" in text


def test_mlflow_filters_quote_names_safely(tmp_path):
    """A parent run named ``row'; x`` (a quote: it broke the f-string filter) is created once and
    found again by the second lookup. Broken deliberately: with the old ``'{ablation}'`` filter the
    second lookup raised MlflowException (invalid filter)."""
    from pipeline.runs.tracking import Tracker, filter_value

    assert filter_value("a'b") == '"a\'b"' and filter_value('a"b') == "'a\"b'"
    with pytest.raises(ValueError):
        filter_value("a'\"b")
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracker._experiment("main")
    first = tracker._parent(exp, "row'; x").info.run_id
    assert tracker._parent(exp, "row'; x").info.run_id == first


def test_slurm_profile_names_only_slurm_dir_or_an_explicit_path(tmp_path, monkeypatch):
    """A ``local.yaml`` in the working directory (its ``setup`` would run as shell) is not taken for
    the bare name ``local.yaml``: slurm/local.yaml is; ``./local.yaml`` (a path) takes the local one.
    Broken deliberately: with the old lookup (the working directory first) the planted file won."""
    from pipeline.params import SLURM_DIR, load_profile

    monkeypatch.chdir(tmp_path)
    (tmp_path / "local.yaml").write_text("setup: ['touch /tmp/pwned']\n")
    assert load_profile("local.yaml") == yaml.safe_load((SLURM_DIR / "local.yaml").read_text())
    assert load_profile("./local.yaml") == {"setup": ["touch /tmp/pwned"]}
    with pytest.raises(P.ParamError, match="not found"):
        load_profile("nosuch.yaml")


def test_train_speed_writes_no_predictable_temp_file(tmp_path, monkeypatch):
    """A symbolic link planted at the old name ``$TMPDIR/cn2-bench-cat-info-3.json`` is not written
    through, and nothing is left in $TMPDIR. Broken deliberately: with the old ``_uniform_freq`` the
    victim file was overwritten with the category list."""
    import tempfile

    bench = load_script("benchmarks/train_speed.py")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    (tmpdir / "cn2-bench-cat-info-3.json").symlink_to(victim)
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmpdir))
    monkeypatch.setattr(bench, "_rows", lambda *a: iter(()))  # no model: only the set-up runs
    bench.run("smoke", 1, 1, "cpu", 3, False)
    assert victim.read_text() == "precious"
    assert [p.name for p in tmpdir.iterdir()] == ["cn2-bench-cat-info-3.json"]


# --- 7. the local Slurm test cluster's scripts (no cluster needed) --------------------------------

CLUSTER = P.ROOT / "slurm" / "local-cluster"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a directory to another user")
def test_cluster_refuses_a_state_dir_it_does_not_own(tmp_path):
    """A CN2_SLURM_DIR made by another user (uid 65534), or writable by others, is refused before
    anything is installed or started. Not tried against the old script, which has no such check and
    would have gone on to install packages and restart the machine's test cluster."""
    import subprocess

    for mode, owner, problem in ((0o700, 65534, "belongs to uid 65534"), (0o777, 0, "is writable by others")):
        run = tmp_path / f"run-{mode:o}"
        run.mkdir()
        os.chmod(run, mode)
        os.chown(run, owner, -1)
        proc = subprocess.run(["bash", str(CLUSTER / "start.sh")], env={**os.environ, "CN2_SLURM_DIR": str(run)},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and problem in proc.stderr, proc.stderr
        assert "installing" not in proc.stdout and list(run.iterdir()) == []


def test_cluster_stop_kills_only_the_daemons_it_names(tmp_path):
    """stop.sh with pid files naming an unrelated ``sleep`` (as a stale pid file does once the pid is
    reused) leaves it running. Broken deliberately: with the old check (alive and not a zombie) it
    killed the sleep."""
    import subprocess

    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        (run / "slurmctld.pid").write_text(f"{sleeper.pid}\n")
        (run / "started").write_text("slurmctld\n")
        proc = subprocess.run(["bash", str(CLUSTER / "stop.sh")], env={**os.environ, "CN2_SLURM_DIR": str(run)},
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert f"pid {sleeper.pid} of {run / 'slurmctld.pid'} is not slurmctld now; leaving it alone" in proc.stdout
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
