"""CenterNet2-agnostic learns: 150 iterations on a small synthetic set halve the loss and find objects."""
import numpy as np
import pytest
import torch
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import SimpleTrainer
from detectron2.evaluation import LVISEvaluator, inference_on_dataset
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.utils.events import EventStorage

from model import get_model_cfg
from pipeline.data import datasets
from pipeline.data.synthetic import SyntheticSpec, generate

# Box AP points the trained model must gain over itself untrained: measured 0.21 -> 3.71 (seed 0,
# this test's settings); 1.5 lies well inside that gap.
MARGIN = 1.5


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    generate(SyntheticSpec(num_train=40, num_val=8, num_classes=3, image_size=(64, 96), seed=1), out)
    datasets.register("synthetic", out)
    return out


def _box_ap(model, cfg, out_dir) -> float:
    """Box AP (LVIS API) of ``model`` on the training split; leaves the model in training mode."""
    model.eval()
    evaluator = LVISEvaluator("synthetic_lvis_train", tasks=("bbox",), distributed=False, output_dir=str(out_dir))
    with EventStorage(0), torch.no_grad():
        results = inference_on_dataset(model, build_detection_test_loader(cfg, "synthetic_lvis_train"), evaluator)
    model.train()
    return results["bbox"]["AP"]


@pytest.mark.slow  # 150 training iterations and two evaluations: CI runs it
def test_centernet2_agnostic_learns_in_150_iterations(tiny_dataset, tmp_path):
    """
    150 iterations halve the loss and raise box AP by MARGIN points over the same model untrained
    (measured: 0.21 untrained, 3.71 trained). The untrained model passed the old check (AP > 0);
    its 0.21 fails this one. No code break was run against this test: one run took 54 minutes on
    the loaded 2-core machine.
    """
    torch.manual_seed(0)
    np.random.seed(0)
    cfg = get_model_cfg("centernet2_agnostic", "smoke", num_classes=3, overrides=[
        "DATASETS.TRAIN", ("synthetic_lvis_train",), "DATASETS.TEST", ("synthetic_lvis_train",),
        "SOLVER.MAX_ITER", 150, "SOLVER.STEPS", (120,), "SOLVER.WARMUP_ITERS", 10,
        "DATALOADER.NUM_WORKERS", 0, "SEED", 0])
    model = build_model(cfg)
    untrained = _box_ap(model, cfg, tmp_path / "untrained")
    optimizer = build_optimizer(cfg, model)
    trainer = SimpleTrainer(model, build_detection_train_loader(cfg), optimizer)
    scheduler = build_lr_scheduler(cfg, optimizer)
    from detectron2.engine import hooks

    trainer.register_hooks([hooks.LRScheduler(optimizer, scheduler)])
    trainer.train(0, cfg.SOLVER.MAX_ITER)
    total = [v for v, _ in trainer.storage.history("total_loss").values()]
    assert len(total) == 150
    first, last = np.mean(total[:10]), np.mean(total[-10:])
    assert last <= 0.5 * first, (first, last)

    trained = _box_ap(model, cfg, tmp_path / "trained")
    assert trained >= untrained + MARGIN, (untrained, trained)
