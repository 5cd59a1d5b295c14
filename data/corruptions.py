"""Common corruptions at five severities, for the robustness evaluation of SegFormer's section 4.4
(Cityscapes-C, made as ImageNet-C is: Hendrycks & Dietterich, ICLR 2019).

Each corruption takes a uint8 (3, H, W) image and a torch generator (seeded per corruption, severity and
sample: the same corrupted set every time) and returns a uint8 image of the same size. The severities'
parameters are ImageNet-C's (its `make_imagenet_c.py`, as the `imagecorruptions` package carries them);
the operations are torchvision's transforms v2 where it has them (Gaussian blur, contrast, saturation),
Pillow's JPEG encoder, and a few lines of torch each for the rest.

The `imagecorruptions` package, which Cityscapes-C was made with, does not install here (nor run on
NumPy 2 and scikit-image 0.19+: its glass blur, Gaussian blur and fog fail; it needs `pkg_resources`), so
its algorithms are written again below: motion blur and snow's streaks are its NumPy stand-in for
ImageMagick's (`_streak`), glass blur its local shuffle (`_jostle`), zoom blur and snow its `clipped_zoom`,
spatter its Gaussian layer and, for water, its OpenCV steps through OpenCV itself (the `robustness`
extra), fog its plasma fractal; tests/test_evaluation.py checks `_streak`, `_jostle`, `clipped_zoom` and
spatter against the reference's own lines. Brightness shifts the value channel of HSV as ImageNet-C does.

Left out, and why: frost, which blends one of six photographs of frost that ship with ImageNet-C and that
we do not have. That is 15 of the paper's 16; zoom blur and pixelation are ImageNet-C's, beyond the paper's
list.
"""

import importlib.util
import io
import math
import zlib

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
    return _gaussian(image, (1, 2, 3, 4, 6)[severity - 1])


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


def _streak(x, radius: int, sigma: float, angle: float):
    """ImageMagick's motion blur as ImageNet-C's `_motion_blur` does it without ImageMagick: the sum of
    2 radius + 1 copies of x (C, H, W), each moved one more pixel along `angle` (degrees) and weighted by a
    one-sided Gaussian of `sigma`, the edges repeated; copies moved past the image are left out."""
    width = 2 * radius + 1
    weights = torch.exp(-torch.arange(width, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    weights /= weights.sum()
    point = (width * math.sin(math.radians(angle)), width * math.cos(math.radians(angle)))
    length = math.hypot(*point)
    H, W = x.shape[-2:]
    padded = F.pad(x[None], (width, width, width, width), mode="replicate")[0]
    total = torch.zeros_like(x)
    for i, weight in enumerate(weights.tolist()):  # the copy's offset, rounded as ImageNet-C rounds it
        down, right = -math.ceil(i * point[0] / length - 0.5), -math.ceil(i * point[1] / length - 0.5)
        if abs(down) >= H or abs(right) >= W:
            break
        total += weight * padded[:, width - down:width - down + H, width - right:width - right + W]
    return total


def motion_blur(image, severity, g):
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[severity - 1]
    angle = float(torch.empty(()).uniform_(-45, 45, generator=g))
    return _uint8(_streak(_float(image), radius, sigma, angle))


def glass_blur(image, severity, g):
    """Blur, move pixels about locally (`_jostle`), blur again."""
    sigma, d, iterations = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))[severity - 1]
    return _gaussian(_jostle(_gaussian(image, sigma), d, iterations, g), sigma)


