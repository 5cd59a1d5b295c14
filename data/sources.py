"""Where samples come from. Each source is a sequence of `(image, annotation, name)` where image and
annotation are PIL images (not yet checked or converted) and name identifies the sample in errors:
a file path, `file row N`, or `dataset[index]`.

* `"synthetic"`: the built-in procedural scenes (`synthetic.py`).
* a dataset folder: ADE20K, Cityscapes, Pascal VOC, mmsegmentation's img_dir/ann_dir, or anything with a
  `dataset.json` manifest (`folders.py`, `manifest.py`);
* Hugging Face datasets: a hub id, a `save_to_disk` directory, or parquet files.

`open_source` returns the `Samples` of one split, which also carry what the source says of its labels
(`Samples.labels`, a `data.spec.SourceLabels`: the class names and colours, and the `LabelMapping` from
stored values to class ids), for `data.spec.decide_labels` to decide the run's labels from.

Split expressions take the `datasets` form: `train`, `train[:50]`, `train[10:20]`, `train[:10%]`.
A source with a single split (a folder of parquet files, one saved Dataset, a flat folder) is divided
with the guide's `train_test_split(test_size=0.2, seed=0)`, whatever split is asked for: `train=True`
takes its train part, otherwise its test part, so training never sees a validation image
(`test_size=0` takes the whole split, for tools that only read).

Folders: hidden files (macOS `._*` AppleDouble files included) are not samples, nor are directories
named like images; a file that cannot be read (a symlink loop, no permission) is a `DataError` naming
it when its sample is loaded, which `skip_bad` can skip.

The path rule: a file that the data's own files name (a COCO `file_name`, a LabelMe `imagePath`, a line of a
split list, a `dataset.json` folder) must lie inside the dataset folder, or inside the folder of a
`--dataset-config` given on the command line. An absolute path, or `..` above the folder, is refused with
one line naming the file that names it, unless the run allows it (`allow_outside`, train.py's
`--allow-outside-data`): a downloaded dataset cannot make a run read, and train on, any file of the machine.
The test is on the path as written (symbolic links inside the folder are followed: they are the machine's
own; every file read must still be a regular file).
"""

import glob
import io
import os
import re
from pathlib import Path

from PIL import Image

from segformer.bands import read_bands
from segformer.errors import DataError
from segformer.files import read_bytes
from segformer.images import decode, displayed_size

from .folders import FolderLayout, detect_folder_layout, refine
from .manifest import read_manifest
from .mapping import ADE, IDENTITY
from .spec import SourceLabels
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import SIZE as SYNTHETIC_SIZE
from .synthetic import SyntheticScenes
from .labelling import open_annotation

# The hub's scene_parse_150 is a loading script, which datasets >= 4 no longer runs; the hub's
# automatic parquet export of it (revision refs/convert/parquet, config "scene_parsing") is read instead.
PARQUET_EXPORTS = {"scene_parse_150": "zhoubolei/scene_parse_150",
                   "zhoubolei/scene_parse_150": "zhoubolei/scene_parse_150"}


def parse_split(split: str) -> tuple[str, slice | None, bool]:
    """'train[10:20%]' -> ('train', slice, is_percent)."""
    m = re.fullmatch(r"\s*(\w+)\s*(?:\[\s*(-?\d*)\s*(%?)\s*:\s*(-?\d*)\s*(%?)\s*\])?\s*", split)
    if not m:
        raise DataError(f"cannot parse split {split!r}; expected e.g. 'train', 'train[:50]', 'validation[:10%]'")
    name, start, start_percent, stop, stop_percent = m.groups()
    if start is None and stop is None and not start_percent and not stop_percent and "[" not in split:
        return name, None, False
    bounds = slice(int(start) if start else None, int(stop) if stop else None)
    return name, bounds, bool(start_percent or stop_percent)


def apply_slice(indices: list[int], bounds: slice | None, percent: bool) -> list[int]:
    if bounds is None:
        return indices
    if percent:
        n = len(indices)
        bounds = slice(None if bounds.start is None else round(bounds.start * n / 100),
                       None if bounds.stop is None else round(bounds.stop * n / 100))
    return indices[bounds]


def holdout(indices: list[int], *, train: bool, test_size: float, seed: int,
            source: str = "the data") -> list[int]:
    """The guide's `Dataset.train_test_split(test_size, seed=seed)`, applied to the sample indices: the
    same parts that call gives on the real dataset, whatever the source."""
    from datasets import Dataset
    if not 0 < test_size < 1:
        raise DataError(f"test_size must be between 0 and 1, got {test_size}")
    if len(indices) == 1:  # train_test_split would leave one side empty
        raise DataError(f"{source}: {len(indices)} sample in one split cannot be divided into training and "
                        f"validation; give it a validation split of its own, or more samples")
    parts = Dataset.from_dict({"index": indices}).train_test_split(test_size=test_size, seed=seed)
    return list(parts["train" if train else "test"]["index"])


