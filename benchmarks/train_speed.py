"""
Training speed of the Table 1 detectors or the Table 3 steps: seconds per iteration, and what a
run's schedule costs at that speed.

    python benchmarks/train_speed.py [--scale synthetic|smoke|paper] [--batch 4] [--iters 3] [--json FILE]
                                     [--precision float32|bfloat16]
    python benchmarks/train_speed.py --table3 ...   # CenterNet2-agnostic + FedLoss, each step added cumulatively

Each row builds the model at the scale, runs one untimed iteration, then times ``--iters`` full
iterations (forward, backward, SGD step) on random images of the scale's test size with two boxes
and masks each, and reports the median. ``--precision`` runs the forward pass as ``train.precision``
does (``pipeline.runs.train.autocast_for``). ``hours_per_run`` is that times the scale's schedule
(``sched2x`` doubles it), i.e. what one seed of that row costs on this device. Weights are random;
speed does not depend on them. Use it to plan: which rows fit a laptop, which need a cluster.
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# isort: off
from model import get_model_cfg  # noqa: E402  (first: model.compat must run before detectron2 loads)
from model.presets import DETECTORS  # noqa: E402
from model.switches import EVAL_ONLY, SWITCHES  # noqa: E402
from pipeline import params as P  # noqa: E402
from pipeline.atomic import write_text  # noqa: E402
from pipeline.runs.train import autocast_for  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
# isort: on


def _batch(n: int, size: int, num_classes: int, device: str, gen: torch.Generator):
    """``n`` random (3, size, size) images, each with two boxes and their box-shaped masks."""
    boxes = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.3, 0.25, 0.9, 0.8]]) * size
    masks = torch.zeros(2, size, size, dtype=torch.bool)
    for m, (x0, y0, x1, y1) in zip(masks, boxes.round().int().tolist()):
        m[y0:y1, x0:x1] = True
    out = []
    for i in range(n):
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(boxes.clone())
        inst.gt_classes = torch.tensor([i % num_classes, (i + 1) % num_classes])
        inst.gt_masks = BitMasks(masks.clone())
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=gen)
        out.append({"image": image.to(device), "height": size, "width": size, "instances": inst.to(device)})
    return out


def _rows(scale: str, device: str, num_classes: int, table3: bool):
    """(row name, config) pairs: the four detectors, or the cumulative Table 3 training steps."""
    overrides = ["MODEL.DEVICE", device]
    if not table3:
        for name in DETECTORS:
            yield name, get_model_cfg(name, scale, num_classes=num_classes, overrides=overrides)
        return
    base = ["MODEL.ROI_BOX_HEAD.CLS_LOSS", "fedloss", "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES",
            min(50, num_classes)] + overrides
    yield "centernet2_agnostic+fedloss", get_model_cfg("centernet2_agnostic", scale, num_classes, base)
    steps: list = []
    for step in SWITCHES:
        if step in EVAL_ONLY:  # trains nothing: its row evaluates the previous row's weights
            continue
        steps.append(step)
        yield f"+{step}", get_model_cfg("centernet2_agnostic", scale, num_classes, base, switches=steps)


def _uniform_freq(num_classes: int, directory: Path) -> str:
    """A cat_info.json for the federated loss's sampling (uniform image counts), in ``directory``."""
    path = Path(directory) / "cat_info.json"
    path.write_text(json.dumps([{"id": i + 1, "image_count": 10} for i in range(num_classes)]))
    return str(path)


def run(scale: str, batch: int, iters: int, device: str, num_classes: int, table3: bool,
        schedule: int = None, precision: str = "float32") -> dict:
    # A private directory (mkdtemp: 0700, a fresh name): no predictable file in a shared $TMPDIR.
    with tempfile.TemporaryDirectory(prefix="cn2-bench-") as tmp:
        return _measure(scale, batch, iters, device, num_classes, table3, schedule,
                        _uniform_freq(num_classes, Path(tmp)), precision)


def _measure(scale: str, batch: int, iters: int, device: str, num_classes: int, table3: bool,
             schedule: int, freq: str, precision: str = "float32") -> dict:
    autocast = autocast_for(precision, device)
    gen = torch.Generator().manual_seed(0)
    rows = {}
    base_iters = get_model_cfg("centernet2_agnostic", scale).SOLVER.MAX_ITER  # the scale's schedule
    for name, cfg in _rows(scale, device, num_classes, table3):
        cfg.defrost()
        cfg.MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH = freq
        torch.manual_seed(0)
        model = build_model(cfg).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        size = cfg.INPUT.MIN_SIZE_TEST
        times = []
        with EventStorage(0):
            for i in range(iters + 1):
                data = _batch(batch, size, num_classes, device, gen)
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with autocast:
                    losses = model(data)
                loss = sum(v.float() for v in losses.values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if device == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first iteration is warm-up
                    times.append(time.perf_counter() - start)
        s_iter = statistics.median(times)
        # The scale's schedule as this row runs it; --schedule replaces the scale's (sched2x doubles it).
        iters_run = cfg.SOLVER.MAX_ITER * (schedule or base_iters) // base_iters
        rows[name] = {"s_per_iter": round(s_iter, 3), "input": size, "schedule_iters": iters_run,
                      "hours_per_run": round(s_iter * iters_run / 3600, 2)}
        print(f"  measured {name}: {s_iter:.2f} s/iter", flush=True)
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "scale": scale, "batch": batch, "iters": iters, "precision": precision, "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--scale", choices=["smoke", "synthetic", "paper"], default="synthetic")
    parser.add_argument("--batch", type=int, default=4, help="images per iteration (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per row (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=40,
                        help="categories (default: %(default)s, the synthetic set's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--table3", action="store_true",
                        help="rows: CenterNet2-agnostic + FedLoss and each Table 3 training step, cumulatively")
    parser.add_argument("--schedule", type=int,
                        help="iterations of a run before sched2x (default: the scale's; params.yaml's "
                             "train.max_iter when it sets one)")
    parser.add_argument("--precision", choices=P.PRECISIONS, default="float32",
                        help="the forward pass's precision, as train.precision (default: %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    if args.batch < 1 or args.iters < 1 or args.classes < 2 or (args.schedule is not None and args.schedule < 1):
        parser.error("--batch, --iters and --schedule must be >= 1, --classes >= 2")
    result = run(args.scale, args.batch, args.iters, args.device, args.classes, args.table3, args.schedule,
                 args.precision)
    print(f"\n{result['device']}, {args.scale} scale, batch {args.batch}, {args.precision}, "
          f"median of {args.iters} iterations")
    print(f"{'row':<30}{'input':>7}{'s/iter':>9}{'schedule':>10}{'h/run':>8}")
    for name, row in result["rows"].items():
        print(f"{name:<30}{row['input']:>7}{row['s_per_iter']:>9.2f}{row['schedule_iters']:>10}"
              f"{row['hours_per_run']:>8.2f}")
    if args.json:
        write_text(args.json, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
