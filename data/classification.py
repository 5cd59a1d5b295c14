"""Images and their class, for pre-training the encoder as an image classifier (pretrain.py).

Sources, each with the split expressions of `data.sources` ("train", "train[:500]", "validation[:10%]"):

* "synthetic": 64x64 crops of the built-in synthetic scenes (a random stream of their own, not the
  segmentation set's scenes), each labelled with the one of the 7 scene classes that covers at least half
  of it, the classes in turn: an offline task whose features are the ones segmenting needs.
* an ImageFolder directory (torchvision's): `<root>/<split>/<class>/*.jpg` with splits `train`/`training`
  and `val`/`validation`; a root whose folders are the classes themselves is one split, divided 80/20 by
  the guide's `train_test_split` (training never sees a validation image).
* a Hugging Face image-classification dataset (a hub id, a `save_to_disk` directory, parquet files): an
  image column and a label column (`ClassLabel` names the classes).

Transforms (`transform`): the DeiT recipe that NVlabs pre-trained MiT with (Touvron et al. 2021, as PVT
and SegFormer's configs): RandomResizedCrop, horizontal flip, RandAugment (2 ops, magnitude 9), in the
workers on bytes; random erasing, mixup and cutmix on the batch where the model runs (pretrain.py).
Evaluation: resize to size / 0.875, centre crop. All torchvision transforms v2, seeded per (seed, epoch,
sample) like the segmentation pipeline.
"""

import glob
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
from PIL import Image

from segformer.errors import DataError
from segformer.images import decode, is_image_file, to_tensor

from .dataset import _sample_seed
from .sources import apply_slice, holdout, parse_split
from .synthetic import CLASSES as SCENE_CLASSES
from .synthetic import SIZE as SCENE_SIZE
from .synthetic import render_scene

SPLIT_NAMES = {"train": ("train", "training"), "validation": ("val", "validation", "valid"), "test": ("test",)}


class ClassifiedImages:
    """The samples of one split: `items[i]` -> (PIL image, class id, name); `class_names`; `source`."""

    def __init__(self, items, indices, *, class_names, source: str, layout: str):
        self.items, self.indices = items, list(indices)
        self.class_names, self.source, self.layout = list(class_names), source, layout

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.items[self.indices[i]]

    def names(self) -> list[str]:
        return [self.items.name(index) for index in self.indices]


class SyntheticCrops:
    """64x64 crops of synthetic scenes at their native scale, crop i labelled with class (i mod 7), which
    covers most of it (at least half): a clean label for the textures, shapes and colours that
    segmenting the scenes needs."""

    SPLIT_SIZES, CROP, COVER = {"train": 4000, "validation": 400, "test": 400}, 64, 0.5

    def __init__(self, split: str):
        self.split, self.stream = split, {"train": 10, "validation": 11, "test": 12}[split]

    def __len__(self):
        return self.SPLIT_SIZES[self.split]

    def name(self, i: int) -> str:
        return f"synthetic-crop-{self.split}-{i:05d}"

    def __getitem__(self, i: int):
        target, crop = i % len(SCENE_CLASSES), self.CROP
        for attempt in range(200):  # scenes until one shows the class large enough (things take a few)
            rng = np.random.default_rng([0, self.stream, i, attempt])
            image, label = render_scene(rng, SCENE_SIZE)
            shares = window_shares(label, crop, classes=len(SCENE_CLASSES) + 1)  # (8, Y, X)
            good = (shares.argmax(0) == target + 1) & (shares[target + 1] >= self.COVER)
            if good.any():
                break
        else:
            raise DataError(f"{self.name(i)}: no scene with a large {SCENE_CLASSES[target]} in 200 attempts")
        tops, lefts = np.nonzero(good)
        pick = rng.integers(len(tops))
        top, left = tops[pick], lefts[pick]
        return Image.fromarray(image[top:top + crop, left:left + crop]), target, self.name(i)


