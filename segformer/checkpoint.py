"""Checkpoints: finding one (a file, a directory or a hub repo id), what it says of itself (`describe`, the
one reader every script asks), and reading its tensors. Writing them: `segformer/files.py`."""

import json
import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from . import weight_layouts
from .bands import Bands
from .calibration import read_temperature
from .config import SegFormerConfig
from .errors import CheckpointError, ConfigError
from .files import read_json, read_json_object, write_json

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
SIDE_FILES = ("preprocessor_config.json", "palette.json")  # beside the weights, where a checkpoint has them


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or of a torch checkpoint (`.pth`, `.bin`: loaded with
    weights_only=True; an mmseg `{"state_dict": ...}` wrapper is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from None
        for wrapper in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{path}: expected a dict of tensors (a state_dict), got {type(obj).__name__}")
        return obj
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file, or truncated ({e})") from None


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor in a weights file; a safetensors file is read from its header only."""
    path = Path(path)
    if path.suffix in TORCH_SUFFIXES or not path.is_file():
        return {name: tuple(t.shape) for name, t in read_state_dict(path).items()}
    try:
        with safe_open(path, framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid safetensors file, or truncated ({e})") from None


def resolve(source: str | Path) -> tuple[Path, Path | None]:
    """(weights file, config.json or None) for a file, a directory, or a hub repo id.

    Hub ids go through huggingface_hub, so its cache, HF_HOME, HF_HUB_OFFLINE=1 and tokens apply."""
    path = Path(source)
    if path.is_file():
        config = path.parent / "config.json"
        return path, config if path.name in WEIGHT_FILES and config.is_file() else None
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                config = path / "config.json"
                return path / name, config if config.is_file() else None
        raise CheckpointError(f"{path}: directory holds none of {', '.join(WEIGHT_FILES)}")
    if _looks_like_path(str(source)):
        raise CheckpointError(f"{source}: no such file or directory")
    return _download(str(source))


def _looks_like_path(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep in source.replace("/", "")
            or Path(source).suffix in TORCH_SUFFIXES + (".safetensors",))


def _download(repo_id: str) -> tuple[Path, Path | None]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    def fetch(filename):
        try:
            return Path(hf_hub_download(repo_id, filename))
        except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: not cached, and offline
            raise
        except EntryNotFoundError:  # the repository has no such file
            return None

    try:
        config = fetch("config.json")
        for name in WEIGHT_FILES:
            weights = fetch(name)
            if weights is not None:
                for side_file in SIDE_FILES:  # into the same snapshot folder, beside the weights, where it has them
                    try:
                        fetch(side_file)
                    except LocalEntryNotFoundError:  # offline, and never fetched: the checkpoint works without
                        pass
                return weights, config
    except GatedRepoError:
        raise CheckpointError(f"{repo_id}: a gated repository; accept its terms on the hub and log in "
                              f"(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo_id}: neither a local path nor a repository on the hub") from None
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"{repo_id}: not in the local hub cache and the hub cannot be reached "
                              f"(offline mode or no network): {e}") from None
    raise CheckpointError(f"{repo_id}: the repository holds none of {', '.join(WEIGHT_FILES)}")


def write_preprocessor_config(directory: str | Path, *, size: int, reduce_labels: bool, bands=None) -> None:
    """The `preprocessor_config.json` of `SegformerImageProcessor` for the size a model was trained
    at, so that inference (ours, or transformers' AutoImageProcessor) feeds it the same input. `bands`
    (segformer.bands.Bands): full-precision images, normalised per band in stored units (no rescale)."""
    from .preprocess import IMAGENET_MEAN, IMAGENET_STD  # here: loading a model needs no torchvision
    normalisation = {"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                     "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
    if bands is not None:
        normalisation = {"do_rescale": False, "rescale_factor": 1.0, "do_normalize": True,
                         "image_mean": list(bands.mean), "image_std": list(bands.std), "num_bands": bands.count,
                         "nodata": bands.nodata}  # what a pixel with no data in any band is labelled
    write_json({
        "image_processor_type": "SegformerImageProcessor",
        "do_resize": True, "size": {"height": size, "width": size}, "resample": 2,  # bilinear
        **normalisation, "do_reduce_labels": reduce_labels,
    }, Path(directory) / "preprocessor_config.json")


def read_model_config(path: str | Path) -> SegFormerConfig:
    """A model's settings from a JSON file: transformers' config.json (what `save_pretrained` writes), or an
    object of SegFormerConfig's fields, e.g. {"depths": [1, 1, 1, 1], "attention": "linear"}, on top of B0's.
    What it gets wrong is a CheckpointError naming the file and the key."""
    values = read_json_object(path)
    if "model_type" in values:
        return SegFormerConfig.from_hf_dict(values, source=str(path))
    known = {f.name for f in fields(SegFormerConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CheckpointError(f"{path}: unknown key {unknown[0]!r}; expected SegFormerConfig's fields "
                              f"({', '.join(sorted(known))}) or transformers' config.json")
    try:
        return replace(SegFormerConfig(), **values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


# ---- what a checkpoint says of itself ------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointFacts:
    """What a checkpoint says of itself, read once by `describe`: every script and `from_pretrained` ask
    this instead of reading the files their own way."""
    source: str
    weights: Path
    config: SegFormerConfig  # the model it holds: from config.json, else read off the weights' shapes
    config_file: Path | None
    head_labels: int | None  # rows of the segmentation classifier in the weights; None: an encoder only
    size: int | None  # the input size in preprocessor_config.json
    reduce_labels: bool | None  # its do_reduce_labels (older files: reduce_labels)
    palette: tuple | None  # palette.json: the class colours of the data it was trained on
    training_args: Path | None  # training_args.json: a checkpoint of this project's train.py
    bands: "Bands | None" = None  # full-precision images of several bands (preprocessor_config.json); None: RGB
    temperature: float | None = None  # calibration.json: the logits' temperature fitted on validation data

    @property
    def conflict(self) -> str | None:
        """config.json and the weights disagreeing on the number of classes, said in one line."""
        if self.head_labels is None or self.head_labels == self.config.num_labels:
            return None
        return (f"{self.config_file} says {self.config.num_labels} labels, but the classifier in {self.weights} has "
                f"{self.head_labels}")

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """The classes of its segmentation head (LABEL_<i> where unnamed); None for an encoder only, or
        where config.json names another number of classes than the head has."""
        if self.head_labels is None or self.conflict:
            return None
        return tuple(self.config.label_names())

    def segmentation_classes(self) -> tuple[str, ...]:
        """`class_names`, or a ConfigError saying why this checkpoint cannot segment and what to do."""
        if self.class_names is not None:
            return self.class_names
        if self.conflict:
            raise ConfigError(f"{self.conflict}: correct its config.json")
        raise ConfigError(f"{self.source} holds an encoder only (no decode head), which cannot segment: "
                          f"fine-tune it first (train.py --pretrained {self.source}) and use that checkpoint")


def describe(source: str | Path) -> CheckpointFacts:
    """The facts of a checkpoint (a directory, a weights file or a hub id) from its config.json, the
    shapes of its weights (a safetensors header, not the tensors) and its side files."""
    weights, config_file = resolve(source)
    shapes = read_shapes(weights)
    hf = read_json_object(config_file) if config_file is not None else None
    if hf is not None and "_model_class" in hf:  # segmentation_models_pytorch's own config.json: not ours to read
        config_file = hf = None
    if hf is not None:
        config = SegFormerConfig.from_hf_dict(hf, source=str(config_file))
    else:  # the settings are in the shapes: converted on the meta device, no memory taken
        meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
        config = weight_layouts.infer_config(weight_layouts.to_native(meta, source=str(weights))[0])
    return CheckpointFacts(source=str(source), weights=weights, config=config, config_file=config_file,
                           head_labels=weight_layouts.classifier_rows(shapes), **read_side_files(weights.parent))


def read_side_files(folder: Path) -> dict:
    """What the files beside a model say: the input size, label reduction and normalisation
    (preprocessor_config.json), the class colours (palette.json) and the run's settings (training_args.json,
    where train.py wrote it)."""
    return dict(**read_preprocessor(folder / "preprocessor_config.json"), temperature=read_temperature(folder),
                palette=_read_palette(folder / "palette.json"),
                training_args=folder / "training_args.json" if (folder / "training_args.json").is_file() else None)


def read_preprocessor(path: Path) -> dict:
    """A `preprocessor_config.json` (SegformerImageProcessor's keys; `num_bands`/`nodata` ours), each key it has
    checked: a value that would be ignored or misread (a size that is not a positive whole number, a reduction
    that is not true or false, 8-bit RGB normalised other than ImageNet's way, which this project's inference
    and training apply) is a CheckpointError naming the file and key, never a silent default."""
    from .images import declared_pixel_limit
    from .preprocess import IMAGENET_MEAN, IMAGENET_STD  # here: loading a model needs no torchvision
    preprocessor = read_json_object(path) if path.is_file() else {}

    def fail(key, expected):
        raise CheckpointError(f"{path}: key {key!r} must be {expected}, got {preprocessor[key]!r:.80}")
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    size = preprocessor.get("size")
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    if "size" in preprocessor and not whole(size):
        fail("size", '{"height": H, "width": W} (or an integer) of positive whole numbers')
    if size is not None and size * size > (limit := declared_pixel_limit()):
        fail("size", f"an input size of at most {limit:,} pixels")
    reduce_labels = preprocessor.get("do_reduce_labels", preprocessor.get("reduce_labels"))  # older: reduce_labels
    for key in ("do_reduce_labels", "reduce_labels", "do_rescale", "do_normalize", "do_resize"):
        if key in preprocessor and not isinstance(preprocessor[key], bool):
            fail(key, "true or false")
    if preprocessor.get("do_normalize") is False:
        fail("do_normalize", "true: this project normalises every image the model is fed")
    if "num_bands" in preprocessor and preprocessor.get("do_rescale") is not False:
        fail("num_bands", 'given with "do_rescale": false (full-precision bands, which are not rescaled)')
    numbers = lambda v, n: isinstance(v, list) and len(v) == n and all(  # noqa: E731
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    if preprocessor.get("do_rescale") is False and "num_bands" in preprocessor:  # ours, for full-precision bands
        count = preprocessor["num_bands"]
        if not (whole(count) and count <= 64):
            fail("num_bands", "the images' band count, 1..64")
        for key in ("image_mean", "image_std"):
            value = preprocessor.get(key)
            if not numbers(value, count) or (key == "image_std" and min(value) <= 0):
                raise CheckpointError(f"{path}: key {key!r} must be {count} finite numbers (one per band"
                                      f"{', positive' if key == 'image_std' else ''}), got {value!r:.80}")
        try:
            bands = Bands(count, tuple(map(float, preprocessor["image_mean"])),
                          tuple(map(float, preprocessor["image_std"])), nodata=preprocessor.get("nodata", "ignore"))
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        return dict(size=size, reduce_labels=reduce_labels, bands=bands)
    for key, imagenet in (("image_mean", IMAGENET_MEAN), ("image_std", IMAGENET_STD)):
        if key in preprocessor and not (numbers(preprocessor[key], 3) and
                                        all(abs(a - b) < 1e-3 for a, b in zip(preprocessor[key], imagenet))):
            fail(key, f"ImageNet's {list(imagenet)}, with which this project normalises 8-bit RGB images (every "
                      f"SegFormer checkpoint's); a model trained with other values would be fed inputs it never saw")
    factor = preprocessor.get("rescale_factor", 1 / 255)
    if preprocessor.get("do_rescale", True) and not (isinstance(factor, (int, float)) and abs(factor - 1 / 255) < 1e-6):
        fail("rescale_factor", "1/255 (8-bit values to 0..1), as this project rescales")
    return dict(size=size, reduce_labels=reduce_labels, bands=None)


def _read_palette(file: Path) -> tuple | None:
    if not file.is_file():
        return None
    colours = read_json(file)
    try:
        palette = tuple(tuple(int(v) for v in colour) for colour in colours)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: expected a list of [r, g, b] colours ({e})") from None
    if not all(len(colour) == 3 and all(0 <= v <= 255 for v in colour) for colour in palette):
        raise CheckpointError(f"{file}: expected a list of [r, g, b] colours of integers 0..255")
    return palette
