"""The whole DAG, end to end at smoke scale, in a temporary git repository, as a user drives it."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers import commit, env, processes_under, scratch_repo, set_params, sh, start_interruptible

# Every test here shares a whole-DAG `dvc repro` (minutes): not in CI; `make test PYTEST_ARGS="-m slow"`.
pytestmark = pytest.mark.slow

STUDIES = {
    "table1": {"centernet2_agnostic": {"detector": "centernet2_agnostic", "loss": "softmax"},
               "cascadercnn": {"detector": "cascadercnn", "loss": "softmax"}},
    # Its softmax row is table1's centernet2_agnostic run: trained once, shared.
    "table2": {"centernet2_agnostic_softmax": {"detector": "centernet2_agnostic", "loss": "softmax"},
               "centernet2_agnostic_fedloss": {"detector": "centernet2_agnostic", "loss": "fedloss"}},
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = scratch_repo(tmp_path_factory.mktemp("dag"), studies=STUDIES)
    first = sh(repo, "dvc", "repro")
    commit(repo, "ran")
    return {"path": repo, "first": first.stdout}


def test_repro_builds_every_output_and_shares_identical_runs(repo):
    r = repo["path"]
    for stage in ("prepare", "main", "study@table1", "study@table2", "aggregate", "report"):
        assert f"Running stage '{stage}'" in repo["first"]
    # main (agnostic+softmax) = table1's agnostic = table2's softmax: 3 distinct settings x 2 seeds.
    assert len(list((r / "runs").glob("*/seed*"))) == 6
    main = json.loads((r / "results" / "main.json").read_text())
    assert main["n_seeds"] == 2 and 0 <= main["bbox"]["AP"] <= 100
    table1 = (r / "reports" / "table1.md").read_text()
    assert "| CenterNet2-agnostic | " in table1 and "(n=2) · paper 26.9 ± 0.05 · Δ" in table1
    assert "CenterNet-FPN" not in table1.split("## Comparisons")[0]  # not in this study: no row
    assert "centernet2_agnostic vs cascadercnn | AP |" in table1
    summary = json.loads((r / "reports" / "summary.json").read_text())
    assert summary["table2"]["centernet2_agnostic_softmax"]["AP"] == summary["table1"]["centernet2_agnostic"]["AP"]
    for fig in ("ap_rcf.png", "loss_curves.png", "accuracy_vs_runtime.png", "data_samples.png"):
        assert (r / "reports" / "figures" / fig).stat().st_size > 1000
    runs_md = (r / "reports" / "runs.md").read_text()
    assert runs_md.count("| table1 |") == 4 and "missing" not in runs_md
    assert (r / "mlflow.db").is_file()


def test_second_repro_does_nothing(repo):
    out = sh(repo["path"], "dvc", "repro").stdout
    assert "Running stage" not in out and "Data and pipelines are up to date." in out


def _exp_show_entries(shown, loss):
    """The commits and experiments (not the workspace) in ``dvc exp show --json`` whose params.yaml
    has ``loss``, wherever DVC nests them."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            params = ((node.get("data") or {}).get("params") or {}).get("params.yaml") or {}
            if node.get("rev") != "workspace" and (params.get("data") or {}).get("loss") == loss:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(shown)
    return found


def _mean_ap(r, pattern):
    """Mean box AP over the seeds of the run store's runs matching ``pattern``."""
    runs = sorted((r / "runs").glob(pattern))
    assert len(runs) == 2, runs
    return sum(json.loads(p.read_text())["bbox"]["AP"] for p in runs) / len(runs)


def test_exp_run_with_another_loss_reruns_only_main(repo):
    """
    The experiment (loss=eql) is listed with its own metrics: the mean box AP of the two eql runs
    in the run store; the baseline commit keeps the mean of the softmax runs (at smoke scale they
    differ: 0.021 vs 0.084 on the check below). Break tried: in this test's real `dvc exp show
    --json` output, the experiment's metrics replaced by the baseline's (what a main stage that
    ignored the loss would report): these assertions failed on it, the old check (two "bbox" in
    the JSON) passed.
    """
    r = repo["path"]
    out = sh(r, "dvc", "exp", "run", "-S", "loss=eql").stdout
    assert "Running stage 'main'" in out
    assert "Running stage 'study" not in out and "Running stage 'aggregate'" not in out
    shown = json.loads(sh(r, "dvc", "exp", "show", "--json").stdout)
    (eql,) = _exp_show_entries(shown, "eql")
    (softmax,) = _exp_show_entries(shown, "softmax")
    for entry, loss in ((eql, "eql"), (softmax, "softmax")):
        metrics = entry["data"]["metrics"]["results/main.json"]["data"]
        assert metrics["n_seeds"] == 2
        pattern = f"centernet2_agnostic-{loss}-*/seed*/eval/*/metrics.json"
        assert metrics["bbox"]["AP"] == pytest.approx(_mean_ap(r, pattern), abs=1e-3)


