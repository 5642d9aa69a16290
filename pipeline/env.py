"""``python -m pipeline.env``: what the installed stack is (versions, detectron2 extension, devices)."""
import importlib.metadata
import os

import torch

from model import compat

_PACKAGES = ["torch", "torchvision", "pb1-detectron2", "numpy", "pillow", "pycocotools", "lvis",
             "dvc", "mlflow", "submitit"]


def collect() -> dict:
    info = {}
    for name in _PACKAGES:
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info[name] = "not installed"
    compiled = compat.compiled_extension_path()
    info["detectron2._C"] = compiled or "stand-in (model/compat.py; kernels from torchvision)"
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    info["cpu threads"] = f"{torch.get_num_threads()} (of {os.cpu_count()} cores)"
    return info


def main(argv=None) -> None:
    for key, value in collect().items():
        print(f"{key:>16}: {value}")


if __name__ == "__main__":
    main()
