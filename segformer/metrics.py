"""Mean IoU from an integer confusion matrix that stays on the device of the predictions, and the metrics
beside it: precision, recall, F1 (Dice), frequency-weighted IoU, and Boundary IoU.

Same semantics as the `evaluate` library's `mean_iou` (what the guide reports): pixels labelled
`ignore_index` are left out; per class, IoU = |pred & label| / |pred | label| and accuracy =
|pred & label| / |label|; a class absent from both predictions and labels has IoU NaN, a class
predicted but never labelled has IoU 0 (and accuracy NaN); the means are nanmeans.

Precision, recall and F1 follow torchmetrics' Multiclass{Precision,Recall,F1Score}(ignore_index=...):
per class TP / (TP + FP), TP / (TP + FN) and 2TP / (2TP + FP + FN), 0 where the denominator is 0;
their "macro" means skip the classes absent from both labels and predictions (NaN per class here).
Frequency-weighted IoU weighs each class's IoU by its share of the labelled pixels.

Boundary IoU (Cheng et al., CVPR 2021; the authors' `mask_to_boundary` and `boundary_iou`): a mask's
boundary band is the mask minus its erosion by d pixels (a 3x3 erosion d times, zeros beyond the image,
which equals one (2d+1)x(2d+1) square erosion), d = 2% of the image diagonal (at least 1); per class, the
intersection and union of the label's and the prediction's bands are summed over the data set, and
ignored pixels count in neither band.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

# The confusion matrix holds K x K int64 counts: 4096 classes take 128 MiB (ADE20K-full has 3688).
MAX_LABELS = 4096


def predicted_classes(names: list[str]) -> list[str]:
    """The classes of a prediction map: the model's, or with a single label (the reference's binary,
    sigmoid head) "background" = 0 and that label = 1."""
    return list(names) if len(names) > 1 else ["background", names[0]]


class NamedClasses:
    """For a class with `class_names` (a model's classifier's classes): their ids, and the classes of its
    prediction maps (data.spec.LabelSpec, segformer.runtimes.ModelFacts)."""
    class_names: tuple[str, ...]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.class_names))

    @property
    def predicted_classes(self) -> list[str]:
        """The classes of a prediction map: with one label (the binary head) background and that label."""
        return predicted_classes(list(self.class_names))


def logits_to_predictions(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, K, h, w) logits -> (B, H, W) class ids: upsample (bilinear, align_corners=False), then argmax
    (one channel: 1 where the logit is positive, the sigmoid above 0.5)."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(dim=1)


class ConfusionMatrix:
    def __init__(self, num_labels: int, ignore_index: int = 255, device: torch.device | str | None = None):
        if not 1 <= num_labels <= MAX_LABELS:
            raise ValueError(f"num_labels must be in 1..{MAX_LABELS} (the confusion matrix has num_labels**2 "
                             f"int64 counts), got {num_labels}")
        self.num_labels, self.ignore_index = num_labels, ignore_index
        # counts[label * K + prediction]: int64, so a whole dataset of pixels cannot overflow it
        self.counts = torch.zeros(num_labels * num_labels, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, predictions: torch.Tensor, references: torch.Tensor) -> None:
        """predictions, references: integer tensors of the same shape, e.g. (B, H, W)."""
        if predictions.shape != references.shape:
            raise ValueError(f"predictions {tuple(predictions.shape)} and references {tuple(references.shape)} "
                             f"differ in shape")
        K = self.num_labels
        keep = (references != self.ignore_index) & (references >= 0) & (references < K)
        keep &= (predictions >= 0) & (predictions < K)
        pairs = references[keep].to(torch.int64) * K + predictions[keep].to(torch.int64)
        self.counts += torch.bincount(pairs, minlength=K * K)

    def all_reduce(self) -> None:
        """Sum the counts of all processes (torchrun); a no-op in a single process."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)

    @property
    def matrix(self) -> torch.Tensor:
        return self.counts.view(self.num_labels, self.num_labels)  # (label, prediction)

    def compute(self) -> dict:
        """`mean_iou`, `mean_accuracy`, `overall_accuracy` (floats) and `per_category_iou`,
        `per_category_accuracy` (float64 arrays with NaN where undefined), as `evaluate` returns them."""
        m = self.matrix.double().cpu()
        intersection = m.diag()
        labelled = m.sum(dim=1)
        predicted = m.sum(dim=0)
        union = labelled + predicted - intersection
        iou = (intersection / union).numpy()  # torch: 0/0 -> NaN (absent from both), no warning
        accuracy = (intersection / labelled).numpy()
        present = (union > 0).numpy()  # in the labels or the predictions

        def zero_division(numerator, denominator):  # torchmetrics: 0 where 0/0; NaN for absent classes
            values = torch.where(denominator > 0, numerator / denominator.clamp(min=1), 0.0).numpy()
            return np.where(present, values, np.nan)
        precision, recall = zero_division(intersection, predicted), zero_division(intersection, labelled)
        f1 = zero_division(2 * intersection, labelled + predicted)
        frequency = (labelled / labelled.sum()).numpy()
        return {
            "mean_iou": float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan"),
            "mean_accuracy": float(np.nanmean(accuracy)) if not np.isnan(accuracy).all() else float("nan"),
            "overall_accuracy": float(intersection.sum() / labelled.sum()),
            "frequency_weighted_iou": float(np.nansum(frequency * np.nan_to_num(iou))),
            "mean_precision": nanmean(precision), "mean_recall": nanmean(recall), "mean_f1": nanmean(f1),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
            "per_category_precision": precision, "per_category_recall": recall, "per_category_f1": f1,
        }


