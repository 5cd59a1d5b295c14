"""Your own data: the layouts people have, manifests, colour masks, the dataset doctor, and the losses for
imbalanced classes. Each layout is fabricated in tmp_path with its official file naming."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data.__main__ as doctor
import train
from data import DataError, build_dataset, open_source
from data.stats import collect, median_frequency_weights
from helpers import random_image, read_log, run_training
from segformer import segmentation_loss
from segformer.labels import CITYSCAPES_CLASSES, VOC_CLASSES, VOC_PALETTE
from training.train_config import TrainConfig

SIZE = 32  # images are 32x32 and evaluated at 32: labels reach the tensors unresized


def labels_of(root, split, **kwargs):
    dataset = build_dataset(str(root), split=split, size=SIZE, **kwargs)
    return dataset, [dataset[i]["labels"] for i in range(len(dataset))]


def mask_with(values: dict[tuple[int, int], int], fill: int) -> np.ndarray:
    mask = np.full((SIZE, SIZE), fill, np.uint8)
    for (row, col), value in values.items():
        mask[row, col] = value
    return mask


# ---- Cityscapes ------------------------------------------------------------------------------------------

def write_cityscapes(root, *, train_ids=False):
    for split, city in (("train", "aachen"), ("val", "frankfurt")):
        for frame in range(2):
            base = f"{city}_000000_{frame:06d}"
            image = root / "leftImg8bit" / split / city / f"{base}_leftImg8bit.png"
            image.parent.mkdir(parents=True, exist_ok=True)
            random_image(SIZE, SIZE, seed=frame).save(image)
            labels = root / "gtFine" / split / city
            labels.mkdir(parents=True, exist_ok=True)
            ids = mask_with({(0, 0): 7, (0, 1): 26, (0, 2): 0, (0, 3): 33, (0, 4): 9}, fill=21)
            Image.fromarray(ids).save(labels / f"{base}_gtFine_labelIds.png")
            Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(labels / f"{base}_gtFine_color.png")
            if train_ids:
                (labels / f"{base}_gtFine_labelIds.png").unlink()
                Image.fromarray(mask_with({(0, 0): 0, (0, 1): 13}, fill=8)).save(
                    labels / f"{base}_gtFine_labelTrainIds.png")
    return root


def test_cityscapes_label_ids_become_the_19_train_ids(tmp_path):
    root = write_cityscapes(tmp_path / "cityscapes")
    dataset, labels = labels_of(root, "train")
    assert dataset.class_names == list(CITYSCAPES_CLASSES) and len(labels) == 2
    row = labels[0][0, :5].tolist()
    assert row == [0, 13, 255, 18, 255]  # road, car, unlabeled -> ignored, bicycle, parking -> ignored
    assert labels[0][5, 5] == 8  # vegetation
    assert len(open_source(str(root), "validation", train=False)) == 2  # "validation" finds val/
    _, train_ids = labels_of(write_cityscapes(tmp_path / "trainids", train_ids=True), "train")
    assert train_ids[0][0, :2].tolist() == [0, 13] and train_ids[0][5, 5] == 8  # read as they are


# ---- Pascal VOC --------------------------------------------------------------------------------------------

def write_voc(root):
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True)
    flat_palette = [v for colour in VOC_PALETTE for v in colour] + [224, 224, 192] * (256 - len(VOC_PALETTE))
    for i, stem in enumerate(["2007_000032", "2007_000039", "2007_000063"]):
        random_image(SIZE, SIZE, seed=i).save(voc / "JPEGImages" / f"{stem}.jpg")
        mask = Image.fromarray(mask_with({(0, 0): 15, (0, 1): 255, (0, 2): 0}, fill=1), mode="P")
        mask.putpalette(flat_palette)
        mask.save(voc / "SegmentationClass" / f"{stem}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("2007_000032\n2007_000039\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("2007_000063\n")
    return root


def test_voc_palette_indices_are_classes_with_background_kept(tmp_path):
    root = write_voc(tmp_path / "voc")
    dataset, labels = labels_of(root, "train")
    assert dataset.class_names == list(VOC_CLASSES) and len(labels) == 2
    assert labels[0][0, :3].tolist() == [15, 255, 0]  # person, void, background (no reduction)
    labels = open_source(str(root), "val", train=False).labels
    assert labels.known and labels.mapping.reduce_labels is False


# ---- mmseg's img_dir/ann_dir, with suffixes -----------------------------------------------------------------

def write_mmseg(root, image_suffix="_sat", annotation_suffix="_mask"):
    for split, count in (("train", 3), ("val", 2)):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(count):
            random_image(SIZE, SIZE, seed=i).save(root / "img_dir" / split / f"tile{i}{image_suffix}.jpg")
            annotation = root / "ann_dir" / split / f"tile{i}{annotation_suffix}.png"
            Image.fromarray(mask_with({(0, 0): i}, fill=2)).save(annotation)
    return root


def test_mmseg_layout_pairs_by_stem_after_suffixes(tmp_path):
    root = write_mmseg(tmp_path / "tiles")
    samples = open_source(str(root), "train", train=True)
    assert [name.rsplit("/", 1)[1] for name in samples.names()] == ["tile0_sat.jpg", "tile1_sat.jpg", "tile2_sat.jpg"]
    assert samples.layout == "mmsegmentation img_dir/ + ann_dir/ folder"
    (root / "dataset.json").write_text(json.dumps({"classes": ["bare", "road", "building"], "reduce_labels": False,
                                                   "image_suffix": "_sat", "annotation_suffix": "_mask"}))
    dataset, labels = labels_of(root, "train")
    assert dataset.class_names == ["bare", "road", "building"]
    assert [lab[0, 0].item() for lab in labels] == [0, 1, 2] and labels[0][1, 1] == 2


# ---- manifests --------------------------------------------------------------------------------------------

PALETTE = [[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]]


def write_photos(root, *, rgb: bool, raw=None):
    """A labelling tool's export: photos/ and masks/ (index or colour), the same content either way."""
    (root / "photos").mkdir(parents=True)
    (root / "masks").mkdir()
    masks = []
    for i in range(4):
        index = raw[i] if raw is not None else np.indices((SIZE, SIZE))[1] // 8 % 4  # stripes of classes 0..3
        random_image(SIZE, SIZE, seed=i).save(root / "photos" / f"img{i}.jpg")
        picture = np.asarray(PALETTE, np.uint8)[index] if rgb else index.astype(np.uint8)
        Image.fromarray(picture).save(root / "masks" / f"img{i}.png")
        masks.append(index)
    return masks


