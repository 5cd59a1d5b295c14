"""The numbers of an evaluation as tables: the per-class table printed after it (`class_table`), and in
`evaluations/step-<N>/` the confusion matrix (`confusion.npy`, counts, rows: labels, columns: predictions;
`confusion.csv`, the same with class names) and `per_class.csv` (IoU, accuracy, labelled / predicted / correct
pixels per class), beside the heatmap (training/plots.py). The columns come from segformer.metrics.METRICS."""

import csv
import math
from pathlib import Path

import numpy as np

from segformer.files import atomic_write
from segformer.metrics import metrics_where
from segformer.visual import pyplot

from .plots import draw_confusion

def class_table(metrics: dict, class_names: list[str]) -> str:
    """The per-class metrics of METRICS' `table` column (IoU and accuracy, %) of the classes seen in the labels
    or the predictions, then their means."""
    columns = metrics_where(table=True)
    rows = [f"{'class':<24}" + "".join(f"{m.table:>8}" for m in columns)]
    absent = 0
    for i, name in enumerate(class_names):
        if math.isnan(metrics["per_category_iou"][i]):
            absent += 1
            continue
        rows.append(f"{name.strip()[:23]:<24}" + "".join(f"{_pct(metrics[f'per_category_{m.per_class}'][i]):>8}"
                                                         for m in columns))
    if absent:
        rows.append(f"({absent} classes neither labelled nor predicted: not shown, not in the means)")
    rows.append(f"{'mean':<24}" + "".join(f"{_pct(metrics[m.key]):>8}" for m in columns))
    rows.append(f"overall accuracy {_pct(metrics['overall_accuracy'])}")
    return "\n".join(rows)


def _pct(x) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def write_evaluation(directory: Path, matrix: np.ndarray, class_names: list[str], metrics: dict, *,
                     draw: bool = True) -> None:
    """The confusion matrix (.npy, .csv), the per-class table (.csv) and (draw) the heatmap of one evaluation."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [spreadsheet_safe(name.strip()) for name in class_names]

    def write_npy(tmp):
        with open(tmp, "wb") as f:
            np.save(f, matrix)
    atomic_write(directory / "confusion.npy", write_npy)

    write_csv(directory / "confusion.csv", [["label \\ prediction", *names]]
              + [[names[i], *map(int, row)] for i, row in enumerate(matrix)])
    labelled, predicted, correct = matrix.sum(1), matrix.sum(0), np.diag(matrix)
    columns = [m.per_class for m in metrics_where(table=True)]
    write_csv(directory / "per_class.csv", [["class", *columns, "labelled_pixels", "predicted_pixels", "correct_pixels"]]
              + [[names[i], *(_number(metrics[f"per_category_{key}"][i]) for key in columns),
                  int(labelled[i]), int(predicted[i]), int(correct[i])] for i in range(len(names))])
    plt = pyplot() if draw else None
    if plt is not None:
        draw_confusion(plt, matrix, names, directory / "confusion.png")


def write_csv(path: Path, rows) -> None:
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(rows)
    atomic_write(path, write)


def spreadsheet_safe(text: str) -> str:
    """A cell a spreadsheet shows as text: one that starts like a formula (=, +, -, @, a tab or a carriage
    return) gets a leading apostrophe, as OWASP's advice on CSV injection and spreadsheet-safe writers do."""
    return "'" + text if text.startswith(("=", "+", "-", "@", "\t", "\r")) else text


def _number(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.6f}"


def robustness_table(robustness: dict) -> str:
    """Mean IoU (%) per corruption and severity, their mean, and the summary line."""
    rows = [f"{'corruption':<20}" + "".join(f"{s:>7}" for s in range(1, 6)) + f"{'mean':>8}"]
    for name, values in robustness["miou"].items():
        rows.append(f"{name:<20}" + "".join(f"{100 * v:>7.1f}" for v in values) + f"{100 * sum(values) / 5:>8.1f}")
    rows.append(f"clean mIoU {100 * robustness['clean_miou']:.1f}; mean corruption mIoU "
                f"{100 * robustness['mean_corruption_miou']:.1f}; relative robustness "
                f"{robustness['relative_robustness']:.3f}")
    return "\n".join(rows)