def window_shares(label: np.ndarray, size: int, classes: int) -> np.ndarray:
    """(classes, H - size + 1, W - size + 1): the share of each class in every size x size window of the
    (H, W) label map, from summed-area tables."""
    one_hot = (label[None] == np.arange(classes)[:, None, None]).astype(np.int32)
    table = np.pad(one_hot.cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
    sums = table[:, size:, size:] - table[:, :-size, size:] - table[:, size:, :-size] + table[:, :-size, :-size]
    return sums / (size * size)


class FolderImages:
    """(image file, class id) pairs of an ImageFolder split."""

    def __init__(self, pairs: list[tuple[Path, int]]):
        self.pairs = pairs

    def __len__(self):
        return len(self.pairs)

    def name(self, i: int) -> str:
        return str(self.pairs[i][0])

    def __getitem__(self, i: int):
        path, label = self.pairs[i]
        return decode(path), label, str(path)


class DatasetImages:
    """The rows of a `datasets.Dataset`: its image column decoded by us (errors name the row), its labels."""

    def __init__(self, dataset, *, image_column: str, label_column: str, origin: str):
        from datasets import Image as ImageFeature
        missing = [c for c in (image_column, label_column) if c not in dataset.column_names]
        if missing:
            raise DataError(f"{origin}: missing column(s) {missing}; the dataset has {dataset.column_names} "
                            f"(choose them with --image-column / --label-column)")
        if isinstance(dataset.features[image_column], ImageFeature):
            dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        self.dataset, self.columns, self.origin = dataset, (image_column, label_column), origin
        names = getattr(dataset.features[label_column], "names", None)  # a ClassLabel names its ids
        values = None if names else sorted(set(dataset[label_column]))  # otherwise: the values, sorted
        self.class_names = list(names) if names else [str(v) for v in values]
        self.class_ids = None if names else {v: i for i, v in enumerate(values)}

    def __len__(self):
        return len(self.dataset)

    def name(self, i: int) -> str:
        return f"{self.origin}[{i}]"

    def __getitem__(self, i: int):
        row = self.dataset[i]
        image, label = row[self.columns[0]], row[self.columns[1]]
        label = self.class_ids[label] if self.class_ids is not None else int(label)
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        if isinstance(image, Image.Image):
            return image, label, self.name(i)
        return decode(image, self.name(i)), label, self.name(i)


def image_folder_split(root: Path, split: str) -> tuple[list, list[str], bool]:
    """((path, class) pairs, class names, whether the folder has one split only) of an ImageFolder."""
    folders = {p.name: p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    named = next((folders[n] for n in SPLIT_NAMES.get(split, (split,)) if n in folders), None)
    single = not any(n in folders for names in SPLIT_NAMES.values() for n in names)
    base = root if single else named
    if base is None:
        raise DataError(f"{root}: no split {split!r}; it has {sorted(folders)}")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{base}: no class folders in it (expected {base}/<class>/*.jpg)")
    pairs = [(path, c) for c, name in enumerate(classes)
             for path in sorted(p for p in (base / name).rglob("*") if is_image_file(p))]
    return pairs, classes, single


def open_images(source: str, split: str, *, train: bool, test_size: float | None = None,
                image_column: str = "image", label_column: str = "label") -> ClassifiedImages:
    """The images of `split` of `source` (see the module's docstring)."""
    name, bounds, percent = parse_split(split)
    if source == "synthetic":
        items = SyntheticCrops("validation" if name in ("validation", "val", "test") else "train")
        indices = apply_slice(list(range(len(items))), bounds, percent)
        return ClassifiedImages(items, indices, class_names=SCENE_CLASSES, source=source,
                                layout="synthetic scene crops")
    path = Path(source)
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        pairs, classes, single = image_folder_split(path, name)
        items, layout = FolderImages(pairs), "image folder"
    else:
        items, single = _hf_images(source, split, name, image_column, label_column)
        classes, layout = items.class_names, "Hugging Face dataset"
        if not single:
            bounds = None  # load_dataset has read the slice
    indices = apply_slice(list(range(len(items))), bounds, percent)
    if single and test_size is None:
        test_size = 0.2  # one split only: the guide's holdout, on both sides
    if test_size:
        indices = holdout(indices, train=train, test_size=test_size, seed=0, source=source)
    if not indices:
        raise DataError(f"{source}: split {split!r} is empty")
    return ClassifiedImages(items, indices, class_names=classes, source=source, layout=layout)


def _hf_images(source: str, split: str, name: str, image_column: str, label_column: str):
    from datasets import DatasetDict, load_dataset, load_from_disk
    path = Path(source)
    if path.is_dir():
        loaded = load_from_disk(str(path))
        if isinstance(loaded, DatasetDict):
            found = next((n for n in SPLIT_NAMES.get(name, (name,)) if n in loaded), None)
            if found is None and len(loaded) != 1:
                raise DataError(f"{source}: no split {name!r}; it has {list(loaded)}")
            key = found or next(iter(loaded))
            return DatasetImages(loaded[key], image_column=image_column, label_column=label_column,
                                 origin=f"{source}:{key}"), found is None
        return DatasetImages(loaded, image_column=image_column, label_column=label_column, origin=source), True
    files = sorted(glob.glob(source)) if any(c in source for c in "*?[") else [source]
    if all(f.endswith(".parquet") and Path(f).is_file() for f in files):
        dataset = load_dataset("parquet", data_files=files, split="train")
        return DatasetImages(dataset, image_column=image_column, label_column=label_column, origin=source), True
    if path.exists():
        raise DataError(f"{source}: not an image folder, a save_to_disk directory or parquet files")
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:  # a path, not an "org/name" hub id
        raise DataError(f"{source}: no such file or directory")
    try:
        dataset = load_dataset(source, split=split)
    except (ConnectionError, FileNotFoundError) as e:
        raise DataError(f"{source}: not a local dataset, and the hub cannot provide it ({e}); offline, use "
                        f"'synthetic', an image folder, a save_to_disk directory or parquet files") from None
    return DatasetImages(dataset, image_column=image_column, label_column=label_column, origin=source), False


def transform(*, train: bool, size: int, min_crop: float = 0.08):
    """The DeiT recipe's per-image part (on uint8 tensors): a random crop of at least `min_crop` of the
    area, resized to `size`; or the evaluation's resize and centre crop."""
    if not train:
        return T.Compose([T.Resize(round(size / 0.875), antialias=True), T.CenterCrop(size)])
    return T.Compose([T.RandomResizedCrop(size, scale=(min_crop, 1.0), antialias=True), T.RandomHorizontalFlip(),
                      T.RandAugment(num_ops=2, magnitude=9)])


class ClassificationDataset(torch.utils.data.Dataset):
    """Samples as bytes, {"pixel_values": uint8 (3, size, size), "labels": class id}: the segmentation
    dataset's batch format (data.dataset), so the same loader, sampler and error handling serve both."""

    def __init__(self, samples: ClassifiedImages, *, train: bool, size: int, min_crop: float = 0.08, seed: int = 0):
        self.samples, self.train, self.seed = samples, train, seed
        self.transform = transform(train=train, size=size, min_crop=min_crop)
        self.class_names = samples.class_names

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        try:
            image, label, _ = self.samples[index]
            image = to_tensor(image)
        except DataError as e:
            if torch.utils.data.get_worker_info() is None:
                raise
            return {"error": str(e)}  # raised by the loader in the main process, as one line
        with torch.random.fork_rng(devices=[]):  # repeatable whatever the workers, restored afterwards
            torch.manual_seed(_sample_seed(self.seed, epoch, index))
            image = self.transform(image)
        return {"pixel_values": image, "labels": torch.tensor(label)}
