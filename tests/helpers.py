"""A scratch copy of this repository as its own git repo, driven like a user drives it."""
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

from pipeline.params import ROOT


def load_script(relpath: str):
    """A script of this repository that is not in a package (``benchmarks/``, ``tools/``), imported
    as a module named by its file's stem, e.g. ``load_script("tools/tail_imbalance.py")``."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def conv_output_dtypes():
    """Yield a set that collects the dtype of every detectron2 ``Conv2d`` output computed while
    gradients are on (training, not evaluation) inside the ``with`` block, from a global forward hook."""
    import torch
    from detectron2.layers import Conv2d

    seen = set()

    def record(module, args, output):
        if isinstance(module, Conv2d) and torch.is_grad_enabled():
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        yield seen
    finally:
        handle.remove()


def tiny_dataset(root: Path, num_val: int = 6, image_size=(64, 80), seed: int = 2,
                 checksum: "str | None" = "abc123") -> Path:
    """A 24-image, 3-category synthetic dataset in ``root`` (with a ``prepare.json`` naming
    ``checksum`` unless it is None): what the unit tests train and evaluate on."""
    from pipeline.data.synthetic import SyntheticSpec, generate

    # val_min_images=1: the validation images at the training proportions, as the values pinned by
    # the metric tests were worked out on (the default 8 would make every image hold all 3 categories).
    generate(SyntheticSpec(num_train=24, num_val=num_val, num_classes=3, image_size=tuple(image_size),
                           seed=seed, val_min_images=1), root)
    if checksum is not None:
        (root / "prepare.json").write_text(f'{{"checksum": "{checksum}"}}')
    return root


def smoke_params(data: Path, detector: str, loss: str = "softmax", seeds=(0,), **train) -> dict:
    """params.yaml contents for smoke-scale runs on ``data`` on the CPU; ``train`` keys are added."""
    return {"data": {"name": "synthetic", "root": str(data)}, "scale": "smoke", "detector": detector,
            "loss": loss, "seeds": list(seeds), "train": {"device": "cpu", **train}}


SMOKE = {"data.synthetic.num_train": 24, "data.synthetic.num_val": 6, "data.synthetic.num_classes": 3,
         "data.synthetic.image_size": [64, 80], "scale": "smoke", "train.max_iter": 4,
         "train.checkpoint_period": 2, "train.log_period": 1, "train.ims_per_batch": 2, "eval.warmup": 1}


def env():
    """This environment's python and dvc first on PATH; MLflow's default store (the repo's)."""
    out = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    return out


def sh(repo: Path, *cmd, check=True, **kw):
    proc = subprocess.run(list(cmd), cwd=repo, env=env(), capture_output=True, text=True, **kw)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def start_interruptible(repo: Path, *cmd) -> subprocess.Popen:
    """``cmd`` in its own process group, as a terminal runs it, so ``os.killpg(p.pid, SIGINT)`` is
    a Ctrl-C. SIGINT is set back to its default first: a shell that started the tests in the
    background ignores it, children inherit that, and the Ctrl-C would then do nothing."""
    return subprocess.Popen(list(cmd), cwd=repo, env=env(), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def processes_under(path: Path) -> list:
    """Command lines of this machine's processes that name ``path`` (read whole from /proc: ``ps``
    cuts lines at the terminal's width, 80 columns without one, so a long path there is missed)."""
    out = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # the process ended meanwhile
            continue
        if str(path) in args:
            out.append(args)
    return out


def commit(repo: Path, message: str):
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, "--allow-empty")


def set_params(repo: Path, **changes):
    """``set_params(repo, **{"train.max_iter": 8})``: dotted keys into params.yaml."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for key, value in changes.items():
        node = params
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def scratch_repo(path: Path, **params) -> Path:
    """This working tree's files (tracked and new) in ``path``, a git repo of one commit."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (path / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, path / f)
    sh(path, "git", "init", "-q")
    set_params(path, **{**SMOKE, **params})
    commit(path, "smoke-scale pipeline")
    return path