def _jostle(image, d: int, iterations: int, g):
    """ImageNet-C's local shuffle: for each pixel, bottom-right to top-left, `iterations` times, the pixel
    takes the value now at a random offset in [-d, d) (numpy's randint). Its code writes this as a swap, but
    a tuple swap of numpy views of RGB pixels copies one way: the pixel takes the other's value and the other
    keeps its own. Sequential (a value can travel), so it runs on a list of source indices, gathered once."""
    C, H, W = image.shape
    rows, cols = torch.arange(H - d, d, -1), torch.arange(W - d, d, -1)
    here = (rows[:, None] * W + cols[None]).flatten()  # the visiting order
    source = list(range(H * W))  # source[p]: the pixel of `image` whose value p holds now
    for _ in range(iterations):
        offset = torch.randint(-d, d, (len(here), 2), generator=g)  # (dx, dy) per pixel, as drawn there
        for a, b in zip(here.tolist(), (here + offset[:, 1] * W + offset[:, 0]).tolist()):
            source[a] = source[b]
    return image.flatten(1)[:, source].view(C, H, W)


def _gaussian(image, sigma: float):
    return TF.gaussian_blur(image, kernel_size=2 * math.ceil(3 * sigma) + 1, sigma=float(sigma))


def _clipped_zoom(x, zoom: float):
    """ImageNet-C's `clipped_zoom` of x (C, H, W): the centre ceil(H / zoom) x ceil(W / zoom), enlarged by
    `zoom` (linear, corners to corners, as scipy's zoom of order 1), its first H rows and W columns."""
    H, W = x.shape[-2:]
    h, w = math.ceil(H / zoom), math.ceil(W / zoom)
    top, left = (H - h) // 2, (W - w) // 2
    crop = x[None, :, top:top + h, left:left + w]
    size = (round(h * zoom), round(w * zoom))
    return F.interpolate(crop, size=size, mode="bilinear", align_corners=True)[0, :, :H, :W]


