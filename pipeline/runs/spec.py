"""
One run = one (detector, loss, seed, scale) on one dataset: resolved from ``params.yaml`` plus
overrides into the record a run directory keeps (``run.json``) and the detectron2 config it trains.
"""
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from pipeline import params as P

# The categories of the real datasets (their cat_info.json has one entry each).
REAL_NUM_CLASSES = {"lvis_v1": 1203, "coco_2017": 80}

DONE_FILE = "train_done.json"  # a finished training, in its run directory (pipeline.runs.train writes it)
METRICS_LOG = "train_metrics.jsonl"  # a training's logged metrics, one JSON line a log period, in its run directory
METRICS_FILE = "metrics.json"  # an evaluation's results, in its eval_dir (pipeline.runs.evaluate writes it)


@dataclass
class RunSpec:
    """Everything that defines a run; ``run.json`` in the run directory."""

    detector: str
    loss: str
    seed: int
    scale: str
    data: Dict[str, Any]
    train: Dict[str, Any]
    eval: Dict[str, Any]
    study: str = "main"
    row: str = ""
    tracking_uri: Optional[str] = None
    opts: List[Any] = field(default_factory=list)
    switches: List[str] = field(default_factory=list)
    # The pretrain stage's settings when the run starts from its backbone (synthetic scale, no
    # train.weights): part of the identity, since they determine the initial weights.
    pretrain: Optional[Dict[str, Any]] = None
    # Where training started: {"source", "path", "sha256"} of train.weights / the preset's weights,
    # null from scratch (written by pipeline.runs.train; a record, not part of identity()).
    initial_weights: Optional[Dict[str, str]] = None
    # The training recipe's version (model.presets.RECIPE) the run was resolved with; null in run.json
    # files written before it existed, which therefore match no current spec.
    recipe: Optional[int] = None

    @property
    def ablation(self) -> str:
        """The parent MLflow run's name: what differs between ablations, seeds aside."""
        return self.row or f"{self.detector}+{self.loss}+{self.data_name}-{self.annotations}"

    @property
    def data_name(self) -> str:
        return self.data.get("name", "synthetic")

    @property
    def annotations(self) -> str:
        if self.data_name == "lvis_v1":
            return "lvis"
        if self.data_name == "coco_2017":
            return "coco"
        return self.data.get("annotations", "lvis")

    @property
    def data_dir(self) -> Path:
        """Where the prepare stage wrote this dataset (synthetic: the dataset; real: cat_info.json)."""
        if self.data_name == "synthetic" and self.data.get("root"):
            return Path(self.data["root"])
        return Path("data") / self.data_name

    @property
    def eval_switches(self) -> List[str]:
        """The switches that change how the weights are tested, not the weights
        (``model.switches.EVAL_ONLY``: TTA)."""
        from model.switches import EVAL_ONLY

        return [s for s in self.switches if s in EVAL_ONLY]

    def training(self) -> "RunSpec":
        """This run as trained: without its evaluation-only switches."""
        return RunSpec(**{**asdict(self), "switches": [s for s in self.switches if s not in self.eval_switches]})

    def identity(self) -> Dict[str, Any]:
        """What determines the trained weights: the recipe's version and every setting but the names,
        the evaluation settings (``eval``, evaluation-only switches) and the settings that change no
        number (logging period, data-loading workers, checkpoints kept). A key added since runs were
        recorded is left out at the value they trained with (``params.ADDED_KEYS``): their keys hold."""
        train = {k: v for k, v in self.train.items() if k not in ("log_period", "num_workers", "keep_checkpoints")
                 and (f"train.{k}", v) not in P.ADDED_KEYS.items()}
        ident = {"detector": self.detector, "loss": self.loss, "seed": self.seed, "scale": self.scale,
                 "data": self.data, "train": train, "opts": self.opts, "switches": self.training().switches,
                 "recipe": self.recipe}
        if self.pretrain is not None:
            ident["pretrain"] = self.pretrain
        return ident

    def key(self) -> str:
        """The run store's directory name of this run's training settings (seeds share it)."""
        ident = {k: v for k, v in self.identity().items() if k != "seed"}
        digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.detector}-{self.loss}-{self.data_name}-{self.annotations}-{self.scale}-{digest}"

    def eval_identity(self) -> Dict[str, Any]:
        """What determines an evaluation of the trained weights: the image subset and timing warm-up
        (``eval``) and the evaluation-only switches; the split is the validation split of ``data``."""
        return {"eval": self.eval, "switches": self.eval_switches}

    def eval_key(self) -> str:
        """The directory name, inside the run's ``eval/``, of this evaluation: ``val-first100-<hash>``,
        ``val-all-tta-<hash>``."""
        digest = hashlib.sha256(json.dumps(self.eval_identity(), sort_keys=True).encode()).hexdigest()[:10]
        n = self.eval.get("max_images")
        return "-".join(["val", f"first{n}" if n else "all", *self.eval_switches, digest])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "RunSpec":
        return cls(**json.loads(text))


