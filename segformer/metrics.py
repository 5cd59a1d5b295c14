"""Mean IoU from an integer confusion matrix that stays on the device of the predictions.

Same semantics as the `evaluate` library's `mean_iou` (what the guide reports): pixels labelled
`ignore_index` are left out; per class, IoU = |pred & label| / |pred | label| and accuracy =
|pred & label| / |label|; a class absent from both predictions and labels has IoU NaN, a class
predicted but never labelled has IoU 0 (and accuracy NaN); the means are nanmeans.
"""

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
        return {
            "mean_iou": float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan"),
            "mean_accuracy": float(np.nanmean(accuracy)) if not np.isnan(accuracy).all() else float("nan"),
            "overall_accuracy": float(intersection.sum() / labelled.sum()),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }
