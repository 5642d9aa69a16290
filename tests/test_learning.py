"""CenterNet2-agnostic learns: 150 iterations on a small synthetic set halve the loss and find objects."""
import json

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


def test_repeat_threshold_repeats_rare_images_as_lvis_does(tmp_path, monkeypatch):
    """
    The report's configs sample LVIS by repeat factors with t = 0.001 = 100 of LVIS v1's 100,170
    images (where its "frequent" bucket begins). At the synthetic set's 1,000 training images the
    same meaning is t = 100 / 1000 = 0.1. Worked out by hand for 1,000 images: an image whose rarest
    category is in 1 of them (f = 0.001) is repeated sqrt(0.1 / 0.001) = 10 times, one of a category
    in 25 images sqrt(0.1 / 0.025) = 2 times, one of a category in 400 images max(1, sqrt(0.25)) = 1;
    at t = 0.001 all three are 1 (nothing would be repeated). ``train.repeat_threshold`` overrides,
    COCO-style labels sample uniformly, and the key is part of a run's identity. Break tried: the
    threshold left at the yaml's 0.001 for the synthetic set; this test failed on it.
    """
    from detectron2.data.samplers import RepeatFactorTrainingSampler

    from pipeline import params as P
    from pipeline.runs.spec import build_cfg, resolve

    dicts = ([{"annotations": [{"category_id": 0}]}] + [{"annotations": [{"category_id": 1}]}] * 25
             + [{"annotations": [{"category_id": 2}]}] * 400 + [{"annotations": [{"category_id": 3}]}] * 574)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "synthetic").mkdir(parents=True)
    (tmp_path / "data" / "synthetic" / "cat_info.json").write_text('[{"id": 1, "name": "a"}]')
    params = P.load()
    params["data"]["synthetic"]["num_train"] = 1000
    spec = resolve(params, ["train.repeat_threshold=null"])
    t = build_cfg(spec, tmp_path / "run").DATALOADER.REPEAT_THRESHOLD
    assert t == pytest.approx(0.1)
    factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, t)
    assert factors[0].item() == pytest.approx(10.0) and factors[1].item() == pytest.approx(2.0)
    assert factors[26].item() == 1.0
    official = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(dicts, 0.001)
    assert torch.all(official == 1.0)

    mine = resolve(params, ["train.repeat_threshold=0.02"])
    assert build_cfg(mine, tmp_path / "run").DATALOADER.REPEAT_THRESHOLD == pytest.approx(0.02)
    assert mine.key() != spec.key()
    coco = build_cfg(resolve(params, ["data.annotations=coco"]), tmp_path / "run")
    assert coco.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"
    with pytest.raises(P.ParamError, match="repeat_threshold"):
        P.check({**params, "train": {**params["train"], "repeat_threshold": 2}})


def test_fed_loss_set_size_is_three_quarters_of_the_synthetic_categories(tmp_path, monkeypatch):
    """
    A null ``train.fed_loss_num_classes`` gives FedLoss |S| = round(0.75 * C) on the synthetic set:
    30 of 40 categories, 3 of 4 (worked by hand), where the model's -1 rule (50 of LVIS's 1203
    scaled) would give 2 of 40. On LVIS v1 it leaves the model's rule (-1 -> 50 of 1203). A set
    value passes through, changes the run's identity, and the detectron2 key is refused in opts.
    Break tried: the key left unset for the synthetic set (|S| = 2); this test failed on it.
    """
    from model.losses import FederatedLoss
    from pipeline import params as P
    from pipeline.runs.spec import build_cfg, fed_loss_num_classes, resolve

    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data" / "synthetic"
    data.mkdir(parents=True)
    params = P.load()
    for C, expected in ((40, 30), (4, 3)):
        (data / "cat_info.json").write_text(json.dumps(
            [{"id": i + 1, "name": f"c{i}", "image_count": 1} for i in range(C)]))
        spec = resolve(params, ["loss=fedloss", "train.fed_loss_num_classes=null"])
        cfg = build_cfg(spec, tmp_path / "run")
        assert cfg.MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES == expected
        assert FederatedLoss(cfg).set_size == expected
    lvis = resolve(params, ["data.name=lvis_v1"])
    assert fed_loss_num_classes(lvis, 1203) == -1
    mine = resolve(params, ["loss=fedloss", "train.fed_loss_num_classes=5"])
    assert build_cfg(mine, tmp_path / "run").MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES == 5
    assert mine.key() != spec.key()
    with pytest.raises(P.ParamError, match="fed_loss_num_classes"):
        P.check({**params, "train": {**params["train"], "fed_loss_num_classes": 0}})
    with pytest.raises(P.ParamError, match="train.fed_loss_num_classes"):
        resolve(params, ["train.opts=[MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES,30]"])
