"""Where samples come from. Each source is a sequence of `(image, annotation, name)` where image and
annotation are PIL images (not yet checked or converted) and name identifies the sample in errors:
a file path, or `dataset[index]`.

* `"synthetic"`: the built-in procedural scenes (`synthetic.py`).
* a folder in the ADEChallengeData2016 layout, `images/{training,validation}/*.jpg` +
  `annotations/{training,validation}/*.png` paired by stem, or a flat `images/` + `annotations/`;
* Hugging Face datasets: a hub id, a `save_to_disk` directory, or parquet files.

Split expressions take the `datasets` form: `train`, `train[:50]`, `train[10:20]`, `train[:10%]`.
A source with a single split (a folder of parquet files, one saved Dataset, a flat folder) is divided
with the guide's `train_test_split(test_size=0.2, seed=0)`, whatever split is asked for: `train=True`
takes its train part, otherwise its test part, so training never sees a validation image
(`test_size=0` takes the whole split, for tools that only read).

Folders: hidden files (macOS `._*` AppleDouble files included) are not samples, nor are directories
named like images; a file that cannot be read (a symlink loop, no permission) is a `DataError` naming
it when its sample is loaded, which `skip_bad` can skip.
"""

import glob
import io
import re
from pathlib import Path

from PIL import Image

from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import SyntheticScenes

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
ADE_SPLITS = {"train": "training", "training": "training", "validation": "validation", "val": "validation",
              "test": "validation"}
# The hub's scene_parse_150 is a loading script, which datasets >= 4 no longer runs; the hub's
# automatic parquet export of it (revision refs/convert/parquet, config "scene_parsing") is read instead.
PARQUET_EXPORTS = {"scene_parse_150": "zhoubolei/scene_parse_150",
                   "zhoubolei/scene_parse_150": "zhoubolei/scene_parse_150"}


class DataError(ValueError):
    """Bad input data; the message names the sample or file."""


def parse_split(split: str) -> tuple[str, slice | None, bool]:
    """'train[10:20%]' -> ('train', slice, is_percent)."""
    m = re.fullmatch(r"\s*(\w+)\s*(?:\[\s*(-?\d*)\s*(%?)\s*:\s*(-?\d*)\s*(%?)\s*\])?\s*", split)
    if not m:
        raise ValueError(f"cannot parse split {split!r}; expected e.g. 'train', 'train[:50]', 'validation[:10%]'")
    name, start, p1, stop, p2 = m.groups()
    if start is None and stop is None and not p1 and not p2 and "[" not in split:
        return name, None, False
    return name, slice(int(start) if start else None, int(stop) if stop else None), bool(p1 or p2)


def apply_slice(indices: list[int], sl: slice | None, percent: bool) -> list[int]:
    if sl is None:
        return indices
    if percent:
        n = len(indices)
        sl = slice(None if sl.start is None else round(sl.start * n / 100),
                   None if sl.stop is None else round(sl.stop * n / 100))
    return indices[sl]


def holdout(indices: list[int], *, train: bool, test_size: float, seed: int) -> list[int]:
    """The guide's `Dataset.train_test_split(test_size, seed=seed)`, applied to the sample indices: the
    same parts that call gives on the real dataset, whatever the source."""
    from datasets import Dataset
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be between 0 and 1, got {test_size}")
    parts = Dataset.from_dict({"index": indices}).train_test_split(test_size=test_size, seed=seed)
    return list(parts["train" if train else "test"]["index"])


class Samples:
    """The samples of one split: `indices` into a source, and what the source knows of its labels:
    `class_names` (None when it does not name them) and `reduce_labels` (True where annotations follow
    the ADE convention, 0 = unlabelled and k = class k-1; None where the source does not say)."""

    def __init__(self, source, indices, *, layout: str, class_names=None, reduce_labels: bool | None = None):
        self.source, self.indices, self.layout = source, list(indices), layout
        self.class_names = list(class_names) if class_names else None
        self.reduce_labels = reduce_labels

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]

    def names(self) -> list[str]:
        """Every sample's name, without decoding anything."""
        return [self.source.name(j) for j in self.indices]


def list_images(folder: Path) -> dict[str, Path]:
    """The image files of a folder by stem. Hidden files (macOS `._*` included) and directories are not
    samples; a name that cannot be followed (a symlink loop) is kept, to fail by name when read."""
    found = {}
    for path in folder.iterdir():
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES or path.is_dir():
            continue
        found[path.stem] = path
    return found


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None


