"""
Exported detectors (pipeline/runs/export.py) give the PyTorch model's detections.

Two smoke-scale runs (CenterNet2-agnostic and CascadeRCNN, 2 training iterations, test score threshold
1e-4 so every image has detections) are exported to TorchScript and ONNX, traced on the first
validation image. Each exported file — TorchScript loaded with ``torch.jit.load``, ONNX with
onnxruntime — then runs on all 6 validation images (64x64, resized to 96x96 as the evaluation does),
and its detections must be the PyTorch model's: the same number, and one to one the same class, the
box within 1e-3 px and the score within 1e-3 (matched greedily in score order: near-equal scores
may swap places). The reference is the run's model built here with detectron2's ``build_model`` and the
checkpoint's weights, fed through detectron2's ``ResizeShortestEdge``.

Deliberate breaks tried, each failed this test: (1) ``TRACED_LEN_MODULES = []`` (the proposal count
frozen at the sample image's): both CenterNet2-agnostic cases failed on the second image, onnxruntime
with "Cannot split using values in 'split' attribute", TorchScript with "split_with_sizes expects
split_sizes to sum exactly to 194 ... got split_sizes=[190]" (CascadeRCNN's RPN keeps a fixed number
of proposals at this size, so its cases passed); (2) the ``_ScaleGradient`` patch removed from
``traceable()``: saving the TorchScript file fails ("Could not export Python function call
'_ScaleGradient'") and the export is refused with that line.
"""
import json
import shutil

import numpy as np
import pytest
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model

from pipeline.runs import export as ex
from pipeline.runs import train as tr
from pipeline.runs.spec import resolve
from tests.helpers import load_script, smoke_params, tiny_dataset

DETECTORS = ("centernet2_agnostic", "cascadercnn")
TOL = 1e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = root / "data"
    # Square images: every validation image has the traced sample's size after the resize.
    tiny_dataset(data, image_size=(64, 64))
    out = {}
    for detector in DETECTORS:
        params = smoke_params(data, detector, max_iter=2, checkpoint_period=2, log_period=1, num_workers=0,
                              opts=["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 1e-4])
        tr.run(root / detector, resolve(params, seed=0), track=False)
        out[detector] = root / detector
    yield {"data": data, **out}
    shutil.rmtree(root, ignore_errors=True)


def _reference(run_dir):
    """The run's PyTorch model and its validation images as model inputs, built here with detectron2."""
    cfg = CfgNode.load_cfg((run_dir / "config.yaml").read_text())
    model = build_model(cfg)
    model.load_state_dict(torch.load(run_dir / "model_final.pth", map_location="cpu", weights_only=True)["model"])
    model.eval()
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    files = sorted((run_dir.parent / "data" / "images" / "val").glob("*.png"))
    images = []
    for f in files:
        bgr = read_image(str(f), format="BGR")
        images.append(torch.as_tensor(resize.get_transform(bgr).apply_image(bgr).transpose(2, 0, 1).astype("float32")))
    return model, files, images


def _assert_same_detections(expected, got, where):
    """expected/got: (boxes (N, 4), scores (N,), classes (N,)) as numpy; one-to-one match."""
    e_boxes, e_scores, e_classes = expected
    g_boxes, g_scores, g_classes = got
    assert len(g_scores) == len(e_scores), f"{where}: {len(g_scores)} detections exported, {len(e_scores)} PyTorch"
    unmatched = list(range(len(e_scores)))
    for i in range(len(g_scores)):
        j = next((j for j in unmatched if g_classes[i] == e_classes[j] and abs(g_scores[i] - e_scores[j]) <= TOL
                  and np.abs(g_boxes[i] - e_boxes[j]).max() <= TOL), None)
        assert j is not None, (f"{where}: exported detection {i} (class {g_classes[i]}, score {g_scores[i]:.6f}, "
                               f"box {g_boxes[i]}) has no PyTorch counterpart")
        unmatched.remove(j)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("detector", DETECTORS)
def test_exported_model_gives_the_pytorch_detections(runs, tmp_path, detector, fmt):
    run_dir = runs[detector]
    out = tmp_path / f"model{ex.FORMATS[fmt]}"
    ex.main(["--run-dir", str(run_dir), "--format", fmt, "--out", str(out)])
    info = json.loads(out.with_name(out.name + ".json").read_text())
    assert info["input"]["shape"] == [3, 96, 96] and info["outputs"] == ["boxes", "scores", "classes"]
    assert [c["id"] for c in info["categories"]] == [1, 2, 3]

    model, files, images = _reference(run_dir)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["image"]
        exported = lambda image: session.run(None, {"image": image.numpy()})  # noqa: E731
    else:
        module = torch.jit.load(str(out))
        exported = lambda image: [t.detach().numpy() for t in module(image)]  # noqa: E731
    counts = []
    for f, image in zip(files, images):
        with torch.no_grad():
            inst = model([{"image": image}])[0]["instances"]
        expected = (inst.pred_boxes.tensor.numpy(), inst.scores.numpy(), inst.pred_classes.numpy())
        _assert_same_detections(expected, exported(image), f"{detector} {fmt} {f.name}")
        counts.append(len(inst))
    assert min(counts) > 0, counts  # the comparison saw detections on every image


def test_what_cannot_be_exported_is_refused_with_the_reason(runs, tmp_path, capsys):
    """A run with test-time augmentation (its config.yaml says so) cannot be traced: one line, exit 1,
    no file."""
    run_dir = tmp_path / "tta"
    shutil.copytree(runs["cascadercnn"], run_dir)
    cfg = CfgNode.load_cfg((run_dir / "config.yaml").read_text())
    cfg.TEST.AUG.ENABLED = True
    (run_dir / "config.yaml").write_text(cfg.dump())
    with pytest.raises(SystemExit) as exc:
        ex.main(["--run-dir", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot export {run_dir} to onnx: test-time augmentation")
    assert not (tmp_path / "m.onnx").exists()


def test_latency_benchmark_times_both_exports_and_leaves_the_model_in_eval_mode():
    """``benchmarks/latency.py --exported`` on a random smoke CenterNet2-agnostic: a time per format,
    the PyTorch model still in eval mode afterwards (its own timing follows), and the reason for a
    model with test-time augmentation. Deliberate break tried, which failed this test: the adapter not
    put in eval mode in ``export_model`` (``torch.onnx.export`` then left the detector training)."""
    from model import get_model_cfg

    bench = load_script("benchmarks/latency.py")
    cfg = get_model_cfg("centernet2_agnostic", "smoke", num_classes=3, overrides=["MODEL.DEVICE", "cpu"])
    model = build_model(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 96, 96), generator=gen, dtype=torch.uint8) for _ in range(3)]
    row = bench.time_exported(model, cfg, images, "cpu", warmup=1)
    assert row["torchscript_ms"] > 0 and row["onnx_ms"] > 0, row
    assert not model.training
    cfg.defrost()
    cfg.TEST.AUG.ENABLED = True
    row = bench.time_exported(model, cfg, images, "cpu", warmup=1)
    assert set(row) == {"torchscript_error", "onnx_error"}
    assert row["onnx_error"].startswith("test-time augmentation")