def test_a_manifest_with_folders_and_one_with_a_list(tmp_path):
    write_photos(tmp_path / "a", rgb=False)
    (tmp_path / "a" / "dataset.json").write_text(json.dumps({
        "classes": ["sea", "boat", "buoy", "rock"],
        "splits": {"train": {"images": "photos", "annotations": "masks"}}}))
    dataset, labels = labels_of(tmp_path / "a", "train", test_size=0)
    assert dataset.class_names == ["sea", "boat", "buoy", "rock"] and labels[0][0, :32:8].tolist() == [0, 1, 2, 3]

    write_photos(tmp_path / "b", rgb=False)
    (tmp_path / "b" / "train.txt").write_text("photos/img0.jpg masks/img0.png\n# a comment\n\n"
                                              "photos/img1.jpg masks/img1.png\n")
    (tmp_path / "b" / "val.txt").write_text("photos/img2.jpg\tmasks/img2.png\n")
    (tmp_path / "b" / "dataset.json").write_text(json.dumps({
        "classes": ["sea", "boat", "buoy"], "ignore_index": 3, "label_map": {"2": 0},
        "splits": {"train": {"list": "train.txt"}, "val": {"list": "val.txt"}}}))
    dataset, labels = labels_of(tmp_path / "b", "train")
    assert len(dataset) == 2 and labels[0][0, :32:8].tolist() == [0, 1, 0, 255]  # 2 -> 0, 3 ignored
    assert len(open_source(str(tmp_path / "b"), "validation", train=False)) == 1


