"""Figures of one run."""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.atomic import save_figure  # noqa: E402


def loss_curve(metrics_jsonl: Path, path: Path, title: str = "") -> None:
    """Total and per-term training losses against iteration, from ``train_metrics.jsonl``."""
    rows = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines()] \
        if Path(metrics_jsonl).is_file() else []
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({k for r in rows for k in r if k == "total_loss" or k.startswith("loss_")})
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points), label=key, linewidth=2.2 if key == "total_loss" else 1.0)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (median over the logging period)")
    ax.set_yscale("log")
    ax.set_title(title or "training losses", fontsize=10)
    if keys:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)
