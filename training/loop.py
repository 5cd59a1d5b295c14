"""The training loop's machinery, shared by train.py and pretrain.py, so that their loop bodies read as the
cycle itself: where the loop is (`LoopState`) and its steps, epoch after epoch (`steps`), the counters
between log lines (`Meter`) and the line of each step (`after_step`), the stop that Ctrl-C or SIGTERM asks
for (`StopRequest`, `stopped`), when a periodic job is due (`due`), the guard against weights that are not
finite (`Diverged`, `non_finite_tensor`), the identity of a training split (`sample_list`), the loop's
state saved and restored (`checkpoint_state`, `restore_loop_state`), a run in its folder
(`run_in_out_folder`) and the command line's exit status (`exit_status`)."""

import errno
import hashlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn as nn

from data import IGNORE_INDEX, DataError
from segformer.cli import run_main
from segformer.errors import CheckpointError, ConfigError, UserError

from .run_folder import RunLock, check_output_dir, check_rewind, clean_up_after_a_kill, last_checkpoint_note
from .distributed import any_process, gather_rng_states, set_rng_states
from .run_log import open_log, write_record


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


@dataclass
class LoopState:
    """Where a run is: the optimizer steps taken (of `total_steps`), the epoch, and the batches of it already
    trained on (per process). Saved in every checkpoint and put back on --resume, so that the next step
    reads the batch a straight run would have read."""
    total_steps: int
    step: int = 0
    epoch: int = 0
    batches_done: int = 0

    @property
    def last(self) -> bool:
        return self.step == self.total_steps

    def advance(self, batches: int) -> None:
        """One optimizer step over `batches` micro-batches."""
        self.step, self.batches_done = self.step + 1, self.batches_done + batches


def steps(run, *, at_epoch_end: Callable[[], None] | None = None) -> Iterator[list[dict]]:
    """The micro-batches of every optimizer step until `run.loop.total_steps`: grad_accum batches a step,
    each epoch read from where the loop is (its sampler set to the position), an incomplete last group of an
    epoch dropped, then the next epoch (`at_epoch_end()` between them). The caller takes the step
    (`run.loop.advance`) before it asks for the next; breaking out of the loop stops it."""
    loop, config = run.loop, run.config
    while loop.step < loop.total_steps:
        run.train_loader.sampler.set_position(loop.epoch, loop.batches_done * config.batch_size)
        for micro_batches in groups_of(run.train_loader, config.grad_accum):
            yield micro_batches
            if loop.step >= loop.total_steps:
                return
        loop.epoch, loop.batches_done = loop.epoch + 1, 0
        if at_epoch_end is not None:
            at_epoch_end()


def after_step(run, progress, loss: float, lr: float) -> None:
    """What every step ends with: its loss counted, the progress bar moved, and every --log-every steps (and
    at the last) a line of the log with the window's mean loss and speed."""
    meter = run.meter
    meter.add_step(loss)
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{meter.images_per_s(run.world_size):.1f}")
    if due(run.loop.step, run.config.log_every, run.loop.last):
        log(run, {"step": run.loop.step, "epoch": run.loop.epoch, "loss": meter.loss / meter.steps, "lr": lr,
                  "images_per_s": meter.images_per_s(run.world_size)})
        meter.restart()


def log(run, record: dict) -> None:
    """A record of the run's metrics.jsonl (rank 0 holds the log) and, with --report-to tensorboard, its
    scalars (an evaluation's under validation/, the rest under train/)."""
    if run.log:
        write_record(run.log, record)
    if getattr(run, "tensorboard", None):
        run.tensorboard.scalars(record["step"], record, "validation" if "mean_iou" in record else "train")


def stopped(run, stop: "StopRequest", saved: Path | None, save: Callable[[str], Path], progress) -> bool:
    """Whether any process was asked to stop (Ctrl-C, SIGTERM); if so, the state after this step is saved
    (`saved`, where this step already wrote a checkpoint, else `save(name)`) and said."""
    if not any_process(stop.signal is not None, run.world_size, run.device):
        return False
    path = saved or save(f"checkpoint-{run.loop.step}")
    if run.is_main:
        progress.write(f"interrupted: saved {path}; continue with --resume {path}")
    return True


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


# ---- what train.py's and pretrain.py's runs share: the loop's state saved and restored, the run folder -----
# A run here is anything with the attributes both scripts' `Run` have: raw_model, optimizer, scheduler, scaler,
# loop (a LoopState), meter, world_size, rank, device, out, log, config (data, batch_size, grad_accum, log_every).

def checkpoint_state(run, *, samples: list, best: float) -> dict:
    """What a checkpoint keeps of the loop, for an exact resume: optimizer, schedule, scaler, position, best
    validation score, every process's random states and the training samples. Every process takes part
    (the RNG gather); weights that are not all finite are never saved (Diverged). The log on disk is made
    to reach at least as far as the checkpoint."""
    bad = non_finite_tensor(run.raw_model)
    if any_process(bad is not None, run.world_size, run.device):
        raise Diverged(f"the model's weights are not finite after step {run.loop.step} ({bad or 'on another process'}); "
                       f"stopping without saving: {last_checkpoint_note(run.out)}")
    if run.log:
        run.log.flush()
        os.fsync(run.log.fileno())
    return {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
            "scaler": run.scaler.state_dict(), "step": run.loop.step, "epoch": run.loop.epoch,
            "batches_done": run.loop.batches_done, "best_miou": best, "world_size": run.world_size,
            "rng": gather_rng_states(run.world_size), "samples": samples}


