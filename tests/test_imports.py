"""What importing the packages costs and guarantees, checked in fresh interpreters (this one has
loaded everything already): the report side never loads detectron2 or torch, and a run's
``config.yaml`` builds its model through ``pipeline.runs.predict`` without anyone having called
``model.get_model_cfg`` first (``model.presets`` registers the parts; ``model`` itself is lazy)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def _heavy_modules_after(code: str) -> str:
    """Which of detectron2, torch and torchvision a fresh interpreter holds after running ``code``."""
    return _python(f"{code}; import sys; "
                   "print(sorted(m for m in ('detectron2', 'torch', 'torchvision') if m in sys.modules))")


def test_the_report_side_loads_neither_detectron2_nor_torch():
    """``aggregate``, ``report`` and the reference comparison start in about a second instead of ~8
    (detectron2 and torchvision's import). Broken if ``pipeline/__init__`` imports ``model``'s
    registrations again, or ``pipeline.stage`` imports ``pipeline.runs.evaluate``."""
    loaded = _heavy_modules_after("import pipeline.report.reference, pipeline.report.aggregate, "
                                  "pipeline.report.figures, pipeline.stage, pipeline.launch")
    assert loaded == "[]"


def test_the_federated_gap_tool_scores_without_detectron2():
    """``tools/federated_gap.py`` is lvis-api and pycocotools alone: an independent check of the
    pipeline's evaluator must not share its code. Broken if ``only_images`` moves back into
    ``pipeline.data.datasets`` (which registers detectron2's datasets)."""
    loaded = _heavy_modules_after("from tests.helpers import load_script; load_script('tools/federated_gap.py')")
    assert loaded == "[]"


def test_a_saved_config_builds_its_model_through_predict_in_a_fresh_process(tmp_path):
    """A run's config.yaml names the project's proposal generator and RoI heads; detectron2 finds them only
    once ``model.presets`` has registered them. Deliberate break tried: dropping predict's import of
    ``model.presets`` -> ``No object named 'CenterNet' found in 'PROPOSAL_GENERATOR' registry``; the test failed."""
    from model import get_model_cfg

    config = tmp_path / "config.yaml"
    config.write_text(get_model_cfg("centernet2_agnostic", "smoke", num_classes=3).dump())
    built = _python("from pathlib import Path; from detectron2.config import CfgNode; "
                    "from pipeline.runs.predict import build_model; "
                    f"m = build_model(CfgNode.load_cfg(Path({str(config)!r}).read_text())); "
                    "print(type(m.proposal_generator).__name__, type(m.roi_heads).__name__)")
    assert built == "CenterNet CenterNet2CascadeROIHeads"
