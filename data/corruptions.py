"""Common corruptions at five severities, for the robustness evaluation of SegFormer's section 4.4
(Cityscapes-C, made as ImageNet-C is: Hendrycks & Dietterich, ICLR 2019).

Each corruption takes a uint8 (3, H, W) image and a torch generator (seeded per corruption, severity and
sample: the same corrupted set every time) and returns a uint8 image of the same size. The severities'
parameters are ImageNet-C's (its `make_imagenet_c.py`, as the `imagecorruptions` package carries them);
the operations are torchvision's transforms v2 where it has them (Gaussian blur, contrast, saturation),
Pillow's JPEG encoder, and a few lines of torch each for the rest.

Left out, and why: the `imagecorruptions` package, which Cityscapes-C was made with, no longer runs on
NumPy 2 and scikit-image 0.19+ (its glass blur, Gaussian blur and fog fail) and needs `pkg_resources`;
snow, frost and spatter need its texture files and ImageMagick's motion blur; glass blur is a per-pixel
Python loop (minutes per image). Fog is ImageNet-C's plasma fractal (diamond-square), zoom blur its
average of zoomed copies. Motion blur is a
straight-line kernel at a random angle, not ImageMagick's one-sided Gaussian one; brightness shifts the
value channel of HSV as ImageNet-C does.
"""

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image

SEVERITIES = (1, 2, 3, 4, 5)


def _float(image):  # uint8 (3, H, W) -> float in [0, 1]
    return image.float() / 255


def _uint8(x):
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def gaussian_noise(image, severity, g):
    sigma = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    x = _float(image)
    return _uint8(x + torch.randn(x.shape, generator=g) * sigma)


def shot_noise(image, severity, g):
    photons = (60, 25, 12, 5, 3)[severity - 1]
    return _uint8(torch.poisson(_float(image) * photons, generator=g) / photons)


def impulse_noise(image, severity, g):
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]  # salt and pepper, half each, per value
    x = _float(image)
    u = torch.rand(x.shape, generator=g)
    return _uint8(torch.where(u < amount / 2, 0.0, torch.where(u > 1 - amount / 2, 1.0, x)))


def speckle_noise(image, severity, g):
    c = (0.15, 0.2, 0.35, 0.45, 0.6)[severity - 1]
    x = _float(image)
    return _uint8(x + x * torch.randn(x.shape, generator=g) * c)


def gaussian_blur(image, severity, g):
    sigma = (1, 2, 3, 4, 6)[severity - 1]
    return TF.gaussian_blur(image, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=float(sigma))


def _filter(image, kernel):
    """Each channel convolved with a (k, k) kernel, the edges reflected."""
    x = _float(image)[None]
    pad = kernel.shape[-1] // 2
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect" if pad < min(x.shape[-2:]) else "replicate")
    return _uint8(F.conv2d(x, kernel.expand(3, 1, *kernel.shape).contiguous(), groups=3)[0])


def defocus_blur(image, severity, g):
    radius, alias = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[severity - 1]
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    disk = ((r[:, None] ** 2 + r[None] ** 2) <= radius ** 2).float()
    disk = TF.gaussian_blur(disk[None, None], kernel_size=2 * math.ceil(3 * alias) + 1, sigma=alias)[0, 0]
    return _filter(image, disk / disk.sum())


def motion_blur(image, severity, g):
    radius = (10, 15, 15, 15, 20)[severity - 1]  # ImageNet-C's radius; a straight line at a random angle
    angle = float(torch.empty(()).uniform_(-45, 45, generator=g)) * math.pi / 180
    size = 2 * radius + 1
    kernel = torch.zeros(size, size)
    for t in torch.linspace(-radius, radius, 4 * size):
        kernel[round(radius + float(t) * math.sin(angle)), round(radius + float(t) * math.cos(angle))] = 1
    return _filter(image, kernel / kernel.sum())


