"""Images that are not 8-bit RGB photos: 16-bit, multi-band (RGB + near infra-red, 6-band multispectral),
GeoTIFF. Read at full precision with every band, normalised per band with the data's own mean and
standard deviation, in raw units (no squashing to 8 bits first).

A data set says it holds such images with `"bands": N` in its dataset.json (with `"mean"`/`"std"`, one
per band; the dataset doctor computes them); a checkpoint trained on it records the band count
(`num_channels` in config.json) and the statistics (`image_mean`/`image_std` with `do_rescale: false` in
preprocessor_config.json, which transformers' image processor applies the same way). Without it,
images are 8-bit RGB as `segformer/images.py` decides.

`adapt_input_conv` lets 3-band pretrained weights start a model with another band count, as timm's
function of that name does: one band takes the sum of the RGB filters; N > 3 bands repeat them in turn,
scaled by 3 / N, so that a grey image repeated on every band gives the RGB model's response to it
(exactly for 1 band and multiples of 3; roughly otherwise).
"""

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import DataError
from .images import check_pixel_count, decode, file_bytes
from .preprocess import IMAGENET_MEAN, IMAGENET_STD

TIFF_SUFFIXES = (".tif", ".tiff")


NODATA_RULES = {"ignore": 255, "background": 0}  # a pixel with no finite value in any band -> its label


@dataclass(frozen=True)
class Bands:
    """How many bands an image has and how to normalise each: (x - mean) / std in the stored units; and what
    a pixel with no finite value in any band (a raster's no-data) is labelled, in training and in the masks
    infer.py writes: "ignore" (255) or "background" (class 0), the data's `"uncovered"`."""
    count: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    nodata: str = "ignore"

    @property
    def nodata_label(self) -> int:
        return NODATA_RULES[self.nodata]

    def __post_init__(self):
        if self.nodata not in NODATA_RULES:
            raise ValueError(f"bands: no-data pixels (\"uncovered\") are {' or '.join(map(repr, NODATA_RULES))}, "
                             f"got {self.nodata!r}")
        if not (len(self.mean) == len(self.std) == self.count) or self.count < 1:
            raise ValueError(f"bands: {self.count} bands need as many means and stds, got {len(self.mean)} and "
                             f"{len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"bands: every std must be positive, got {list(self.std)}")

    def describe(self) -> str:
        values = lambda xs: ", ".join(f"{x:g}" for x in xs)  # noqa: E731
        return (f"{self.count} bands at full precision, mean [{values(self.mean)}], std [{values(self.std)}]"
                + ("; no-data pixels are class 0" if self.nodata == "background" else ""))

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """float (..., C, H, W) in stored units -> the model's input."""
        shape = (self.count, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=image.device).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32, device=image.device).view(shape)
        return (image.float() - mean) / std


RGB = Bands(3, tuple(255 * m for m in IMAGENET_MEAN), tuple(255 * s for s in IMAGENET_STD))  # what 8-bit photos get


def read_bands(data: bytes | str | Path, name: str | None = None) -> np.ndarray:
    """An image file -> (H, W, C) array of its stored values, every band, any depth (uint8, uint16,
    float32, ...): TIFF through tifffile (multi-band, planar or interleaved, GeoTIFF), the rest through PIL."""
    data, name = file_bytes(data, name)
    if data[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):  # a TIFF (BigTIFF too)
        return _read_tiff(data, name)
    array = np.asarray(decode(data, name))  # PIL's images as everywhere: the pixel limit, one frame, upright
    return array[..., None] if array.ndim == 2 else array


def _read_tiff(data: bytes, name: str) -> np.ndarray:
    try:
        import tifffile
    except ImportError:
        raise DataError(f"{name}: TIFF images with bands are read by tifffile: pip install tifffile (or the "
                        f"project's [geo] extra)") from None
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            series = tiff.series[0]
            if len(tiff.series) > 1:  # pages of other images (not bands): the first would be read without a word
                raise DataError(f"{name}: a TIFF of {len(tiff.series)} images; expected one (its bands as samples "
                                f"or planes of one image): save the one you mean as its own file")
            sizes = dict(zip(series.axes, series.shape))
            check_pixel_count(sizes.get("X", 1), sizes.get("Y", 1), name)  # from the header, before decoding
            array, axes = series.asarray(), series.axes
            nodata = tiff.pages[0].tags.get("GDAL_NODATA")  # GDAL's no-data value (-9999, 0, 65535, ...)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{name}: cannot decode TIFF ({type(e).__name__}: {e})") from None
    if nodata is not None:
        array = with_nodata(array, nodata.value, name)
    if axes == "YX":
        return array[..., None]
    if axes in ("YXS", "YXC"):
        return array
    if axes in ("SYX", "CYX", "QYX", "IYX"):  # planar: bands first
        return np.moveaxis(array, 0, -1)
    raise DataError(f"{name}: a TIFF of axes {axes!r} {array.shape}; expected one image, (Y, X[, bands])")


