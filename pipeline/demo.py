"""``make demo``: the whole pipeline on the built-in synthetic data, through DVC.

Runs ``dvc repro`` in the repository (every stage that ``dvc.yaml`` defines), then says where the
outputs are. Stages that have not been built yet simply are not in ``dvc.yaml``.
"""
import subprocess
import sys
from pathlib import Path

from pipeline import env

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    env.main([])
    dvc = Path(sys.executable).with_name("dvc")
    subprocess.run([str(dvc), "repro"], cwd=ROOT, check=True)
    print(f"\ndemo done: tables and figures are under {ROOT / 'reports'}")


if __name__ == "__main__":
    main()
