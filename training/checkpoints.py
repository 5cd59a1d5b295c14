"""The run folder: `checkpoint-<step>/` directories, `best/`, and what --resume reads back.

A checkpoint directory holds the model in the hub layout (`model.safetensors`, `config.json`), the
`preprocessor_config.json` inference needs, the resolved settings (`training_args.json`) and the state
to continue exactly (`training_state.pt`: optimizer, scheduler, scaler, RNGs, data position).
"""

import re
import shutil
import tempfile
from pathlib import Path

import torch

from segformer.checkpoint import write_preprocessor_config

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def list_checkpoints(out: Path) -> list[Path]:
    """The run's `checkpoint-<step>` directories, oldest first (other names are not the run's)."""
    found = [p for p in Path(out).glob("checkpoint-*") if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.fullmatch(p.name).group(1)))


def save_checkpoint(directory: Path, *, model, state: dict, config) -> None:
    """Write a checkpoint directory atomically: build it under a temporary name, then rename it into
    place (an existing directory of that name is replaced only once the new one is complete)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        model.save_pretrained(tmp)
        write_preprocessor_config(tmp, size=config.size, reduce_labels=config.reduce_labels)
        torch.save(state, tmp / "training_state.pt")
        config.save(tmp / "training_args.json")  # the resolved settings, for --resume and for people
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_training_state(directory: Path) -> dict:
    return torch.load(directory / "training_state.pt", map_location="cpu", weights_only=False)


def check_output_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    """A new run never overwrites an earlier one unless asked to."""
    checkpoints = list_checkpoints(out)[::-1]
    earlier = checkpoints + [out / "best"] * (out / "best").exists()
    if not earlier or resume:
        return
    if not overwrite:
        newest = f"--resume {checkpoints[0]}, " if checkpoints else ""
        raise SystemExit(f"{out} already holds a run ({', '.join(p.name for p in earlier[:4])}): continue it with "
                         f"{newest}choose another --out, or pass --overwrite to replace it")
    for path in earlier:
        shutil.rmtree(path)
    (out / "metrics.jsonl").unlink(missing_ok=True)


def prune_checkpoints(out: Path, keep: int | None) -> None:
    if keep:
        for old in list_checkpoints(out)[:-keep]:
            shutil.rmtree(old)
