"""
The launcher against a real Slurm cluster (slurm/local-cluster/start.sh starts one on this machine;
.ci/run does so before the tests). Skipped, with the reason, when no Slurm controller answers.
"""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import scratch_repo, set_params, sh, start_interruptible

PROFILE = yaml.safe_load((Path(__file__).resolve().parents[1] / "slurm" / "local.yaml").read_text())


def _slurm_ready() -> str:
    if not shutil.which("sinfo"):
        return "no Slurm client (sinfo) on PATH: run slurm/local-cluster/start.sh"
    state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if state.returncode or not {"idle", "mixed", "allocated"} & set(state.stdout.split()):
        return f"no idle Slurm node ({(state.stderr or state.stdout).strip()}): run slurm/local-cluster/start.sh"
    return ""


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(bool(_slurm_ready()), reason=_slurm_ready() or "ok")]


def _squeue(repo_name: str):
    out = subprocess.run(["squeue", "-h", "-o", "%i %T %j"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line]


def _sacct(job: str):
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job, "--units=M",
                          "--format=JobID,State,Partition,ReqCPUS,ReqMem"], capture_output=True, text=True,
                         check=True).stdout
    return [line.split("|") for line in out.splitlines() if line]


@pytest.fixture
def repo(tmp_path):
    repo = scratch_repo(tmp_path / "repo", **{"launcher.cluster": "slurm", "launcher.profile": "local.yaml",
                                              "launcher.timeout_min": 20})
    sh(repo, "python", "-m", "pipeline.data.prepare", "--no-figures")
    return repo


def test_job_array_runs_every_seed_and_follows_the_profile(repo):
    out = sh(repo, "python", "-m", "pipeline.stage", "main")
    main = json.loads((repo / "results" / "main.json").read_text())
    assert set(main) == {"bbox", "bbox_std", "runtime_ms", "n_seeds"} and main["n_seeds"] == 2
    runs = json.loads((repo / "results" / "main_runs.json").read_text())["seeds"]
    assert set(runs) == {"seed0", "seed1"}
    for run in runs.values():
        assert (Path(run["eval_dir"]) / "metrics.json").is_file() and run["mlflow_run_id"]
    # One array of two tasks, on the profile's partition with its CPUs and memory.
    array = out.stderr.split("submitted 2 job(s) to slurm: ")[1].split(";")[0].split(", ")
    assert len(array) == 2 and array[0].endswith("_0") and array[1].endswith("_1")
    for job in array:
        # submitit reads the result as soon as the job writes it; Slurm's record follows within seconds
        # (seen: RUNNING still, on a fast machine).
        _wait_for(lambda job=job: _sacct(job)[0][1] != "RUNNING", "Slurm to record the job's end", 60)
        (row,) = _sacct(job)
        assert row[1] == "COMPLETED" and row[2] == PROFILE["partition"]
        assert int(row[3]) == PROFILE["cpus_per_task"] and row[4] == f"{PROFILE['mem_gb'] * 1024}M"
        logs = list((repo / "slurm-logs").glob(f"{job}/*_log.*"))
        assert {p.suffix for p in logs} == {".out", ".err"}


def test_failed_job_fails_the_stage_with_its_id_and_stderr(repo):
    set_params(repo, seeds=[0], **{"train.opts": ["MODEL.PIXEL_STD", [0.0, 0.0, 0.0]]})
    out = sh(repo, "python", "-m", "pipeline.stage", "main", check=False)
    assert out.returncode == 1
    assert "error: job " in out.stderr and " failed " in out.stderr
    job = out.stderr.split("error: job ")[1].split()[0]
    # submitit reads the job's error as soon as it is written; Slurm's record follows within seconds.
    _wait_for(lambda: _sacct(job)[0][1] != "RUNNING", "Slurm to record the job's end", 60)
    assert _sacct(job)[0][1] == "FAILED"
    assert "NaN/inf values in the forward pass at iteration 0" in out.stderr  # the job's own stderr, tailed


def _start_stage(repo):
    return start_interruptible(repo, "python", "-m", "pipeline.stage", "main")


def _wait_for(predicate, what: str, timeout: float = 240):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_interrupt_cancels_the_jobs(repo):
    set_params(repo, **{"train.max_iter": 400})
    before = {line.split()[0] for line in _squeue("")}
    proc = _start_stage(repo)
    _wait_for(lambda: any("RUNNING" in line for line in _squeue("") if line.split()[0] not in before),
              "a running job")
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
    proc.wait(timeout=60)
    assert proc.returncode != 0
    _wait_for(lambda: not [line for line in _squeue("") if line.split()[0] not in before], "an empty queue", 60)


def test_requeued_job_resumes_and_logs_each_step_once(repo):
    from mlflow.tracking import MlflowClient

    set_params(repo, seeds=[0], **{"train.max_iter": 200, "train.checkpoint_period": 5})
    proc = _start_stage(repo)
    ckpt = lambda: list((repo / "runs").glob("*/seed0/model_0000009.pth"))  # noqa: E731
    _wait_for(lambda: ckpt() or proc.poll() is not None, "a checkpoint")
    (job,) = [line.split()[0] for line in _squeue("") if "RUNNING" in line]
    subprocess.run(["scontrol", "requeue", job], check=True)  # as preemption does
    # Slurm holds a requeued job for ~2 minutes (BeginTime); let it start again at once.
    _wait_for(lambda: "PENDING" in " ".join(_squeue("")), "the requeued job to be pending", 60)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    # (model_0000009.pth itself is gone by now: train.keep_checkpoints 0 deletes them once the run finishes)
    run_dir = next((repo / "runs").glob("*/seed0/train_done.json")).parent
    done = json.loads((run_dir / "train_done.json").read_text())
    assert done["resumed_from"] >= 10 and done["iterations"] == 200
    steps = [json.loads(line)["step"] for line in (run_dir / "train_metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(200))
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`cn2.run_dir` = '{run_dir.resolve()}'")
    assert len(runs) == 1  # the requeued job continued its MLflow run
    history = client.get_metric_history(runs[0].info.run_id, "total_loss")
    assert sorted(m.step for m in history) == list(range(200))
