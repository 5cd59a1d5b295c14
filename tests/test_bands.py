"""Images that are not 8-bit RGB: a 4-band 16-bit TIFF data set read at full precision, trained, fine-tuned
from 3-band weights, segmented (GeoTIFF masks with their georeferencing), toured and exported."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataError, build_dataset
from helpers import read_log, run_training
from segformer import SegFormer
from segformer.bands import adapt_input_conv, read_bands
from segformer.errors import ConfigError
from segformer.files import write_json
from segformer.runtimes.onnx import OnnxModel

tifffile = pytest.importorskip("tifffile")

CLASSES = ["water", "field", "forest"]


def write_multiband(root, *, bands=4, train=8, val=4, manifest=None):
    """img_dir/ + ann_dir/ of 64x64 uint16 TIFFs whose first three bands tell the classes apart (values far
    above 255: an 8-bit squash would lose them) and a fourth that is constant."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        (root / "img_dir" / split).mkdir(parents=True)
        (root / "ann_dir" / split).mkdir(parents=True)
        for i in range(count):
            label = np.zeros((64, 64), np.uint8)
            label[:, 32:] = 1
            label[int(rng.integers(0, 40)):, :20] = 2
            planes = [1000 + 30000 * (label == k) + rng.normal(0, 500, label.shape) for k in range(3)]
            image = np.stack(planes + [np.full(label.shape, 20000.0)] * (bands - 3), -1).clip(0, 65535)
            tifffile.imwrite(root / "img_dir" / split / f"tile{i}.tif", image.astype(np.uint16))
            Image.fromarray(label).save(root / "ann_dir" / split / f"tile{i}.png")
    (root / "dataset.json").write_text(json.dumps({"classes": CLASSES, "bands": bands, **(manifest or {})}))
    return root


QUICK = ["--size", "64", "--batch-size", "4", "--warmup-steps", "0", "--eval-every", "100", "--save-every", "100",
         "--no-plots", "--log-every", "1", "--train-split", "train", "--eval-split", "val"]


def test_adapted_first_convolution_keeps_the_response_to_grey_images(tmp_path, caplog):
    weight = torch.randn(32, 3, 7, 7)
    assert torch.equal(adapt_input_conv(weight, 1), weight.sum(1, keepdim=True))
    assert torch.allclose(adapt_input_conv(weight, 6).sum(1), weight.sum(1), atol=1e-6)  # a multiple of 3: exact
    assert adapt_input_conv(weight, 4).shape == (32, 4, 7, 7)
    model = SegFormer.from_variant("b0", num_labels=3).eval()
    model.save_pretrained(tmp_path / "rgb")
    with caplog.at_level(logging.WARNING, logger="segformer"):
        six = SegFormer.from_pretrained(tmp_path / "rgb", in_channels=6).eval()
    assert "adapted from 3 to 6 input bands" in caplog.text
    grey = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(six(grey.repeat(1, 6, 1, 1)), model(grey.repeat(1, 3, 1, 1)), atol=1e-5)


def test_sixteen_bit_bands_are_read_at_full_precision_and_normalised_per_band(tmp_path, capsys):
    from data.__main__ import main as doctor
    root = write_multiband(tmp_path / "tiles")
    stored = tifffile.imread(root / "img_dir" / "train" / "tile0.tif")
    assert stored.dtype == np.uint16 and stored.max() > 30000
    assert np.array_equal(read_bands(root / "img_dir" / "train" / "tile0.tif"), stored)
    dataset = build_dataset(str(root), "train", train=False, size=64)
    bands = dataset.spec.bands
    assert bands.count == 4 and bands.std[3] == 1.0  # measured on these images; the constant band unscaled
    raw, _ = dataset.load(0)
    assert torch.equal(raw, torch.from_numpy(stored.transpose(2, 0, 1).astype(np.float32)))  # no 8-bit squash
    sample = dataset[0]["pixel_values"]
    expected = (raw - torch.tensor(bands.mean).view(4, 1, 1)) / torch.tensor(bands.std).view(4, 1, 1)
    assert sample.dtype == torch.float32 and torch.allclose(sample, expected, atol=1e-4)
    assert doctor([str(root)]) == 0
    assert 'bands: 4 (stored as uint16); measured over 8 images: "mean": [' in capsys.readouterr().out


