"""Images in, one way everywhere: training, evaluation, inference, the tour and the export checks.

Two rules, decided here and nowhere else:

* Orientation: a photo's EXIF orientation is applied on decoding, to images and annotations alike, so
  pixels are what an image viewer (and transformers' `load_image`) shows. An annotation drawn on the
  displayed photo lines up with it; one drawn on the stored pixels of a rotated photo does not, and the
  size check that follows names both files.
* Colours: any PIL mode becomes 8-bit RGB the same way. 16- and 32-bit greys (`I;16*`, `I`) are scaled
  by 1/257 (65535 -> 255), float greys (`F`) are clipped to 0..255, alpha is dropped, palette, CMYK,
  1-bit and grey images are converted by PIL.
"""

import io
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .errors import DataError
from .files import read_bytes

# What a folder of images holds; an animation's first frame is the image.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"})
EXIF_ORIENTATION = 0x0112
TRANSPOSED = {5, 6, 7, 8}  # orientations that swap width and height


def is_image_file(path: Path) -> bool:
    """An image by its suffix; hidden files (macOS `._*` included) and directories are not."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and not path.is_dir()


def file_bytes(data: bytes | str | Path, name: str | None = None) -> tuple[bytes, str]:
    """(the bytes, the name errors give it) of an image file given by its path or its bytes; a file that
    cannot be read is a DataError naming it."""
    name = name or (str(data) if isinstance(data, (str, Path)) else "an image")
    if isinstance(data, (str, Path)):  # a regular file only: a FIFO blocks, /dev/zero fills the memory
        data = read_bytes(Path(data), error=DataError, expected="an image file")
    return data, name


PIXEL_LIMIT_VARIABLE = "SEGFORMER_MAX_IMAGE_PIXELS"
DEFAULT_PIXEL_LIMIT = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)  # PIL's refusal as it comes (not as set later)


def declared_pixel_limit() -> int:
    """The most pixels an image may have, for every decoder (PIL, tifffile, rasterio) and every size a file
    declares (a COCO image entry, a LabelMe canvas): checked from the header or the declaration, before
    anything of that size is allocated or decoded. PIL's own refusal (twice its warning limit, 178,956,970)
    unless the environment variable SEGFORMER_MAX_IMAGE_PIXELS sets another, which PIL then follows too."""
    value = os.environ.get(PIXEL_LIMIT_VARIABLE)
    if value is None:
        return DEFAULT_PIXEL_LIMIT
    if not value.strip().isdigit() or int(value) < 1:
        from .errors import ConfigError
        raise ConfigError(f"{PIXEL_LIMIT_VARIABLE}={value!r}: expected a positive whole number of pixels")
    Image.MAX_IMAGE_PIXELS = (int(value) + 1) // 2  # PIL refuses beyond twice this: beyond ours, we refuse first
    return int(value)


def check_pixel_count(width: int, height: int, name: str, *, declared: bool = False) -> None:
    """The one refusal of an image beyond `declared_pixel_limit()`, named by `name`."""
    limit = declared_pixel_limit()
    if width * height > limit:
        raise DataError(pixel_count_problem(width, height, name, limit, declared=declared))


def pixel_count_problem(width: int, height: int, name: str, limit: int, *, declared: bool = False) -> str:
    return (f"{name}: {'declares' if declared else 'is'} {width}x{height} pixels, more than the {limit:,} an image "
            f"may have ({PIXEL_LIMIT_VARIABLE} raises the limit)")


def cannot_decode(error: Exception, name: str, limit: int) -> DataError:
    """PIL's failure to open or decode an image file as one line naming the file: its own header check
    (DecompressionBombError, at the same limit: `declared_pixel_limit` sets it) as the one pixel-limit line, with
    PIL's count (it refuses before it returns the image: no sides); anything else as PIL says it, without the
    name of its buffer (the file is named already)."""
    if isinstance(error, Image.DecompressionBombError):
        found = re.search(r"\((\d+) pixels\)", str(error))
        count = f"{int(found.group(1)):,}" if found else "more"
        return DataError(f"{name}: is {count} pixels, more than the {limit:,} an image may have "
                         f"({PIXEL_LIMIT_VARIABLE} raises the limit)")
    reason = str(error).split(" <_io.BytesIO")[0]
    return DataError(f"{name}: cannot decode image ({type(error).__name__}: {reason})")


def decode(data: bytes | str | Path, name: str | None = None) -> Image.Image:
    """An image file (its bytes or its path), decoded fully now (a corrupt or truncated file fails here,
    naming it) and turned as its EXIF orientation says. The image keeps `name` as PIL's `filename`, for
    errors found later. Any mode: see `to_rgb` for images, annotations keep theirs."""
    data, name = file_bytes(data, name)
    if not data:
        raise DataError(f"{name}: an empty file (0 bytes); expected an image")
    limit = declared_pixel_limit()  # also sets PIL's own, where SEGFORMER_MAX_IMAGE_PIXELS is given
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > limit:  # PIL's header check: the same line as every decoder's
            raise DataError(pixel_count_problem(image.width, image.height, name, limit))
        frames = getattr(image, "n_frames", 1)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
    except DataError:
        raise
    except Exception as e:  # not an image, truncated, a broken EXIF block, past PIL's own limit
        raise cannot_decode(e, name, limit) from None
    if frames > 1:  # an animation or a multi-page file: its first frame would be read without a word
        raise DataError(f"{name}: {frames} frames or pages; expected one image (a video goes to infer.py as a "
                        f"video file; save the frame or page you mean as its own image)")
    image.filename = name
    return image


def displayed_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) of an image file as `decode` turns it, read from its header without decoding."""
    limit = declared_pixel_limit()
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as e:
        raise cannot_decode(e, name, limit) from None
    if width * height > limit:  # the same line as decode's
        raise DataError(pixel_count_problem(width, height, name, limit))
    return (height, width) if orientation in TRANSPOSED else (width, height)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8, by the rule in the module's docstring."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        grey = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            grey = grey / 257.0  # 16-bit range -> 8-bit range
        return np.repeat(grey.clip(0, 255).round().astype(np.uint8)[..., None], 3, axis=2)
    array = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    if array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"{getattr(image, 'filename', '') or 'an image'}: cannot convert mode {image.mode} to RGB")
    return array


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> an RGB image, by the rule above (what inference draws its overlays on)."""
    return image if image.mode == "RGB" else Image.fromarray(to_rgb_array(image))


def to_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """A PIL image of any mode, or a uint8 (3, H, W) tensor as it is -> uint8 (3, H, W)."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(to_rgb_array(image).copy()).permute(2, 0, 1)  # a copy torch may write to
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3:
        return image
    raise TypeError(f"expected a PIL image or a uint8 (3, H, W) tensor, got {type(image).__name__}"
                    + (f" {image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else ""))


def load_image(path: str | Path) -> Image.Image:
    """An image file as the model sees it everywhere: decoded, turned upright, RGB."""
    return to_rgb(decode(path))


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as uint8 (3, H, W): `load_image`, as a tensor."""
    return to_tensor(decode(path))
