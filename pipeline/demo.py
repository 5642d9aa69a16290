"""``make demo``: the whole pipeline on the built-in synthetic data, through DVC.

Runs ``dvc repro`` in the repository (every stage that ``dvc.yaml`` defines), then says where the
outputs are. Stages that have not been built yet simply are not in ``dvc.yaml``.
"""
import os
import subprocess
import sys
from pathlib import Path

from pipeline import env

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    env.main([])
    venv_bin = Path(sys.executable).parent
    # dvc.yaml's commands say `python`: make it this environment's, as `source .venv/bin/activate` would.
    env_vars = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run([str(venv_bin / "dvc"), "repro"], cwd=ROOT, check=True, env=env_vars)
    print(f"\ndemo done: tables and figures are under {ROOT / 'reports'}; against the committed reference run: "
          "python -m pipeline.report.reference (README: Reference run)")


if __name__ == "__main__":
    main()