def test_manifest_reduce_labels_follows_the_ade_convention(tmp_path):
    write_photos(tmp_path / "c", rgb=False)
    (tmp_path / "c" / "dataset.json").write_text(json.dumps({
        "classes": ["boat", "buoy", "rock"], "reduce_labels": True,
        "splits": {"train": {"images": "photos", "annotations": "masks"}}}))
    _, labels = labels_of(tmp_path / "c", "train", test_size=0)
    assert labels[0][0, :32:8].tolist() == [255, 0, 1, 2]


def test_a_colour_mask_and_its_index_twin_give_identical_labels(tmp_path):
    masks = write_photos(tmp_path / "index", rgb=False)
    write_photos(tmp_path / "colour", rgb=True)
    manifest = {"classes": ["sea", "boat", "buoy", "rock"], "splits": {"train": {"images": "photos", "annotations":
                                                                                  "masks"}}}
    (tmp_path / "index" / "dataset.json").write_text(json.dumps(manifest))
    (tmp_path / "colour" / "dataset.json").write_text(json.dumps({**manifest, "annotation_format": "rgb",
                                                                  "palette": PALETTE}))
    _, from_index = labels_of(tmp_path / "index", "train", test_size=0)
    _, from_colour = labels_of(tmp_path / "colour", "train", test_size=0)
    for a, b, mask in zip(from_index, from_colour, masks):
        assert torch.equal(a, b) and torch.equal(a, torch.from_numpy(mask).to(a.dtype))


def test_an_unknown_colour_is_named_with_its_pixel_count_or_ignored(tmp_path):
    write_photos(tmp_path / "d", rgb=True)
    mask = np.asarray(Image.open(tmp_path / "d" / "masks" / "img1.png")).copy()
    mask[:3, :5] = (9, 9, 9)  # 15 pixels of a colour the palette does not have
    Image.fromarray(mask).save(tmp_path / "d" / "masks" / "img1.png")
    manifest = {"classes": ["sea", "boat", "buoy", "rock"], "annotation_format": "rgb", "palette": PALETTE,
                "splits": {"train": {"images": "photos", "annotations": "masks"}}}
    (tmp_path / "d" / "dataset.json").write_text(json.dumps(manifest))
    dataset = build_dataset(str(tmp_path / "d"), split="train", size=SIZE, test_size=0)
    with pytest.raises(DataError, match=r"img1\.png: 1 colour\(s\) not in the palette: \(9, 9, 9\): 15 pixels"):
        dataset[1]
    (tmp_path / "d" / "dataset.json").write_text(json.dumps({**manifest, "unknown_colors": "ignore"}))
    labels = build_dataset(str(tmp_path / "d"), split="train", size=SIZE, test_size=0)[1]["labels"]
    assert (labels[:3, :5] == 255).all() and (labels[3:] != 255).all()