class Samples:
    """The samples of one split: `indices` into a source, what the source says of its labels (`labels`),
    and the files of a folder that found no partner (`unpaired`, listed where `open_source(strict=False)`)."""

    def __init__(self, source, indices, *, labels: SourceLabels, unpaired=(), outside=(), generated: bool = False):
        self.source, self.indices, self.labels, self.unpaired = source, list(indices), labels, list(unpaired)
        self.outside = list(outside)  # files named from outside the folder, left out (open_source(strict=False))
        self.generated = generated  # made on the fly (the synthetic scenes): no file to go bad

    @property
    def layout(self) -> str:
        return self.labels.layout

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]

    def name(self, i) -> str:
        """Sample i's name, without decoding anything."""
        return self.source.name(self.indices[i])

    def names(self) -> list[str]:
        return [self.name(i) for i in range(len(self))]

    def peek(self, i):
        """(annotation, (width, height) of the image, name): the image is not decoded."""
        return self.source.peek(self.indices[i])


class FilePairs:
    """(image file, annotation file) pairs. `raw`: images are read at full precision with every band
    ((H, W, C) arrays, segformer/bands.py), not as 8-bit RGB."""

    def __init__(self, pairs: list[tuple[Path, Path]], *, raw: bool = False):
        self.pairs, self.raw = pairs, raw

    def __len__(self):
        return len(self.pairs)

    def name(self, i) -> str:
        return str(self.pairs[i][0])

    def __getitem__(self, i):
        image, annotation = self.pairs[i]  # files; or, from labelling tools, a Drawn annotation (data/labelling.py)
        data = _read(image)
        pixels = read_bands(data, str(image)) if self.raw else decode(data, str(image))
        return pixels, open_annotation(annotation), str(image)

    def peek(self, i):
        image, annotation = self.pairs[i]
        if self.raw:  # TIFFs of many bands: PIL cannot read their header
            height, width = read_bands(_read(image), str(image)).shape[:2]
            return open_annotation(annotation), (width, height), str(image)
        return open_annotation(annotation), displayed_size(_read(image), str(image)), str(image)


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
        image, annotation = (decode(self._bytes(row[c], f"{name} column {c!r}"), f"{name} column {c!r}")
                             for c in self.columns)
        return image, annotation, name

    def peek(self, i):
        row = self.dataset[i]
        name = self.name(i)
        image_column, annotation_column = self.columns
        annotation = decode(self._bytes(row[annotation_column], f"{name} column {annotation_column!r}"),
                            f"{name} column {annotation_column!r}")
        return annotation, displayed_size(self._bytes(row[image_column], name), name), name

    @staticmethod
    def _bytes(value, name) -> bytes:
        if isinstance(value, Image.Image):
            buffer = io.BytesIO()
            value.save(buffer, format="PNG")
            return buffer.getvalue()
        if isinstance(value, dict) and value.get("bytes"):
            return value["bytes"]
        if isinstance(value, dict) and value.get("path"):
            return _read(Path(value["path"]), name)
        raise DataError(f"{name}: expected an image, got {type(value).__name__}")


def _read(path, name: str | None = None) -> bytes:
    """A file's bytes (a regular file's only; see segformer.files.read_bytes), or those of an image inside a
    LabelMe file; an error names the file and the sample `name` that points to it."""
    try:
        if not isinstance(path, Path):  # data.labelling.EmbeddedImage
            return path.read_bytes()
        return read_bytes(path, error=DataError, expected="an image or annotation file")
    except DataError as e:
        raise DataError(f"{name}: {e}" if name else str(e)) from None


def outside_folders(pairs, folders: list[Path]) -> dict[int, str]:
    """The pairs (image, annotation) with a file whose path, as written, leaves every one of `folders`:
    {index: '<file>, named by <annotation>'}."""
    bases = [os.path.normpath(os.path.abspath(folder)) for folder in folders]

    def outside(path) -> bool:
        where = os.path.normpath(os.path.abspath(path))
        return all(os.path.commonpath([base, where]) != base for base in bases)

    found = {}
    for i, (image, annotation) in enumerate(pairs):
        for file in (image, annotation):
            if isinstance(file, Path) and outside(file) and i not in found:
                found[i] = f"{file}" + ("" if file is annotation else f", named by {annotation}")
    return found


