"""
Export a trained run: ``python -m pipeline.runs.export --run-dir DIR --format torchscript|onnx [--out FILE]
[--image FILE] [--device cpu|cuda]``.

The run's detector (``config.yaml`` + ``model_final.pth``) is traced with detectron2's
``TracingAdapter``, which flattens detectron2's inputs and outputs (dicts, ``Instances``) to tensors,
and saved as a TorchScript module (``torch.jit.trace``) or an ONNX file (``torch.onnx.export``, the
TorchScript-based exporter, opset 17). The graph:

- input ``image``: (3, H, W) float32, pixel values 0-255 in the run's ``INPUT.FORMAT`` channel order
  (BGR), already resized by the test-time ``ResizeShortestEdge`` (as ``pipeline.runs.predict`` does; an
  image resize is left to the application's image library, since the training resize is PIL's);
- inside: pixel normalisation, padding to the backbone's size divisibility, the detector, NMS, and the
  post-processing (boxes clipped to the image);
- outputs ``boxes`` (N, 4) XYXY in the input image's pixels, ``scores`` (N,), ``classes`` (N,) int64
  in the model's category order (names and the dataset's ids in the JSON file written beside).

Tracing records the sample image's size: the exported graph is for inputs of that size (H, W), the
size the JSON beside records; ``--image`` picks the sample (default: the run's first validation
image). What cannot be exported is refused with the reason: test-time augmentation (it resizes, flips
and merges in Python per image), mask heads (detectron2 0.6's mask pasting does not trace), and, to
ONNX, deformable convolution (no ONNX operator for ``torchvision.ops.deform_conv2d`` in this
exporter).
"""
import argparse
import importlib.util
import json
import sys
import types
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Sequence, Tuple
from unittest import mock

import numpy as np
import torch

from pipeline.atomic import write_text
from pipeline.runs.predict import DEVICES, Predictor, RunError, categories, run_dir_arg, val_split
from pipeline.runs.spec import DONE_FILE

FORMATS = {"torchscript": ".ts.pt", "onnx": ".onnx"}
OUTPUT_NAMES = ("boxes", "scores", "classes")
ONNX_OPSET = 17
# Modules whose len() of a tensor / Instances must stay symbolic in the trace (see traceable()).
TRACED_LEN_MODULES = ["model.fast_rcnn", "model.roi_heads", "model.centernet"]


def tracing_adapter():
    """
    ``detectron2.export.TracingAdapter``. detectron2 0.6's ``detectron2/export/__init__.py`` first
    imports its Caffe2 exporter, which needs ``caffe2`` (in no PyTorch 2 wheel), so importing the
    package fails; later detectron2 releases import Caffe2 only when present. Do the same: register
    the package without running its ``__init__``, then import the tracing modules from it. The
    stand-in package exports ``TracingAdapter`` as the real one does, for detectron2 code that imports
    it from there (``detectron2.utils.analysis``: the latency benchmark's FLOP count).
    """
    if "detectron2.export" not in sys.modules:
        try:
            import detectron2.export  # noqa: F401  (a detectron2 with caffe2, or a later release)
        except ImportError:
            spec = importlib.util.find_spec("detectron2.export")
            package = types.ModuleType("detectron2.export")
            package.__path__ = list(spec.submodule_search_locations)
            package.__spec__ = spec
            sys.modules["detectron2.export"] = package
    from detectron2.export.flatten import TracingAdapter

    sys.modules["detectron2.export"].TracingAdapter = TracingAdapter
    return TracingAdapter


@contextmanager
def traceable():
    """
    Inference-neutral patches for tracing. detectron2 0.6's cascade calls ``_ScaleGradient.apply``
    (identity forward, gradient scaled by 1/stages) in every stage, at test time too; a traced
    graph keeps it as a Python autograd call, which a TorchScript file cannot hold (later detectron2
    releases call it only in training). At inference it is the identity, so it becomes one.
    And, as ``TracingAdapter`` does in detectron2's own heads, ``len()`` in this project's heads
    returns the traced size (``__len__``), not a Python int that the trace would freeze: the number
    of proposals per image varies from image to image.
    """
    from detectron2.export.torchscript_patch import patch_builtin_len
    from detectron2.modeling.roi_heads import cascade_rcnn

    with mock.patch.object(cascade_rcnn._ScaleGradient, "apply", lambda features, scale: features), \
            patch_builtin_len(TRACED_LEN_MODULES):
        yield


def refusal(cfg, fmt: str) -> Optional[str]:
    """Why the run's model cannot be exported to ``fmt``, or None."""
    if cfg.TEST.AUG.ENABLED:
        return ("test-time augmentation (switch tta) resizes, flips and merges detections in Python for "
                "each image, which tracing cannot record; export the run whose weights it evaluates "
                f"({DONE_FILE}: trained_by)")
    if fmt == "onnx" and any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
        return ("deformable convolution (switch dcn, torchvision.ops.deform_conv2d) has no ONNX operator in "
                "torch.onnx's exporter; use --format torchscript")
    if cfg.MODEL.MASK_ON:
        return ("mask heads (switch mask) are not exported: detectron2 0.6's mask pasting into the image "
                "(paste_masks_in_image) fails under tracing with a shape error")
    return None


