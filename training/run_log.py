"""What a run logs as it goes: `metrics.jsonl` in its folder, one JSON record a line (a training window's
loss, learning rate and speed; an evaluation's metrics), flushed at every record and fsynced at every
checkpoint, cut back to the resumed step on --resume; and, with --report-to tensorboard, the same scalars
and a few validation images with their predictions in TensorBoard."""

import json
import math
from pathlib import Path

import numpy as np

from segformer.errors import CheckpointError
from segformer.files import atomic_write
from segformer.metrics import metrics_where
from segformer.visual import blend


def jsonable(metrics: dict) -> dict:
    """NaN -> null, arrays -> lists: strict JSON."""
    def clean(x):
        if isinstance(x, (np.ndarray, list, tuple)):
            return [clean(v) for v in x]
        x = float(x)
        return None if math.isnan(x) else x
    return {k: clean(v) if not isinstance(v, (int, str)) else v for k, v in metrics.items()}


def read_log(path: Path) -> tuple[list[dict], bool]:
    """The records of a run's metrics.jsonl, and whether its last line was torn (a write cut short by a kill,
    a power loss or a full disk: dropped). A bad line elsewhere is a CheckpointError naming the file and line."""
    try:
        lines = Path(path).read_text().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the run's log ({e})") from None
    records, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not a record")
        except ValueError as e:
            if any(later.strip() for later in lines[number:]):  # not the last record: the log is damaged
                raise CheckpointError(f"{path} line {number}: not a JSON record ({e})") from None
            torn = True  # the last record, cut short
            continue
        records.append(record)
    return records, torn


def write_record(log, record: dict) -> None:
    """One line of metrics.jsonl, flushed (a checkpoint also fsyncs it: training.loop.loop_state)."""
    try:
        log.write(json.dumps(record) + "\n")
        log.flush()
    except OSError as e:  # a full disk: named (a torn last line is dropped on --resume, by open_log)
        raise OSError(e.errno, e.strerror, log.name) from None


def open_log(out: Path, *, resumed_at: int | None):
    """metrics.jsonl, for appending. A new run starts a new log. A resumed run keeps the records up to the
    step it resumes from (no step is ever reported twice) and drops a torn last record, saying so."""
    path = out / "metrics.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    if resumed_at is None or not path.is_file():
        return open(path, "w")
    records, torn = read_log(path)
    if torn:
        print(f"{path}: its last record was cut short (a kill or a full disk while it was written): dropped")
    kept = [record for record in records if record.get("step", 0) <= resumed_at]
    if torn or len(kept) < len(records):
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))
    return open(path, "a")


class TensorBoard:
    """--report-to tensorboard: scalars of training and evaluation, and a few validation images with their
    predicted classes drawn over them, in <out>/tensorboard (tensorboard --logdir <out>)."""

    def __init__(self, out: Path, palette: list[tuple[int, int, int]]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--report-to tensorboard needs the tensorboard package: "
                              "pip install tensorboard") from None
        self.writer, self.palette = SummaryWriter(str(Path(out) / "tensorboard")), palette

    def scalars(self, step: int, record: dict, prefix: str) -> None:
        for key in ("loss", "lr", "images_per_s", *(m.key for m in metrics_where(curves=True))):
            if isinstance(record.get(key), (int, float)):
                self.writer.add_scalar(f"{prefix}/{key}", record[key], step)
        self.writer.flush()

    def predictions(self, step: int, images, predictions) -> None:
        """uint8 (N, 3, H, W) images and (N, H, W) class ids -> the classes' colours over the images."""
        images = np.asarray(images)
        blended = blend(images.transpose(0, 2, 3, 1), np.asarray(predictions), self.palette).transpose(0, 3, 1, 2)
        self.writer.add_images("validation/predictions", np.concatenate([images, blended], axis=3), step,
                               dataformats="NCHW")  # each image beside its prediction
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
