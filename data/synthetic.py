"""A built-in synthetic scene set: procedural, deterministic from (seed, split, index), offline.

Each scene has a horizon; above it sky and a wall, below it grass and water ("stuff"), and in front
one to five objects ("things": balls, boxes, roofs) of random size and place that occlude each other
and the background. Every region takes a *random* colour, so colour alone never tells the class:
the model has to learn texture (brick lines, waves, speckle, a smooth gradient), shape and context.
Patches of clutter are labelled 0, "unlabelled", as in ADE20K, so label reduction (0 -> 255 ->
ignored) is exercised exactly as with real data. Pixel noise covers everything.
"""

import numpy as np
from PIL import Image

CLASSES = ("sky", "grass", "water", "wall", "ball", "box", "roof")  # annotation values 1..7
SPLIT_SIZES = {"train": 2000, "validation": 100}
SIZE = 128  # scenes are rendered at 128x128, their natural training and evaluation size
_SPLIT_STREAMS = {"train": 0, "validation": 1, "test": 2}


class SyntheticScenes:
    """A sequence of (image, annotation, name): RGB and mode-L PIL images of `size` x `size`."""

    def __init__(self, split: str = "train", *, size: int = SIZE, length: int | None = None, seed: int = 0):
        if split not in _SPLIT_STREAMS:
            raise ValueError(f"synthetic split must be one of {', '.join(_SPLIT_STREAMS)}, got {split!r}")
        self.split, self.size, self.seed = split, size, seed
        self.length = length if length is not None else SPLIT_SIZES.get(split, 100)

    def __len__(self):
        return self.length

    def name(self, index: int) -> str:
        return f"synthetic-{self.split}-{index:05d}"

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(index)
        image, label = render_scene(np.random.default_rng([self.seed, _SPLIT_STREAMS[self.split], index]), self.size)
        return Image.fromarray(image), Image.fromarray(label), self.name(index)

    def peek(self, index: int):
        """(annotation, (width, height) of the image, name), as folders give them to the dataset doctor."""
        image, annotation, name = self[index]
        return annotation, image.size, name


def render_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8 image and (H, W) uint8 labels in ADE convention (0 unlabelled, 1..7)."""
    H = W = size
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    image = np.zeros((H, W, 3), np.float32)
    label = np.zeros((H, W), np.uint8)

    def paint(region, cls, texture):
        colour = rng.uniform(40, 215, size=3)
        image[region] = colour * texture[region, None]
        label[region] = cls

    horizon = int(H * rng.uniform(0.3, 0.65))
    above, below = yy < horizon, yy >= horizon
    paint(above, 1, 0.75 + 0.5 * (yy / H) + rng.normal(0, 0.02, (H, W)))  # sky: smooth vertical gradient
    if rng.random() < 0.8:  # a wall rising from the horizon: bricks with dark mortar lines
        left, width = rng.integers(0, W // 2), rng.integers(W // 4, W)
        top = rng.integers(0, max(horizon - H // 8, 1))
        period = rng.integers(6, 11)
        row = (yy // period).astype(int)
        mortar = ((yy % period) < 2) | (((xx + (row % 2) * period) % (2 * period)) < 2)
        paint(above & (yy >= top) & (xx >= left) & (xx < left + width), 4, np.where(mortar, 0.45, 1.05))
    split_x = W * rng.uniform(-0.2, 1.2)  # grass and water share the ground, split by a slanted line
    slope = rng.uniform(-1, 1)
    water = below & (xx - slope * (yy - horizon) > split_x)
    grass = below & ~water
    paint(grass, 2, 1.0 + rng.normal(0, 0.28, (H, W)))  # grass: coarse speckle
    period = rng.uniform(4, 8)
    paint(water, 3, 1.0 + 0.3 * np.sin(2 * np.pi * yy / period + 0.3 * np.sin(xx / 5)))  # water: waves

    for _ in range(rng.integers(1, 6)):  # things, drawn in order so that later ones occlude
        kind = rng.integers(5, 8)
        r = rng.uniform(0.06, 0.22) * size
        cy, cx = rng.uniform(0.15, 0.95) * H, rng.uniform(0, 1) * W
        if kind == 5:  # ball: a disc, lit from the top left
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            paint(d2 < r * r, 5, 1.25 - 0.7 * np.sqrt(((yy - cy + r / 2) ** 2 + (xx - cx + r / 2) ** 2)) / (2 * r))
        elif kind == 6:  # box: a rectangle with a dark frame
            h, w = r * rng.uniform(0.6, 1.6), r * rng.uniform(0.6, 1.6)
            inside = (abs(yy - cy) < h) & (abs(xx - cx) < w)
            frame = (abs(yy - cy) > h - 3) | (abs(xx - cx) > w - 3)
            paint(inside, 6, np.where(frame, 0.4, 1.0))
        else:  # roof: a triangle with diagonal stripes
            inside = (yy < cy + r) & (abs(xx - cx) < (yy - (cy - r)) * 0.8)
            paint(inside, 7, 0.8 + 0.3 * (((xx + yy) // 4) % 2))

    for _ in range(rng.integers(0, 3)):  # clutter: unlabelled blobs of noise, as ADE's "other"
        cy, cx, r = rng.uniform(0, H), rng.uniform(0, W), rng.uniform(0.02, 0.06) * size
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        image[blob] = rng.uniform(0, 255, (int(blob.sum()), 3))
        label[blob] = 0

    image += rng.normal(0, 6, image.shape)  # sensor noise everywhere
    return image.clip(0, 255).astype(np.uint8), label
