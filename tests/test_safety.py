"""
Failing safely on bad input (issue 17): malformed params files, names and synthetic sizes.

Each test feeds a hand-made bad input to a stage's command line and checks that it stops before any
work with exit code 1 and one line naming the file given and the key.
"""
from pathlib import Path

import pytest
import yaml

from pipeline import params as P
from pipeline import prepare as prep
from pipeline import stage

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
    [20, 120000], pipeline.synthetic.LIMITS). Broken deliberately: with the schema accepting any
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
    """The caps of pipeline.synthetic.LIMITS hold for prepare's flags too (192 = 8 shapes x 8
    colours x 3 patterns). Broken deliberately: without the flag check (only ``>= 20``, as before),
    --num-train 300000000 started generating."""
    monkeypatch.chdir(tmp_path)
    code, err = _prepare(P.PARAMS_FILE, capsys, *flags)
    assert code == 1 and err == f"error: {problem}", err
    assert not (tmp_path / "data").exists()
