"""Files written so that an interrupted write never leaves half a file behind: every file of a checkpoint,
a run folder, a report or a prediction is written to a temporary name, fsynced and renamed over its own
(`atomic_write`), and a folder is checked to take files before anything is written to it
(`writable_folder`). And the one JSON reader that names the file whatever is wrong with it."""

import io
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save

from .errors import CheckpointError, ConfigError, UserError


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


def writable_folder(path: str | Path, flag: str = "--out") -> Path:
    """`path` as a folder that exists and takes files, created if need be; otherwise a ConfigError naming
    the flag and why (a file is there, no permission, a read-only or full disk)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path}: a file is there; expected a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write there ({e.strerror or type(e).__name__})") from None
    return path


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


def read_json_object(path: Path, *, error: type[UserError] = CheckpointError) -> dict:
    """A JSON file that must hold an object; anything else is an `error` naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