@pytest.mark.parametrize("change, message", [
    ({"palette": PALETTE[:3]}, r"key 'palette' has 3 colours for 4 classes"),
    ({"palette": [[0, 0, 0]] * 4}, r"key 'palette' gives two classes the same colour"),
    ({"splits": {"train": {"images": "nowhere", "annotations": "masks"}}},
     r"key 'splits\.train\.images' names 'nowhere', which does not exist"),
    ({"annotation_format": "rgb"}, r'key \'annotation_format\' is "rgb": colour masks need a "palette"'),
    ({"label_map": {"3": 9}}, r"key 'label_map' entry '3': 9 must map a raw value to a class id 0\.\.3 or 255"),
    ({"classes": "sea"}, r"key 'classes' must be a non-empty list"),
    ({"clases": ["x"]}, r"key 'clases' is not a manifest key"),
    ({"classes": ["sea", "boat", "sea", "rock"]}, r"key 'classes' names 'sea' twice \(classes \[0, 2\]\)"),
    ({"classes": ["sea", " ", "buoy", "rock"]}, r"key 'classes' class 1 has an empty name"),
    ({"classes": [f"c{i}" for i in range(256)]},
     r"key 'classes' has 256 classes; the label maps hold 255"),
])
def test_a_manifest_that_contradicts_itself_or_the_files_names_the_key(tmp_path, change, message):
    write_photos(tmp_path / "e", rgb=False)
    manifest = {"classes": ["sea", "boat", "buoy", "rock"], "splits": {"train": {"images": "photos",
                                                                                  "annotations": "masks"}}}
    (tmp_path / "e" / "dataset.json").write_text(json.dumps({**manifest, **change}))
    with pytest.raises(DataError, match=rf"dataset\.json: {message}"):
        open_source(str(tmp_path / "e"), "train", train=True)


# ---- what the run is told, the doctor ------------------------------------------------------------------------

def test_the_run_says_layout_sizes_and_mapping_and_warns_about_class_zero(tmp_path, capsys):
    raw = [np.where(np.indices((SIZE, SIZE))[1] < 24, 0, 1 + i % 2) for i in range(10)]  # 75% zero
    folder = tmp_path / "flat"
    (folder / "images").mkdir(parents=True)
    (folder / "annotations").mkdir()
    for i, mask in enumerate(raw):
        random_image(SIZE, SIZE, seed=i).save(folder / "images" / f"{i}.png")
        Image.fromarray(mask.astype(np.uint8)).save(folder / "annotations" / f"{i}.png")
    quick = ["--data", str(folder), "--size", "32", "--batch-size", "2", "--max-steps", "1", "--eval-every", "1",
             "--save-every", "100", "--num-labels", "2", "--no-plots"]
    train.execute(quick + ["--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "data: images/ + annotations/ folder" in out and "8 training / 2 validation samples" in out
    assert "labels: 0 -> ignored, k -> k-1 (ADE convention); 255 ignored" in out
    assert "warning: 75% of the pixels of the first 8 annotations are 0" in out and "--no-reduce-labels" in out
    train.execute(quick + ["--out", str(tmp_path / "run2"), "--no-reduce-labels", "--num-labels", "3"])
    assert "warning" not in capsys.readouterr().out


def test_the_doctor_reports_classes_problems_and_weights(tmp_path, capsys):
    write_photos(tmp_path / "f", rgb=True)
    mask = np.asarray(Image.open(tmp_path / "f" / "masks" / "img2.png")).copy()
    mask[0, 0] = (9, 9, 9)
    Image.fromarray(mask).save(tmp_path / "f" / "masks" / "img2.png")
    random_image(SIZE, SIZE).save(tmp_path / "f" / "photos" / "lonely.jpg")
    (tmp_path / "f" / "dataset.json").write_text(json.dumps({
        "classes": ["sea", "boat", "buoy", "rock"], "annotation_format": "rgb", "palette": PALETTE,
        "splits": {"train": {"images": "photos", "annotations": "masks"}}}))
    before = sorted(p.name for p in (tmp_path / "f").rglob("*"))
    assert doctor.main([str(tmp_path / "f")]) == 1  # problems found
    out = capsys.readouterr().out
    assert "splits: train 4" in out and "image sizes: 32x32 (3)" in out
    assert "sea" in out and "25.00%" in out  # four equal stripes
    assert "unpaired: " in out and "lonely.jpg" in out
    assert "img2.png: 1 colour(s) not in the palette: (9, 9, 9): 1 pixels" in out
    assert "--class-weights auto (median frequency balancing over this split): sea 1, boat 1" in out
    assert sorted(p.name for p in (tmp_path / "f").rglob("*")) == before  # nothing changed


def test_median_frequency_weights_on_a_hand_made_case():
    from data.stats import SplitStats
    stats = SplitStats(3)
    stats.pixels[:] = [600, 100, 0]  # class 0 in 2 images of 400 labelled pixels, class 1 in one of them
    stats.image_pixels[:] = [800, 400, 0]
    # freq = [0.75, 0.25]; median 0.5 -> weights 0.5/0.75, 0.5/0.25; never present -> 1
    assert median_frequency_weights(stats) == [pytest.approx(2 / 3, abs=1e-6), 2.0, 1.0]


# ---- losses ----------------------------------------------------------------------------------------------

def upsampled(logits, labels):
    return F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)


@pytest.fixture()
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 8, 10, generator=g)
    labels = torch.randint(0, 4, (2, 30, 38), generator=g)
    labels[:, :4] = 255
    return logits, labels