def eval_dir(run_dir: Path, spec: RunSpec) -> Path:
    """Where the evaluation of ``run_dir``'s weights with ``spec``'s evaluation settings lives."""
    return Path(run_dir) / "eval" / spec.eval_key()


def resolve(params: Dict[str, Any], overrides: List[str] = (), seed: Optional[int] = None,
            study: str = "main", row: str = "") -> RunSpec:
    """Check ``params`` (after ``overrides``) and pick this run's settings; seed defaults to seeds[0]."""
    from model.presets import RECIPE  # here, not at the top: params checks need no torch

    params = P.apply_overrides(params, list(overrides))
    P.validate(params)
    seeds = params.get("seeds", [0])
    scale = params.get("scale", "synthetic")
    from_pretrain = scale in PRETRAINED_SCALES and not P.get(params, "train.weights")
    return RunSpec(
        detector=params.get("detector", "centernet2_agnostic"), loss=params.get("loss", "softmax"),
        seed=seeds[0] if seed is None else seed, scale=scale,
        data=params.get("data", {"name": "synthetic"}), train=params.get("train", {}),
        eval=params.get("eval", {}), study=study, row=row,
        tracking_uri=P.get(params, "tracking.uri"), opts=list(P.get(params, "train.opts", []) or []),
        switches=list(params.get("switches") or []),
        pretrain=dict(params.get("pretrain") or {}) if from_pretrain else None, recipe=RECIPE)


# Scales whose runs start, unless train.weights says otherwise, from the pretrain stage's backbone
# (pipeline/runs/pretrain.py) -- the synthetic stand-in for the report's ImageNet initialisation.
PRETRAINED_SCALES = ("synthetic",)


def study_specs(params: Dict[str, Any], study: str) -> Dict[str, List[RunSpec]]:
    """Per row of a study, one RunSpec per seed."""
    out = {}
    for name, merged in P.study_rows(params, study).items():
        out[name] = [resolve(merged, seed=s, study=study, row=name) for s in merged["seeds"]]
    return out


def num_classes(spec: RunSpec) -> int:
    if spec.data_name in REAL_NUM_CLASSES:
        return REAL_NUM_CLASSES[spec.data_name]
    cat_info = spec.data_dir / "cat_info.json"
    if not cat_info.is_file():
        raise FileNotFoundError(f"{cat_info} not found: run `python -m pipeline.data.prepare` first")
    return len(json.loads(cat_info.read_text()))


def repeat_threshold(spec: RunSpec, official: float) -> float:
    """
    The repeat-factor sampling threshold t of ``spec``: ``train.repeat_threshold``, or when null the
    report's meaning of its LVIS value at the dataset's own size. Repeat-factor sampling (LVIS paper,
    Gupta et al. 2019, sec. 4) repeats an image max(1, sqrt(t / f_c)) times over its categories' image
    fractions f_c. The official LVIS configs' t = 0.001 is 100 of LVIS v1's 100,170 training images:
    the image count where LVIS's "frequent" bucket begins, so rare and common categories are repeated
    (a 1-image category 10 times) and frequent ones are not. On the synthetic set (same r/c/f bounds,
    ``synthetic.COMMON_MAX`` = 100) that is t = 100 / num_train: 0.1 at 1,000 images, where 0.001
    would repeat nothing (measured, CenterNet2-agnostic, 300 iterations, all 200 val images: AP 5.6
    -> 9.1, AP_r 0.7 -> 4.5).
    """
    t = spec.train.get("repeat_threshold")
    if t is not None:
        return float(t)
    if spec.data_name != "synthetic":
        return float(official)
    from pipeline.data.synthetic import COMMON_MAX, SyntheticSpec

    return COMMON_MAX / spec.data.get("synthetic", {}).get("num_train", SyntheticSpec.num_train)


# FedLoss's |S| on the synthetic set, as a fraction of its categories: 30 of the default 40. The
# report's 50 of LVIS v1's 1203 (4 %) scaled to 40 categories is 2, and then S is just the categories
# present: a rare category gets 3.0 negative images per positive where LVIS's get at least 32 (LVIS
# 1203 categories, 2-image GPU batches), and FedLoss trails sigmoid CE at 300 detections per image
# (3,000 iterations, 3 seeds, both detectors, p < 0.05). 30 of 40 gives rare categories 34.5, LVIS's
# figure (`python tools/tail_imbalance.py --set-size 30`), and levels it with sigmoid CE
# (reports/reference/full-schedule/README.md). Chosen from the exposure before training; re-measure
# with that tool for other dataset settings.
SYNTHETIC_FED_LOSS_FRACTION = 0.75


