"""One image loader: the same files give the same tensors in training, evaluation, inference, the tour and
the export checks, whatever their orientation, bit depth or colour mode."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import explain
import export
import infer
from data import build_dataset
from helpers import random_image
from segformer import SegFormer
from segformer.images import decode, displayed_size, load_image, read_image, to_tensor
from segformer.preprocess import normalize, resize_image

SIDE = 40


def exif_rotated(image: Image.Image, orientation: int = 6) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: "rotate 90 degrees clockwise to display"
    return exif


def write_photo_folder(root):
    """An images/ + annotations/ folder of one photo in each awkward form, with annotations drawn on the
    photos as a viewer shows them. Returns {stem: the displayed image as uint8 (3, H, W)}."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    base = random_image(SIDE, SIDE, seed=7)
    grey16 = (np.asarray(base.convert("L")).astype(np.uint16) * 257 + np.arange(SIDE)[None, :] % 200).astype(np.uint16)
    displayed = {}
    # A square phone photo stored sideways with an EXIF orientation: every size check passes either way.
    stored = base.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back to `base`
    stored.save(root / "images" / "rotated.jpg", exif=exif_rotated(stored), quality=95)
    displayed["rotated"] = base
    Image.fromarray(grey16).save(root / "images" / "grey16.png")  # 16-bit: 1/257 of it, everywhere
    displayed["grey16"] = Image.fromarray(np.round(grey16 / 257).astype(np.uint8)).convert("RGB")
    for stem, mode in (("palette", "P"), ("cmyk", "CMYK"), ("alpha", "RGBA"), ("greyalpha", "LA"), ("grey", "L")):
        converted = base.convert(mode)
        converted.save(root / "images" / f"{stem}.{'jpg' if mode == 'CMYK' else 'png'}")
        displayed[stem] = converted.convert("RGB")
    labels = np.zeros((SIDE, SIDE), np.uint8)
    labels[:, : SIDE // 4] = 1  # a left band: rotated by 90 degrees, it would be a top band
    for stem in displayed:
        Image.fromarray(labels).save(root / "annotations" / f"{stem}.png")
    return displayed


def test_every_path_reads_the_same_pixels(tmp_path):
    write_photo_folder(tmp_path / "photos")
    dataset = build_dataset(str(tmp_path / "photos"), "train", num_labels=2, test_size=0, train=False,
                            reduce_labels=False, size=SIDE)
    size = 32
    checked = export.check_images(str(tmp_path / "photos" / "images"), size, count=100)
    files = sorted((tmp_path / "photos" / "images").iterdir())
    model = SegFormer.from_variant("b0", num_labels=2, depths=(1, 1, 1, 1)).eval()
    for i, (path, exported) in enumerate(zip(files, checked)):
        image, labels = dataset.load(i)  # training and evaluation
        assert dataset.samples.name(i) == str(path)
        assert torch.equal(to_tensor(load_image(path)), image), path.name  # infer.py and explain.py
        assert torch.equal(read_image(path), image), path.name
        assert torch.equal(exported, normalize(resize_image(image, (size, size)))), path.name  # export.py's checks
        tour = explain.tour(model, load_image(path), size=size, pixel=(3, 3))
        assert torch.equal(tour["input"], normalize(resize_image(image, (size, size)))), path.name
        assert (labels[:, : SIDE // 4] == 1).all() and (labels[:, SIDE // 4:] == 0).all()  # still a left band


def test_orientation_and_bit_depth_are_decided_once(tmp_path):
    displayed = write_photo_folder(tmp_path / "photos")
    for path in sorted((tmp_path / "photos" / "images").iterdir()):
        got = read_image(path)
        if path.suffix == ".jpg":  # lossy: what a viewer shows of the file
            assert torch.equal(got, to_tensor(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))), path.name
        else:
            assert torch.equal(got, to_tensor(displayed[path.stem])), path.name
    rotated = read_image(tmp_path / "photos" / "images" / "rotated.jpg").float()
    upright, sideways = to_tensor(displayed["rotated"]).float(), to_tensor(displayed["rotated"]).float().mT
    assert (rotated - upright).abs().mean() < 0.3 * (rotated - sideways).abs().mean()
    wide = random_image(20, 50)  # stored 50 wide, 20 high; shown 20 wide, 50 high
    wide.save(tmp_path / "wide.jpg", exif=exif_rotated(wide))
    assert decode(tmp_path / "wide.jpg").size == (20, 50) == displayed_size((tmp_path / "wide.jpg").read_bytes(), "x")
    grey16 = read_image(tmp_path / "photos" / "images" / "grey16.png")
    assert grey16.max() > 200  # not clipped to white or squashed to black


def test_a_photo_whose_annotation_was_drawn_on_the_stored_pixels_is_named(tmp_path):
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    stored = random_image(20, 50)
    stored.save(root / "images" / "a.jpg", exif=exif_rotated(stored))
    Image.fromarray(np.zeros((20, 50), np.uint8)).save(root / "annotations" / "a.png")  # the stored pixels' size
    dataset = build_dataset(str(root), "train", num_labels=2, test_size=0, reduce_labels=False, size=32)
    from segformer.errors import DataError
    with pytest.raises(DataError, match=r"a\.png: the annotation is 50x20 \(WxH\) but its image .*a\.jpg is 20x50 \(as "
                                        r"displayed: its EXIF orientation applied"):
        dataset[0]


def test_inference_sees_a_16_bit_image_as_training_does(tmp_path):
    """A model trained on 16-bit greys must see the same input from infer.py: not a white image."""
    torch.manual_seed(0)
    model = SegFormer.from_variant("b0", num_labels=3, depths=(1, 1, 1, 1))
    model.save_pretrained(tmp_path / "model")
    write_photo_folder(tmp_path / "photos")
    path = tmp_path / "photos" / "images" / "grey16.png"
    assert infer.main(infer.get_args(["--checkpoint", str(tmp_path / "model"), str(path), "--size", "32",
                                      "--out", str(tmp_path / "out")])) == 0
    from segformer.inference import Predictor
    expected = Predictor(model, size=32, device="cpu")(read_image(path)).label_map
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "grey16_mask.png")), expected.numpy())