def test_a_four_band_tiff_set_trains_fine_tunes_from_rgb_infers_geotiff_and_exports(tmp_path, caplog):
    """A 4-band 16-bit TIFF set trains (B0 with one block per stage: half the export's tracing), fine-tunes
    from RGB weights, infers with GeoTIFF masks, and exports a graph that holds the checkpoint's calibration."""
    import export
    import infer
    root = write_multiband(tmp_path / "tiles")
    (tmp_path / "one_block.json").write_text(json.dumps({"depths": [1, 1, 1, 1]}))
    run_training(tmp_path / "run", "--data", str(root), "--max-steps", "6", "--lr", "1e-3", "--model",
                 str(tmp_path / "one_block.json"), base=QUICK)
    losses = [r["loss"] for r in read_log(tmp_path / "run") if "mean_iou" not in r and "loss" in r]
    assert losses[-1] < losses[0]
    best = tmp_path / "run" / "best"
    assert json.loads((best / "config.json").read_text())["num_channels"] == 4
    preprocessor = json.loads((best / "preprocessor_config.json").read_text())
    assert preprocessor["do_rescale"] is False and len(preprocessor["image_mean"]) == 4

    SegFormer.from_variant("b0", num_labels=3).save_pretrained(tmp_path / "rgb")
    with caplog.at_level(logging.WARNING, logger="segformer"):
        run_training(tmp_path / "ft", "--data", str(root), "--pretrained", str(tmp_path / "rgb"), "--max-steps", "1",
                     base=QUICK)
    assert "adapted from 3 to 4 input bands" in caplog.text

    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin
    image = tifffile.imread(root / "img_dir" / "val" / "tile0.tif")
    where = dict(crs="EPSG:32633", transform=from_origin(500000, 4500000, 10, 10))
    with rasterio.open(tmp_path / "scene.tif", "w", driver="GTiff", height=64, width=64, count=4, dtype="uint16",
                       **where) as dst:
        dst.write(image.transpose(2, 0, 1))
    assert infer.main(infer.get_args(["--checkpoint", str(best), str(tmp_path / "scene.tif"),
                                      "--out", str(tmp_path / "pred")])) == 0
    mask = np.asarray(Image.open(tmp_path / "pred" / "scene_mask.png"))
    with rasterio.open(tmp_path / "pred" / "scene_mask.tif") as geo:
        assert geo.crs.to_string() == "EPSG:32633" and geo.transform == where["transform"]
        assert np.array_equal(geo.read(1), mask)
    assert Image.open(tmp_path / "pred" / "scene_overlay.png").size[1] == 64  # (and a legend beside it)
    import explain
    assert explain.main(["--checkpoint", str(best), str(tmp_path / "scene.tif"), "--out", str(tmp_path / "tour")]) == 0

    write_json({"temperature": 2.0}, best / "calibration.json")  # as --calibrate writes it: the graph divides
    export.export_checkpoint(str(best), tmp_path / "onnx")  # checks the graph against the model itself
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        expected = SegFormer.from_pretrained(best).eval()(x) / 2.0
    assert (OnnxModel(tmp_path / "onnx" / "model.onnx")(x) - expected).abs().max().item() < 1e-4
    assert infer.main(infer.get_args(["--onnx", str(tmp_path / "onnx" / "model.onnx"), str(tmp_path / "scene.tif"),
                                      "--out", str(tmp_path / "pred_onnx")])) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "pred_onnx" / "scene_mask.png")), mask)
    with pytest.raises(ConfigError, match=r"reads 4-band images at full precision: --label-map"):
        export.export_checkpoint(str(best), tmp_path / "onnx2", label_map=True)


@pytest.mark.parametrize("manifest, message", [
    ({"bands": 0}, r"dataset.json: key 'bands' must be the images' band count, 1..64, got 0"),
    ({"mean": [1, 2, 3, 4]}, r"dataset.json: key 'std' is needed with \"std\" / \"mean\""),
    ({"mean": [1, 2], "std": [1, 2]}, r"dataset.json: key 'mean' must be a list of 4 numbers"),
    ({"bands": 3}, r"tile0.tif: 4 band\(s\), the data set says 3"),
])
def test_bad_band_settings_are_one_line_naming_key_or_file(manifest, message, tmp_path):
    root = write_multiband(tmp_path / "tiles", train=2, val=1, manifest=manifest)
    with pytest.raises(DataError, match=message):
        dataset = build_dataset(str(root), "train", size=64)
        dataset.load(0)