def detections(model, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """The detector on one image (3, H, W) as tensors: boxes (N, 4) XYXY, scores (N,), classes (N,).
    Without "height"/"width" in the input, detectron2's post-processing keeps the input's size."""
    instances = model([{"image": image}])[0]["instances"]
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def sample_image(predictor: Predictor, run_dir: Path, image: Optional[Path]) -> Tuple[torch.Tensor, str]:
    """The tracing sample, resized as for inference: (3, H, W) float32; and where it came from."""
    if image is None:
        from detectron2.data import DatasetCatalog

        records = DatasetCatalog.get(val_split(run_dir).name)
        if not records:
            raise RunError(f"{run_dir}: the run's validation split has no image; pass --image FILE")
        image = Path(records[0]["file_name"])
    try:
        array = predictor.read(image)
    except Exception as e:
        raise RunError(f"{image}: cannot read image ({type(e).__name__})") from None
    return predictor.inputs(array)["image"].to(predictor.cfg.MODEL.DEVICE), str(image)


def export_model(model: torch.nn.Module, image: torch.Tensor, fmt: str, out: Path) -> Path:
    """
    Trace ``model`` (eval mode) on ``image`` (3, H, W) float32 and write it to ``out`` as ``fmt``
    (complete or not at all). Raises RuntimeError with one line (the exporter's, naming what it
    could not convert) when that fails.
    """
    # In eval mode: torch.onnx.export puts the module it gets back in the mode it found it in, and a
    # new module (the adapter) is in training mode, which would leave ``model`` training.
    adapter = tracing_adapter()(model, (image,), detections).eval()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad(), traceable():
            # TracerWarnings name every Python-level branch on a tensor; the parity test is the check.
            warnings.simplefilter("ignore")
            if fmt == "torchscript":
                torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False).save(str(tmp))
            else:
                torch.onnx.export(adapter, adapter.flattened_inputs, str(tmp), dynamo=False,
                                  opset_version=ONNX_OPSET, input_names=["image"],
                                  output_names=list(OUTPUT_NAMES), do_constant_folding=True)
    except Exception as e:  # the exporter's own message names the op it could not convert
        tmp.unlink(missing_ok=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RuntimeError(f"{type(e).__name__}: {first}") from None
    tmp.replace(out)
    return out


def export(run_dir: Path, fmt: str, out: Optional[Path] = None, image: Optional[Path] = None,
           device: str = "cpu") -> Path:
    """Write the exported model to ``out`` (default ``DIR/exported/model<ext>``) and, beside it,
    ``<out>.json`` (input size and format, output names, categories). Returns ``out``."""
    if fmt not in FORMATS:
        raise RunError(f"--format {fmt!r}; allowed: {', '.join(FORMATS)}")
    run_dir = Path(run_dir)
    predictor = Predictor(run_dir, device)
    reason = refusal(predictor.cfg, fmt)
    if reason:
        raise RunError(f"cannot export {run_dir} to {fmt}: {reason}")
    out = Path(out) if out else run_dir / "exported" / f"model{FORMATS[fmt]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    tensor, source = sample_image(predictor, run_dir, image)
    try:
        export_model(predictor.model, tensor, fmt, out)
    except RuntimeError as e:
        raise RunError(f"cannot export {run_dir} to {fmt}: {e}") from None
    cats = categories(run_dir)
    info = {"format": fmt, "file": out.name, "run_dir": str(run_dir.resolve()),
            "input": {"name": "image", "shape": list(tensor.shape), "dtype": "float32",
                      "channels": predictor.cfg.INPUT.FORMAT, "range": [0, 255],
                      "resize": {"shortest_edge": predictor.cfg.INPUT.MIN_SIZE_TEST,
                                 "max_size": predictor.cfg.INPUT.MAX_SIZE_TEST}},
            "outputs": list(OUTPUT_NAMES),
            "traced_on": source, "device": predictor.cfg.MODEL.DEVICE,
            "categories": [{"index": i, "id": c, "name": n} for i, (c, n) in enumerate(zip(cats.ids, cats.names))]}
    if fmt == "onnx":
        info["opset"] = ONNX_OPSET
    write_text(out.with_name(out.name + ".json"), json.dumps(info, indent=2) + "\n")
    return out


def load_exported(path: Path, device: str = "cpu"):
    """A callable image (3, H, W) float32 tensor -> tuple of numpy outputs, for either format."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(path), providers=[p for p in providers
                                                             if p in ort.get_available_providers()])
        return lambda image: tuple(session.run(None, {"image": image.cpu().numpy()}))
    module = torch.jit.load(str(path), map_location=device)

    def run(image):
        with torch.no_grad():
            return tuple(np.asarray(t.cpu()) for t in module(image.to(device)))

    return run


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.runs.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=run_dir_arg, required=True,
                        help="a finished run (holds model_final.pth), or `main`: the main experiment's first seed")
    parser.add_argument("--format", choices=sorted(FORMATS), required=True)
    parser.add_argument("--out", type=Path, help="output file (default: DIR/exported/model.ts.pt or model.onnx)")
    parser.add_argument("--image", type=Path, help="tracing sample; its resized size is the graph's input size "
                                                   "(default: the run's first validation image)")
    parser.add_argument("--device", choices=[d for d in DEVICES if d != "auto"], default="cpu",
                        help="device the graph is traced on (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.format, args.out, args.image, args.device)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    info = json.loads(out.with_name(out.name + ".json").read_text())
    print(f"wrote {out} (input {'x'.join(map(str, info['input']['shape']))}) and {out.name}.json")


if __name__ == "__main__":
    main()
