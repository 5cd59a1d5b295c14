"""Evaluation: mean IoU over a loader, on the device, summed over all processes; one code path for the
evaluations of a training run and for `train.py --eval-only`.

Predictions are the logits upsampled to the labels' size, then the argmax, as the guide's
compute_metrics does; the metric is `segformer.metrics.ConfusionMatrix` (the `evaluate` library's
mean_iou semantics).
"""

from dataclasses import dataclass

import numpy as np
import torch

from data import IGNORE_INDEX, DataError, batch_to_device
from segformer.metrics import ConfusionMatrix, logits_to_predictions


@dataclass
class Evaluation:
    metrics: dict  # mean_iou, ..., per_category_iou (float64 arrays, NaN where undefined)
    confusion: np.ndarray  # (K, K) pixel counts, rows: labels, columns: predictions
    shown: tuple = ()  # (uint8 images, predictions) of the first few samples, to look at


@torch.no_grad()
def evaluate(model, loader, *, num_labels: int, device, autocast, show: int = 0, stop=None) -> Evaluation | None:
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
        predictions = logits_to_predictions(logits.float(), labels.shape[-2:])
        confusion.update(predictions, labels)
        if show and not shown and predictions.shape[-2:] == batch["pixel_values"].shape[-2:]:
            shown = (batch["pixel_values"][:show], predictions[:show].cpu())
    confusion.all_reduce()
    model.train(was_training)
    if stopped:
        return None
    if confusion.counts.sum() == 0:
        raise DataError(f"nothing to evaluate: no labelled pixel in the validation split ({len(reasons)} sample(s) "
                        f"skipped as bad{': ' + '; '.join(reasons[:3]) if reasons else ''})")
    return Evaluation(confusion.compute(), confusion.matrix.cpu().numpy(), shown)
