"""Inference: what `pipeline("image-segmentation")` and the guide's manual inference do, plus the
paper's sliding window and test-time augmentation, in bounded memory on photos of any size.

    predictor = Predictor(SegFormer.from_pretrained("nvidia/segformer-b0-finetuned-ade-512-512"))
    result = predictor(load_image("room.jpg"))  # segformer.images.load_image: as the data pipeline reads it
    result.label_map   # (H, W) int64 class ids at the image's own size
    result.segments    # [{"label": "wall", "score": None, "mask": PIL L image (0/255)}, ...]

Logits come back to the image's size the way `post_process_semantic_segmentation` brings them:
bilinear upsampling (align_corners=False), then argmax.

Modes: "resize" squashes to size x size (the image processor, the guide; default); "aspect" keeps
the aspect ratio (short side `size`, sides multiples of 32); "slide" runs `window` x `window` crops
every `stride` pixels over the image at its own resolution and averages the overlapping logits
(smaller images are padded; mmseg's slide_inference). `tta=True` averages the softmax probabilities
over `scales` and their horizontal flips (the paper's multi-scale + flip testing).

Memory. Upsampled logits are K x H x W floats: a 4000x3000 photo with 150 classes would need 7 GB.
Nothing that large is ever held. Each view of an image keeps only its low-resolution logits (a slide
view, its windows', spilled to a temporary file beyond `memory_mb`), and the full-size logits are
made a few classes at a time: upsampling one class does not depend on the others, so a class chunk
of F.interpolate is bit for bit the rows of the full call. One view: a running maximum over the
chunks gives exactly the argmax of all classes (ties keep the lower class, as argmax does). Several
views: each view's per-pixel maximum, then its softmax denominator summed class after class, come
first, then the averaged probabilities chunk by chunk. The chunk size only sets the memory: the label
map does not depend on it.
"""

import os
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .bands import Bands, fill_nonfinite, to_band_tensor
from .images import to_tensor
from .labels import default_name
from .metrics import predicted_classes
from .device import AMP_DTYPES, autocast
from .errors import ConfigError, DataError
from .preprocess import DEFAULT_SIZE, aspect_size, normalize, resize_image

ROWS = 512  # rows of a label map updated at a time: small temporaries


@dataclass
class Prediction:
    label_map: torch.Tensor  # (H, W) int64
    probabilities: torch.Tensor | None  # (K, H, W) float, when asked for
    id2label: dict[int, str] = field(repr=False)
    confidence: dict | None = None  # "max", "margin", "entropy": (H, W) float maps, when asked for

    @property
    def segments(self) -> list[dict]:
        """One {"label", "score", "mask"} per class present, in ascending class id (the pipeline's); the
        score is the segment's mean top probability where the confidence was computed, else None."""
        labels = self.label_map.cpu().numpy()
        top = self.confidence["max"].cpu().numpy() if self.confidence is not None else None
        out = []
        for class_id in map(int, np.unique(labels)):
            inside = labels == class_id
            score = round(float(top[inside].mean()), 6) if top is not None else None
            mask = Image.fromarray((inside * 255).astype(np.uint8))
            out.append({"label": self.id2label.get(class_id, default_name(class_id)), "score": score, "mask": mask})
        return out


# ---- the views of an image, and their full-size logits one class chunk at a time --------------------------

class ResizedView:
    """Low-resolution logits (K, h, w) of the whole image, brought to (H, W). A flipped view is flipped
    back before upsampling, which commutes with a horizontal flip (align_corners=False mirrors exactly)."""

    def __init__(self, logits: torch.Tensor, size: tuple[int, int], flipped: bool):
        logits = logits.contiguous()  # the upsampling of a channels-last map (the decoder's) is 3x slower
        self.logits, self.size = (logits.flip(-1) if flipped else logits), size
        self.device = logits.device

    def classes(self, first: int, last: int) -> torch.Tensor:
        return F.interpolate(self.logits[None, first:last], size=self.size, mode="bilinear",
                             align_corners=False)[0]  # (last - first, H, W)


