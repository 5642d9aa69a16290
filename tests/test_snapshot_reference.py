import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script

snapshot_reference = load_script("tools/snapshot_reference.py")


@pytest.fixture
def reports(tmp_path, monkeypatch):
    """A git repository whose reports/ holds a finished run's tables and two figures."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "init"], check=True)
    rep = tmp_path / "reports"
    (rep / "figures").mkdir(parents=True)
    for f in snapshot_reference.FILES:
        (rep / f).write_text("{}" if f.endswith(".json") else f"| {f} |\n")
    (rep / "figures" / "loss_curves.png").write_bytes(b"curves")
    (rep / "figures" / "ap_rcf.png").write_bytes(b"ap at 300 per image")
    monkeypatch.setattr(snapshot_reference, "ROOT", tmp_path)
    monkeypatch.setattr(snapshot_reference, "REPORTS", rep)
    return rep


def _snapshot(out: str, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["snapshot_reference.py", "--command", "dvc exp run", "--wall", "1h",
                                      "--out", out])
    snapshot_reference.main()


def test_a_second_view_does_not_duplicate_unchanged_figures(reports, monkeypatch):
    _snapshot("reports/reference", monkeypatch)
    main = reports / "reference"
    assert sorted(p.name for p in (main / "figures").iterdir()) == ["ap_rcf.png", "loss_curves.png"]

    # The same runs re-scored: the AP figure changes, the loss curves do not.
    (reports / "figures" / "ap_rcf.png").write_bytes(b"ap at 10 per image")
    _snapshot("reports/reference/detections-10", monkeypatch)
    view = main / "detections-10"
    assert [p.name for p in (view / "figures").iterdir()] == ["ap_rcf.png"]
    assert (view / "figures" / "ap_rcf.png").read_bytes() == b"ap at 10 per image"
    readme = (view / "README.md").read_text()
    assert "`figures/ap_rcf.png`" in readme
    assert "unchanged from the main reference: `../figures/loss_curves.png`" in readme
    # The main snapshot itself always holds every figure.
    assert (main / "figures" / "ap_rcf.png").read_bytes() == b"ap at 300 per image"


@pytest.mark.parametrize("out", ["reports", "../x", "/tmp/x", "reports/reference/../../x"])
def test_out_must_be_a_folder_under_reports(reports, monkeypatch, out):
    with pytest.raises(SystemExit, match="must be a folder under"):
        _snapshot(out, monkeypatch)


def test_the_inputs_the_runs_read_are_recorded(reports, monkeypatch):
    """A user whose numbers differ must be able to tell other inputs from other hardware."""
    data = reports.parent / "data"
    (data / "synthetic").mkdir(parents=True)
    (data / "synthetic" / "prepare.json").write_text('{"checksum": "abc123"}')
    _snapshot("reports/reference", monkeypatch)
    readme = (reports / "reference" / "README.md").read_text()
    assert "- inputs: dataset `synthetic` checksum `abc123`\n" in readme
    (data / "pretrain").mkdir()
    (data / "pretrain" / "pretrain.json").write_text('{"sha256": "fff999", "trained": true}')
    _snapshot("reports/reference", monkeypatch)
    readme = (reports / "reference" / "README.md").read_text()
    assert "- inputs: dataset `synthetic` checksum `abc123`; pretrained backbone sha256 `fff999`\n" in readme


def test_the_recipe_is_read_from_the_commit_not_the_working_tree(reports, monkeypatch):
    """Run keys carry model.presets.RECIPE: a snapshot says which recipe made it, as the commit had it."""
    repo = reports.parent
    _snapshot("reports/reference", monkeypatch)
    assert "- recipe:" not in (reports / "reference" / "README.md").read_text()  # a commit before RECIPE

    (repo / "model").mkdir()
    (repo / "model" / "presets.py").write_text('"""presets"""\nRECIPE = 7  # version\n')
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "model/presets.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "recipe 7"], check=True)
    (repo / "model" / "presets.py").write_text("RECIPE = 8\n")  # edited since, not committed
    _snapshot("reports/reference", monkeypatch)
    assert "- recipe: 7 (`model.presets.RECIPE` at that commit)\n" in (reports / "reference" / "README.md").read_text()


def test_the_params_the_run_trained_with_are_recorded(reports, monkeypatch):
    """settings.json: the commit's params.yaml with the command's -S overrides, as `dvc exp run` applied
    them; `python -m pipeline.report.reference` compares a user's params with it."""
    repo = reports.parent
    _snapshot("reports/reference", monkeypatch)
    assert not (reports / "reference" / "settings.json").exists()  # a commit without params.yaml
    assert "Tables 1-2 at its seeds" in (reports / "reference" / "README.md").read_text()  # no count to give

    (repo / "params.yaml").write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "params"], check=True)
    (repo / "params.yaml").write_text("seeds: [5]\n")  # edited since: not what the run used
    monkeypatch.setattr(sys, "argv", ["snapshot_reference.py", "--command",
                                      "dvc exp run -S 'seeds=[0,1,2]' -S eval.max_images=null", "--wall", "1h"])
    snapshot_reference.main()
    recorded = json.loads((reports / "reference" / "settings.json").read_text())
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert recorded["commit"] == head and recorded["command"].startswith("dvc exp run -S")
    assert recorded["params"]["seeds"] == [0, 1, 2] and recorded["params"]["eval"]["max_images"] is None
    assert recorded["params"]["eval"]["detections_per_image"] == 300  # the commit's own value
    readme = (reports / "reference" / "README.md").read_text()
    assert "`settings.json`" in readme
    assert "Tables 1-2 at 3 seeds, as produced" in readme  # the command's seeds, not the edited file's 1


def test_a_one_table_run_is_named_for_the_table_it_made(reports, monkeypatch):
    """`-S 'run_studies=[table2]'` makes Table 2 only: the README says so and leaves out Table 1's
    'not run' file rather than presenting it as a result."""
    repo = reports.parent
    (repo / "params.yaml").write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "params"], check=True)
    monkeypatch.setattr(sys, "argv", ["snapshot_reference.py", "--command",
                                      "dvc exp run -S 'seeds=[0,1,2]' -S 'run_studies=[table2]'", "--wall", "1h"])
    snapshot_reference.main()
    readme = (reports / "reference" / "README.md").read_text()
    assert "The synthetic Table 2 at 3 seeds, as produced" in readme
    assert "## Table 2\n\n| table2.md |" in readme
    assert "## Table 1" not in readme and "| table1.md |" not in readme
    assert "Not run: Table 1 (`run_studies` is ['table2'])" in readme
    assert (reports / "reference" / "table1.md").is_file()  # still copied: the reference tool reads every file

    monkeypatch.setattr(sys, "argv", ["snapshot_reference.py", "--command", "dvc exp run", "--wall", "1h"])
    snapshot_reference.main()  # the params' own run_studies: [table1, table2]
    readme = (reports / "reference" / "README.md").read_text()
    assert "The synthetic Tables 1-2 at 2 seeds" in readme and "Not run:" not in readme
    assert readme.index("## Table 1") < readme.index("## Table 2")