def test_default_loss_is_the_reference_cross_entropy_bit_for_bit(batch):
    logits, labels = batch
    expected = F.cross_entropy(upsampled(logits, labels), labels, ignore_index=255)
    assert segmentation_loss(logits, labels).item() == expected.item()


def test_the_memory_efficient_loss_is_the_cross_entropy_with_its_gradient():
    """train.py's fused form (UpsampledCrossEntropy: bands of rows, softmax - one-hot in place) against
    the plain one, on channels-last logits as the decoder gives them and on contiguous ones; 150 rows: the
    last band is a short one."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (2, 150, 98), generator=g)
    labels[:, :9] = 255
    for layout in (torch.channels_last, torch.contiguous_format):
        logits = torch.randn(2, 7, 38, 25, generator=g).contiguous(memory_format=layout)
        plain, fused = (logits.clone().requires_grad_() for _ in range(2))
        expected = segmentation_loss(plain, labels)
        got = segmentation_loss(fused, labels, memory_efficient=True)
        expected.backward(), got.backward()
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-7)
        assert torch.allclose(fused.grad, plain.grad, rtol=1e-5, atol=1e-10)


def test_weighted_and_smoothed_cross_entropy(batch):
    logits, labels = batch
    weights = torch.tensor([0.5, 1.0, 2.0, 4.0])
    expected = F.cross_entropy(upsampled(logits, labels), labels, weight=weights, label_smoothing=0.1,
                               ignore_index=255)
    got = segmentation_loss(logits, labels, class_weights=weights, label_smoothing=0.1)
    assert torch.allclose(got, expected, rtol=1e-6)


def mmseg_ohem(seg_logit, seg_label, thresh, min_kept, ignore_index=255):
    """mmseg's OHEMPixelSampler.sample, transcribed, then its CrossEntropyLoss (mean over all pixels)."""
    with torch.no_grad():
        seg_label = seg_label.unsqueeze(1).long()
        batch_kept = min_kept * seg_label.size(0)
        valid_mask = seg_label != ignore_index
        seg_weight = seg_logit.new_zeros(size=seg_label.size())
        valid_seg_weight = seg_weight[valid_mask]
        seg_prob = F.softmax(seg_logit, dim=1)
        tmp_seg_label = seg_label.clone()
        tmp_seg_label[tmp_seg_label == ignore_index] = 0
        seg_prob = seg_prob.gather(1, tmp_seg_label)
        sort_prob, sort_indices = seg_prob[valid_mask].sort()
        min_threshold = sort_prob[min(batch_kept, sort_prob.numel() - 1)] if sort_prob.numel() > 0 else 0.0
        threshold = max(min_threshold, thresh)
        valid_seg_weight[seg_prob[valid_mask] < threshold] = 1.0
        seg_weight[valid_mask] = valid_seg_weight
        seg_weight = seg_weight.squeeze(1)
    loss = F.cross_entropy(seg_logit, seg_label.squeeze(1), reduction="none", ignore_index=ignore_index)
    return (loss * seg_weight).mean()


