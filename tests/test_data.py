"""The data pipeline: sources agree, transforms equal the reference image processor, bad input is named."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataError, LabelSpec, build_dataset, build_loader, normalize_batch
from data.mapping import ADE
from data.sources import parse_split
from data.synthetic import SyntheticScenes
from data.transforms import PaperTrainTransform, aspect_size
from segformer.errors import ConfigError
from segformer.labels import ADE20K_CLASSES, ADE20K_PALETTE

SIZES = [(67, 91), (120, 80), (64, 64), (75, 130), (90, 101)]  # (H, W), none a multiple of 32


def make_pairs(n=len(SIZES), num_classes=150):
    """Images with structure (gradients + noise) and ADE-convention annotations containing 0, 255 and
    class values up to num_classes."""
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(n):
        H, W = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:H, 0:W]
        image = np.stack([xx * 255 // W, yy * 255 // H, (xx + yy) % 256], -1) + rng.integers(0, 40, (H, W, 3))
        label = rng.integers(0, num_classes + 1, (H, W))
        label[: H // 5] = 0
        label[-3:] = 255
        pairs.append((Image.fromarray(image.clip(0, 255).astype(np.uint8)), Image.fromarray(label.astype(np.uint8))))
    return pairs


def write_ade_folder(root, pairs, split="training"):
    for i, (image, label) in enumerate(pairs):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        image.save(root / "images" / split / f"ADE_{split}_{i:08d}.png")
        label.save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")
    return root


def hf_dataset(pairs):
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature
    features = Features({"image": ImageFeature(), "annotation": ImageFeature()})
    return Dataset.from_dict({"image": [p[0] for p in pairs], "annotation": [p[1] for p in pairs]}, features=features)


def batches(ds, **kwargs):
    loader = build_loader(ds, batch_size=2, seed=0, **kwargs)
    return [b for epoch in range(2) if loader.sampler.set_epoch(epoch) is None for b in loader]


def assert_same_batches(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert torch.equal(x["pixel_values"], y["pixel_values"]) and torch.equal(x["labels"], y["labels"])


def model_input(sample: dict) -> torch.Tensor:
    """A dataset's sample (bytes) as the model's float input, the way the loader's consumer makes it."""
    valid = sample["valid"][None] if "valid" in sample else None
    return normalize_batch(sample["pixel_values"][None], valid)[0]


def test_the_ade_reduction_that_runs_equals_the_reference_processor():
    """The reduction the data pipeline applies (the ADE mapping's table) against transformers' reduce_label."""
    from transformers import SegformerImageProcessor
    raw = torch.tensor([[0, 1, 2, 150, 254, 255]], dtype=torch.uint8)
    expected = SegformerImageProcessor(do_reduce_labels=True).reduce_label([raw])[0]
    assert ADE.apply(raw).tolist() == expected.tolist() == [[255, 0, 1, 149, 253, 255]]
    annotation = np.zeros((8, 8), np.uint8)  # and as the dataset runs it, on a file's values (150 classes)
    annotation[0, :5] = [0, 1, 2, 150, 255]
    pairs = [(Image.fromarray(np.full((8, 8), 3, np.uint8)), Image.fromarray(annotation))]
    assert build_dataset_from_pairs(pairs, size=8)[0]["labels"][0, :5].tolist() == [255, 0, 1, 149, 255]


@pytest.mark.parametrize("train", [False, True])
def test_every_source_yields_the_same_batches(tmp_path, train):
    pairs = make_pairs()
    folder = write_ade_folder(tmp_path / "ade", pairs)
    hf_dataset(pairs).save_to_disk(str(tmp_path / "saved"))
    hf_dataset(pairs[:3]).to_parquet(str(tmp_path / "part-0.parquet"))  # two files, read through a glob
    hf_dataset(pairs[3:]).to_parquet(str(tmp_path / "part-1.parquet"))
    common = dict(split="train", train=train, size=64, num_labels=150, test_size=0)  # every sample of each
    from_folder = batches(build_dataset(str(folder), **common))
    from_disk = batches(build_dataset(str(tmp_path / "saved"), **common))
    from_parquet = batches(build_dataset(str(tmp_path / "part-*.parquet"), **common))
    assert_same_batches(from_folder, from_disk)
    assert_same_batches(from_folder, from_parquet)