def open_source(source: str, split: str, *, train: bool, test_size: float | None = None, split_seed: int = 0,
                image_column: str = "image", annotation_column: str = "annotation",
                dataset_config: str | None = None, strict: bool = True, allow_outside: bool = False) -> Samples:
    """The samples of `split` of `source` (see module docstring). `dataset_config`: a manifest to read
    instead of the folder's own `dataset.json`. `strict=False` lists unpaired files in `.unpaired` and
    files from outside the folder in `.outside` instead of refusing them (the dataset doctor).
    `allow_outside`: read files that the data names outside its folder (the path rule, above)."""
    from segformer.labels import ADE20K_CLASSES, ADE20K_PALETTE
    name, bounds, percent = parse_split(split)
    if source == "synthetic":
        data = SyntheticScenes("validation" if name in ("validation", "val", "test") else "train")
        if test_size:
            raise DataError("the synthetic set has its own validation split; test_size does not apply")
        return Samples(data, apply_slice(list(range(len(data))), bounds, percent), labels=SourceLabels(
            source, "synthetic scenes", class_names=SYNTHETIC_CLASSES, mapping=ADE, known=True,
            native_size=SYNTHETIC_SIZE), generated=True)

    path = Path(source)
    labels, unpaired, outside = None, [], []  # what the source says of its labels
    manifest = Path(dataset_config) if dataset_config else None
    if path.is_dir() and (layout := detect_folder_layout(path, manifest)):
        pairs, unpaired, single = layout.split(name, path)
        if unpaired and strict:
            raise DataError(f"{len(unpaired)} unpaired files (an image without annotation or the reverse): "
                            + ", ".join(unpaired[:10]) + (" ..." if len(unpaired) > 10 else ""))
        found = {} if allow_outside else outside_folders(pairs, [path] + ([manifest.parent] if manifest else []))
        if found and strict:
            raise DataError(f"{path}: {len(found)} file(s) named by the data lie outside the folder: "
                            + "; ".join(list(found.values())[:3]) + (" ..." if len(found) > 3 else "")
                            + " (a dataset may name only its own files; --allow-outside-data to read them)")
        outside = list(found.values())
        pairs = [pair for i, pair in enumerate(pairs) if i not in found]
        data = FilePairs(pairs, raw=layout.bands is not None)
        labels = SourceLabels(source, layout.name, class_names=layout.class_names, palette=layout.palette,
                              mapping=layout.mapping, known=layout.known,
                              assumed=layout.assumed and layout.class_names is not None, bands=layout.bands,
                              nodata=layout.nodata)
    elif path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        data, single = _saved_dataset(path, name, image_column, annotation_column)
        description = "save_to_disk dataset"
    elif files := _parquet_files(source):
        data, single = _parquet_source(files, str(source), image_column, annotation_column), True
        description = f"{len(files)} parquet file(s)"
    elif path.exists():
        raise DataError(f"{source}: not a dataset; expected 'synthetic', a dataset folder (ADE20K, Cityscapes, Pascal "
                        f"VOC, img_dir/ + ann_dir/, or one with a dataset.json), a save_to_disk directory, parquet "
                        f"files, or a hub dataset id")
    elif source.startswith(("/", ".", "~")) or source.count("/") > 1:  # a path, not an "org/name" hub id
        raise DataError(f"{source}: no such file or directory")
    else:
        data, single = _hub_dataset(source, split, name, image_column, annotation_column)
        if not single:
            bounds = None  # load_dataset has read the whole split expression, slice included
        description = "hub dataset"
        if source in PARQUET_EXPORTS:  # SceneParse150 is ADE20K's 150 classes
            labels = SourceLabels(source, description, class_names=ADE20K_CLASSES, palette=ADE20K_PALETTE,
                                  mapping=ADE, known=True)
    if labels is None:  # a manifest may describe the labels of any source; else ADE's convention is the guess
        labels = _manifest_labels(manifest, source, description) if manifest else \
            SourceLabels(source, description, mapping=ADE, known=False)

    indices = list(range(len(data)))
    if single and test_size is None:
        test_size = 0.2  # one split only: hold out 20% as the guide does, on both sides
    indices = apply_slice(indices, bounds, percent)
    if test_size:
        indices = holdout(indices, train=train, test_size=test_size, seed=split_seed, source=source)
    return Samples(data, indices, labels=labels, unpaired=unpaired, outside=outside)


def _manifest_labels(path: Path, source: str, description: str) -> SourceLabels:
    manifest = read_manifest(path)
    if manifest.get("splits"):
        raise DataError(f"{path}: key 'splits' describes folders; this source is not one")
    refined = refine(FolderLayout(description, {}, mapping=IDENTITY, known=False), manifest, path)
    if refined.bands is not None:
        raise DataError(f"{path}: key 'bands' applies to image files in folders; this source is not one")
    return SourceLabels(source, refined.name, class_names=refined.class_names, palette=refined.palette,
                        mapping=refined.mapping, known=refined.known)


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