@pytest.mark.parametrize("thresh, min_kept", [(0.7, 10), (0.3, 1), (0.99, 2000), (0.05, 50)])
def test_ohem_equals_mmseg_sampler(batch, thresh, min_kept):
    logits, labels = batch
    expected = mmseg_ohem(upsampled(logits, labels), labels, thresh, min_kept)
    got = segmentation_loss(logits, labels, ohem_threshold=thresh, ohem_min_kept=min_kept)
    assert torch.allclose(got, expected, rtol=1e-5), (got, expected)


def test_dice_equals_its_formula_on_a_hand_made_case():
    # Two pixels of class 0 and one of class 2, one ignored; logits at the label size (no resampling).
    logits = torch.tensor([[[[2.0, 0.0, 1.0, 5.0]], [[0.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 3.0, 0.0]]]])  # (1, 3, 1, 4)
    labels = torch.tensor([[[0, 0, 2, 255]]])
    p = logits[0, :, 0, :3].softmax(0)  # (3 classes, 3 labelled pixels)
    dice_0 = (2 * (p[0, 0] + p[0, 1]) + 1) / (p[0].sum() + 2 + 1)
    dice_2 = (2 * p[2, 2] + 1) / (p[2].sum() + 1 + 1)
    expected = 1 - (dice_0 + dice_2) / 2  # class 1 is not labelled here: not averaged
    assert torch.allclose(segmentation_loss(logits, labels, kind="dice"), expected)
    ce = F.cross_entropy(logits, labels, ignore_index=255)
    assert torch.allclose(segmentation_loss(logits, labels, kind="ce+dice"), ce + expected)


def test_binary_head_refuses_the_multi_class_options():
    with pytest.raises(ValueError, match="need two or more classes"):
        segmentation_loss(torch.randn(1, 1, 4, 4), torch.zeros(1, 8, 8, dtype=torch.long), kind="dice")


# ---- end to end -----------------------------------------------------------------------------------------

def test_train_py_on_a_folder_with_a_manifest(tmp_path):
    masks = [np.indices((SIZE, SIZE))[1] // 8 % 4 for _ in range(10)]
    write_photos(tmp_path / "g", rgb=True, raw=masks)
    (tmp_path / "g" / "dataset.json").write_text(json.dumps({
        "classes": ["sea", "boat", "buoy", "rock"], "annotation_format": "rgb", "palette": PALETTE,
        "splits": {"all": {"images": "photos", "annotations": "masks"}}}))
    for i in range(4, 10):  # more photos, listed by the same folder
        random_image(SIZE, SIZE, seed=i).save(tmp_path / "g" / "photos" / f"img{i}.jpg")
        Image.fromarray(np.asarray(PALETTE, np.uint8)[masks[i]]).save(tmp_path / "g" / "masks" / f"img{i}.png")
    result = run_training(tmp_path / "run", "--data", str(tmp_path / "g"), "--size", "32", "--batch-size", "2",
                          "--max-steps", "2", "--eval-every", "2", "--save-every", "2", "--class-weights", "auto",
                          "--loss", "ce+dice", "--label-smoothing", "0.05", "--ohem", "0.9", "--ohem-min-kept", "64",
                          base=[])
    assert len(result["per_category_iou"]) == 4
    settings = TrainConfig.load(tmp_path / "run" / "checkpoint-2" / "training_args.json")
    assert settings.class_weight_values == (1.0, 1.0, 1.0, 1.0)  # four equal stripes: balanced already
    assert settings.loss == "ce+dice" and settings.reduce_labels is False
    assert json.loads((tmp_path / "run" / "checkpoint-2" / "palette.json").read_text()) == PALETTE
    assert all(np.isfinite(r["loss"]) for r in read_log(tmp_path / "run"))
    stats = collect(open_source(str(tmp_path / "g"), "all", train=True), open_source(
        str(tmp_path / "g"), "all", train=True).labels.mapping, 4, progress=False)
    assert stats.images == 8 and (stats.pixels == 8 * SIZE * SIZE // 4).all()