def with_nodata(array: np.ndarray, value: str, name: str) -> np.ndarray:
    """The values a GeoTIFF's GDAL_NODATA tag names as no data, made NaN (float32; float64 stays), so that they
    are what NaN is everywhere: left out of the statistics, fed as the band mean, labelled as "uncovered" says."""
    try:
        nodata = float(str(value).strip().rstrip("\x00"))
    except ValueError:
        raise DataError(f"{name}: its GDAL_NODATA tag is {str(value)[:40]!r}; expected a number") from None
    missing = np.isnan(array) if math.isnan(nodata) else array == nodata  # compared in the stored type
    result = array.astype(np.float64 if array.dtype == np.float64 else np.float32)
    result[missing] = np.nan
    return result


def to_band_tensor(array: np.ndarray, name: str, count: int) -> torch.Tensor:
    """(H, W, C) stored values -> float32 (C, H, W), checking the band count."""
    if array.shape[-1] != count:
        raise DataError(f"{name}: {array.shape[-1]} band(s), the data set says {count} (\"bands\" in dataset.json)")
    if not np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_:
        raise DataError(f"{name}: pixel type {array.dtype}; expected numbers")
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))


def band_statistics(arrays) -> Bands:
    """Per-band mean and standard deviation over the finite values of some (H, W, C) arrays (float64 sums;
    NaN and infinity, a float raster's no-data, are left out); a constant band gets std 1 (its values minus
    the mean, unscaled). A band with no finite value at all is a ValueError naming it."""
    count, total, squares, pixels = None, None, None, None
    for array in arrays:
        values = array.reshape(-1, array.shape[-1]).astype(np.float64)
        if count is None:
            count, total, squares, pixels = (values.shape[1], np.zeros(values.shape[1]), np.zeros(values.shape[1]),
                                             np.zeros(values.shape[1]))
        finite = np.isfinite(values)
        values = np.where(finite, values, 0.0)
        total += values.sum(0)
        squares += (values ** 2).sum(0)
        pixels += finite.sum(0)
    if (pixels == 0).any():
        raise ValueError(f"band {int(np.argmax(pixels == 0)) + 1} has no finite value in the images measured")
    mean = total / pixels
    std = np.sqrt(np.maximum(squares / pixels - mean ** 2, 0))
    return Bands(count, tuple(float(m) for m in mean), tuple(float(s) if s > 0 else 1.0 for s in std))  # constant: 1


def fill_nonfinite(image: torch.Tensor, bands: Bands) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A float (C, H, W) image in stored units with its NaN and infinite values (a raster's no-data) set to
    their band's mean, so that nothing non-finite reaches the model (a resize would spread it, the logits
    would be NaN), and the (H, W) bool map of the pixels that had no finite value in any band (None when
    every value is finite): training ignores their labels, inference says how many there were."""
    finite = torch.isfinite(image)
    if bool(finite.all()):
        return image, None
    mean = torch.tensor(bands.mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return torch.where(finite, image, mean), ~finite.any(0)


def adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """(out, 3, k, k) RGB filters -> (out, in_channels, k, k), timm's rule (see the module's docstring)."""
    if weight.shape[1] == in_channels:
        return weight
    if weight.shape[1] != 3:
        raise ValueError(f"can only adapt 3-band filters, got {weight.shape[1]} bands")
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeated = weight.repeat(1, math.ceil(in_channels / 3), 1, 1)[:, :in_channels]
    return repeated * (3 / in_channels)


def display_rgb(array: np.ndarray) -> Image.Image:
    """An (H, W, C) image of stored values as a picture to draw on: its first three bands (one band: grey),
    each stretched between its 2nd and 98th percentiles to 0..255."""
    shown = array[..., :3] if array.shape[-1] >= 3 else np.repeat(array[..., :1], 3, axis=-1)
    shown = shown.astype(np.float64)
    shown[~np.isfinite(shown)] = np.nan  # no data: left out of the percentiles, drawn black
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a band with no finite value: all black
        low, high = np.nanpercentile(shown, 2, axis=(0, 1)), np.nanpercentile(shown, 98, axis=(0, 1))
    scaled = np.nan_to_num((shown - low) / np.maximum(high - low, 1e-12) * 255, nan=0.0)
    return Image.fromarray(scaled.clip(0, 255).round().astype(np.uint8))


def georeference(source: Path) -> dict | None:
    """The CRS and transform of a GeoTIFF, where rasterio is installed and the file has them; else None."""
    try:
        import rasterio
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rasterio's NotGeoreferencedWarning: the answer is None
            with rasterio.open(source) as src:
                crs, transform = src.crs, src.transform
    except Exception:  # not a file rasterio reads
        return None
    if crs is None and transform == rasterio.Affine.identity():
        return None
    return {"crs": crs, "transform": transform}


def write_geotiff(label_map: np.ndarray, target: Path, georeferencing: dict) -> None:
    """A label map as a one-band GeoTIFF (deflate) placed where `georeference` says its image lies."""
    import rasterio
    dtype = "uint8" if label_map.max(initial=0) < 256 else "uint16"
    with rasterio.open(target, "w", driver="GTiff", height=label_map.shape[0], width=label_map.shape[1], count=1,
                       dtype=dtype, compress="deflate", **georeferencing) as dst:
        dst.write(label_map.astype(dtype), 1)
