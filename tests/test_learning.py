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
from pipeline import datasets
from pipeline.synthetic import SyntheticSpec, generate


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    generate(SyntheticSpec(num_train=40, num_val=8, num_classes=3, image_size=(64, 96), seed=1), out)
    datasets.register("synthetic", out)
    return out


def test_centernet2_agnostic_learns_in_150_iterations(tiny_dataset, tmp_path):
    torch.manual_seed(0)
    np.random.seed(0)
    cfg = get_model_cfg("centernet2_agnostic", "smoke", num_classes=3, overrides=[
        "DATASETS.TRAIN", ("synthetic_lvis_train",), "DATASETS.TEST", ("synthetic_lvis_train",),
        "SOLVER.MAX_ITER", 150, "SOLVER.STEPS", (120,), "SOLVER.WARMUP_ITERS", 10,
        "DATALOADER.NUM_WORKERS", 0, "SEED", 0])
    model = build_model(cfg)
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

    model.eval()
    evaluator = LVISEvaluator("synthetic_lvis_train", tasks=("bbox",), distributed=False,
                              output_dir=str(tmp_path))
    with EventStorage(0):
        results = inference_on_dataset(model, build_detection_test_loader(cfg, "synthetic_lvis_train"),
                                       evaluator)
    assert results["bbox"]["AP"] > 0
