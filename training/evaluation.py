"""Evaluation: mean IoU over a loader, on the device, summed over all processes; one code path for the
evaluations of a training run and for `train.py --eval-only` (with `--report DIR`, the full report).

Predictions are the logits upsampled to the labels' size, then the argmax, as the guide's
compute_metrics does; the metric is `segformer.metrics.ConfusionMatrix` (the `evaluate` library's
mean_iou semantics). A `Report` collects what the report adds, from the same predictions: each image's
own IoU, Boundary IoU per class, and the worst images to look at.
"""

import heapq

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import IGNORE_INDEX, DataError, batch_to_device
from segformer.calibration import TEMPERATURES, Calibration
from segformer.metrics import BoundaryIoU, ConfusionMatrix, logits_to_predictions, nanmean


@dataclass
class Evaluation:
    metrics: dict  # mean_iou, ..., per_category_iou (float64 arrays, NaN where undefined)
    confusion: np.ndarray  # (K, K) pixel counts, rows: labels, columns: predictions
    shown: tuple = ()  # (uint8 images, predictions) of the first few samples, to look at


@torch.no_grad()
def evaluate(model, loader, *, num_labels: int, device, autocast, show: int = 0, stop=None,
             report: "Report | None" = None) -> Evaluation | None:
    """Mean IoU of `model` over `loader`, summed over all processes; `num_labels` classes of predictions
    (2 for the binary head); `autocast()` the precision context; the first `show` images kept with their
    predictions. `stop()` true between two batches ends it early: None (the processes still meet to sum
    what they counted). A validation set with no labelled pixel (every sample skipped as bad, or all
    ignored) is an error, not a NaN."""
    was_training = model.training
    model.eval()
    confusion = ConfusionMatrix(num_labels, ignore_index=IGNORE_INDEX, device=device)
    reasons, shown, stopped = [], (), False
    for batch in loader:
        if stop is not None and stop():
            stopped = True
            break
        reasons += batch["skip_reasons"]
        if "pixel_values" not in batch:  # every sample of the batch was skipped
            continue
        pixel_values, labels = batch_to_device(batch, device)
        with autocast():
            logits = model(pixel_values)
        if report is not None and logits.shape[1] > 1:  # the report's calibration: the logits at the labels' size
            logits = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            report.calibration.update(logits, labels)
        predictions = logits_to_predictions(logits.float(), labels.shape[-2:])
        confusion.update(predictions, labels)
        if report is not None:
            report.update(batch["pixel_values"], predictions, labels, batch.get("indices"))
        if show and not shown and predictions.shape[-2:] == batch["pixel_values"].shape[-2:]:
            shown = (batch["pixel_values"][:show], predictions[:show].cpu())
    confusion.all_reduce()
    if report is not None:
        report.all_reduce()
    model.train(was_training)
    if stopped:
        return None
    if confusion.counts.sum() == 0:
        raise DataError(f"nothing to evaluate: no labelled pixel in the validation split ({len(reasons)} sample(s) "
                        f"skipped as bad{': ' + '; '.join(reasons[:3]) if reasons else ''})")
    return Evaluation(confusion.compute(), confusion.matrix.cpu().numpy(), shown)


class Report:
    """What the evaluation report adds to the data set's confusion matrix, counted from the same
    predictions: per image, its labelled pixels, accuracy and IoU per class (NaN: absent from both); per
    class, Boundary IoU; the `worst` images by their own mean IoU, kept with their labels and predictions;
    the pixel probabilities' calibration (segformer/calibration.py) at `temperatures` (the grid a fit needs,
    or only those to be reported: each costs a softmax over the classes at every pixel)."""

    def __init__(self, num_labels: int, *, device, worst: int = 8, boundary_ratio: float = 0.02,
                 temperatures=TEMPERATURES):
        self.num_labels, self.keep = num_labels, worst
        self.boundary = BoundaryIoU(num_labels, ignore_index=IGNORE_INDEX, ratio=boundary_ratio, device=device)
        self.calibration = Calibration(num_labels, ignore_index=IGNORE_INDEX, temperatures=temperatures,
                                       device=device)
        self.rows = []  # one dict per image
        self.worst = []  # heap of (-mean IoU, index, image, labels, prediction): the worst `keep` images

    @torch.no_grad()
    def update(self, pixel_values: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor, indices) -> None:
        self.boundary.update(predictions, labels)
        K = self.num_labels
        for i, (prediction, label) in enumerate(zip(predictions, labels)):
            keep = label != IGNORE_INDEX
            counts = torch.bincount(label[keep] * K + prediction[keep], minlength=K * K).view(K, K).double().cpu()
            intersection = counts.diag()
            union = counts.sum(0) + counts.sum(1) - intersection
            iou = (intersection / union).numpy()
            pixels = int(keep.sum())
            row = {"index": indices[i] if indices is not None else len(self.rows), "pixels": pixels,
                   "accuracy": float(intersection.sum() / pixels) if pixels else float("nan"),
                   "mean_iou": nanmean(iou), "iou": iou}
            self.rows.append(row)
            score = -row["mean_iou"] if not np.isnan(row["mean_iou"]) else float("-inf")
            if len(self.worst) < self.keep or score > self.worst[0][0]:
                entry = (score, row["index"], display(pixel_values[i], label.shape), label.cpu(), prediction.cpu())
                (heapq.heappush if len(self.worst) < self.keep else heapq.heapreplace)(self.worst, entry)

    def all_reduce(self) -> None:
        """Every process's images on every process (the rows are few numbers each; the gallery k images)."""
        self.boundary.all_reduce()
        self.calibration.all_reduce()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (self.rows, self.worst))
            self.rows = sorted((row for rows, _ in gathered for row in rows), key=lambda row: row["index"])
            self.worst = heapq.nlargest(self.keep, (entry for _, worst in gathered for entry in worst),
                                        key=lambda entry: (entry[0], -entry[1]))
        self.rows.sort(key=lambda row: row["index"])

    def worst_images(self) -> list[tuple]:
        """(index, its mean IoU, image uint8 (3, H, W), labels, prediction) from the worst image up."""
        return [(index, -score, *rest) for score, index, *rest in sorted(self.worst, key=lambda e: (-e[0], e[1]))]

    def per_image_mean_iou(self) -> float:
        """The mean over images of each image's own mean IoU (images with no labelled class left out)."""
        return nanmean(np.array([row["mean_iou"] for row in self.rows], dtype=np.float64))


def display(pixels: torch.Tensor, size) -> torch.Tensor:
    """A batch's image as uint8 (3, H, W) at the labels' size, to look at: the bytes themselves, or, for
    images of several bands (normalised floats), the first three stretched to 0..255."""
    image = pixels.float()
    if pixels.dtype != torch.uint8:
        image = image[:3] if image.shape[0] >= 3 else image[:1].expand(3, -1, -1)
        low = image.flatten(1).quantile(0.02, dim=1)[:, None, None]
        high = image.flatten(1).quantile(0.98, dim=1)[:, None, None]
        image = (image - low) / (high - low).clamp(min=1e-6) * 255
    if tuple(image.shape[-2:]) != tuple(size):
        image = F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    return image.clamp(0, 255).round().to(torch.uint8).cpu()