def zoom_blur(image, severity, g):
    """The average of the image zoomed about its centre by each factor (bilinear), as ImageNet-C's."""
    zooms = (torch.arange(1, 1.11, 0.01), torch.arange(1, 1.16, 0.01), torch.arange(1, 1.21, 0.02),
             torch.arange(1, 1.26, 0.02), torch.arange(1, 1.31, 0.03))[severity - 1]
    x = _float(image)
    H, W = x.shape[-2:]
    total = torch.zeros_like(x)
    for zoom in zooms.tolist():
        h, w = max(1, round(H / zoom)), max(1, round(W / zoom))
        top, left = (H - h) // 2, (W - w) // 2
        crop = x[None, :, top:top + h, left:left + w]
        total += F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=False)[0]
    return _uint8((x + total) / (len(zooms) + 1))


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) cloud in [0, 1] by the diamond-square algorithm (ImageNet-C's fog), size a power of 2."""
    cloud = np.zeros((size, size))
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = cloud[0:size:step, 0:size:step]
        means = (corners + np.roll(corners, -1, 0) + np.roll(corners, -1, 1) + np.roll(np.roll(corners, -1, 0), -1, 1))
        cloud[half:size:step, half:size:step] = means / 4 + rng.uniform(-wibble, wibble, means.shape)  # squares
        for axis in (0, 1):  # diamonds: the points between two corners, from their four neighbours
            rows, cols = (slice(half, size, step), slice(0, size, step)) if axis == 0 else \
                (slice(0, size, step), slice(half, size, step))
            centres = cloud[half:size:step, half:size:step]
            corners = cloud[0:size:step, 0:size:step]
            if axis == 0:
                total = corners + np.roll(corners, -1, 0) + centres + np.roll(centres, 1, 1)
            else:
                total = corners + np.roll(corners, -1, 1) + centres + np.roll(centres, 1, 0)
            cloud[rows, cols] = total / 4 + rng.uniform(-wibble, wibble, total.shape)
        step, wibble = half, wibble / decay
    cloud -= cloud.min()
    return cloud / max(cloud.max(), 1e-12)


def fog(image, severity, g):
    strength, decay = ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[severity - 1]
    x = _float(image)
    H, W = x.shape[-2:]
    size = 1 << max(H, W, 2).__sub__(1).bit_length()  # the next power of two
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (), generator=g)))
    cloud = torch.from_numpy(plasma_fractal(size, decay, rng)[:H, :W]).float()
    peak = x.max()
    return _uint8((x + strength * cloud) * peak / (peak + strength))


def brightness(image, severity, g):
    shift = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]  # added to V of HSV, as ImageNet-C does
    x = _float(image)
    value = x.amax(0, keepdim=True)
    return _uint8(x * ((value + shift).clamp(max=1) / value.clamp(min=1e-6)))


def contrast(image, severity, g):
    return TF.adjust_contrast(image, (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1])


def saturate(image, severity, g):
    return TF.adjust_saturation(image, (0.0, 0.1, 2.0, 5.0, 20.0)[severity - 1])  # Cityscapes-C's, in factors


def jpeg_compression(image, severity, g):
    buffer = io.BytesIO()  # Pillow's encoder (torchvision's own image encoding is deprecated for TorchCodec)
    quality = (25, 18, 15, 10, 7)[severity - 1]
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="JPEG", quality=quality)
    return torch.from_numpy(np.array(Image.open(buffer).convert("RGB"))).permute(2, 0, 1).contiguous()


def pixelate(image, severity, g):
    c = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1]
    H, W = image.shape[-2:]
    small = F.interpolate(image[None].float(), size=(max(1, int(H * c)), max(1, int(W * c))), mode="area")  # PIL's BOX
    return F.interpolate(small, size=(H, W), mode="nearest")[0].round().to(torch.uint8)


CORRUPTIONS = {  # the four families of ImageNet-C / Cityscapes-C
    "noise": {"gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
              "speckle_noise": speckle_noise},
    "blur": {"defocus_blur": defocus_blur, "motion_blur": motion_blur, "zoom_blur": zoom_blur,
             "gaussian_blur": gaussian_blur},
    "weather": {"fog": fog},
    "digital": {"brightness": brightness, "contrast": contrast, "saturate": saturate,
                "jpeg_compression": jpeg_compression, "pixelate": pixelate},
}
ALL = {name: function for family in CORRUPTIONS.values() for name, function in family.items()}


class Corruption:
    """One corruption at one severity, applied to sample `index` with a generator seeded from (its name,
    the severity, the index): the same corrupted image every time, whatever the workers."""

    def __init__(self, name: str, severity: int):
        if name not in ALL:
            raise ValueError(f"unknown corruption {name!r}; expected one of {', '.join(ALL)}")
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be 1..5, got {severity}")
        self.name, self.severity = name, severity
        self.seed = list(ALL).index(name) * 1000 + severity

    def __call__(self, image: torch.Tensor, index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return ALL[self.name](image, self.severity, g)


def parse_corruptions(text: str) -> list[str]:
    """'all', a family (noise, blur, weather, digital) or names, comma-separated -> the corruption names."""
    names = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        if item == "all":
            names += list(ALL)
        elif item in CORRUPTIONS:
            names += list(CORRUPTIONS[item])
        elif item in ALL:
            names.append(item)
        else:
            raise ValueError(f"unknown corruption {item!r}; expected all, {', '.join(CORRUPTIONS)} or some of "
                             f"{', '.join(ALL)}")
    return list(dict.fromkeys(names))