def restore_loop_state(run, state: dict, directory: Path, schedule, *, samples: list) -> None:
    """Put the optimizer, schedule, scaler, random states and data position back where `checkpoint_state` left
    them (`checkpoint_state`), after checking that the processes and the training samples are the same; the learning rates of
    the next step come from `schedule`, which --max-steps/--epochs may have extended. The best score is the
    caller's to read (`state["best_miou"]`)."""
    if state["world_size"] != run.world_size:
        raise ConfigError(f"{directory} was trained on {state['world_size']} processes; resume it on as many "
                          f"(the data order and per-process batches depend on it), not {run.world_size}")
    saved = state.get("samples")
    if saved is not None and saved != samples:
        change = "other names" if saved[0] == samples[0] else f"{samples[0]} samples now, {saved[0]} then"
        raise ConfigError(f"{run.config.data}: the training split is not the one {directory} was trained on "
                          f"({change}); its saved data position would index another order. Put the files back, or "
                          f"start a new run from these weights: --pretrained {directory} --out <new folder>")
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.loop.step, run.loop.epoch, run.loop.batches_done = state["step"], state["epoch"], state["batches_done"]
    for group, base_lr in zip(run.optimizer.param_groups, run.scheduler.base_lrs):
        group["lr"] = base_lr * schedule(run.loop.step)
    set_rng_states(state["rng"][run.rank])
    if run.rank == 0:
        print(f"resumed from {directory} at step {run.loop.step} (epoch {run.loop.epoch}, batch {run.loop.batches_done})")


def resume_then_open_log(run, resume: Path | None, schedule, restore) -> None:
    """--resume: `restore(run, resume, schedule)` puts the loop back; continued in the checkpoint's own run
    folder, a checkpoint older than the newest is a rewind (`check_rewind`). Then rank 0 opens the log: a new
    one for a new run or a branch into another folder, the same one cut at the step for a continued run."""
    continued = resume is not None and resume.resolve().parent == run.out.resolve()
    if resume:
        restore(run, resume, schedule)
        if run.is_main and continued:
            check_rewind(run.out, resume, run.loop.step)
    if run.is_main:
        run.log = open_log(run.out, resumed_at=run.loop.step if continued else None)


def start_line(run, task: str, classes: int) -> str:
    """The run's first line: what trains on what, for how long, on what."""
    config = run.config
    return (f"{task} {run.raw_model.config.describe()} on {config.data} ({len(run.train_loader.dataset)} train / "
            f"{len(run.eval_loader.dataset)} eval images, {classes} classes) for {run.loop.total_steps} steps of "
            f"{config.batch_size * config.grad_accum * run.world_size} images on {run.world_size} x "
            f"{run.device.type}, amp={config.amp}")


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # a disk that fills up (or turns read-only) mid-run


def run_in_out_folder(command, build_run, train, *, rank: int, world_size: int, device) -> dict:
    """Build and train one run in its --out folder: locked for the run, mended after a kill, never another
    run's (rank 0 sees to it); the loaders' workers and the log are closed when it ends, however it ends. A
    disk that fills up while the log, a plot or an evaluation is written is one line naming the file and the
    last checkpoint (checkpoints are written whole or not at all: `save_checkpoint`)."""
    lock = None
    try:
        out = Path(command.config.out)
        if rank == 0:
            lock = RunLock(out)
            for note in clean_up_after_a_kill(out):
                print(note)
            try:
                check_output_dir(out, resume=command.resume, overwrite=command.overwrite, ran_here=not lock.first)
            except UserError:
                lock.release(forget=True)  # refused before it started: no trace of it, not even its lock file
                lock = None
                raise
        run = build_run(command, rank=rank, world_size=world_size, device=device)
        try:
            return train(run)
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            where = f"while writing {e.filename}" if e.filename else f"while writing the run's files in {out}"
            raise CheckpointError(f"{os.strerror(e.errno).lower()} {where}; {last_checkpoint_note(out)}, intact "
                                  f"(free space, then --resume it)") from None
        finally:
            run.train_loader.close()  # the workers end now, not whenever the run is collected
            run.eval_loader.close()
            if run.log:
                run.log.close()
    finally:
        if lock:
            lock.release()


def exit_status(execute, argv=None) -> int:
    """A training script's command line around its `execute`: 0 when done, 128 + the signal when stopped by
    Ctrl-C or SIGTERM (after saving), and a problem the user can fix as one line, with its type's exit code."""
    def status() -> int:
        result = execute(argv)
        return 128 + result["interrupted"] if result.get("interrupted") else 0
    try:
        return run_main(status)
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, without saving
        print("\ninterrupted again: stopped without saving this step", file=sys.stderr)
        return 128 + signal.SIGINT