def test_an_rgb_checkpoint_is_not_evaluated_on_band_data(tmp_path):
    import train
    root = write_multiband(tmp_path / "tiles", train=2, val=1)
    SegFormer.from_variant("b0", num_labels=3).save_pretrained(tmp_path / "rgb")
    with pytest.raises(train.ConfigError, match=r"reads 8-bit RGB images, the data .* holds 4-band images"):
        train.execute(["--eval-only", "--checkpoint", str(tmp_path / "rgb"), "--data", str(root),
                       "--eval-split", "val", "--size", "64"])


def test_no_data_values_of_a_float_raster_never_reach_the_model(tmp_path, capsys):
    """A float GeoTIFF with NaN pixels (a raster's no-data): the measured statistics were NaN (the doctor said
    "no problems found"), training died with a NaN loss naming no file, and infer.py wrote a mask of class 0
    and exited 0. Now the statistics leave them out, training ignores their labels, infer.py says how many
    pixels had no value, and no logit is NaN."""
    from segformer.inference import Predictor
    root = write_multiband(tmp_path / "tiles", val=2)
    for path in sorted((root / "img_dir").rglob("*.tif")):
        image = tifffile.imread(path).astype(np.float32)
        image[:8, :8] = np.nan  # no data in every band
        image[20, 20, 1] = np.inf  # one band of one pixel
        tifffile.imwrite(path, image)
    dataset = build_dataset(str(root), "train", train=False, size=64)
    assert all(np.isfinite(dataset.spec.bands.mean)) and all(np.isfinite(dataset.spec.bands.std))
    sample = dataset[0]
    assert torch.isfinite(sample["pixel_values"]).all()
    assert (sample["labels"][:8, :8] == 255).all() and (sample["labels"][8:] != 255).all()
    run_training(tmp_path / "run", "--data", str(root), "--max-steps", "2", *QUICK)
    assert all(np.isfinite(r["loss"]) for r in read_log(tmp_path / "run") if "loss" in r)
    model = SegFormer.from_pretrained(tmp_path / "run" / "checkpoint-2").eval()
    predictor = Predictor(model, size=64, bands=dataset.spec.bands, device="cpu")
    raw = read_bands(root / "img_dir" / "val" / "tile0.tif")
    probabilities = predictor(raw, probabilities=True).probabilities
    assert torch.isfinite(probabilities).all()
    import infer
    capsys.readouterr()
    assert infer.main(infer.get_args(["--checkpoint", str(tmp_path / "run" / "checkpoint-2"),
                                      str(root / "img_dir" / "val" / "tile0.tif"), "--out", str(tmp_path / "masks")])) == 0
    assert "tile0.tif: 64 pixels have no finite value in any band (no data); labelled 255 in the mask (ignore" \
        in capsys.readouterr().out
    mask = np.asarray(Image.open(tmp_path / "masks" / "tile0_mask.png"))
    assert (mask[:8, :8] == 255).all() and (mask[8:] != 255).all()  # not the model's guess from the bands' means
    segments = json.loads((tmp_path / "masks" / "tile0.json").read_text())["segments"]
    assert {"id": 255, "label": "no data", "pixels": 64} == {k: segments[-1][k] for k in ("id", "label", "pixels")}


def test_no_data_pixels_are_labelled_as_the_data_says_in_training_and_in_the_masks(tmp_path, capsys):
    """dataset.json's "uncovered": "background" makes them class 0 in training, the checkpoint keeps the rule,
    and infer.py writes them as class 0; a value that is neither rule is one line naming the key."""
    root = write_multiband(tmp_path / "tiles", val=2, manifest={"uncovered": "background"})
    for path in sorted((root / "img_dir").rglob("*.tif")):
        image = tifffile.imread(path).astype(np.float32)
        image[:8, :8] = np.nan
        tifffile.imwrite(path, image)
    sample = build_dataset(str(root), "train", train=False, size=64)[0]
    assert (sample["labels"][:8, :8] == 0).all()
    run_training(tmp_path / "run", "--data", str(root), "--max-steps", "1", *QUICK)
    assert json.loads((tmp_path / "run" / "checkpoint-1" / "preprocessor_config.json").read_text())["nodata"] == \
        "background"
    import infer
    assert infer.main(infer.get_args(["--checkpoint", str(tmp_path / "run" / "checkpoint-1"),
                                      str(root / "img_dir" / "val" / "tile0.tif"), "--out", str(tmp_path / "masks")])) == 0
    assert (np.asarray(Image.open(tmp_path / "masks" / "tile0_mask.png"))[:8, :8] == 0).all()
    (root / "dataset.json").write_text(json.dumps({"classes": CLASSES, "bands": 4, "uncovered": "nothing"}))
    with pytest.raises(DataError, match=r"dataset\.json: \"uncovered\" \(what a pixel with no data in any band is\) "
                                        r"must be 'ignore' or 'background', got 'nothing'"):
        build_dataset(str(root), "train", size=64)


