"""The run folder: `checkpoint-<step>/` directories, `best/`, and what --resume reads back.

A checkpoint directory holds the model in the hub layout (`model.safetensors`, `config.json`), the
`preprocessor_config.json` inference needs, the resolved settings (`training_args.json`), the state to
continue exactly (`training_state.pt`: optimizer, scheduler, scaler, RNGs, data position), the model card
(`README.md`, the hub's format) and the class colours of its overlays (`palette.json`).

What a kill, a power cut or a full disk can do to the folder, and why it cannot hurt:
- one run at a time: `RunLock` holds an exclusive lock on `<out>/.lock` for the life of the run;
- a directory is written under a temporary name, every file fsynced, and only then renamed into place
  (and the folder fsynced): a checkpoint is complete or absent;
- a directory that already exists (`best/`) is swapped with the new one in one atomic
  `renameat2(RENAME_EXCHANGE)`, so a complete `best/` exists at every instant; where the file system
  cannot swap, it takes two renames, and the next run puts back a `best/` a kill left aside;
- temporaries of killed writes are removed by the next run that holds the lock.
"""

import ctypes
import errno
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from segformer.checkpoint import write_preprocessor_config
from segformer.files import atomic_write, writable_folder, write_json, write_torch
from segformer.errors import CheckpointError, ConfigError, UserError, first_line

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
TEMPORARY_NAME = re.compile(r"\.(checkpoint-\d+|best)\.(.+\.tmp|old)")  # what save_checkpoint leaves when killed
STATE_KEYS = {"optimizer": dict, "scheduler": dict, "scaler": dict, "step": int, "epoch": int,
              "batches_done": int, "best_miou": float, "world_size": int, "rng": list}


class RunLocked(UserError):
    """Another live run holds the output folder."""

    exit_code = 75  # EX_TEMPFAIL (sysexits.h): try again when the other run has ended


class RunLock:
    """An exclusive `flock` on `<out>/.lock` for the life of the run. The kernel drops it when the
    process ends, however it ends, so a killed run never leaves a stale lock behind."""

    def __init__(self, out: Path):
        import fcntl
        writable_folder(out)  # a file there, no permission, a read-only or full disk: one line, before any work
        self.path = out / ".lock"
        self.first = not self.path.exists()  # no run of this project has used the folder before
        try:
            self.file = open(self.path, "a+")
        except OSError as e:
            raise ConfigError(f"--out {out}: cannot write its lock file ({e.strerror or type(e).__name__})") from None
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunLocked(f"{out} is in use by another run ({holder}); wait for it to end or choose "
                            f"another --out") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        self.file.flush()

    def release(self, *, forget: bool = False) -> None:
        """Drop the lock; `forget`: and leave no trace of this run in a folder no run had used (a run
        refused before its start)."""
        self.file.close()  # closing the file drops the lock
        if forget and self.first:
            self.path.unlink(missing_ok=True)


def list_checkpoints(out: Path) -> list[Path]:
    """The run's `checkpoint-<step>` directories, oldest first (other names are not the run's)."""
    found = [p for p in Path(out).glob("checkpoint-*") if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def last_checkpoint(out: Path) -> Path | None:
    checkpoints = list_checkpoints(out)
    return checkpoints[-1] if checkpoints else None


def last_checkpoint_note(out: Path) -> str:
    last = last_checkpoint(out)
    return f"the last checkpoint on disk is {last}" if last else f"no checkpoint was written in {out}"


def clean_up_after_a_kill(out: Path) -> list[str]:
    """Put back a `best/` that a kill left aside between two renames, and remove the temporaries of
    killed writes. Only ever called by the run that holds the lock. Returns what it did, to say so."""
    done = []
    for path in sorted(Path(out).glob(".*")):
        match = TEMPORARY_NAME.fullmatch(path.name)
        if not match or not path.is_dir():
            continue
        target = path.with_name(match.group(1))
        if match.group(2) == "old" and not target.exists():
            path.rename(target)
            done.append(f"restored {target} (left aside by a killed write)")
        else:
            shutil.rmtree(path)
            done.append(f"removed {path.name} (an unfinished write)")
    return done


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE). False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete directory `new` in place of `target`, which exists completely at every instant."""
    if not target.exists():
        new.rename(target)
    elif _exchange(new, target):
        shutil.rmtree(new)  # now the old one
    else:  # two renames: a kill between them leaves target aside as .<name>.old, put back by the next run
        aside = target.with_name(f".{target.name}.old")
        shutil.rmtree(aside, ignore_errors=True)
        target.rename(aside)
        new.rename(target)
        shutil.rmtree(aside)
    fsync_dir(target.parent)


@contextmanager
def _writing(path: Path, previous: str):
    """Turn a full disk into one line naming the file, and what is still intact."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"no space left on the device while writing {path}; {previous}") from None
        raise