def synthetic_fed_loss_num_classes(num_classes: int) -> int:
    """FedLoss's |S| (background included) on a synthetic set of ``num_classes`` categories."""
    return max(1, round(SYNTHETIC_FED_LOSS_FRACTION * num_classes))


def fed_loss_num_classes(spec: RunSpec, num_classes: int) -> int:
    """
    FedLoss's |S| for ``spec``: ``train.fed_loss_num_classes``, or when null the report's 50 on LVIS v1
    (-1: model/losses.py scales 50 of 1203 to the categories) and ``synthetic_fed_loss_num_classes``
    on the synthetic set, whose 40 categories make the scaled 2 expose rare categories to a tenth of
    LVIS's negatives.
    """
    n = spec.train.get("fed_loss_num_classes")
    if n is not None:
        return int(n)
    return synthetic_fed_loss_num_classes(num_classes) if spec.data_name == "synthetic" else -1


def build_cfg(spec: RunSpec, run_dir: Path):
    """The detectron2 config of ``spec``: detector yaml, scale preset, dataset, loss, overrides."""
    import torch

    from model import get_model_cfg
    from model.switches import apply_switches
    from pipeline.data import datasets

    splits = datasets.layout(spec.data_name, spec.data_dir if spec.data_name == "synthetic"
                             else Path(spec.data.get("root") or datasets.default_root()))
    if spec.annotations not in splits:
        raise P.ParamError(f"params.yaml: data.annotations={spec.annotations!r}: {spec.data_name} has "
                           f"{', '.join(splits)}")
    train_split, val_split = splits[spec.annotations]
    n_classes = num_classes(spec)
    cfg = get_model_cfg(spec.detector, spec.scale, num_classes=n_classes)
    overrides = [
        "DATASETS.TRAIN", (train_split.name,), "DATASETS.TEST", (val_split.name,),
        "MODEL.ROI_BOX_HEAD.CLS_LOSS", spec.loss,
        "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES", fed_loss_num_classes(spec, n_classes),
        "MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH", str((spec.data_dir / "cat_info.json").resolve()),
        "SEED", spec.seed, "OUTPUT_DIR", str(run_dir),
    ]
    if spec.pretrain is not None:
        from pipeline.runs.pretrain import OUTPUT_DIR, WEIGHTS_FILE

        overrides += ["MODEL.WEIGHTS", str(OUTPUT_DIR / WEIGHTS_FILE)]
    if spec.annotations == "coco":  # exhaustive labels: no repeat-factor sampling (that is for LVIS)
        overrides += ["DATALOADER.SAMPLER_TRAIN", "TrainingSampler"]
    else:
        overrides += ["DATALOADER.REPEAT_THRESHOLD", repeat_threshold(spec, cfg.DATALOADER.REPEAT_THRESHOLD)]
    t = spec.train
    if t.get("max_iter"):
        # Scale the LR steps with the schedule (e.g. 60k/80k of 90k stay at 2/3 and 8/9).
        old, new = cfg.SOLVER.MAX_ITER, t["max_iter"]
        # Each step strictly inside the schedule (detectron2's scheduler refuses one at MAX_ITER).
        steps = sorted({min(new - 1, max(1, round(s * new / old))) for s in cfg.SOLVER.STEPS} - {0})
        overrides += ["SOLVER.MAX_ITER", new, "SOLVER.STEPS", tuple(steps),
                      "SOLVER.WARMUP_ITERS", min(cfg.SOLVER.WARMUP_ITERS, max(1, new // 10))]
    for key, cfg_key in (("ims_per_batch", "SOLVER.IMS_PER_BATCH"), ("base_lr", "SOLVER.BASE_LR"),
                         ("checkpoint_period", "SOLVER.CHECKPOINT_PERIOD"),
                         ("num_workers", "DATALOADER.NUM_WORKERS")):
        if t.get(key) is not None:
            overrides += [cfg_key, t[key]]
    device = t.get("device", "auto")
    if device != "auto":
        if device == "cuda" and not torch.cuda.is_available():
            raise P.ParamError("params.yaml: train.device='cuda': no CUDA device is visible; allowed here: auto, cpu")
        overrides += ["MODEL.DEVICE", device]
    cfg.merge_from_list(overrides)
    # Table 3 steps last but for explicit opts: `sched2x` doubles the schedule the run ends up with.
    try:
        apply_switches(cfg, spec.switches)
    except ValueError as e:
        raise P.ParamError(f"params.yaml: switches={spec.switches}: {e}") from None
    cfg.merge_from_list(list(spec.opts))
    cfg.freeze()
    return cfg