def test_band_images_pil_decodes_hold_the_pixel_limit_one_frame_and_orientation(tmp_path, monkeypatch):
    """read_bands' PIL path (16-bit PNGs, greys) decoded whatever it was given: no pixel limit of its own (PIL's
    DecompressionBombError, or nothing under a lower SEGFORMER_MAX_IMAGE_PIXELS), the first frame of an
    animation without a word, and the stored pixels of a rotated photo whose annotation is read upright."""
    from segformer.images import decode
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    image = Image.fromarray(np.arange(40 * 60, dtype=np.uint16).reshape(40, 60))
    image.save(tmp_path / "grey16.png")
    assert read_bands(tmp_path / "grey16.png").shape == (40, 60, 1)
    monkeypatch.setenv("SEGFORMER_MAX_IMAGE_PIXELS", "2000")
    for read in (read_bands, decode):  # PIL refuses in its header check: its count, in the one line
        with pytest.raises(DataError, match=r"grey16\.png: is 2,400 pixels, more than the 2,000 an image may have"):
            read(tmp_path / "grey16.png")
    monkeypatch.delenv("SEGFORMER_MAX_IMAGE_PIXELS")
    frames = [Image.new("L", (8, 8), v) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match=r"anim\.png: 2 frames or pages; expected one image"):
        read_bands(tmp_path / "anim.png")
    rotated = Image.fromarray(np.arange(6 * 4, dtype=np.uint8).reshape(4, 6))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: shown turned 90 degrees
    rotated.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    assert read_bands(tmp_path / "rotated.jpg").shape[:2] == np.asarray(decode(tmp_path / "rotated.jpg")).shape[:2] \
        == (6, 4)


def test_a_raster_with_no_data_is_drawn_black_there_and_stretched_elsewhere():
    """The overlay's picture of a float raster took its percentiles over NaN: every pixel came out as the cast of
    NaN (a RuntimeWarning, an undefined colour)."""
    import warnings

    from segformer.bands import display_rgb
    raster = np.linspace(0, 1000, 20 * 20 * 3, dtype=np.float32).reshape(20, 20, 3)
    raster[:5] = np.nan
    raster[10, 10, 0] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shown = np.asarray(display_rgb(raster))
    assert (shown[:5] == 0).all() and shown[10, 10, 0] == 0
    assert shown[5:].max() == 255 and len(np.unique(shown[5:])) > 100  # the finite values, stretched
    all_nan = np.full((4, 4, 1), np.nan, np.float32)
    assert (np.asarray(display_rgb(all_nan)) == 0).all()


def test_a_geotiffs_gdal_nodata_value_is_no_data_like_nan(tmp_path):
    """Integer rasters mark no data with a value their GDAL_NODATA tag names (0, -9999, 65535), not NaN: those
    pixels were read as data, pulling the measured mean toward 0 and trained on as whatever class they were
    labelled. Now they are NaN when read, with all that NaN means (statistics, the model's input, the labels)."""
    root = write_multiband(tmp_path / "tiles", val=2)
    for path in sorted((root / "img_dir").rglob("*.tif")):
        image = tifffile.imread(path)
        image[:8, :8] = 65535
        tifffile.imwrite(path, image, extratags=[(42113, "s", 0, "65535", True)])  # GDAL_NODATA = "65535"
    raw = read_bands(root / "img_dir" / "train" / "tile0.tif")
    assert raw.dtype == np.float32 and np.isnan(raw[:8, :8]).all() and np.isfinite(raw[8:]).all()
    dataset = build_dataset(str(root), "train", train=False, size=64)
    assert dataset.spec.bands.mean[3] == pytest.approx(20000.0)  # the constant band: no 65535 averaged in
    sample = dataset[0]
    assert torch.isfinite(sample["pixel_values"]).all() and (sample["labels"][:8, :8] == 255).all()
    tifffile.imwrite(tmp_path / "odd.tif", np.zeros((8, 8, 4), np.uint16), extratags=[(42113, "s", 0, "none", True)])
    with pytest.raises(DataError, match=r"odd\.tif: its GDAL_NODATA tag is 'none'; expected a number"):
        read_bands(tmp_path / "odd.tif")
