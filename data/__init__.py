"""Data for SegFormer: sources (`sources.py`: synthetic scenes, dataset folders, Hugging Face datasets), the
folder layouts recognised (`folders.py`: ADE20K, Cityscapes, Pascal VOC, mmsegmentation, COCO, LabelMe, CVAT,
as one ordered table, FOLDER_LAYOUTS), the `dataset.json` schema (`manifest.py`), labelling tools' formats
(`labelling.py`), the label spec decided once (`spec.py`), label mappings (`mapping.py`), joint image/mask
transforms identical to the reference image processor, and the DataLoader. `python -m data <source>` checks
a data set.

    from data import batch_to_device, build_dataset, build_loader
    ds = build_dataset("synthetic", split="validation")
    ds[0]  # {"pixel_values": uint8 (3, 128, 128), "labels": uint8 (128, 128)}: bytes, as workers hand them on
    loader = build_loader(ds, batch_size=2, num_workers=2, seed=0)
    pixel_values, labels = batch_to_device(next(iter(loader)), "cpu")  # normalised float (2, 3, 128, 128), int64
"""

from dataclasses import replace

from segformer.bands import Bands, band_statistics, to_band_tensor
from segformer.errors import DataError

from .dataset import SegmentationDataset, batch_to_device, build_loader, collate
from .mapping import IGNORE_INDEX, LabelMapping
from .sources import Samples, open_source
from .spec import LabelSpec, SourceLabels, decide_labels
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .transforms import build_transform, normalize_batch


def build_dataset(source: "str | Samples", split: str = "validation", *, spec: LabelSpec | None = None,
                  train: bool = False, class_names=None, num_labels: int | None = None,
                  reduce_labels: bool | None = None, size: int | None = None, recipe: str = "guide",
                  eval_mode: str = "resize", test_size: float | None = None, split_seed: int = 0,
                  image_column: str = "image", annotation_column: str = "annotation",
                  dataset_config: str | None = None, seed: int = 0, skip_bad: bool = False,
                  corruption=None, allow_outside: bool = False) -> SegmentationDataset:
    """A dataset yielding what the guide's transformed dataset yields, as bytes (see `data.dataset`).

    source: "synthetic", a dataset folder, a `save_to_disk` directory, parquet file(s) (a glob is
        fine) or a hub dataset id (`scene_parse_150` is read through its parquet export); or the
        `Samples` that `open_source` returned.
    split: a split expression, "train", "validation", "train[:50]", "train[:10%]".
    spec: the label spec (`data.spec.decide_labels`: classes, label mapping, input size) of a run; without
        one, it is decided here the same way from the data and `class_names`, `num_labels`,
        `reduce_labels` and `size` (by default the data's own classes and convention, and its native size
        or 512).
    train: training transform (`recipe` "guide" or "paper") and shuffling; else the evaluation
        transform (`eval_mode` "resize", the processor's square squash, or "aspect", the paper's).
    test_size: hold out this fraction of `split` by `train_test_split(test_size, seed=split_seed)`
        and take its train part when `train`, its test part otherwise (the guide uses 0.2).
    seed: augmentation seed; skip_bad: warn and skip bad samples instead of raising; corruption: a
        `data.corruptions.Corruption` applied to every image as decoded (the robustness evaluation).
    allow_outside: read the files that the data's own files name outside its folder (`data.sources`' path rule).
    """
    samples = source if isinstance(source, Samples) else open_source(
        source, split, train=train, test_size=test_size, split_seed=split_seed, image_column=image_column,
        annotation_column=annotation_column, dataset_config=dataset_config, allow_outside=allow_outside)
    if len(samples) == 0:
        raise DataError(f"{source}: split {split!r} is empty")
    if spec is None:
        spec, _ = decide_labels(data=samples.labels, id2label=dict(enumerate(class_names)) if class_names else None,
                                id2label_origin="class_names", num_labels=num_labels, reduce_labels=reduce_labels,
                                size=size)
    if isinstance(spec.bands, int):  # a band count alone: the statistics of these images
        spec = replace(spec, bands=measure_bands(samples, spec.bands))
    transform = build_transform(train=train, recipe=recipe, size=spec.size, eval_mode=eval_mode)
    return SegmentationDataset(samples, spec, transform, train=train, seed=seed, skip_bad=skip_bad,
                               corruption=corruption)


def measure_bands(samples: Samples, count: int, *, limit: int = 64) -> Bands:
    """Per-band mean and std of up to `limit` images of `samples` (evenly spread), in stored units; with the
    data's rule for pixels with no data (`"uncovered"`)."""
    step = max(1, len(samples) // limit)
    picked = list(range(0, len(samples), step))[:limit]
    try:
        measured = band_statistics(to_band_tensor(samples[i][0], samples.name(i), count).permute(1, 2, 0).numpy()
                                   for i in picked)
        return replace(measured, nodata=samples.labels.nodata)
    except ValueError as e:  # a band that is no-data everywhere
        raise DataError(f"{samples.name(picked[0])} and the other {len(picked) - 1} images measured: {e}; give "
                        f"the bands' \"mean\" and \"std\" in dataset.json") from None


__all__ = ["build_dataset", "build_loader", "batch_to_device", "collate", "decide_labels", "SegmentationDataset",
           "DataError", "IGNORE_INDEX", "LabelMapping", "LabelSpec", "SourceLabels", "SYNTHETIC_CLASSES",
           "normalize_batch", "open_source", "Samples"]
