"""The training loop's machinery, shared by train.py and pretrain.py, so that their loop bodies read as the
cycle itself: the counters between log lines (`Meter`), the stop that Ctrl-C or SIGTERM asks for
(`StopRequest`), micro-batches grouped into steps (`groups_of`), when a periodic job is due (`due`), the
guard against weights that are not finite (`Diverged`, `non_finite_tensor`), and the identity of a
training split (`sample_list`)."""

import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from data import IGNORE_INDEX, DataError
from segformer.errors import UserError


class Diverged(UserError):
    """The loss or the weights stopped being finite: nothing is saved from them (lower the learning rate)."""

    exit_code = 1


def non_finite_tensor(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding a NaN or an infinity, or None (one sync)."""
    tensors = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
    finite = torch.stack([t.isfinite().all() for _, t in tensors])
    if bool(finite.all()):
        return None
    return tensors[int((~finite).nonzero()[0])][0]


def sample_list(names: list[str], root: str) -> list:
    """[count, a hash of the names] of a split's samples, names relative to the data folder (which may move):
    recorded in each checkpoint, so that a resume on another set of files is refused."""
    names = [os.path.relpath(name, root) if Path(root).is_dir() else name for name in names]
    return [len(names), hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]]


class Meter:
    """The loop's counters (the idea of torchvision's MetricLogger): the window of steps since the last
    log line (their loss, images and time), and over the whole run what the data held back: samples
    skipped as bad (with the first reasons) and micro-batches with no labelled pixel."""

    def __init__(self):
        self.skipped, self.skip_reasons = set(), []  # the names of the bad samples skipped, the first reasons
        self.trained_batches = self.unlabelled_batches = 0
        self.restart()

    def restart(self) -> None:
        self.loss, self.steps, self.images, self.start = 0.0, 0, 0, time.perf_counter()

    def restart_clock(self) -> None:
        """Leave time spent outside training steps (an evaluation) out of the images per second."""
        self.images, self.start = 0, time.perf_counter()

    def add_batch(self, batch: dict, *, ignore_index: int | None = IGNORE_INDEX) -> bool:
        """Count a micro-batch; True when it has a label to learn from (one that is not `ignore_index`;
        None: every label counts, as for image classes)."""
        self.skip_reasons += [reason for name, reason in zip(batch["skipped"], batch["skip_reasons"])
                              if name not in self.skipped][:3 - len(self.skip_reasons)]
        self.skipped.update(batch["skipped"])
        labelled = "pixel_values" in batch and (ignore_index is None or
                                                bool((batch["labels"] != ignore_index).any()))  # CPU: no sync
        if "pixel_values" in batch:
            self.trained_batches += labelled
            self.unlabelled_batches += not labelled
            self.images += batch["pixel_values"].shape[0]
        return labelled

    def add_step(self, loss: float) -> None:
        self.loss, self.steps = self.loss + loss, self.steps + 1

    def images_per_s(self, world_size: int) -> float:
        return self.images * world_size / (time.perf_counter() - self.start)

    def check_something_trained(self) -> None:
        """--skip-bad must not turn a data set of bad samples into a run that trained on nothing. (A run
        resumed at the very end of an epoch has seen no batch yet: nothing to say.)"""
        if self.trained_batches == 0 and (self.skipped or self.unlabelled_batches):
            reasons = "; ".join(self.skip_reasons) or "every batch had only ignored pixels"
            raise DataError(f"no training sample reached the model ({len(self.skipped)} skipped as bad, "
                            f"{self.unlabelled_batches} batches without a labelled pixel); first reasons: {reasons}")


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (what SLURM, Kubernetes and `timeout` send) asks the loop to stop at the
    end of the current step, so that the checkpoint it writes is exactly the state after a whole step (a
    step cut short has already moved BatchNorm's running statistics). A second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal = None
        self.previous = {number: signal.signal(number, self.handler) for number in self.SIGNALS}

    def handler(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (again to abort)", file=sys.stderr)

    def restore(self):
        for number, previous in self.previous.items():
            signal.signal(number, previous)


def groups_of(loader, n: int):
    """Consecutive lists of n batches; a shorter last group is dropped."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []


def due(step: int, every: int, last: bool) -> bool:
    return step % every == 0 or last