def test_an_empty_or_unreadable_image_file_is_named_without_pils_buffer(tmp_path):
    """A zero-byte file said "cannot identify image file <_io.BytesIO object at 0x...>"."""
    from segformer.errors import DataError
    from segformer.images import decode
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"empty\.png: an empty file \(0 bytes\); expected an image"):
        decode(tmp_path / "empty.png")
    with pytest.raises(DataError, match=r"junk\.png: cannot decode image \(UnidentifiedImageError: cannot identify "
                                        r"image file\)$"):
        decode(tmp_path / "junk.png")


def test_an_animation_or_a_huge_tiff_is_named_not_read_in_part_or_whole(tmp_path):
    """An animated image or a multi-page file was read at its first frame without a word; a tiled TIFF of a
    few MB that decodes to 30000 x 30000 x 4 was decoded whole (the PIL path had a pixel limit, not TIFF's)."""
    tifffile = pytest.importorskip("tifffile")
    from segformer.bands import read_bands
    from segformer.errors import DataError
    from segformer.images import decode
    frames = [random_image(20, 30, seed=i) for i in range(3)]
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(DataError, match=r"moving\.gif: 3 frames or pages; expected one image"):
        decode(tmp_path / "moving.gif")
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tiff:
        tiff.write(np.zeros((20, 30), np.uint16))
        tiff.write(np.zeros((10, 10), np.uint8))
    with pytest.raises(DataError, match=r"pages\.tif: a TIFF of 2 images; expected one"):
        read_bands(tmp_path / "pages.tif")
    with tifffile.TiffWriter(tmp_path / "huge.tif", bigtiff=True) as tiff:  # tiles of zeros: a small file
        tiff.write(shape=(14000, 14000), dtype=np.uint8, tile=(2048, 2048), compression="zlib",
                   data=iter(np.zeros((2048, 2048), np.uint8) for _ in range(7 * 7)))
    assert (tmp_path / "huge.tif").stat().st_size < 50_000_000
    with pytest.raises(DataError, match=r"huge\.tif: is 14000x14000 pixels, more than the [\d,]+ an image may have"):
        read_bands(tmp_path / "huge.tif")


def test_one_configurable_pixel_limit_for_every_decoder_and_declared_size(tmp_path, monkeypatch):
    """PIL, tifffile and a LabelMe canvas refuse beyond the same limit in the same line; the environment
    variable sets it for all of them (PIL's own check follows), and a bad value is one line."""
    import json

    import tifffile

    from data.labelling import draw_labelme
    from segformer.bands import read_bands
    from segformer.errors import ConfigError, DataError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    random_image(40, 50, seed=0).save(tmp_path / "photo.png")
    tifffile.imwrite(tmp_path / "bands.tif", np.zeros((40, 50, 4), np.uint16))
    document = {"imagePath": "photo.png", "imageData": None, "imageHeight": 40, "imageWidth": 50, "shapes": []}
    (tmp_path / "canvas.json").write_text(json.dumps(document))
    assert decode(tmp_path / "photo.png").size == (50, 40) and read_bands(tmp_path / "bands.tif").shape == (40, 50, 4)
    monkeypatch.setenv("SEGFORMER_MAX_IMAGE_PIXELS", "1999")
    refusals = [(lambda: decode(tmp_path / "photo.png"), "photo.png: is 50x40"),
                (lambda: read_bands(tmp_path / "bands.tif"), "bands.tif: is 50x40"),
                (lambda: draw_labelme(tmp_path / "canvas.json", ("background",)), "canvas.json: declares 50x40")]
    for read, said in refusals:
        with pytest.raises(DataError) as refused:
            read()
        assert str(refused.value).endswith(f"{said} pixels, more than the 1,999 an image may have "
                                           f"(SEGFORMER_MAX_IMAGE_PIXELS raises the limit)")
    assert Image.MAX_IMAGE_PIXELS == 1000  # PIL's own check (at twice this) follows the same limit
    monkeypatch.setenv("SEGFORMER_MAX_IMAGE_PIXELS", "2000")
    assert decode(tmp_path / "photo.png").size == (50, 40)
    monkeypatch.setenv("SEGFORMER_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ConfigError, match="SEGFORMER_MAX_IMAGE_PIXELS='lots': expected a positive whole number"):
        decode(tmp_path / "photo.png")


def test_the_float_resize_of_devices_without_a_uint8_kernel_is_within_a_grey_level():
    """CUDA has no uint8 antialiased bilinear kernel (Predictor on a GPU raised NotImplementedError): there
    resize_image goes through float32; its bytes are within one grey level of the CPU's uint8 kernel."""
    from segformer.preprocess import resize_in_float
    image = torch.randint(0, 256, (3, 211, 317), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for size in ((64, 64), (300, 500), (211, 100)):
        native, through_float = resize_image(image, size), resize_in_float(image, size)
        assert through_float.dtype == torch.uint8 and through_float.shape == native.shape
        assert (through_float.int() - native.int()).abs().max() <= 1, size