def test_unknown_key_and_bad_value_fail_clearly(repo):
    r = repo["path"]
    bad = sh(r, "dvc", "exp", "run", "-S", "nosuchkey=1", check=False)
    assert bad.returncode != 0 and "nosuchkey" in bad.stdout + bad.stderr
    params = yaml.safe_load((r / "params.yaml").read_text())
    params["loss"] = "focal"
    (r / "bad.yaml").write_text(yaml.safe_dump(params))
    bad = sh(r, sys.executable, "-m", "pipeline.stage", "main", "--params", "bad.yaml", check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: bad.yaml: loss='focal': allowed values: softmax, sigmoid, eql, fedloss")  # the file given
    (r / "bad.yaml").unlink()


def _unfinished_with_checkpoint(r):
    """The main stage's run directories that have written a checkpoint but not finished training."""
    return [d for d in (r / "runs").glob("centernet2_agnostic-softmax-*/seed*")
            if (d / "model_0000003.pth").exists() and not (d / "train_done.json").exists()]


def test_interrupted_stage_resumes_its_runs(repo):
    r = repo["path"]
    sh(r, "git", "checkout", "-q", "--", "params.yaml")
    set_params(r, **{"train.max_iter": 60})
    proc = start_interruptible(r, "dvc", "repro", "-s", "main")
    deadline = time.time() + 240

    while not _unfinished_with_checkpoint(r):
        assert time.time() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
    proc.wait(timeout=120)
    assert proc.returncode != 0
    # Ctrl-C cancelled the jobs: no job process of this repository is left running.
    deadline = time.time() + 30
    while processes_under(r / "runs"):
        assert time.time() < deadline, f"jobs still running after the interrupt: {processes_under(r / 'runs')}"
        time.sleep(1)
    interrupted = _unfinished_with_checkpoint(r)
    assert interrupted
    sh(r, "dvc", "repro", "-s", "main")
    for d in interrupted:
        done = json.loads((d / "train_done.json").read_text())
        assert done["resumed_from"] >= 4 and done["iterations"] == 60
        steps = [json.loads(line)["step"] for line in (d / "train_metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(60))


def test_sigterm_cancels_the_jobs_even_when_sigint_is_ignored(repo, tmp_path):
    # As `kill <stage pid>` does to a stage started in the background of a script (where SIGINT is
    # ignored, and with it submitit's cancel of a local job): the stage stops, and so do its jobs.
    r = repo["path"]
    sh(r, "git", "checkout", "-q", "--", "params.yaml")
    # New runs (nothing of the previous tests' is reused), too long to end by themselves meanwhile.
    set_params(r, **{"train.max_iter": 5000})
    log = tmp_path / "stage.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.stage", "main"], cwd=r, env=env(),
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))

    deadline = time.time() + 240
    while not _unfinished_with_checkpoint(r):
        assert time.time() < deadline and proc.poll() is None, "no checkpoint appeared"
        time.sleep(0.5)
    started = _unfinished_with_checkpoint(r)
    os.kill(proc.pid, signal.SIGTERM)  # the stage only, not its process group
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert "cancelled 2 running job(s)" in log.read_text()  # main: 2 seeds, both running
    deadline = time.time() + 30
    while processes_under(r / "runs"):
        assert time.time() < deadline, f"jobs still running after SIGTERM: {processes_under(r / 'runs')}"
        time.sleep(1)
    assert not any((d / "train_done.json").exists() for d in started)  # stopped, not finished


def test_aggregate_uses_exactly_the_current_seeds(repo):
    r = repo["path"]
    sh(r, "git", "checkout", "-q", "--", "params.yaml")
    set_params(r, seeds=[0])
    sh(r, "dvc", "repro")
    summary = json.loads((r / "reports" / "summary.json").read_text())
    assert summary["table1"]["cascadercnn"]["AP_n"] == 1
    assert "(n=1)" in (r / "reports" / "table1.md").read_text()
    assert list((r / "runs").glob("cascadercnn-*/seed1"))  # the old seed's run is still on disk...
    seed0 = json.loads(next((r / "runs").glob("cascadercnn-*/seed0/eval/*/metrics.json")).read_text())
    assert summary["table1"]["cascadercnn"]["AP"] == pytest.approx(seed0["bbox"]["AP"], abs=1e-3)  # ...but unused
