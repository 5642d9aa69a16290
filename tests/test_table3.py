"""The Table 3 steps: each a real switch of the model, working on CPU at smoke scale."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage

from model import get_model_cfg
from model.deform import TVModulatedDeformConv
from model.switches import SWITCHES

STEPS = list(SWITCHES)  # mask, sched2x, fpn_p2p6, x101, dcn, pointrend, larger_input, tta


def _batch(n=2, size=96, with_masks=True):
    batch = []
    for i in range(n):
        inst = Instances((size, size))
        boxes = [[10.0, 12.0, 50.0, 60.0], [40.0, 30.0, 90.0, 80.0]]
        inst.gt_boxes = Boxes(torch.tensor(boxes))
        inst.gt_classes = torch.tensor([i % 3, 2])
        if with_masks:
            inst.gt_masks = PolygonMasks([[[x0, y0, x1, y0, x1, y1, x0, y1]] for x0, y0, x1, y1 in boxes])
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8)
        batch.append({"image": image, "height": size, "width": size, "instances": inst})
    return batch


def _cfg(switches, **kw):
    return get_model_cfg("centernet2_agnostic", "smoke", num_classes=3, switches=switches, **kw)


@pytest.mark.parametrize("upto", range(1, len(STEPS) + 1), ids=STEPS)
def test_each_cumulative_step_trains_and_infers(upto):
    switches = STEPS[:upto]
    cfg = _cfg([s for s in switches if s != "tta"])  # TTA is an evaluation wrapper: tested below
    model = build_model(cfg)
    model.train()
    with EventStorage(0):
        losses = model(_batch())
    assert all(torch.isfinite(v) for v in losses.values()), losses
    assert {"loss_mask"} <= set(losses)
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        (out,) = model([{k: v for k, v in _batch(1)[0].items() if k != "instances"}])
    inst = out["instances"]
    assert inst.has("pred_masks") and inst.pred_masks.shape[-2:] == (96, 96)


def test_mask_switch_adds_mask_loss_and_segm_is_evaluated(tmp_path_factory):
    """
    A training step of the mask model has a positive, finite ``loss_mask`` (the model without the
    switch has none), and the pipeline's evaluation of a mask run scores masks: ground-truth
    polygons fed back as predictions (``tests/test_metrics.py``'s stand-in model) give segm AP 100.
    Breaks tried, each failed this test: the RoI heads' mask branch returning no loss in training
    (no loss_mask), and evaluation asking the evaluator for ("bbox",) only (no segm).
    """
    from pipeline.data.synthetic import SyntheticSpec, generate
    from pipeline.runs import evaluate as ev
    from tests.test_metrics import KnownPredictions, ground_truth, untrained_run

    cfg = _cfg(["mask"])
    assert cfg.MODEL.MASK_ON and cfg.MODEL.ROI_MASK_HEAD.NAME == "MaskRCNNConvUpsampleHead"
    losses = {}
    for switches in (["mask"], []):
        with EventStorage(0):
            losses[bool(switches)] = build_model(_cfg(switches)).train()(_batch())
    assert "loss_mask" in losses[True] and "loss_mask" not in losses[False], sorted(losses[True])
    assert torch.isfinite(losses[True]["loss_mask"]) and losses[True]["loss_mask"] > 0

    data = tmp_path_factory.mktemp("mask") / "data"
    generate(SyntheticSpec(num_train=20, num_val=3, num_classes=3, image_size=(64, 80), seed=2), data)
    (data / "prepare.json").write_text('{"checksum": "abc"}')
    run_dir, spec = untrained_run(data, tmp_path_factory.mktemp("maskrun") / "run", switches=["mask"])
    val = data / "annotations" / "lvis_v1_val.json"
    record = ev.evaluate(run_dir, spec, model=KnownPredictions(ground_truth(val, with_masks=True)))
    assert record["segm"]["AP"] == pytest.approx(100.0)


def test_sched2x_doubles_iterations_and_steps():
    base, doubled = _cfg([]), _cfg(["sched2x"])
    assert doubled.SOLVER.MAX_ITER == 2 * base.SOLVER.MAX_ITER
    assert doubled.SOLVER.STEPS == tuple(2 * s for s in base.SOLVER.STEPS)
    paper = get_model_cfg("centernet2_agnostic", "paper", switches=["sched2x"])
    assert paper.SOLVER.MAX_ITER == 180000 and paper.SOLVER.STEPS == (120000, 160000)


def test_fpn_p2p6_has_a_p2_level():
    model = build_model(_cfg(["fpn_p2p6"]))
    shapes = model.backbone.output_shape()
    assert sorted(shapes) == ["p2", "p3", "p4", "p5", "p6"] and shapes["p2"].stride == 4
    assert model.proposal_generator.in_features[0] == "p2"
    assert model.roi_heads.box_in_features[0] == "p2"


def test_x101_has_32_groups_of_width_8():
    model = build_model(_cfg(["x101"]))
    block = model.backbone.bottom_up.res2[0]
    assert block.conv2.groups == 32 and block.conv2.weight.shape[0] == 32 * 8
    assert len(model.backbone.bottom_up.res4) == 23  # ResNet-101


def test_dcn_offsets_receive_gradients():
    model = build_model(_cfg(["x101", "dcn"]))  # as in Table 3: DCN goes into the bottleneck blocks
    deformable = [m for m in model.backbone.bottom_up.modules() if hasattr(m, "conv2_offset")]
    assert deformable and all(isinstance(m.conv2, TVModulatedDeformConv) for m in deformable)
    assert not hasattr(model.backbone.bottom_up.res2[0], "conv2_offset")  # res2 stays plain
    model.train()
    with EventStorage(0):
        sum(model(_batch(with_masks=False)).values()).backward()
    for m in deformable:
        assert m.conv2_offset.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("groups", [1, 2])
def test_tv_deform_conv_with_zero_offsets_is_a_plain_convolution(groups):
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, groups=groups)
    dcn = TVModulatedDeformConv(4, 6, 3, padding=1, groups=groups)
    dcn.weight, dcn.bias = conv.weight, conv.bias
    x = torch.randn(2, 4, 9, 9)
    offset = torch.zeros(2, 18, 9, 9)
    mask = torch.ones(2, 9, 9, 9)
    assert torch.allclose(dcn(x, offset, mask), conv(x), atol=1e-5)
    # A whole-pixel offset shifts the sampling: offset (dy=0, dx=1) everywhere = conv of the shifted input.
    offset[:, 1::2] = 1.0
    shifted = torch.nn.functional.pad(x[..., 1:], (0, 1))
    # (Border columns differ: DCN samples real pixels where the shifted, padded input has zeros.)
    assert torch.allclose(dcn(x, offset, mask)[..., 1:-1], conv(shifted)[..., 1:-1], atol=1e-5)


def test_pointrend_masks_come_out_at_the_subdivided_resolution():
    cfg = _cfg(["mask", "pointrend"])
    model = build_model(cfg).eval()
    steps = cfg.MODEL.POINT_HEAD.SUBDIVISION_STEPS
    images = model.preprocess_image(_batch(1))
    with torch.no_grad():
        features = model.backbone(images.tensor)
        inst = Instances(images.image_sizes[0])
        inst.pred_boxes = Boxes(torch.tensor([[10.0, 10.0, 60.0, 70.0], [30.0, 20.0, 90.0, 90.0]]))
        inst.pred_classes = torch.tensor([0, 2])
        inst.scores = torch.tensor([0.9, 0.8])
        (out,) = model.roi_heads.forward_with_given_boxes(features, [inst])
    assert out.pred_masks.shape == (2, 1, 28 * 2**steps, 28 * 2**steps)
    assert ((out.pred_masks >= 0) & (out.pred_masks <= 1)).all()


def test_pointrend_trains_its_point_head():
    model = build_model(_cfg(["mask", "pointrend"]))
    model.train()
    with EventStorage(0):
        losses = model(_batch())
    assert "loss_mask_point" in losses and torch.isfinite(losses["loss_mask_point"])
    losses["loss_mask_point"].backward()
    assert model.roi_heads.mask_head.point_head.predictor.weight.grad.abs().sum() > 0


def test_larger_input_raises_sizes_by_the_reports_ratio():
    base, large = _cfg([]), _cfg(["larger_input"])
    assert large.INPUT.MIN_SIZE_TEST == round(base.INPUT.MIN_SIZE_TEST * 1.2)
    paper = get_model_cfg("centernet2_agnostic", "paper", switches=["larger_input"])
    assert paper.INPUT.MIN_SIZE_TEST == 960 and paper.INPUT.MAX_SIZE_TEST == 1600


def test_tta_runs_the_model_once_per_scale_and_flip():
    from detectron2.modeling import GeneralizedRCNNWithTTA

    cfg = _cfg(["mask", "tta"])
    assert len(cfg.TEST.AUG.MIN_SIZES) == 9 and cfg.TEST.AUG.FLIP  # 400..1200 step 100, relative
    model = build_model(cfg).eval()
    calls = []
    original = model.proposal_generator.forward

    def counting(images, features, gt_instances=None):
        calls.extend(tuple(size) for size in images.image_sizes)  # TTA batches its inputs
        return original(images, features, gt_instances)

    model.proposal_generator.forward = counting
    tta = GeneralizedRCNNWithTTA(cfg, model)
    with torch.no_grad():
        (out,) = tta([{k: v for k, v in _batch(1)[0].items() if k != "instances"}])
    # One image per scale and flip: every size exactly twice (plain and flipped).
    assert len(calls) == 2 * len(cfg.TEST.AUG.MIN_SIZES)
    assert sorted(set(min(c) for c in calls)) == sorted(cfg.TEST.AUG.MIN_SIZES)
    assert all(calls.count(c) == 2 for c in calls)
    inst = out["instances"]
    assert inst.has("pred_masks") and ((inst.scores >= 0) & (inst.scores <= 1)).all()


def test_switches_in_an_impossible_order_are_refused():
    with pytest.raises(ValueError, match="needs 'mask'"):
        _cfg(["pointrend"])
    with pytest.raises(ValueError, match="put 'x101' before it"):
        _cfg(["dcn"])  # the smoke scale's ResNet-18 has no bottleneck blocks


@pytest.mark.slow  # the Table 3 study through `dvc repro`: CI runs it
def test_table3_study_through_the_pipeline_evaluates_test_aug_on_the_larger_input_weights(tmp_path):
    """`dvc repro` of a Table 3 study: mask AP columns beside the report's, and the "+ test-aug" row is
    a second evaluation (TTA is an evaluation setting) of the run the "+ larger input" row trained:
    one run directory, two evaluation directories, one of them with TTA on."""
    import json

    from tests.helpers import scratch_repo, sh

    row = {"detector": "centernet2_agnostic", "loss": "fedloss"}
    studies = {"table3": {"baseline": row, "mask": {**row, "switches": ["mask"]},
                          "larger_input": {**row, "switches": STEPS[:-1]}, "test_aug": {**row, "switches": STEPS}}}
    # TTA runs the model 36 times an image (9 scales, flip, boxes then masks): evaluate two images.
    repo = scratch_repo(tmp_path, studies=studies, run_studies=["table3"], seeds=[0], **{"eval.max_images": 2})
    sh(repo, "dvc", "repro")
    # The main stage trains params.yaml's own experiment (CenterNet2-agnostic, softmax CE) beside the study.
    records = {d: json.loads((d / "run.json").read_text()) for d in (repo / "runs").glob("*/seed0")}
    assert sorted(r["study"] for r in records.values()) == ["main", "table3", "table3", "table3"]
    runs = {r["row"]: d for d, r in records.items() if r["study"] == "table3"}
    assert set(runs) == {"baseline", "mask", "larger_input"}  # test_aug trained nothing of its own
    shared = runs["larger_input"]
    evals = {json.loads((e / "eval.json").read_text())["row"]: e for e in (shared / "eval").iterdir()}
    assert set(evals) == {"larger_input", "test_aug"}
    assert json.loads((evals["test_aug"] / "eval.json").read_text())["switches"] == ["tta"]
    for name, tta_on in (("larger_input", "false"), ("test_aug", "true")):
        aug = (evals[name] / "config.yaml").read_text().split("AUG:")[1].split("\n  ")[1]
        assert f"ENABLED: {tta_on}" in aug, name
        assert {"bbox", "segm"} <= set(json.loads((evals[name] / "metrics.json").read_text()))
    study = json.loads((repo / "results" / "studies" / "table3.json").read_text())["rows"]
    larger, test_aug = study["larger_input"]["seeds"]["seed0"], study["test_aug"]["seeds"]["seed0"]
    assert larger["run_dir"] == test_aug["run_dir"] == str(shared)
    assert (larger["eval_dir"], test_aug["eval_dir"]) == (str(evals["larger_input"]), str(evals["test_aug"]))

    table = (repo / "reports" / "table3.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| Row"))
    assert header.startswith("| Row | mask AP | mask APr | mask APc | mask APf | AP |")
    test_aug = next(line for line in table.splitlines() if line.startswith("| + test-aug"))
    assert "(n=1) · paper 36.1 · Δ" in test_aug  # mask AP beside the report's
    summary = json.loads((repo / "reports" / "summary.json").read_text())
    assert "mask_AP" in summary["table3"]["test_aug"] and "mask_AP" not in summary["table3"]["baseline"]
