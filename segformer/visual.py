"""Drawing what the model sees and says: class colours, overlays with a legend, and figures written
atomically. Shared by infer.py, explain.py and the run's reports (training/plots.py, training/eval_report.py). matplotlib is
optional and imported only by `pyplot`."""

import colorsys
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .labels import ADE20K_CLASSES, ADE20K_PALETTE, KNOWN_PALETTES


def palette(num_labels: int, id2label: dict[int, str] | None = None) -> list[tuple[int, int, int]]:
    """The data set's own colours for the ADE20K, Cityscapes and VOC label sets (unnamed 150 labels are
    taken for ADE20K's); otherwise distinct colours spread over the hue circle (golden-ratio steps), the
    same for the same number of labels."""
    names = tuple(id2label.get(i) for i in range(num_labels)) if id2label else None
    if names in KNOWN_PALETTES:
        return list(KNOWN_PALETTES[names])
    if names is None and num_labels == len(ADE20K_CLASSES):
        return list(ADE20K_PALETTE)
    colours = []
    for i in range(num_labels):
        hue = (i * 0.618033988749895) % 1.0
        saturation, value = (0.65, 0.95) if i % 2 == 0 else (0.9, 0.75)
        r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return colours


def class_colours(predicted: list[str], *candidates) -> tuple:
    """A colour per predicted class: the first of `candidates` (palettes: the data's, the checkpoint's, ...;
    None where there is none) with one colour per class, else the known or generated ones (`palette`)."""
    fitting = next((c for c in candidates if c and len(c) == len(predicted)), None)
    if fitting is not None:
        return tuple(map(tuple, fitting))
    return tuple(palette(len(predicted), dict(enumerate(predicted))))


def blend(image: np.ndarray, label_map: np.ndarray, colours, alpha: float = 0.5) -> np.ndarray:
    """(..., H, W, 3) uint8 images and (..., H, W) class ids -> the images with each pixel's class colour
    blended in at opacity `alpha`, uint8."""
    palette = np.asarray(colours, dtype=np.uint8)
    out = np.empty(np.broadcast_shapes(image.shape, (*label_map.shape, 3)), dtype=np.uint8)
    for top in range(0, out.shape[-3], 256):  # a band of rows at a time: no float copy of a large photo
        rows = slice(top, top + 256)
        colour_of = palette[label_map[..., rows, :]]
        out[..., rows, :, :] = ((1 - alpha) * image[..., rows, :, :].astype(np.float32)
                                + alpha * colour_of).round().astype(np.uint8)
    return out


def label_map_image(label_map: np.ndarray, num_classes: int) -> Image.Image:
    """A label map as a PNG-ready image of class ids: mode L, or I;16 past 256 classes."""
    return Image.fromarray(label_map.astype(np.uint8 if num_classes <= 256 else np.uint16))


def overlay(image: Image.Image, label_map: np.ndarray, colours, names: dict, alpha: float = 0.5) -> Image.Image:
    """The image blended with each pixel's class colour, and a legend of the classes present (largest
    first; as many as fit the picture's height)."""
    picture = Image.fromarray(blend(np.asarray(image.convert("RGB")), label_map, colours, alpha))
    present, counts = np.unique(label_map, return_counts=True)
    order = present[np.argsort(-counts, kind="stable")]
    font = ImageFont.load_default(size=max(10, min(image.height // 24, 24)))
    row = font.size + 6
    fit = max(1, (image.height - 8) // row)  # the legend stays within the picture's height
    shown = order if len(order) <= fit else order[:fit - 1]
    lines = [names[int(c)].strip() for c in shown]
    if len(shown) < len(order):
        lines.append(f"+{len(order) - len(shown)} more")
    width = max(int(font.getlength(text)) for text in lines) + row + 16
    canvas = Image.new("RGB", (image.width + width, max(image.height, row * len(lines) + 8)), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, text in enumerate(lines):
        y = 4 + i * row
        if i < len(shown):
            draw.rectangle([image.width + 6, y, image.width + 6 + font.size, y + font.size],
                           fill=tuple(colours[shown[i]]))
        draw.text((image.width + 12 + font.size, y - 1), text, fill="black", font=font)
    return canvas


def pyplot():
    """matplotlib's pyplot on a file-only backend, or None where matplotlib is not installed (a warning
    says so, once)."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn("plots need matplotlib (pip install matplotlib); the numbers are written without them",
                      stacklevel=2)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(plt, figure, path: Path, dpi: int = 100) -> None:
    """Lay out, write atomically (a run killed mid-write leaves the previous PNG, never half of one), close."""
    from .files import atomic_write
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=dpi, format="png"))
    plt.close(figure)