class FolderSource:
    """Image/annotation pairs matched by file stem, ordered by stem."""

    def __init__(self, images_dir: Path, annotations_dir: Path):
        images, annotations = list_images(images_dir), list_images(annotations_dir)
        lonely = sorted(set(images) ^ set(annotations))
        if lonely:
            listing = [str(images.get(s) or annotations.get(s)) for s in lonely]
            raise DataError(f"{len(lonely)} unpaired files (an image without annotation or the reverse): "
                            + ", ".join(listing[:10]) + (" ..." if len(listing) > 10 else ""))
        self.pairs = [(images[s], annotations[s]) for s in sorted(images)]

    def __len__(self):
        return len(self.pairs)

    def name(self, i) -> str:
        return str(self.pairs[i][0])

    def __getitem__(self, i):
        image_path, annotation_path = self.pairs[i]
        image = _open(read_file(image_path), str(image_path))
        return image, _open(read_file(annotation_path), str(annotation_path)), str(image_path)


class HFSource:
    """A `datasets.Dataset` read with its image columns undecoded, so that we decode (and name the
    sample in any error) ourselves. `row_names` names rows by file and row where the dataset was read
    from several parquet files."""

    def __init__(self, dataset, *, image_column: str = "image", annotation_column: str = "annotation", origin: str,
                 row_names=None):
        from datasets import Image as ImageFeature
        missing = [c for c in (image_column, annotation_column) if c not in dataset.column_names]
        if missing:
            raise DataError(f"{origin}: missing column(s) {missing}; the dataset has {dataset.column_names} "
                            f"(choose them with image_column= / annotation_column=)")
        for column in (image_column, annotation_column):
            if isinstance(dataset.features[column], ImageFeature):
                dataset = dataset.cast_column(column, ImageFeature(decode=False))
        self.dataset, self.columns, self.origin = dataset, (image_column, annotation_column), origin
        self.row_names = row_names

    def __len__(self):
        return len(self.dataset)

    def name(self, i) -> str:
        return self.row_names(i) if self.row_names else f"{self.origin}[{i}]"

    def __getitem__(self, i):
        row = self.dataset[i]
        name = self.name(i)
        image, annotation = (self._decode(row[c], f"{name} column {c!r}") for c in self.columns)
        return image, annotation, name

    @staticmethod
    def _decode(value, name):
        if isinstance(value, Image.Image):
            return value
        if isinstance(value, dict) and value.get("bytes"):
            return _open(value["bytes"], name)
        if isinstance(value, dict) and value.get("path"):
            try:
                return _open(Path(value["path"]).read_bytes(), name)
            except OSError as e:
                raise DataError(f"{name}: cannot read {value['path']} ({e.strerror or type(e).__name__})") from None
        raise DataError(f"{name}: expected an image, got {type(value).__name__}")


