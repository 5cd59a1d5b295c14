"""How far a model's pixel probabilities can be trusted, and temperature scaling to make them trustworthy.

Pixel-level, over the labelled pixels (the ignore index left out), from the logits upsampled to the labels
as the metric's predictions are:

* expected calibration error (Guo et al. 2017, 15 equal-width bins of the top probability): the
  pixel-weighted mean over bins of |accuracy - mean confidence|;
* negative log-likelihood: the mean of -log p(label);
* Brier score: the mean over pixels of sum_k (p_k - [k = label])^2.

Temperature scaling (Guo et al. 2017) divides the logits by one T > 0 before the softmax: the argmax, so
every label map and IoU, stays the same; T is fitted on the validation split by the NLL, over a
logarithmic grid of temperatures all counted in one pass (`TEMPERATURES`, 0.25 to 8), then saved beside
the checkpoint (`calibration.json`) and applied by `Predictor` and the ONNX export.
"""

from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .files import read_json

BINS = 15
TEMPERATURES = tuple(float(t) for t in np.geomspace(0.25, 8.0, 61))  # ratio 1.06 between neighbours
CALIBRATION_FILE = "calibration.json"


class Calibration:
    """ECE, NLL and Brier score at every temperature of `temperatures`, counted on the device."""

    def __init__(self, num_labels: int, *, ignore_index: int = 255, temperatures=TEMPERATURES, device=None):
        self.ignore_index, self.temperatures = ignore_index, tuple(temperatures)
        T = len(self.temperatures)
        self.scale = torch.tensor([1 / t for t in self.temperatures], device=device)  # (T,)
        self.bins = torch.zeros(T, 3, BINS, dtype=torch.float64, device=device)  # pixels, confidence, correct
        self.sums = torch.zeros(T, 2, dtype=torch.float64, device=device)  # NLL, Brier
        self.pixels = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor, *, pixels_at_once: int = 1 << 16) -> None:
        """(B, K, H, W) logits at the labels' size, (B, H, W) labels."""
        K = logits.shape[1]
        x = logits.permute(0, 2, 3, 1).reshape(-1, K).float()
        y = labels.reshape(-1)
        keep = y != self.ignore_index
        x, y = x[keep], y[keep].long()
        self.pixels += len(y)
        for start in range(0, len(y), pixels_at_once):  # (T, N, K) at most T x 65536 x K floats at once
            xs, ys = x[start:start + pixels_at_once], y[start:start + pixels_at_once]
            log_p = torch.log_softmax(xs[None] * self.scale[:, None, None], dim=-1)  # (T, N, K)
            p = log_p.exp()
            picked = log_p.gather(-1, ys[None, :, None].expand(len(self.scale), -1, 1))[..., 0]  # (T, N)
            self.sums[:, 0] -= picked.sum(1).double()
            squares = p.square().sum(-1) - 2 * picked.exp() + 1  # sum_k (p_k - y_k)^2
            self.sums[:, 1] += squares.sum(1).double()
            confidence, predicted = p.max(-1)  # (T, N)
            correct = (predicted == ys[None]).double()
            which = (confidence * BINS).long().clamp(max=BINS - 1)  # [i/15, (i+1)/15), the last closed
            for values, row in ((torch.ones_like(correct), 0), (confidence.double(), 1), (correct, 2)):
                self.bins[:, row].scatter_add_(1, which, values)

    def all_reduce(self) -> None:
        if dist.is_available() and dist.is_initialized():
            for tensor in (self.bins, self.sums, self.pixels):
                dist.all_reduce(tensor)

    def at(self, temperature: float) -> dict:
        """ECE, NLL, Brier score and the reliability diagram's bins at one of the temperatures."""
        i = min(range(len(self.temperatures)), key=lambda j: abs(self.temperatures[j] - temperature))
        pixels = float(self.pixels)
        counts, confidence, correct = self.bins[i].cpu().numpy()
        with np.errstate(invalid="ignore", divide="ignore"):
            ece = float(np.nansum(np.abs(correct - confidence)) / pixels) if pixels else float("nan")
            return {"temperature": self.temperatures[i], "ece": ece, "nll": float(self.sums[i, 0]) / pixels,
                    "brier": float(self.sums[i, 1]) / pixels, "bin_pixels": counts.tolist(),
                    "bin_confidence": (confidence / counts).tolist(), "bin_accuracy": (correct / counts).tolist()}

    def fit(self) -> float:
        """The temperature of the lowest NLL."""
        return self.temperatures[int(self.sums[:, 0].argmin())]


TEMPERATURE_RANGE = (0.01, 100.0)  # what calibration.json may hold: dividing logits by it stays meaningful


def read_temperature(folder: Path) -> float | None:
    """The temperature saved beside a checkpoint (calibration.json), or None."""
    path = Path(folder) / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        value = float(read_json(path)["temperature"])
    except (ValueError, KeyError, TypeError) as e:
        from .errors import CheckpointError
        raise CheckpointError(f"{path}: expected {{\"temperature\": a positive number}} ({e})") from None
    low, high = TEMPERATURE_RANGE
    if not low <= value <= high:  # NaN, infinity, 0, a denormal: every pixel's probabilities would be wrong
        from .errors import CheckpointError
        raise CheckpointError(f"{path}: the temperature must be a number in {low:g}..{high:g} (--calibrate fits "
                              f"{TEMPERATURES[0]:g}..{TEMPERATURES[-1]:g}), got {value}")
    return value