def nanmean(values: np.ndarray) -> float:
    return float(np.nanmean(values)) if not np.isnan(values).all() else float("nan")


def boundary_band(masks: torch.Tensor, d: int) -> torch.Tensor:
    """(N, H, W) bool masks -> their boundary bands: each mask minus its erosion by a (2d+1) square, with
    zeros beyond the image (so a mask's pixels within d of the image's edge are boundary too)."""
    outside = F.pad((~masks).float()[:, None], (d, d, d, d), value=1.0)  # 1: not in the mask
    # the square's max as a column's then a row's: the same erosion, 2(2d+1) comparisons a pixel, not (2d+1)^2
    outside = F.max_pool2d(outside, kernel_size=(2 * d + 1, 1), stride=1)
    eroded = F.max_pool2d(outside, kernel_size=(1, 2 * d + 1), stride=1)[:, 0] == 0
    return masks & ~eroded


def boundary_width(height: int, width: int, ratio: float = 0.02) -> int:
    """The band's width d of the authors' code: ratio x the image diagonal, rounded, at least 1."""
    return max(1, round(ratio * math.hypot(height, width)))


class BoundaryIoU:
    """Per-class Boundary IoU over a data set (see the module's docstring), counted on the device."""

    def __init__(self, num_labels: int, ignore_index: int = 255, ratio: float = 0.02, device=None,
                 classes_at_once: int = 16):
        self.num_labels, self.ignore_index, self.ratio, self.chunk = num_labels, ignore_index, ratio, classes_at_once
        self.counts = torch.zeros(2, num_labels, dtype=torch.int64, device=device)  # intersection, union

    @torch.no_grad()
    def update(self, predictions: torch.Tensor, references: torch.Tensor) -> None:
        """(B, H, W) predictions and labels of one size."""
        d = boundary_width(*references.shape[-2:], self.ratio)
        for prediction, reference in zip(predictions, references):
            valid = reference != self.ignore_index
            classes = torch.unique(torch.cat([prediction[valid], reference[valid]]))
            classes = classes[(classes >= 0) & (classes < self.num_labels)]
            for start in range(0, len(classes), self.chunk):  # a few classes' bands at a time: bounded memory
                chunk = classes[start:start + self.chunk]
                label_band = boundary_band(reference[None] == chunk[:, None, None], d) & valid
                predicted_band = boundary_band(prediction[None] == chunk[:, None, None], d) & valid
                self.counts[0, chunk] += (label_band & predicted_band).flatten(1).sum(1)
                self.counts[1, chunk] += (label_band | predicted_band).flatten(1).sum(1)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)

    def compute(self) -> dict:
        intersection, union = self.counts.double().cpu()
        iou = (intersection / union).numpy()  # NaN: no band of the class anywhere
        return {"mean_boundary_iou": nanmean(iou), "per_category_boundary_iou": iou}


# ---- the metrics as one table ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    """A row of METRICS: a number the evaluation reports over the data set (`key` in what `compute` returns)
    and, where `per_class` is set, its value for each class (`per_category_<per_class>`)."""
    key: str  # "mean_iou": its value over the data set
    name: str  # "Mean IoU": its name on a model card (the hub's model-index)
    per_class: str | None = None  # "iou": per class, `per_category_iou`; its column in the report's tables
    header: str | None = None  # its column's header in the report's tables (per class, or the headline)
    card: str | None = None  # on the model-index of "every" card (a training run's too), of the "report"'s, or none
    curves: bool = False  # drawn in curves.png and written to TensorBoard, at every evaluation of a run
    table: str | None = None  # its column in the per-class table printed after an evaluation ("IoU", "acc")


# The order is the order of report.json, the report's per-class tables and the model-index. Adding a metric:
# a row here, and its values in ConfusionMatrix.compute (or BoundaryIoU.compute) under `key` and
# `per_category_<per_class>`; the report, the cards, the curves and the class table read this table.
METRICS = (
    Metric("mean_iou", "Mean IoU", "iou", "IoU", card="every", curves=True, table="IoU"),
    Metric("mean_accuracy", "Mean Accuracy", "accuracy", "accuracy", card="every", curves=True, table="acc"),
    Metric("overall_accuracy", "Overall Accuracy", header="overall accuracy", card="every", curves=True),
    Metric("frequency_weighted_iou", "Frequency-weighted IoU", header="FW IoU", card="report"),
    Metric("mean_precision", "Mean Precision", "precision", "precision"),
    Metric("mean_recall", "Mean Recall", "recall", "recall"),
    Metric("mean_f1", "Mean F1", "f1", "F1", card="report"),
    Metric("mean_boundary_iou", "Mean Boundary IoU", "boundary_iou", "Boundary IoU", card="report"),
)


def metrics_where(**wanted) -> tuple[Metric, ...]:
    """The rows of METRICS whose fields have the values asked for (a value of True: any set value)."""
    return tuple(m for m in METRICS if all(getattr(m, k) == v or (v is True and getattr(m, k)) for k, v in
                                           wanted.items()))