def test_augmentation_repeats_exactly_whatever_the_workers():
    ds = build_dataset("synthetic", split="train[:12]", train=True)
    single = batches(ds, num_workers=0)
    assert_same_batches(single, batches(ds, num_workers=2))
    assert not torch.equal(single[0]["pixel_values"], single[len(single) // 2]["pixel_values"])  # epochs differ
    other_seed = build_loader(build_dataset("synthetic", split="train[:12]", train=True, seed=1), batch_size=2, seed=0)
    assert not torch.equal(next(iter(other_seed))["pixel_values"], single[0]["pixel_values"])


def test_evaluation_transform_equals_the_reference_processor():
    from transformers import SegformerImageProcessor
    processor = SegformerImageProcessor(do_reduce_labels=True)
    pairs = make_pairs()
    pairs.append((Image.open(io.BytesIO(_jpeg_bytes(pairs[0][0]))), pairs[0][1]))  # a real JPEG too
    for i, (image, label) in enumerate(pairs):
        expected = processor(images=image, segmentation_maps=label, return_tensors="pt")
        got = build_dataset_from_pairs([(image, label)])[0]
        assert got["pixel_values"].shape == expected["pixel_values"][0].shape == (3, 512, 512)
        assert torch.equal(got["labels"].long(), expected["labels"][0]), i
        assert (model_input(got) - expected["pixel_values"][0]).abs().max().item() <= 3e-7, i  # README's claim


def build_dataset_from_pairs(pairs, *, train=False, size=512, **kwargs):
    from data.dataset import SegmentationDataset
    from data.transforms import build_transform
    samples = [(image, label, f"pair{i}") for i, (image, label) in enumerate(pairs)]
    spec = LabelSpec(class_names=ADE20K_CLASSES, reduce_labels=True, palette=ADE20K_PALETTE, size=size, mapping=ADE)
    return SegmentationDataset(samples, spec, build_transform(train=train, size=size, **kwargs), train=train)


def _jpeg_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_images_of_any_mode_become_rgb(mode):
    image, label = make_pairs(1)[0]
    if mode == "I;16":
        converted = Image.fromarray(np.asarray(image.convert("L")).astype(np.uint16) * 257)
    else:
        converted = image.convert(mode)
    sample = build_dataset_from_pairs([(converted, label)])[0]
    assert sample["pixel_values"].shape == (3, 512, 512) and sample["pixel_values"].dtype == torch.uint8
    if mode == "I;16":  # a 16-bit grey reads as its 8-bit grey
        grey = build_dataset_from_pairs([(image.convert("L"), label)])[0]["pixel_values"]
        assert (sample["pixel_values"].int() - grey.int()).abs().max() <= 1


def test_aspect_mode_keeps_the_annotation_size():
    image, label = make_pairs(1)[0]  # 67 x 91
    sample = build_dataset_from_pairs([(image, label)], eval_mode="aspect", size=512)[0]
    assert sample["pixel_values"].shape == (3, 512, 704)  # 91 * 512 / 67 = 695.4 -> 704
    assert sample["labels"].shape == (67, 91)
    assert aspect_size(512, 683, 512) == (512, 672)


def test_paper_recipe_crops_pads_and_keeps_labels_discrete():
    torch.manual_seed(0)
    image, label = make_pairs(1)[0]  # 67 x 91: smaller than the crop after most rescales
    transform = PaperTrainTransform(size=96)
    from data.dataset import annotation_to_tensor
    from segformer.images import to_tensor
    mask = ADE.apply(annotation_to_tensor(label, "x"))
    for _ in range(5):
        pixels, labels = transform(to_tensor(image), mask)
        assert pixels.dtype == torch.uint8 and max(pixels.shape[-2:]) <= 96 and labels.shape == (96, 96)
        assert set(labels.unique().tolist()) <= set(mask.unique().tolist())  # nearest only, + pad 255
    sample = build_dataset_from_pairs([(image, label)], train=True, recipe="paper", size=96)[0]
    assert sample["pixel_values"].shape == (3, 96, 96) and (model_input(sample)[:, -1] == 0).all()  # mean colour


@pytest.mark.parametrize("train, recipe", [(False, "guide"), (True, "guide"), (True, "paper")])
def test_batches_are_bytes_normalised_where_the_model_runs(train, recipe):
    """One batch format: uint8 pixels (4x smaller than floats) and labels as stored (8x smaller than int64),
    made the model's input by batch_to_device, bit for bit each sample normalised and padded alone."""
    from data import batch_to_device
    from segformer.preprocess import normalize
    dataset = build_dataset_from_pairs(make_pairs(), train=train, recipe=recipe, size=96)
    batch = next(iter(build_loader(dataset, batch_size=5, shuffle=False)))
    assert batch["pixel_values"].dtype == torch.uint8 and batch["labels"].dtype == torch.uint8
    pixel_values, labels = batch_to_device(batch, "cpu")
    for i in range(5):
        sample = dataset[(0, i)]
        expected = normalize(sample["pixel_values"])
        if "valid" in sample:  # the paper's crops: zero (the mean colour) beyond the crop
            h, w = sample["valid"].tolist()
            expected[:, h:], expected[:, :, w:] = 0, 0
        assert torch.equal(pixel_values[i], expected) and torch.equal(labels[i], sample["labels"].long())


def test_split_expressions_and_the_guide_holdout(tmp_path):
    assert parse_split("train[:50]") == ("train", slice(None, 50), False)
    assert parse_split("validation[10:20%]") == ("validation", slice(10, 20), True)
    with pytest.raises(DataError, match="cannot parse split 'train\\[:x\\]'"):
        parse_split("train[:x]")
    pairs = make_pairs(10)
    hf_dataset(pairs).save_to_disk(str(tmp_path / "one"))
    train = build_dataset(str(tmp_path / "one"), split="train", train=True, test_size=0.2, num_labels=150)
    test = build_dataset(str(tmp_path / "one"), split="train", train=False, test_size=0.2, num_labels=150)
    assert len(train) == 8 and len(test) == 2
    reference = hf_dataset(pairs).train_test_split(test_size=0.2, seed=0)  # what the guide's call picks
    index_of = {np.asarray(image).tobytes(): i for i, (image, _) in enumerate(pairs)}
    assert test.samples.indices == [index_of[np.asarray(im).tobytes()] for im in reference["test"]["image"]]
    assert train.samples.indices == [index_of[np.asarray(im).tobytes()] for im in reference["train"]["image"]]
    # a single-split source asked for "validation" holds out 20% on its own
    assert len(build_dataset(str(tmp_path / "one"), split="validation", num_labels=150)) == 2
    assert len(build_dataset("synthetic", split="validation[:10]")) == 10


def test_flat_folder_and_stem_order(tmp_path):
    root = tmp_path / "flat"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for stem, (image, label) in zip(["b", "a", "c"], make_pairs(3)):
        image.save(root / "images" / f"{stem}.jpg")
        label.save(root / "annotations" / f"{stem}.png")
    ds = build_dataset(str(root), split="train", test_size=0, num_labels=150)
    names = [ds.samples[i][2].rsplit("/", 1)[1] for i in range(len(ds))]
    assert names == ["a.jpg", "b.jpg", "c.jpg"]


# ---- bad input ---------------------------------------------------------------------------------

def test_unpaired_files_are_listed(tmp_path):
    root = write_ade_folder(tmp_path / "ade", make_pairs(2))
    images = root / "images" / "training"
    (images / "ADE_lonely.png").write_bytes((images / "ADE_training_00000000.png").read_bytes())
    with pytest.raises(DataError, match=r"1 unpaired files.*ADE_lonely\.png"):
        build_dataset(str(root), split="training")


def test_corrupt_and_truncated_images_are_named(tmp_path):
    root = write_ade_folder(tmp_path / "ade", make_pairs(3))
    first = root / "images" / "training" / "ADE_training_00000000.png"
    first.write_bytes(first.read_bytes()[:200])  # truncated
    (root / "images" / "training" / "ADE_training_00000001.png").write_text("not an image")
    ds = build_dataset(str(root), split="training", test_size=0)
    with pytest.raises(DataError, match=r"ADE_training_00000000\.png: cannot decode image"):
        ds[0]
    with pytest.raises(DataError, match=r"ADE_training_00000001\.png: cannot decode image"):
        ds[1]
    # opt-in: skip with a warning, count, keep the good sample
    ds = build_dataset(str(root), split="training", skip_bad=True, test_size=0)
    with pytest.warns(UserWarning, match="skipping bad sample"):
        batch = next(iter(build_loader(ds, batch_size=3, shuffle=False)))
    assert len(batch["skipped"]) == 2 and batch["pixel_values"].shape[0] == 1 and len(ds.skipped) == 2


def test_annotation_size_mode_and_values_are_checked(tmp_path):
    image, label = make_pairs(1)[0]
    with pytest.raises(DataError, match=r"pair0: the annotation is 50x50 \(WxH\) but its image pair0 is 91x67"):
        build_dataset_from_pairs([(image, label.resize((50, 50)))])[0]
    grey_as_rgb = build_dataset_from_pairs([(image, label.convert("RGB"))])[0]["labels"]  # a grey map saved as RGB
    assert torch.equal(grey_as_rgb, build_dataset_from_pairs([(image, label)])[0]["labels"])
    colours = np.stack([np.asarray(label)] * 3, -1)
    colours[..., 0] = 7
    with pytest.raises(DataError, match=r'pair0: a colour mask \(mode RGB\); .*dataset\.json with "annotation_format"'):
        build_dataset_from_pairs([(image, Image.fromarray(colours))])[0]
    with pytest.raises(DataError, match=r"pair0: annotation has mode 'CMYK'.*single-channel"):
        build_dataset_from_pairs([(image, label.convert("CMYK"))])[0]
    too_high = Image.fromarray(np.full((67, 91), 200, np.uint8))
    with pytest.raises(DataError, match=r"pair0: label values \[199\].*not class ids 0\.\.149"):
        build_dataset_from_pairs([(image, too_high)])[0]


def test_empty_split_and_missing_column(tmp_path):
    hf_dataset(make_pairs(3)).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"split 'train\[:0\]' is empty"):
        build_dataset(str(tmp_path / "saved"), split="train[:0]", num_labels=150)
    with pytest.raises(DataError, match=r"missing column\(s\) \['mask'\].*\['image', 'annotation'\]"):
        build_dataset(str(tmp_path / "saved"), split="train", annotation_column="mask", num_labels=150)
    with pytest.raises(ConfigError, match=r"saved: the data does not name its classes; give --num-labels N"):
        build_dataset(str(tmp_path / "saved"), split="train")  # no guess: 150 classes is not a reason to say ADE
    assert build_dataset(str(tmp_path / "saved"), split="train", num_labels=150).class_names[0] == "LABEL_0"
    with pytest.raises(DataError, match=r"not a dataset"):
        (tmp_path / "plain").mkdir()
        build_dataset(str(tmp_path / "plain"))


def test_synthetic_scenes_are_deterministic_and_varied():
    a, b = SyntheticScenes("train"), SyntheticScenes("train")
    assert np.array_equal(np.asarray(a[3][0]), np.asarray(b[3][0]))
    labels = np.stack([np.asarray(a[i][1]) for i in range(40)])
    assert set(np.unique(labels)) == set(range(8))  # 0 (unlabelled) and all seven classes
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(SyntheticScenes("validation")[0][0]))


def test_scene_parse_150_is_read_from_its_parquet_export(monkeypatch):
    """The hub's scene_parse_150 is a loading script; datasets >= 4 reads its parquet export."""
    import datasets
    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return hf_dataset(make_pairs(10))
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train = build_dataset("scene_parse_150", split="train[:50]", test_size=0.2, train=True)
    assert calls == [("zhoubolei/scene_parse_150", {"split": "train[:50]", "name": "scene_parsing",
                                                    "revision": "refs/convert/parquet"})]
    assert len(train) == 8 and train[0]["pixel_values"].shape == (3, 512, 512)
