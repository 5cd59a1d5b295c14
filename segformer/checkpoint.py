"""Files: finding a checkpoint (file, directory or hub repo id), reading its tensors, and writing
files atomically so that an interrupted save never leaves a half-written file behind."""

import io
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def atomic_write(path: str | Path, write) -> None:
    """Call `write(tmp_path)`, fsync, then rename tmp_path over `path` (atomic on POSIX and Windows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_all(path: str | Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def write_bytes(data: bytes, path: str | Path) -> None:
    """Atomic and fsynced. Every file of a checkpoint is serialised in memory and written here, by
    Python, so that a full disk is always an OSError (ENOSPC): safetensors' own writer reports it as a
    SafetensorError, and torch.save as a RuntimeError from its zip writer."""
    atomic_write(path, lambda tmp: _write_all(tmp, data))


def write_json(obj, path: str | Path) -> None:
    write_bytes((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), path)


def write_safetensors(state_dict: dict, path: str | Path) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    write_bytes(save(tensors, metadata={"format": "pt"}), path)


def write_torch(obj, path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(buffer.getvalue(), path)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or of a torch checkpoint (`.pth`, `.bin`: loaded with
    weights_only=True; an mmseg `{"state_dict": ...}` wrapper is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: cannot read as a torch checkpoint ({type(e).__name__}: {e})") from None
        for wrapper in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path}: expected a dict of tensors (a state_dict), got {type(obj).__name__}")
        return obj
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a valid safetensors file, or truncated ({e})") from None


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
        raise FileNotFoundError(f"{path}: directory holds none of {', '.join(WEIGHT_FILES)}")
    if _looks_like_path(str(source)):
        raise FileNotFoundError(f"{source}: no such file or directory")
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
                return weights, config
    except GatedRepoError:
        raise PermissionError(f"{repo_id}: a gated repository; accept its terms on the hub and log in "
                              f"(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{repo_id}: neither a local path nor a repository on the hub") from None
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"{repo_id}: not in the local hub cache and the hub cannot be reached "
                                f"(offline mode or no network): {e}") from None
    raise FileNotFoundError(f"{repo_id}: the repository holds none of {', '.join(WEIGHT_FILES)}")


def write_preprocessor_config(directory: str | Path, *, size: int, reduce_labels: bool) -> None:
    """The `preprocessor_config.json` of `SegformerImageProcessor` for the size a model was trained
    at, so that inference (ours, or transformers' AutoImageProcessor) feeds it the same input."""
    from .preprocess import IMAGENET_MEAN, IMAGENET_STD  # here: loading a model needs no torchvision
    write_json({
        "image_processor_type": "SegformerImageProcessor",
        "do_resize": True, "size": {"height": size, "width": size}, "resample": 2,  # bilinear
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
        "do_reduce_labels": reduce_labels,
    }, Path(directory) / "preprocessor_config.json")


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; anything else is an error naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_preprocessor_config(source: str | Path) -> dict:
    """The `preprocessor_config.json` beside a checkpoint (a directory, or a file in one); {} if none."""
    path = Path(source)
    config = (path if path.is_dir() else path.parent) / "preprocessor_config.json"
    return read_json_object(config) if config.is_file() else {}


def read_palette(source: str | Path) -> list[tuple[int, int, int]] | None:
    """The class colours in a checkpoint directory's `palette.json` (written where the training data
    defined them), or None."""
    path = Path(source)
    file = (path if path.is_dir() else path.parent) / "palette.json"
    if not file.is_file():
        return None
    try:
        colours = json.loads(file.read_text())
        return [tuple(int(v) for v in colour) for colour in colours if len(colour) == 3]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{file}: expected a list of [r, g, b] colours ({e})") from None


def read_input_size(source: str | Path) -> int | None:
    """The square input size in a checkpoint directory's `preprocessor_config.json`, if any."""
    size = read_preprocessor_config(source).get("size", {})
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge")
    return int(size) if size else None


def segmentation_labels(source: str | Path) -> list[str] | None:
    """The class names of a checkpoint's segmentation head, from its `config.json`; None where there is
    no config or it describes another model (the ImageNet classifiers of `nvidia/mit-b*`)."""
    from .config import SegFormerConfig
    _, config_path = resolve(source)
    if config_path is None:
        return None
    hf = read_json_object(config_path)
    if "SegformerForSemanticSegmentation" not in hf.get("architectures", ["SegformerForSemanticSegmentation"]):
        return None
    return SegFormerConfig.from_hf_dict(hf, source=str(config_path)).label_names()
