"""
Install detectron2 0.6 into the running interpreter's environment, as pure Python.

detectron2 has no official PyPI release. ``pb1-detectron2==0.6`` is an sdist whose Python files are
byte-identical to upstream v0.6; only ``setup.py``'s ``name`` differs. Its C++/CUDA sources are not in
it, so the one change made here before building is to drop ``ext_modules=get_extensions()`` from its
``setup.py``; ``model/compat.py`` then provides a stand-in ``detectron2._C``.

Every run downloads the sdist with ``pip --require-hashes`` and checks the sha256 again itself.
A detectron2 with a compiled ``_C`` (built from source by the user) is left untouched.

Usage: ``python tools/install_detectron2.py [--force]`` (``make setup`` calls it).
"""
import argparse
import hashlib
import importlib.machinery
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

DIST = "pb1-detectron2"
VERSION = "0.6"
SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
EXTENSION_LINE = "ext_modules=get_extensions(),"


def _compiled_detectron2() -> str:
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return ""
    found = importlib.machinery.PathFinder.find_spec("_C", list(spec.submodule_search_locations))
    if found is not None and isinstance(found.loader, importlib.machinery.ExtensionFileLoader):
        return found.origin
    return ""


def _installed_version() -> str:
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        return ""


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def install(force: bool = False) -> None:
    compiled = _compiled_detectron2()
    if compiled:
        print(f"detectron2 with a compiled extension is installed ({compiled}); keeping it.")
        return
    if _installed_version() == VERSION and not force:
        print(f"{DIST}=={VERSION} already installed.")
        return
    with tempfile.TemporaryDirectory(prefix="detectron2-sdist-") as tmp:
        tmp = Path(tmp)
        req = tmp / "requirements.txt"
        req.write_text(f"{DIST}=={VERSION} --hash=sha256:{SHA256}\n")
        _pip("download", "-q", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
             "--require-hashes", "-r", str(req), "-d", str(tmp / "dl"))
        (sdist,) = (tmp / "dl").glob("*.tar.gz")
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != SHA256:
            sys.exit(f"error: {sdist.name}: sha256 {digest} != pinned {SHA256}; refusing to install.")
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp / "src", filter="data")
        (src,) = (tmp / "src").iterdir()
        setup_py = src / "setup.py"
        text = setup_py.read_text()
        if text.count(EXTENSION_LINE) != 1:
            sys.exit(f"error: {setup_py}: expected one '{EXTENSION_LINE}' line; sdist changed?")
        setup_py.write_text(text.replace(EXTENSION_LINE, "# C++ extension disabled: csrc/ is not in the sdist."))
        # Upstream's setup.py packages the model-zoo configs from a top-level configs/ (it links
        # it into detectron2/model_zoo/); the sdist ships them already inside the package instead.
        shutil.move(src / "detectron2" / "model_zoo" / "configs", src / "configs")
        _pip("install", "-q", "--no-deps", "--no-build-isolation", str(src))
    print(f"installed {DIST}=={VERSION} (pure Python; sha256 {SHA256[:12]}... verified)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--force", action="store_true", help="reinstall even if already installed")
    install(parser.parse_args().force)
