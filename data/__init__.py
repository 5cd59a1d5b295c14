"""Data for SegFormer: sources (synthetic scenes, dataset folders in the ADE20K, Cityscapes, Pascal VOC,
mmsegmentation or manifest layouts, Hugging Face datasets), label mappings, joint image/mask transforms
identical to the reference image processor, and the DataLoader. `python -m data <source>` checks a data set.

    from data import build_dataset, build_loader
    ds = build_dataset("synthetic", split="validation", train=False, num_labels=7, size=128)
    ds[0]  # {"pixel_values": float (3, H, W), "labels": int64 (H, W)}
    loader = build_loader(ds, batch_size=2, shuffle=True, num_workers=2, seed=0)
"""

from .dataset import SegmentationDataset, build_loader, collate
from .errors import DataError
from .mapping import IGNORE_INDEX, LabelMapping
from .sources import Samples, open_source
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .transforms import build_transform, normalize_batch, reduce_labels

SYNTHETIC_SIZE = 128  # the synthetic scenes are rendered at 128x128, their default training size


def build_dataset(source: "str | Samples", split: str = "validation", *, train: bool = False,
                  class_names=None, num_labels: int | None = None, reduce_labels: bool | None = None,
                  size: int | None = None, recipe: str = "guide", eval_mode: str = "resize",
                  test_size: float | None = None, split_seed: int = 0, image_column: str = "image",
                  annotation_column: str = "annotation", dataset_config: str | None = None, seed: int = 0,
                  skip_bad: bool = False, uint8: bool = False) -> SegmentationDataset:
    """A dataset yielding what the guide's transformed dataset yields.

    source: "synthetic", an ADE-layout folder, a `save_to_disk` directory, parquet file(s) (a glob is
        fine) or a hub dataset id (`scene_parse_150` is read through its parquet export); or the
        `Samples` that `open_source` returned.
    split: a split expression, "train", "validation", "train[:50]", "train[:10%]".
    train: training transform (`recipe` "guide" or "paper") and shuffling; else the evaluation
        transform (`eval_mode` "resize", the processor's 512x512 squash, or "aspect", the paper's).
    class_names / num_labels: the classes after reduction; by default the source's own list (ADE20K
        folders and SceneParse150 name their 150 classes, the synthetic set its 7). A source that names
        none needs one of them.
    reduce_labels: 0 -> 255, k -> k-1 (the ADE convention); by default the source's own label mapping
        (`samples.mapping`: ADE20K's, Cityscapes' labelIds -> trainIds, VOC's indices, a manifest's), and
        ADE's where the source does not say.
    test_size: hold out this fraction of `split` by `train_test_split(test_size, seed=split_seed)`
        and take its train part when `train`, its test part otherwise (the guide uses 0.2).
    seed: augmentation seed; skip_bad: warn and skip bad samples instead of raising.
    uint8: samples as bytes (pixels and labels), to be normalised on the device by `normalize_batch`.
    """
    samples = source if isinstance(source, Samples) else open_source(
        source, split, train=train, test_size=test_size, split_seed=split_seed, image_column=image_column,
        annotation_column=annotation_column, dataset_config=dataset_config)
    if len(samples) == 0:
        raise DataError(f"{source}: split {split!r} is empty")
    class_names = list(class_names or samples.class_names or [f"LABEL_{i}" for i in range(num_labels or 0)])
    if not class_names:
        raise DataError(f"{source}: the data does not name its classes; give num_labels or class_names")
    if num_labels is not None and num_labels != len(class_names):
        raise DataError(f"{source}: num_labels={num_labels} but {len(class_names)} class names")
    mapping = samples.mapping if reduce_labels is None else samples.mapping.with_reduce(reduce_labels)
    if size is None:
        size = SYNTHETIC_SIZE if samples.layout == "synthetic scenes" else 512
    transform = build_transform(train=train, recipe=recipe, size=size, eval_mode=eval_mode)
    return SegmentationDataset(samples, transform, train=train, class_names=class_names, mapping=mapping,
                               seed=seed, skip_bad=skip_bad, uint8=uint8)


__all__ = ["build_dataset", "build_loader", "collate", "SegmentationDataset", "DataError", "IGNORE_INDEX",
           "LabelMapping", "SYNTHETIC_CLASSES", "normalize_batch", "reduce_labels", "open_source", "Samples"]
