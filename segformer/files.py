"""Files written so that an interrupted write never leaves half a file behind: every file of a checkpoint,
a run folder, a report or a prediction is written to a temporary name, fsynced and renamed over its own
(`atomic_write`), and a folder is checked to take files before anything is written to it
(`writable_folder`). And the one reader of every file a reader opens (an image, an annotation, a list, a
JSON file): a regular file of a bounded size, its text UTF-8, whatever is wrong named with the file."""

import io
import json
import os
import stat
import sys
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


JSON_LIMIT = 1 << 30  # bytes: COCO's largest official annotation files are under 500 MB
FILE_LIMIT = 1 << 32  # bytes: an image at the pixel limit, 4 float32 bands, uncompressed, is 2.9 GB


def is_file(path: str | Path) -> bool:
    """`Path.is_file` for a name a file wrote (a COCO file_name, a line of a list): False, not an exception,
    where the system cannot look it up (a NUL byte in it, a name too long); FIFOs and devices are not files."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def exists(path: str | Path) -> bool:
    """`Path.exists` for a name a file wrote, False where the system cannot look it up (see `is_file`)."""
    try:
        return Path(path).exists()
    except (OSError, ValueError):
        return False


def regular_file(path: Path, *, error: type[UserError], expected: str, limit: int | None) -> Path:
    """`path` if it is a regular file (through symlinks: what would be read) of at most `limit` bytes (None: any
    size, for a file that is streamed); else an
    `error` naming it and what it is: a FIFO would block the reader for ever, a device such as /dev/zero behind a
    symlink would fill the memory, a sparse file can claim terabytes it does not hold."""
    path = Path(path)
    try:
        info = path.stat()
    except OSError as e:  # missing, no permission, a symlink loop
        raise error(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO" if stat.S_ISFIFO(info.st_mode) else \
            "a device or socket"
        raise error(f"{path}: {kind}, not a file; expected {expected}")
    if limit is not None and info.st_size > limit:
        raise error(f"{path}: {info.st_size / 2**20:,.0f} MB; {expected} of at most {limit / 2**20:,.0f} MB is read")
    return path


def read_bytes(path: Path, *, error: type[UserError], expected: str = "a file", limit: int = FILE_LIMIT) -> bytes:
    """The bytes of a regular file (`regular_file`), every read failure an `error` naming the file."""
    try:
        return regular_file(path, error=error, expected=expected, limit=limit).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read it ({e.strerror or type(e).__name__})") from None


def read_text(path: Path, *, error: type[UserError], expected: str = "a text file", limit: int = JSON_LIMIT) -> str:
    """A regular file's text: UTF-8 (with or without the byte-order mark Windows tools write); bytes that are
    not UTF-8 are an `error` naming the file and where."""
    data = read_bytes(path, error=error, expected=expected, limit=limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start} is {data[e.start:e.start + 1]!r}); expected "
                    f"{expected}") from None


def read_json(path: Path, *, error: type[UserError] = CheckpointError, limit: int = JSON_LIMIT):
    """The value of a JSON file, read the one way every reader reads one: a regular file (`regular_file`) of at
    most `limit` bytes, valid UTF-8 JSON, nested within Python's recursion limit. Anything else is an `error`
    naming the file and what it is."""
    text = read_text(path, error=error, expected="a JSON file", limit=limit)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to read (more than about {sys.getrecursionlimit()} levels)") \
            from None


def read_json_object(path: Path, *, error: type[UserError] = CheckpointError) -> dict:
    """A JSON file that must hold an object; anything else is an `error` naming the file."""
    value = read_json(path, error=error)
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