class WindowStore:
    """The low-resolution logits of a slide view's windows: in memory up to `budget` bytes, beyond it in a
    temporary file, from which class chunks are read back (a window's classes are contiguous)."""

    def __init__(self, budget: int):
        self.budget, self.boxes, self.tensors, self.shapes, self.offsets = budget, [], [], [], []
        self.file, self.size = None, 0

    def append(self, box: tuple[int, int, int, int], logits: torch.Tensor) -> None:
        logits = logits.float().cpu().contiguous()
        if self.file is None and self.size + logits.nbytes > self.budget:
            self.file = tempfile.TemporaryFile()
            for tensor in self.tensors:
                self.file.write(tensor.numpy().tobytes())
            self.tensors = []
        self.boxes.append(box)
        self.shapes.append(tuple(logits.shape))
        self.offsets.append(self.size)
        self.size += logits.nbytes
        if self.file is None:
            self.tensors.append(logits)
        else:
            self.file.write(logits.numpy().tobytes())

    def classes(self, index: int, first: int, last: int) -> torch.Tensor:
        K, h, w = self.shapes[index]
        if self.file is None:
            return self.tensors[index][first:last]
        self.file.flush()
        data = os.pread(self.file.fileno(), (last - first) * h * w * 4, self.offsets[index] + first * h * w * 4)
        return torch.frombuffer(bytearray(data), dtype=torch.float32).view(last - first, h, w)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class SlideView:
    """Windows over the padded (Hp, Wp) image at scale: their logits, each upsampled to its window and
    averaged where they overlap, cropped to (Hs, Ws), then brought to (H, W) (and flipped back)."""

    def __init__(self, windows: WindowStore, padded: tuple[int, int], scaled: tuple[int, int],
                 size: tuple[int, int], flipped: bool, device):
        self.windows, self.padded, self.scaled, self.size, self.flipped = windows, padded, scaled, size, flipped
        self.device = device
        self.count = torch.zeros(1, *padded, dtype=torch.uint8, device=device)  # windows over each pixel
        for y1, y2, x1, x2 in windows.boxes:
            self.count[:, y1:y2, x1:x2] += 1

    def classes(self, first: int, last: int) -> torch.Tensor:
        total = torch.zeros(last - first, *self.padded, device=self.count.device)
        for i, (y1, y2, x1, x2) in enumerate(self.windows.boxes):
            low = self.windows.classes(i, first, last).to(self.count.device)
            total[:, y1:y2, x1:x2] += F.interpolate(low[None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                                    align_corners=False)[0]
        Hs, Ws = self.scaled
        logits = total.div_(self.count)[:, :Hs, :Ws]
        if self.flipped:  # back before the last upsampling, which commutes with it
            logits = logits.flip(-1)
        if (Hs, Ws) != tuple(self.size):
            logits = F.interpolate(logits[None], size=self.size, mode="bilinear", align_corners=False)[0]
        return logits


# ---- combining the views, a class chunk at a time ----------------------------------------------------------

def combine(views: list, num_labels: int, size: tuple[int, int], *, memory: int, probabilities: bool,
            confidence: bool = False):
    """(label map (H, W), probabilities (K', H, W) or None, confidence or None) of an image from its views,
    a chunk of classes at a time, in about `memory` bytes. K' is 2 for the binary head (background and the
    label). The confidence: the top probability, its margin over the second, the entropy (nats)."""
    H, W = size
    device, plane = views[0].device, 4 * H * W  # bytes of one (H, W) float map
    if num_labels == 1:  # the binary head: 1 where the (averaged) sigmoid is above one half
        logits = [view.classes(0, 1)[0] for view in views]
        if len(views) == 1 and not probabilities and not confidence:
            return (logits[0] > 0).long(), None, None
        p = sum(x.sigmoid() for x in logits) / len(views)
        sure = None
        if confidence:
            q = torch.stack([1 - p, p]).clamp(min=1e-12)
            sure = {"max": torch.maximum(p, 1 - p), "margin": (2 * p - 1).abs(), "entropy": -(q * q.log()).sum(0)}
        return (p > 0.5).long(), torch.stack([1 - p, p]) if probabilities else None, sure
    tta = len(views) > 1 or probabilities or confidence
    fixed = plane * (1 + 0.5 + (len(views) if tta else 0) + (len(views) == 1) + (2 if confidence else 0))  # + the
    # views' log-sums, one view's best logit, the second best and the entropy
    chunk = int(max(1, min(num_labels, (memory - fixed) // (2 * plane))))  # two (chunk, H, W) maps at a time
    chunks = [(first, min(first + chunk, num_labels)) for first in range(0, num_labels, chunk)]
    best = torch.full((H, W), -float("inf"), device=device)
    label_map = torch.zeros((H, W), dtype=torch.int16, device=device)  # class ids < 4096

    if not tta:  # one view: the argmax of the logits themselves
        for first, last in chunks:
            keep_best(views[0].classes(first, last), first, best, label_map)
        del best
        return label_map.long(), None, None
    # A view's softmax is exp(x - L), L = log sum_k exp(x_k) each pixel's log-sum-exp over all classes:
    # its maximum m first, then the sum of exp(x_k - m), class after class (the same arithmetic whatever
    # the chunk size). One plane per view.
    log_sums = []
    for view in views:
        maximum = torch.full((H, W), -float("inf"), device=device)
        for first, last in chunks:
            maximum = torch.maximum(maximum, view.classes(first, last).amax(0))
        total = torch.zeros((H, W), device=device)
        for first, last in chunks:
            exponentials = view.classes(first, last).sub_(maximum).exp_()
            for k in range(last - first):
                total += exponentials[k]
        log_sums.append(total.log_().add_(maximum))
        del maximum, exponentials
    full = torch.empty((num_labels, H, W), device=device) if probabilities else None
    second = torch.full((H, W), -float("inf"), device=device) if confidence else None
    entropy = torch.zeros((H, W), device=device) if confidence else None
    # One view: the label map is its logits' own argmax, as without probabilities or confidence (exp(x - L)
    # can round two logits a last bit apart to one probability, whose tie would go to the lower class).
    best_logit = torch.full((H, W), -float("inf"), device=device) if len(views) == 1 else None
    for first, last in chunks:
        averaged = None
        for view, log_sum in zip(views, log_sums):  # the softmax of each view, summed
            logits = view.classes(first, last)
            if best_logit is not None:
                keep_best(logits, first, best_logit, label_map)
            softmax = logits.sub_(log_sum).exp_()
            averaged = softmax if averaged is None else averaged.add_(softmax)
            del logits, softmax
        averaged /= len(views)
        if full is not None:
            full[first:last] = averaged
        if confidence:  # the runner-up before `best` moves on, and -sum p log p
            top, runner_up = top_two(averaged)
            second = torch.maximum(torch.minimum(best, top), torch.maximum(second, runner_up))
            entropy -= (averaged * averaged.clamp(min=1e-12).log()).sum(0)
        if best_logit is None:
            keep_best(averaged, first, best, label_map)
        else:
            torch.maximum(best, averaged.amax(0), out=best)
        del averaged
    sure = {"max": best, "margin": best - second, "entropy": entropy} if confidence else None
    del log_sums
    return label_map.long(), full, sure


def keep_best(scores: torch.Tensor, first: int, best: torch.Tensor, label_map: torch.Tensor) -> None:
    """Fold the scores of classes first.. into a running maximum and its class, a band of rows at a time.
    Strictly greater: ties keep the lower class, as argmax does."""
    for top in range(0, best.shape[0], ROWS):
        value, index = scores[:, top:top + ROWS].max(0)
        rows = best[top:top + ROWS]
        better = value > rows
        torch.where(better, value, rows, out=rows)
        labels = label_map[top:top + ROWS]
        torch.where(better, (index + first).to(label_map.dtype), labels, out=labels)


def top_two(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The largest and the second largest of (K, H, W) scores over K, each (H, W) (-inf: no second); the
    maximum, then the maximum with it masked out (topk over the first dimension is 2.5x slower)."""
    best, index = scores.max(0)
    if scores.shape[0] == 1:
        return best, torch.full_like(best, -float("inf"))
    return best, scores.scatter(0, index[None], -float("inf")).amax(0)


# ---- the predictor -------------------------------------------------------------------------------------

class NonFiniteLogits(DataError):
    """The model's logits for an image hold NaN or infinity: no label map is made of them (the argmax of NaN is
    class 0 at every pixel, a mask that looks like an answer)."""


class Predictor:
    """model: any `segformer.runtimes.InferenceModel`: a `SegFormer`, or a graph a runtime runs
    (`segformer.runtimes.onnx.OnnxModel`): `id2label`, and a forward from normalised pixel values to logits.

    channels_last / compile: the faster CPU paths of eager PyTorch; memory_mb: the memory the
    full-size logits and the windows may take (the chunking above)."""

    def __init__(self, model, *, size: int = DEFAULT_SIZE, mode: str = "resize", window: int = 512, stride: int = 341,
                 tta: bool = False, scales=(0.75, 1.0, 1.25), flip: bool = True, device=None, amp: str = "off",
                 batch_size: int = 4, channels_last: bool = False, compile: bool = False, memory_mb: int = 512,
                 bands: Bands | None = None, temperature: float | None = None):
        if mode not in ("resize", "aspect", "slide"):
            raise ValueError(f"mode must be 'resize', 'aspect' or 'slide', got {mode!r}")
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
        if mode == "slide" and not 0 < stride <= window:
            raise ValueError(f"the stride ({stride}) must be in 1..window ({window})")
        side = getattr(model, "input_side", None)  # a graph of one input size (ExecuTorch's)
        if side is not None and (tta or not (mode == "resize" and size == side or mode == "slide" and window == side)):
            raise ConfigError(f"{model.path} takes {side}x{side} inputs only (exported at that size): --mode resize "
                              f"at its size, or --mode slide --window {side}, without --tta")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model = model.eval().to(self.device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = torch.compile(model, dynamic=mode != "resize") if compile else model
        self.num_labels = len(model.id2label)
        self.id2label = dict(enumerate(predicted_classes(list(model.id2label.values()))))
        self.size, self.mode, self.window, self.stride = size, mode, window, stride
        self.scales = tuple(scales) if tta else (1.0,)
        self.flip = tta and flip
        self.amp, self.batch_size, self.channels_last = amp, batch_size, channels_last
        self.memory = memory_mb * 2**20
        self.bands = bands  # full-precision images of several bands, normalised per band; None: 8-bit RGB
        self.temperature = temperature  # the logits are divided by it (segformer/calibration.py); None: 1
        self.normalize = bands.normalize if bands is not None else normalize
        self.views_per_image = len(self.scales) * (2 if self.flip else 1)

    @torch.no_grad()
    def __call__(self, images, *, probabilities: bool = False, confidence: bool = False):
        """One image (PIL, any mode, or uint8 (3, H, W) tensor; with `bands`, an (H, W, C) array of stored
        values as segformer.bands.read_bands gives, or a float (C, H, W) tensor) -> Prediction; a list -> list.
        In "resize" mode a list runs through the model `batch_size` images at a time. probabilities=True
        also returns the (K, H, W) class probabilities, which take K x H x W floats; confidence=True the
        (H, W) maps of the top probability, its margin over the second and the entropy, computed a chunk of
        classes at a time (no K x H x W array), and each segment's score: its mean top probability."""
        single = not isinstance(images, (list, tuple))
        images = [self.to_tensor(image).to(self.device) for image in ([images] if single else images)]
        results = []
        batch_size = self.batch_size if self.mode == "resize" else 1  # other modes: an image at a time
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            for image, views in zip(batch, self.views(batch)):
                H, W = image.shape[-2:]
                label_map, probs, sure = combine(views, self.num_labels, (H, W), memory=self.memory // 2,
                                                 probabilities=probabilities, confidence=confidence)
                for view in views:
                    if isinstance(view, SlideView):
                        view.windows.close()
                results.append(Prediction(label_map, probs, self.id2label, sure))
        return results[0] if single else results

    def to_tensor(self, image) -> torch.Tensor:
        if self.bands is None:
            return to_tensor(image)
        if isinstance(image, np.ndarray):
            image = to_band_tensor(image, "an image", self.bands.count)
        elif isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] == self.bands.count:
            image = image.float()
        else:
            raise TypeError(f"expected an (H, W, {self.bands.count}) array or a ({self.bands.count}, H, W) tensor of "
                            f"stored values, got {type(image).__name__}")
        return fill_nonfinite(image, self.bands)[0]  # no-data values as the band mean: never NaN logits

    def views(self, images: list[torch.Tensor]) -> list[list]:
        """For each image, its views (every scale, and flipped where asked): their low-resolution results."""
        per_image = [[] for _ in images]
        for scale in self.scales:
            for flipped in ((False, True) if self.flip else (False,)):
                inputs = [image.flip(-1) if flipped else image for image in images]
                for i, view in enumerate(self.view_of(inputs, scale, flipped)):
                    per_image[i].append(view)
        return per_image

    def view_of(self, images: list[torch.Tensor], scale: float, flipped: bool) -> list:
        scaled = [resize_image(image, self.input_size(*image.shape[-2:], scale)) for image in images]  # uint8
        sizes = [tuple(image.shape[-2:]) for image in images]
        if self.mode == "slide":  # normalised a window at a time: no float copy of a large image
            return [self.slide(x, size, flipped) for x, size in zip(scaled, sizes)]
        inputs = [self.normalize(x) for x in scaled]
        if self.mode == "resize":  # one input size for all: one batch
            batch = self.forward(torch.stack(inputs))  # (B, K, size/4, size/4)
            return [ResizedView(logits, size, flipped) for logits, size in zip(batch, sizes)]
        return [ResizedView(self.forward(x[None])[0], size, flipped) for x, size in zip(inputs, sizes)]

    def input_size(self, H: int, W: int, scale: float) -> tuple[int, int]:
        if self.mode == "resize":
            return (round(self.size * scale),) * 2
        if self.mode == "aspect":
            return aspect_size(H, W, round(self.size * scale))
        return max(1, round(H * scale)), max(1, round(W * scale))  # slide: the image's own resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device.type, self.amp):
            logits = self.model(x).float()
        if not bool(torch.isfinite(logits).all()):
            raise NonFiniteLogits(
                f"the model's logits are NaN or infinite at {int((~torch.isfinite(logits)).sum()):,} of "
                f"{logits.numel():,} values, so no mask is made of them: an input far outside the values the model "
                f"was trained on" + (f", or {self.amp} autocast overflowing (amp 'off' computes in float32)"
                                     if self.amp != "off" else ""))
        return logits / self.temperature if self.temperature else logits

    def slide(self, image: torch.Tensor, size: tuple[int, int], flipped: bool) -> SlideView:
        """mmseg's slide_inference on a uint8 (3, Hs, Ws) image: window x window crops every `stride`
        pixels (the last ones flush with the far edges), the image padded to at least one window with
        zeros after normalisation (the mean colour)."""
        Hs, Ws = image.shape[-2:]
        win, stride = self.window, self.stride
        Hp, Wp = max(Hs, win), max(Ws, win)
        windows = WindowStore(self.memory // (2 * self.views_per_image))  # the views' windows share half
        for r in range(max(Hp - win + stride - 1, 0) // stride + 1):
            for c in range(max(Wp - win + stride - 1, 0) // stride + 1):
                y2, x2 = min(r * stride + win, Hp), min(c * stride + win, Wp)
                y1, x1 = max(y2 - win, 0), max(x2 - win, 0)
                crop = self.normalize(image[:, y1:min(y2, Hs), x1:min(x2, Ws)])
                crop = F.pad(crop, (0, x2 - x1 - crop.shape[-1], 0, y2 - y1 - crop.shape[-2]))
                windows.append((y1, y2, x1, x2), self.forward(crop[None])[0])
        return SlideView(windows, (Hp, Wp), (Hs, Ws), size, flipped, image.device)