def save_checkpoint(directory: Path, *, model, state: dict, config, size: int, reduce_labels: bool = False,
                    palette=None, bands=None, card: str | None = None, ema=None) -> None:
    """Write a checkpoint directory: all files under a temporary name, fsynced, then put in place. `size`,
    `reduce_labels` and the images' `bands` (segformer/bands.py) go into preprocessor_config.json, the class
    colours `palette` into palette.json. `ema`: the moving average of the weights, as a model of its own in
    `ema/`, which every tool loads."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    previous = last_checkpoint(directory.parent)
    intact = (f"the previous {directory.name} is intact" if directory.exists() else
              f"the previous checkpoint {previous} is intact" if previous else
              f"no checkpoint was written in {directory.parent}")
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        with _writing(directory / "model.safetensors", intact):
            model.save_pretrained(tmp)  # atomic, fsynced writes
        with _writing(directory / "preprocessor_config.json", intact):
            write_preprocessor_config(tmp, size=size, reduce_labels=reduce_labels, bands=bands)
        with _writing(directory / "training_state.pt", intact):
            write_torch(state, tmp / "training_state.pt")
        with _writing(directory / "training_args.json", intact):
            config.save(tmp / "training_args.json")  # the resolved settings, for --resume and for people
        if card is not None:  # the model card: README.md in the hub's format
            with _writing(directory / "README.md", intact):
                atomic_write(tmp / "README.md", lambda path: Path(path).write_text(card))
        colours = [list(colour) for colour in palette] if palette else None
        if colours:
            with _writing(directory / "palette.json", intact):  # the class colours of overlays (infer, explain)
                write_json(colours, tmp / "palette.json")
        if ema is not None:  # the moving average: a checkpoint of its own, which every tool loads
            with _writing(directory / "ema" / "model.safetensors", intact):
                ema.save_pretrained(tmp / "ema")
                write_preprocessor_config(tmp / "ema", size=size, reduce_labels=reduce_labels, bands=bands)
                if colours:
                    write_json(colours, tmp / "ema" / "palette.json")
            fsync_dir(tmp / "ema")
        fsync_dir(tmp)
        replace_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_training_state(directory: Path) -> dict:
    """`training_state.pt`, unpickled with weights_only=True (tensors and plain Python values only, so
    a planted file cannot run code), and checked to hold what --resume needs."""
    path = directory / "training_state.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, not a torch file, or wanting globals beyond plain data
        reason = first_line(e)
        raise CheckpointError(f"{path}: not a training state this project wrote ({reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of training state, got {type(state).__name__}")
    for key, kind in STATE_KEYS.items():
        if key not in state:
            raise CheckpointError(f"{path}: no {key!r} in it; not a training state this project wrote")
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            raise CheckpointError(f"{path}: {key!r} is {type(state[key]).__name__}, expected {kind.__name__}")
    return state


RUN_FILES = ("metrics.jsonl", "evaluations", "curves.png", "per_class_iou.png", "tensorboard")  # what a run logs


def check_output_dir(out: Path, *, resume: Path | None, overwrite: bool, ran_here: bool = True) -> None:
    """A new run never overwrites an earlier one unless asked to; nor does a resumed run write into a
    folder that holds another run. A run that starts afresh in `out` (new, or resumed into another folder)
    starts with a new log: what a run killed before its first checkpoint logged there is removed, but only
    where a run of this project ran (`ran_here`: its lock file was there); files of the same names in a
    folder no run has used (a TensorBoard folder of other experiments, the user's evaluations) are the
    user's, and replaced only with --overwrite."""
    checkpoints = list_checkpoints(out)[::-1]
    earlier = checkpoints + ([out / "best"] if (out / "best").exists() else [])
    if resume is not None and resume.resolve().parent == out.resolve():
        return  # the run continues where it is
    if earlier and not overwrite:
        what = "another run" if resume is not None else "a run"
        newest = f"continue it with --resume {checkpoints[0]}, " if checkpoints and resume is None else ""
        raise ConfigError(f"--out {out} already holds {what} ({', '.join(p.name for p in earlier[:4])}): {newest}"
                          f"choose another --out, or pass --overwrite to replace it")
    theirs = [name for name in RUN_FILES if (out / name).exists()]
    if theirs and not earlier and not ran_here and not overwrite:
        raise ConfigError(f"--out {out.resolve()} holds {', '.join(theirs)}, which no run of this project wrote, and "
                          f"a run would replace them: choose another --out, or pass --overwrite to replace them")
    for path in earlier + [out / name for name in RUN_FILES]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def check_rewind(out: Path, resumed: Path, step: int) -> None:
    """Resuming from a checkpoint older than the run's newest rewinds it: said for a checkpoint-<step> (its
    later checkpoints are removed and its log cut at the step, so that no later resume mixes the abandoned
    steps with the new ones); refused for best/, whose step no name
    shows, so that the newer checkpoints are not lost by mistake."""
    newer = [p.name for p in list_checkpoints(out) if int(p.name.split("-")[1]) > step]
    if not newer:
        return
    if not CHECKPOINT_NAME.fullmatch(resumed.resolve().name):
        raise ConfigError(f"--resume {resumed}: it holds step {step}, but {out} has newer checkpoints "
                          f"({', '.join(newer)}), which resuming here would overwrite; continue the run with "
                          f"--resume {out / newer[-1]}, or branch from {resumed.name} with --out <new folder>")
    for name in newer:  # the abandoned steps go now: a shorter rewound run kept them, and mixed two timelines
        shutil.rmtree(out / name)
    print(f"rewinding to step {step}: {', '.join(newer)} removed (the steps after it are trained again) and the log "
          f"after step {step} cut")


def prune_checkpoints(out: Path, keep: int | None) -> None:
    if keep:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old)