def _open(data: bytes, name: str) -> Image.Image:
    """Decode fully now, so that a corrupt or truncated file fails here with its name."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except Exception as e:
        raise DataError(f"{name}: cannot decode image ({type(e).__name__}: {e})") from None


def open_source(source: str, split: str, *, train: bool, test_size: float | None = None, split_seed: int = 0,
                image_column: str = "image", annotation_column: str = "annotation") -> Samples:
    """The samples of `split` of `source` (see module docstring)."""
    from segformer.labels import ADE20K_CLASSES
    name, sl, percent = parse_split(split)
    if source == "synthetic":
        data = SyntheticScenes("validation" if name in ("validation", "val", "test") else "train")
        if test_size:
            raise ValueError("the synthetic set has its own validation split; test_size does not apply")
        return Samples(data, apply_slice(list(range(len(data))), sl, percent), layout="synthetic scenes",
                       class_names=SYNTHETIC_CLASSES, reduce_labels=True)

    path = Path(source)
    known = {}  # what the source says of its labels
    if path.is_dir() and (path / "images").is_dir() and (path / "annotations").is_dir():
        data, single = _ade_folder(path, name)
        if not single:  # ADEChallengeData2016: the 150 SceneParse classes, 0 = unlabelled
            known = dict(class_names=ADE20K_CLASSES, reduce_labels=True)
        layout = "ADEChallengeData2016 folder" if not single else "images/ + annotations/ folder"
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        data, single = _saved_dataset(path, name, image_column, annotation_column)
        layout = "save_to_disk dataset"
    elif files := _parquet_files(source):
        data, single = _parquet_source(files, str(source), image_column, annotation_column), True
        layout = f"{len(files)} parquet file(s)"
    elif path.exists():
        raise DataError(f"{source}: not a dataset; expected 'synthetic', an ADE-layout folder (images/ + "
                        f"annotations/), a save_to_disk directory, parquet files, or a hub dataset id")
    elif source.startswith(("/", ".", "~")) or source.count("/") > 1:  # a path, not an "org/name" hub id
        raise DataError(f"{source}: no such file or directory")
    else:
        data, single = _hub_dataset(source, split, name, image_column, annotation_column)
        if not single:
            sl = None  # load_dataset has read the whole split expression, slice included
        if source in PARQUET_EXPORTS:  # SceneParse150 is ADE20K's 150 classes
            known = dict(class_names=ADE20K_CLASSES, reduce_labels=True)
        layout = "hub dataset"

    indices = list(range(len(data)))
    if single and test_size is None:
        test_size = 0.2  # one split only: hold out 20% as the guide does, on both sides
    indices = apply_slice(indices, sl, percent)
    if test_size:
        indices = holdout(indices, train=train, test_size=test_size, seed=split_seed)
    return Samples(data, indices, layout=layout, **known)


def _parquet_files(source: str) -> list[str]:
    """The parquet files named by `source`: a file, a glob, or a folder of them ([] if none)."""
    path = Path(source)
    if path.is_dir():
        return [str(p) for p in sorted(path.glob("*.parquet"))]
    files = sorted(glob.glob(source)) if any(ch in source for ch in "*?[") else [source]
    return files if files and all(f.endswith(".parquet") and Path(f).is_file() for f in files) else []


def _parquet_source(files: list[str], origin: str, image_column: str, annotation_column: str) -> HFSource:
    """Parquet files, each checked to be one (a garbage or empty file is named), rows named by file and row."""
    import bisect

    import pyarrow.parquet as pq
    from datasets import load_dataset
    ends = []
    for file in files:
        try:
            rows = pq.read_metadata(file).num_rows
        except Exception as e:
            raise DataError(f"{file}: not a readable parquet file ({str(e).strip() or type(e).__name__})") from None
        ends.append(rows + (ends[-1] if ends else 0))

    def row_name(i):
        k = bisect.bisect_right(ends, i)
        return f"{files[k]} row {i - (ends[k - 1] if k else 0)}"
    dataset = load_dataset("parquet", data_files=files, split="train")
    return HFSource(dataset, image_column=image_column, annotation_column=annotation_column, origin=origin,
                    row_names=row_name if len(files) > 1 else lambda i: f"{files[0]} row {i}")


def _ade_folder(root: Path, split_name: str):
    images, annotations = root / "images", root / "annotations"
    if split_name in ADE_SPLITS and (images / ADE_SPLITS[split_name]).is_dir():
        sub = ADE_SPLITS[split_name]
        return FolderSource(images / sub, annotations / sub), False
    splits = sorted(p.name for p in images.iterdir()  # a directory named like an image is no split
                    if p.is_dir() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_SUFFIXES)
    if splits:
        raise DataError(f"{root}: no split {split_name!r}; found {splits}")
    return FolderSource(images, annotations), True  # flat layout: one split


def _saved_dataset(path: Path, split_name: str, image_column, annotation_column):
    from datasets import DatasetDict, load_from_disk
    loaded = load_from_disk(str(path))
    if isinstance(loaded, DatasetDict):
        if split_name in loaded:
            return HFSource(loaded[split_name], image_column=image_column, annotation_column=annotation_column,
                            origin=f"{path}:{split_name}"), False
        if len(loaded) == 1:
            only = next(iter(loaded))
            return HFSource(loaded[only], image_column=image_column, annotation_column=annotation_column,
                            origin=f"{path}:{only}"), True
        raise DataError(f"{path}: no split {split_name!r}; it has {list(loaded)}")
    return HFSource(loaded, image_column=image_column, annotation_column=annotation_column, origin=str(path)), True


def _hub_dataset(repo_id: str, split: str, name: str, image_column, annotation_column):
    """(samples, single): `split` as load_dataset reads it, or, where the hub dataset has no such split,
    its train split as the only one (single=True), to be divided by a holdout."""
    from datasets import load_dataset
    kwargs = {}
    if repo_id in PARQUET_EXPORTS:
        repo_id, kwargs = PARQUET_EXPORTS[repo_id], {"name": "scene_parsing", "revision": "refs/convert/parquet"}
    columns = dict(image_column=image_column, annotation_column=annotation_column)
    try:
        try:
            return HFSource(load_dataset(repo_id, split=split, **kwargs), origin=f"{repo_id}:{split}", **columns), False
        except ValueError as e:  # unknown split
            if "split" not in str(e).lower() or name == "train":
                raise
            return HFSource(load_dataset(repo_id, split="train", **kwargs), origin=f"{repo_id}:train", **columns), True
    except (ConnectionError, FileNotFoundError) as e:
        raise DataError(f"{repo_id}: not a local dataset, and the hub cannot provide it ({e}). Offline, use "
                        f"'synthetic', an ADE-layout folder, a save_to_disk directory or parquet files") from None
