"""Joint (image, mask) transforms on uint8 tensors: image (3, H, W) uint8, mask (H, W) int64.

Masks are only ever moved, never blended: they resize with nearest neighbour and pad with 255.

* `EvalTransform("resize")` is `SegformerImageProcessor(do_reduce_labels=True)`: a 512x512 squash
  (bilinear + antialias for the image, nearest-exact for the mask), rescale 1/255, ImageNet mean/std.
* `EvalTransform("aspect")` is how the paper evaluates: short side to 512 keeping the aspect ratio,
  sides rounded to multiples of 32; the mask keeps its original size (the metric upsamples the
  logits to it), so the score is measured on the real annotation.
* `GuideTrainTransform` is the Hugging Face guide's training recipe: ColorJitter on the image, then
  the processor's resize and normalisation.
* `PaperTrainTransform` is the paper's ADE20K recipe (mmseg): random rescale 0.5-2.0 of a
  (4*size, size) scale, random crop with `cat_max_ratio=0.75`, horizontal flip, photometric
  distortion, padding to the crop size (mask with 255).

Every transform returns the image still as uint8 and the mask in its stored dtype (uint8 for L/P
annotations): `SegmentationDataset` hands both on as bytes, to be normalised where the model runs
(`normalize_batch`). The paper recipe's crop may be smaller than `size`: the image is then padded with
zeros *after* normalisation (the mean colour), which `normalize_batch` does, knowing the crop's own size
(`valid`); the mask is padded here, with 255.

Images of several bands at full precision (segformer/bands.py) come as float (C, H, W) in stored units:
they take the geometric steps only (resize, crop, flip), no colour jitter or photometric distortion,
and the dataset normalises them per band.

Random transforms draw only from torch's global generator; `SegmentationDataset` seeds it per sample
inside `torch.random.fork_rng`, which makes every augmentation repeatable. The guide's ColorJitter stays
with the workers (on PIL, 8-bit): its hue shift has no exact equivalent on the device.
"""

import torch
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from segformer.preprocess import aspect_size, normalize, resize_image

from .mapping import IGNORE_INDEX


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-exact (pixel centres, as the reference processor), on any integer dtype."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    kernel_dtype = torch.uint8 if mask.dtype == torch.uint8 else torch.float64  # exact for any label value
    out = TF.resize(mask[None].to(kernel_dtype), list(size), interpolation=T.InterpolationMode.NEAREST_EXACT)[0]
    return out.to(mask.dtype)


def on_pil(image: torch.Tensor, transform) -> torch.Tensor:
    """Run a colour transform through PIL: its 8-bit HSV hue shift is ~1.5x faster than the float one
    of torchvision's tensor kernel, and it is exactly what the guide does (ColorJitter on PIL images)."""
    return TF.pil_to_tensor(transform(TF.to_pil_image(image)))


class EvalTransform:
    def __init__(self, size: int = 512, mode: str = "resize"):
        if mode not in ("resize", "aspect"):
            raise ValueError(f"eval mode must be 'resize' or 'aspect', got {mode!r}")
        self.size, self.mode = size, mode

    def __call__(self, image, mask):
        H, W = image.shape[-2:]
        if self.mode == "resize":
            size = (self.size, self.size)
            mask = resize_mask(mask, size)
        else:
            size = aspect_size(H, W, self.size)
        return resize_image(image, size), mask


class GuideTrainTransform:
    """ColorJitter(0.25, 0.25, 0.25, 0.1) on the image, then the evaluation resize.

    The jitter runs on whichever of the original and the resized image has fewer pixels (ADE images
    are larger than 512x512 on average). Its four operations act pixel by pixel and the resize is a
    weighted average of neighbours, so the order changes nothing but rounding along colour edges;
    the hue shift, the costliest step, then touches fewer pixels."""

    def __init__(self, size: int = 512):
        self.size = size
        self.jitter = T.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.1)

    def __call__(self, image, mask):
        H, W = image.shape[-2:]
        size = (self.size, self.size)
        if image.dtype != torch.uint8:  # full-precision bands: no colour jitter, the resize only
            return resize_image(image, size), resize_mask(mask, size)
        if H * W > self.size * self.size:
            image = on_pil(resize_image(image, size), self.jitter)
        else:
            image = resize_image(on_pil(image, self.jitter), size)
        return image, resize_mask(mask, size)