def zoom_blur(image, severity, g):
    """The average of the image and its zoomed copies (zooming in about the centre), as ImageNet-C's."""
    zooms = (torch.arange(1, 1.11, 0.01), torch.arange(1, 1.16, 0.01), torch.arange(1, 1.21, 0.02),
             torch.arange(1, 1.26, 0.02), torch.arange(1, 1.31, 0.03))[severity - 1]
    x = _float(image)
    total = sum(_clipped_zoom(x, zoom) for zoom in zooms.tolist())
    return _uint8((x + total) / (len(zooms) + 1))


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) cloud in [0, 1] by the diamond-square algorithm (ImageNet-C's fog), size a power of 2.
    Each step's random part is wibble * U(-wibble, wibble), as ImageNet-C's: it shrinks by decay**2 a step."""
    cloud = np.zeros((size, size))
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = cloud[0:size:step, 0:size:step]
        means = (corners + np.roll(corners, -1, 0) + np.roll(corners, -1, 1) + np.roll(np.roll(corners, -1, 0), -1, 1))
        # squares: each centre from its four corners
        cloud[half:size:step, half:size:step] = means / 4 + wibble * rng.uniform(-wibble, wibble, means.shape)
        for axis in (0, 1):  # diamonds: the points between two corners, from their four neighbours
            rows, cols = (slice(half, size, step), slice(0, size, step)) if axis == 0 else \
                (slice(0, size, step), slice(half, size, step))
            centres = cloud[half:size:step, half:size:step]
            corners = cloud[0:size:step, 0:size:step]
            if axis == 0:
                total = corners + np.roll(corners, -1, 0) + centres + np.roll(centres, 1, 1)
            else:
                total = corners + np.roll(corners, -1, 1) + centres + np.roll(centres, 1, 0)
            cloud[rows, cols] = total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)
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


def snow(image, severity, g):
    """ImageNet-C's snow: a layer of Gaussian flakes, zoomed, thresholded and streaked by a motion blur
    falling at -135..-45 degrees, added twice (once turned 180 degrees) to the image whitened towards its grey."""
    loc, scale, zoom, threshold, radius, sigma, keep = (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7), (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65), (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55))[severity - 1]
    x = _float(image)
    H, W = x.shape[-2:]
    flakes = _clipped_zoom(torch.randn(1, H, W, generator=g) * scale + loc, zoom)
    flakes = flakes.masked_fill(flakes < threshold, 0).clamp(0, 1)
    flakes = _streak(flakes, radius, sigma, float(torch.empty(()).uniform_(-135, -45, generator=g)))
    flakes = (flakes * 255).round() / 255
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]  # OpenCV's RGB2GRAY
    x = keep * x + (1 - keep) * torch.maximum(x, grey * 1.5 + 0.5)
    return _uint8(x + flakes + flakes.flip(-2, -1))


def _smooth(x, sigma: float):
    """scipy's (and scikit-image's) gaussian_filter of a (H, W) float map: truncated at 4 sigma, the edges
    repeated ('nearest'), one axis at a time."""
    radius = int(4 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-t ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    x = F.pad(x[None, None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return F.conv2d(x, kernel.view(1, 1, 1, -1))[0, 0]


def spatter(image, severity, g):
    """ImageNet-C's spatter: a blurred, thresholded Gaussian layer as drops of water (severities 1-3: pale
    turquoise, brightest along the drops' Canny edges, through OpenCV as ImageNet-C does) or of mud (4-5:
    brown, opaque)."""
    loc, scale, sigma, threshold, intensity, mud = (
        (0.65, 0.3, 4, 0.69, 0.6, 0), (0.65, 0.3, 3, 0.68, 0.6, 0), (0.65, 0.3, 2, 0.68, 0.5, 0),
        (0.65, 0.3, 1, 0.65, 1.5, 1), (0.67, 0.4, 1, 0.65, 1.5, 1))[severity - 1]
    x = _float(image).double()
    H, W = x.shape[-2:]
    liquid = _smooth(torch.randn(H, W, generator=g, dtype=torch.float64) * scale + loc, sigma)
    liquid = liquid.masked_fill(liquid < threshold, 0)
    if mud:
        m = _smooth((liquid > threshold).double(), intensity)
        m = m.masked_fill(m < 0.8, 0)
        brown = torch.tensor([63, 42, 20], dtype=torch.float64).view(3, 1, 1) / 255
        return _uint8((x * (1 - m) + brown * m).float())
    drops = (liquid * 255).to(torch.uint8)  # ImageNet-C goes on with the layer in 8 bits
    m = drops.double() * torch.from_numpy(_drop_edges(drops.numpy())).double()
    m = m / m.max().clamp(min=1e-12) * intensity
    turquoise = torch.tensor([175, 238, 238], dtype=torch.float64).view(3, 1, 1) / 255
    return _uint8((x + m * turquoise).float())


def _drop_edges(liquid):
    """ImageNet-C's OpenCV steps for water drops (uint8 (H, W) -> float32): the distance to the drops'
    Canny edges, capped at 20, blurred, equalised, embossed, blurred."""
    try:
        import cv2
    except ImportError:
        raise ImportError("the spatter corruption needs OpenCV, as ImageNet-C's: pip install "
                          "opencv-python-headless (the project's 'robustness' extra)") from None
    distance = cv2.distanceTransform(255 - cv2.Canny(liquid, 50, 150), cv2.DIST_L2, 5)
    _, distance = cv2.threshold(distance, 20, 20, cv2.THRESH_TRUNC)
    distance = cv2.equalizeHist(cv2.blur(distance, (3, 3)).astype(np.uint8))
    emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
    return cv2.blur(cv2.filter2D(distance, cv2.CV_8U, emboss), (3, 3)).astype(np.float32)


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
    "blur": {"defocus_blur": defocus_blur, "glass_blur": glass_blur, "motion_blur": motion_blur,
             "zoom_blur": zoom_blur, "gaussian_blur": gaussian_blur},
    "weather": {"snow": snow, "spatter": spatter, "fog": fog},
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
        self.seed = zlib.crc32(name.encode()) * 10 + severity  # by name: adding a corruption changes no other

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
    names = list(dict.fromkeys(names))
    if "spatter" in names and importlib.util.find_spec("cv2") is None:
        raise ValueError("spatter needs OpenCV, as ImageNet-C's does: pip install opencv-python-headless (the "
                         "'robustness' extra), or name the others")
    return names
