"""What a split's annotations hold, read once: pixels per class, image sizes, values outside the classes,
colours outside the palette. The images themselves are not decoded (their sizes come from the headers).

Used by the dataset doctor (`python -m data`), by `train.py`'s check of both splits before it trains (a bad
file found at the first evaluation would cost the steps before it), and by `--class-weights auto`, whose
weights are
median frequency balancing (Eigen & Fergus, ICCV 2015): freq(c) = pixels of class c / labelled pixels of
the images in which c appears, and weight(c) = median over classes of freq / freq(c), so that a class
as common as the median weighs 1, rarer ones more. A class that never appears weighs 1.
"""

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from segformer.errors import DataError
from segformer.files import read_json

from .dataset import annotation_to_tensor, size_mismatch
from .mapping import IGNORE_INDEX, LabelMapping


@dataclass
class SplitStats:
    num_labels: int
    images: int = 0
    pixels: np.ndarray = None  # (K,) labelled pixels per class
    image_pixels: np.ndarray = None  # (K,) labelled pixels of the images in which each class appears
    images_with: np.ndarray = None  # (K,) images in which each class appears
    ignored: int = 0  # pixels mapped to 255
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    outside: list = field(default_factory=list)  # (name, values) of annotations with values beyond the classes
    unreadable: list = field(default_factory=list)  # (name, reason): undecodable, unknown colours, size mismatch

    def __post_init__(self):
        for name in ("pixels", "image_pixels", "images_with"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.num_labels, dtype=np.int64))


def read_annotation(samples, i: int, mapping: LabelMapping):
    """(name, image size from its header, class ids) of sample i, or (name, None, the DataError's message)."""
    try:
        annotation, size, name = samples.peek(i)
        labels = mapping.apply(annotation_to_tensor(annotation, name, mapping))
    except DataError as e:
        return samples.name(i), None, str(e)
    if problem := size_mismatch(annotation, name, labels, *size):
        return name, None, problem
    return name, size, labels


def collect(samples, mapping: LabelMapping, num_labels: int, *, progress: bool = True,
            description: str = "reading annotations", threads: int = min(8, os.cpu_count() or 1)) -> SplitStats:
    """Read every annotation of `samples` once (decoded by `threads` threads: PIL's decoders let go of the GIL)."""
    highest = max(num_labels, 2) - 1
    stats = SplitStats(max(num_labels, 2))
    chunk = 4 * threads  # a few annotations in flight per thread: bounded memory
    with ThreadPoolExecutor(threads) as pool, tqdm(total=len(samples), desc=description, unit="annotation",
                                                   disable=not progress) as bar:
        for start in range(0, len(samples), chunk):
            indices = range(start, min(start + chunk, len(samples)))
            for name, size, labels in pool.map(lambda i: read_annotation(samples, i, mapping), indices):
                bar.update(1)
                if size is None:
                    stats.unreadable.append((name, labels))
                else:
                    add_annotation(stats, name, size, labels.long(), highest)
    return stats


def add_annotation(stats: SplitStats, name: str, size: tuple[int, int], labels: torch.Tensor, highest: int) -> None:
    stats.images += 1
    stats.sizes[size] += 1
    ignored = labels == IGNORE_INDEX
    beyond = labels[(labels > highest) & ~ignored].unique()
    if len(beyond):
        stats.outside.append((name, beyond.tolist()))
    counts = torch.bincount(labels[(labels <= highest) & ~ignored], minlength=stats.num_labels).numpy()
    stats.pixels += counts
    present = counts > 0
    stats.image_pixels[present] += counts.sum()
    stats.images_with[present] += 1
    stats.ignored += int(ignored.sum())


def problems(stats: SplitStats) -> list[str]:
    """One line per bad annotation of a split, naming its file: unreadable, of another size than its image,
    of a mode or colours that are not labels, or with values that are not classes."""
    highest = stats.num_labels - 1
    return [reason for _, reason in stats.unreadable] + [
        f"{name}: label values {values[:10]} are not class ids 0..{highest} nor {IGNORE_INDEX} (ignored)"
        for name, values in stats.outside]


def median_frequency_weights(stats: SplitStats) -> list[float]:
    present = stats.pixels > 0
    if not present.any():
        raise DataError("no labelled pixel in the training split: class weights cannot be computed")
    frequency = np.zeros(stats.num_labels)
    frequency[present] = stats.pixels[present] / stats.image_pixels[present]
    weights = np.ones(stats.num_labels)
    weights[present] = np.median(frequency[present]) / frequency[present]
    return [round(float(w), 6) for w in weights]


def read_class_weights(path: str | Path, class_names: list[str]) -> list[float]:
    """A JSON file: a list of one weight per class, or an object {class id or name: weight} (others 1)."""
    path = Path(path)
    raw = read_json(path, error=DataError)
    K = len(class_names)
    if isinstance(raw, list):
        if len(raw) != K:
            raise DataError(f"{path}: {len(raw)} class weights for {K} classes")
        weights = raw
    elif isinstance(raw, dict):
        weights = [1.0] * K
        by_name = {name.strip(): i for i, name in enumerate(class_names)}
        given = {}
        for key, value in raw.items():
            index = int(key) if str(key).isdigit() else by_name.get(str(key).strip())
            if index is None or not 0 <= index < K:
                raise DataError(f"{path}: {key!r} is not a class (ids 0..{K - 1} or names)")
            if index in given:  # by id and by name: one of the two would be dropped without a word
                raise DataError(f"{path}: {given[index]!r} and {key!r} are both class {index}; give it one weight")
            given[index] = key
            weights[index] = value
    else:
        raise DataError(f"{path}: expected a list of weights or an object {{class: weight}}")
    for i, w in enumerate(weights):
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not np.isfinite(w) or w < 0:
            raise DataError(f"{path}: the weight of class {i} ({class_names[i].strip()}) must be a number >= 0, "
                            f"got {w!r}")
    if not any(weights):
        raise DataError(f"{path}: every class weight is 0, so no pixel would count in the loss")
    return [float(w) for w in weights]


def zero_share(samples, mapping: LabelMapping, *, look_at: int = 16) -> tuple[float, int]:
    """(the share of raw value 0 among the pixels of the first `look_at` annotations, how many were read);
    unreadable ones are left for the loader to report."""
    zeros = total = read = 0
    for i in range(min(look_at, len(samples))):
        try:
            annotation, _, _ = samples.peek(i)
            raw = annotation_to_tensor(annotation, samples.name(i), mapping)
        except DataError:
            continue
        zeros, total, read = zeros + int((raw == 0).sum()), total + raw.numel(), read + 1
    return (zeros / total if total else 0.0), read