class PaperTrainTransform:
    def __init__(self, size: int = 512, *, ratio_range=(0.5, 2.0), cat_max_ratio: float = 0.75):
        self.size, self.ratio_range, self.cat_max_ratio = size, ratio_range, cat_max_ratio

    def __call__(self, image, mask):
        # 1. Rescale: fit into (long, short) = (4*size, size) times a random ratio, keeping the aspect.
        ratio = self.ratio_range[0] + torch.rand(()).item() * (self.ratio_range[1] - self.ratio_range[0])
        H, W = image.shape[-2:]
        scale = min(4 * self.size * ratio / max(H, W), self.size * ratio / min(H, W))
        size = (int(H * scale + 0.5), int(W * scale + 0.5))
        image, mask = resize_image(image, size), resize_mask(mask, size)
        # 2. Random crop; retry (up to 10 times) while one class covers more than cat_max_ratio of it.
        for _ in range(10):
            top, left = self._crop_origin(mask)
            crop = mask[top:top + self.size, left:left + self.size]
            counts = torch.bincount(crop[crop != IGNORE_INDEX].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        image = image[:, top:top + self.size, left:left + self.size]
        mask = mask[top:top + self.size, left:left + self.size]
        # 3. Horizontal flip with probability 0.5.
        if torch.rand(()) < 0.5:
            image, mask = image.flip(-1), mask.flip(-1)
        # 4. Photometric distortion, 5. pad the mask to the crop size with 255 (the image: see pad_to).
        image = photometric_distortion(image) if image.dtype == torch.uint8 else image  # colours: 8-bit RGB only
        pad_h, pad_w = self.size - image.shape[-2], self.size - image.shape[-1]
        if pad_h or pad_w:
            mask = torch.nn.functional.pad(mask, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        return image, mask

    @property
    def pad_to(self) -> int:
        """Images come out at most this big and are padded to it after normalisation."""
        return self.size

    def _crop_origin(self, mask):
        H, W = mask.shape
        top = int(torch.randint(0, max(H - self.size, 0) + 1, ()))
        left = int(torch.randint(0, max(W - self.size, 0) + 1, ()))
        return top, left


def photometric_distortion(image: torch.Tensor) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion: each step with probability 1/2 — brightness +-32 (additive),
    contrast x[0.5, 1.5] (multiplicative, before or after the colour steps), saturation x[0.5, 1.5],
    hue +-18/180 of the circle. Departure: saturation blends with the grey image (torchvision) instead
    of scaling S in HSV (mmcv); hue uses torchvision's HSV rotation, as mmcv does."""
    def coin():
        return torch.rand(()) < 0.5

    def uniform(low, high):
        return low + torch.rand(()).item() * (high - low)

    x = image.float()
    if coin():
        x = x + uniform(-32, 32)
    contrast_first = coin()
    contrast = uniform(0.5, 1.5) if coin() else None
    if contrast_first and contrast is not None:
        x = x * contrast
    x = x.clamp(0, 255).round().to(torch.uint8)
    if coin():
        x = TF.adjust_saturation(x, uniform(0.5, 1.5))
    if coin():
        shift = uniform(-18, 18) / 180
        x = on_pil(x, lambda im: TF.adjust_hue(im, shift))
    if not contrast_first and contrast is not None:
        x = (x.float() * contrast).clamp(0, 255).round().to(torch.uint8)
    return x


def normalize_batch(pixel_values: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) batches of `SegmentationDataset` -> the model's float input: normalised as the
    image processor does, and zero (the mean colour) beyond each sample's `valid` (h, w). Float batches
    (images of several bands, segformer/bands.py) come normalised per band by the dataset."""
    x = normalize(pixel_values) if pixel_values.dtype == torch.uint8 else pixel_values.clone()
    if valid is not None:
        for i, (h, w) in enumerate(valid.tolist()):
            x[i, :, h:], x[i, :, :, w:] = 0.0, 0.0
    return x


def build_transform(*, train: bool, recipe: str = "guide", size: int = 512, eval_mode: str = "resize"):
    if not train:
        return EvalTransform(size, eval_mode)
    if recipe == "guide":
        return GuideTrainTransform(size)
    if recipe == "paper":
        return PaperTrainTransform(size)
    raise ValueError(f"unknown training recipe {recipe!r}; expected 'guide' or 'paper'")

