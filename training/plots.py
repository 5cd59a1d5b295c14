"""What a run leaves to look at, refreshed at every evaluation, in its output folder:

    curves.png                         loss and learning rate, mean IoU and accuracies, against step
    evaluations/step-<N>/confusion.png row-normalised heatmap (past 30 classes: the most confused pairs)
    per_class_iou.png                  at the end: per-class IoU, sorted, named

(the numbers beside them: training/tables.py). Plots need matplotlib (an optional dependency: without it,
one line says so and the numbers are still written). Several runs side by side, e.g. to compare two:

    python -m training.plots runs/a runs/b --out comparison.png
"""

import argparse
import itertools
import math
import sys
from pathlib import Path

import numpy as np

from segformer.cli import run_main
from segformer.errors import CheckpointError
from segformer.metrics import metrics_where
from segformer.visual import pyplot, save_figure

from .run_log import read_log

HEATMAP_CLASSES = 30  # beyond this, a heatmap is unreadable: the most confused pairs instead


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each label's row as fractions of its pixels (rows of unlabelled classes stay 0)."""
    totals = matrix.sum(1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=np.float64), where=totals > 0)


def most_confused(matrix: np.ndarray, names: list[str], count: int = 20) -> list[tuple[str, str, float]]:
    """(label, predicted as, share of the label's pixels), the largest off-diagonal shares first."""
    shares = row_normalised(matrix)
    np.fill_diagonal(shares, 0)
    order = np.argsort(shares, axis=None)[::-1][:count]
    return [(names[i], names[j], float(shares[i, j])) for i, j in zip(*np.unravel_index(order, shares.shape))
            if shares[i, j] > 0]


def draw_confusion(plt, matrix: np.ndarray, names: list[str], path: Path) -> None:
    present = matrix.sum(1) + matrix.sum(0) > 0
    if present.sum() <= HEATMAP_CLASSES:
        keep = np.flatnonzero(present)
        shares = row_normalised(matrix)[np.ix_(keep, keep)]
        size = max(4.0, 0.35 * len(keep) + 2)
        figure, axis = plt.subplots(figsize=(size + 1, size))
        image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        axis.set_xticks(range(len(keep)), [names[i] for i in keep], rotation=90)
        axis.set_yticks(range(len(keep)), [names[i] for i in keep])
        axis.set_xlabel("predicted")
        axis.set_ylabel("labelled")
        for (r, c), value in np.ndenumerate(shares):
            if value >= 0.01:
                axis.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if value > 0.5 else "black")
        figure.colorbar(image, ax=axis, fraction=0.046, label="share of the label's pixels")
        axis.set_title("confusion (rows sum to 1)")
    else:
        pairs = most_confused(matrix, names)
        figure, axis = plt.subplots(figsize=(8, 0.3 * len(pairs) + 1.5))
        axis.barh(range(len(pairs)), [share for _, _, share in pairs], color="tab:red")
        axis.set_yticks(range(len(pairs)), [f"{label} -> {predicted}" for label, predicted, _ in pairs])
        axis.invert_yaxis()
        axis.set_xlabel("share of the label's pixels predicted as the other class")
        axis.set_title(f"the {len(pairs)} most confused pairs of {int(present.sum())} classes")
    save_figure(plt, figure, path)


CLASSIFICATION_METRICS = ("top1", "top5")  # pretrain.py's


def segmentation_metrics() -> tuple[str, ...]:
    """The metrics of METRICS drawn in the curves: mean IoU and the accuracies."""
    return tuple(m.key for m in metrics_where(curves=True))


def draw_curves(runs: list[tuple[str, list[dict]]], path: Path, metrics=None) -> bool:
    """Loss and learning rate; the evaluations' `metrics` (mean IoU and accuracies; pretrain.py's top-1 and
    top-5); against step: one line per run."""
    plt = pyplot()
    if plt is None:
        return False
    metrics = metrics or segmentation_metrics()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, records in runs:
        train = [r for r in records if metrics[0] not in r and "loss" in r and "lr" in r]
        evaluations = [r for r in records if metrics[0] in r]
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
        axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], label=name)
        for key, style in zip(metrics, itertools.cycle(("-o", "--", ":", "-."))):
            axes[2].plot([r["step"] for r in evaluations], [r[key] for r in evaluations], style,
                         label=f"{name}: {key.replace('_', ' ')}" if len(runs) > 1 else key.replace("_", " "))
    for axis, title in zip(axes, ("training loss", "learning rate (encoder)", "validation")):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    save_figure(plt, figure, path)
    return True


def draw_per_class(metrics: dict, class_names: list[str], path: Path) -> bool:
    """Per-class IoU, sorted, named (the classes neither labelled nor predicted are left out)."""
    plt = pyplot()
    if plt is None:
        return False
    pairs = sorted(((float(v), name.strip()) for v, name in zip(metrics["per_category_iou"], class_names)
                    if v is not None and not math.isnan(float(v))), reverse=True)
    figure, axis = plt.subplots(figsize=(8, 0.25 * len(pairs) + 1.5))
    axis.barh(range(len(pairs)), [v for v, _ in pairs], color="tab:blue")
    axis.set_yticks(range(len(pairs)), [name for _, name in pairs], fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.axvline(metrics["mean_iou"], color="black", linestyle="--", label=f"mean {metrics['mean_iou']:.3f}")
    axis.set_xlabel("IoU")
    axis.legend()
    save_figure(plt, figure, path)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.plots", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (each with its metrics.jsonl)")
    p.add_argument("--out", help="the figure (default: comparison.png, or the run's curves.png for one run)")
    args = p.parse_args(argv)
    return run_main(lambda: compare(args))


def compare(args) -> int:
    runs = []
    for folder in map(Path, args.runs):
        log = folder / "metrics.jsonl"
        if not log.is_file():
            raise CheckpointError(f"{log}: no such file (is {folder} a run folder?)")
        runs.append((folder.name, read_log(log)[0]))
    out = Path(args.out) if args.out else (Path(args.runs[0]) / "curves.png" if len(runs) == 1
                                           else Path("comparison.png"))
    classification = any("top1" in record for _, records in runs for record in records)
    if not draw_curves(runs, out, CLASSIFICATION_METRICS if classification else None):
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
