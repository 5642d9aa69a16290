"""requirements.lock is hash-pinned and `make setup` installs it with --require-hashes (issue 17).
No network, no install: the files are read as text."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[A-Za-z0-9][A-Za-z0-9.+!_-]*)"
                 r"(?P<hashes>(?:\s+--hash=sha256:[0-9a-f]{64})+)$")


def lock_requirements(text: str):
    """The lock's requirements as logical lines: backslash continuations joined, comments dropped."""
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        continued = line.endswith("\\")
        current += " " + line.rstrip("\\").strip()
        if not continued:
            if current.strip():
                logical.append(current.strip())
            current = ""
    if current.strip():
        logical.append(current.strip())
    return logical


def lock_problems(text: str):
    """Every requirement that is not ``name==version --hash=sha256:<64 hex> ...``."""
    problems, seen = [], set()
    for req in lock_requirements(text):
        m = PIN.match(req)
        if not m:
            problems.append(req[:120])
            continue
        name = re.sub(r"[-_.]+", "-", m["name"]).lower()
        if name in seen:
            problems.append(f"{name}: pinned twice")
        seen.add(name)
    return problems, seen


def make_recipe(target: str) -> str:
    """The recipe lines (tab-indented, continuations joined) of ``target`` in the Makefile."""
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{target}\s*:", line))
    recipe = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return " ".join(recipe).replace("\\ ", " ")


def test_every_pin_has_a_sha256_hash():
    """Each requirement of requirements.lock is ``name==version`` followed by at least one
    ``--hash=sha256:`` of 64 hex digits, once per package; torch and torchvision are among them.
    Checked against the lock before hashes (``git show`` of it, 206 plain ``name==version`` lines):
    this test failed there, naming the hash-less lines."""
    problems, names = lock_problems((ROOT / "requirements.lock").read_text())
    assert not problems, f"requirements.lock lines without a pinned version and sha256 hash: {problems[:10]}"
    assert len(names) > 100 and {"torch", "torchvision", "lvis", "mlflow", "dvc"} <= names


def test_lock_checker_rejects_unhashed_and_unpinned_lines():
    """The checker itself: a hash-less pin, a range, a short hash are refused; a hashed pin with a
    continuation line and pip-compile's trailing comment passes."""
    good = "torch==2.14.1 \\\n    --hash=sha256:" + "a" * 64 + " \\\n    --hash=sha256:" + "b" * 64 + "  # via x\n"
    assert lock_problems(good) == ([], {"torch"})
    for bad in ("torch==2.14.1\n", "torch>=2.14 --hash=sha256:" + "a" * 64 + "\n",
                "torch==2.14.1 --hash=sha256:abc\n", "torch==2.14.1 --hash=md5:" + "a" * 32 + "\n"):
        assert lock_problems(bad)[0], bad


def test_setup_installs_with_require_hashes_and_lock_generates_them():
    """`make setup` installs requirements.lock with --require-hashes; `make lock` writes hashes.
    On the Makefile before (plain ``install -r requirements.lock``) the first assert failed."""
    setup = make_recipe("setup")
    installs = [cmd for cmd in setup.split(";") if "-r requirements.lock" in cmd]
    assert installs and all("--require-hashes" in cmd for cmd in installs), installs
    assert "--generate-hashes" in make_recipe("lock")
