"""Fine-tune SegFormer: the Hugging Face semantic-segmentation guide's `Trainer` run, written out.

    python train.py                                   # synthetic scenes, B0 from scratch, ~4 min on a CPU
    python train.py --recipe guide                    # the guide: scene_parse_150 train[:50], nvidia/mit-b0
    python train.py --recipe paper --data ADEChallengeData2016/   # the paper's 160k-iteration schedule
    torchrun --nproc_per_node 8 train.py --recipe paper --data ADEChallengeData2016/
    python train.py --resume runs/synthetic/checkpoint-600        # continue exactly
    python train.py --eval-only --checkpoint runs/synthetic/best   # per-class IoU table

One step: batch -> forward under autocast -> loss (logits upsampled to the labels, cross-entropy
ignoring 255) -> backward (x grad_accum) -> clip -> AdamW step -> poly schedule. Every --eval-every
steps: mean IoU on the validation split; every --save-every steps: a checkpoint directory that
`SegFormer.from_pretrained` and transformers both load, plus the state to resume exactly.

Reading order: `build_run` (labels, data, model, optimizer, schedule, restored state), then `train`,
which repeats `train_step` and `after_step` (log, evaluate, keep the best, checkpoint, agree on a stop).
"""

import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import IGNORE_INDEX, DataError, build_dataset, build_loader, normalize_batch, open_source
from data.dataset import annotation_to_tensor
from data.stats import collect, median_frequency_weights, read_class_weights
from segformer import SegFormer, segmentation_loss
from segformer.checkpoint import (atomic_write, read_input_size, read_preprocessor_config,
                                  segmentation_labels)
from segformer.labels import palette, read_id2label
from segformer.layouts import LayoutError
from segformer.metrics import ConfusionMatrix, logits_to_predictions, predicted_classes
from training.checkpoints import (CheckpointError, RunLock, RunLocked, check_output_dir, clean_up_after_a_kill,
                                  last_checkpoint_note, load_training_state, prune_checkpoints, rng_from_plain,
                                  rng_to_plain, save_checkpoint)
from training.config import Command, ConfigError, TrainConfig, parse_command_line
from training.hub import HubError, HubPusher, model_card
from training.report import (TensorBoard, class_table, draw_curves, draw_per_class, jsonable, read_log,
                             write_evaluation)

AMP_DTYPES = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- processes, devices, seeds ---------------------------------------------------------------------

def setup_distributed(device_name: str | None) -> tuple[int, int, torch.device]:
    """Under torchrun: one process per device, NCCL on GPUs, gloo on CPUs. Returns (rank, world, device)."""
    device_name = device_name or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device_name)
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device_name.startswith("cuda")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_rng_states(world_size: int) -> list:
    """Every process's RNG states (dropout and drop path draw from them), so a resume is exact."""
    states = rng_to_plain(rng_states())
    if world_size == 1:
        return [states]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, states)
    return gathered


def any_process(flag: bool, world_size: int, device) -> bool:
    """True on every process when the flag is true on any of them, so that all act at the same step."""
    if world_size == 1:
        return flag
    total = torch.tensor([float(flag)], device=device)
    dist.all_reduce(total)
    return total.item() > 0


# ---- labels, data, model, optimizer, schedule ---------------------------------------------------------

def _is_default_names(names: list[str]) -> bool:
    return all(name == f"LABEL_{i}" for i, name in enumerate(names))


def check_same_classes(names: list[str], origin: str, other: list[str] | None, other_origin: str) -> None:
    """Two label lists must agree in number, and in names unless one of them has only LABEL_<i> names."""
    if other is None:
        return
    same_names = [n.strip() for n in names] == [n.strip() for n in other]
    if len(names) != len(other) or not (same_names or _is_default_names(names) or _is_default_names(other)):
        def show(ns):
            return ", ".join(n.strip() for n in ns[:4]) + (", ..." if len(ns) > 4 else "")
        raise ConfigError(f"{origin} has {len(names)} classes ({show(names)}) but {other_origin} has "
                          f"{len(other)} ({show(other)})")


def source_class_names(samples, reduce_labels: bool | None) -> list[str] | None:
    """The data source's own class list, which holds under its own label convention only: with the
    reduction switched the other way, the same names would describe other pixels."""
    return samples.class_names if reduce_labels in (None, samples.reduce_labels) else None


def decide_labels(config: TrainConfig, samples, *, resumed: Path | None = None) -> list[str]:
    """The run's class names, decided once here and handed to both datasets and the model.

    The first of: the resumed checkpoint's, --id2label, the data source's own list (ADE20K folders,
    SceneParse150, the synthetic set), a --pretrained segmentation checkpoint's, LABEL_<i> for
    --num-labels. Whatever else names the classes must agree with it."""
    source_names = source_class_names(samples, config.reduce_labels)
    if resumed is not None:
        names, origin = segmentation_labels(resumed), f"the checkpoint {resumed}"
    elif config.id2label:
        names, origin = list(read_id2label(config.id2label).values()), f"--id2label {config.id2label}"
    elif source_names:
        names, origin = source_names, f"the data {config.data}"
    elif config.pretrained and (head := segmentation_labels(config.pretrained)) and config.num_labels in (None,
                                                                                                         len(head)):
        names, origin = head, f"--pretrained {config.pretrained}"
    elif config.num_labels:
        names, origin = [f"LABEL_{i}" for i in range(config.num_labels)], f"--num-labels {config.num_labels}"
    else:
        raise ConfigError(f"{config.data}: the data does not name its classes; give --num-labels N or "
                          f"--id2label FILE")
    if config.num_labels is not None and config.num_labels != len(names):
        raise ConfigError(f"--num-labels {config.num_labels}, but {origin} has {len(names)} classes")
    check_same_classes(names, origin, source_names, f"the data {config.data} ({samples.layout})")
    return names


def resolve_for_run(config: TrainConfig, *, labels: list[str], samples, world_size: int,
                    device: torch.device) -> TrainConfig:
    """Settings whose value depends on the data, the machine or the number of processes, made concrete
    once, so that `training_args.json` records what the run actually does."""
    reduce = config.reduce_labels
    if reduce is None:
        reduce = True if samples.reduce_labels is None else samples.reduce_labels
    batch_size = config.batch_size
    if config.total_batch_size:  # the recipe fixes the images per step over all processes
        batch_size = max(1, config.total_batch_size // (world_size * config.grad_accum))
    return replace(config, amp=resolve_amp(config.amp, device), reduce_labels=reduce, num_labels=len(labels),
                   batch_size=batch_size)


def resolve_amp(amp: str, device: torch.device) -> str:
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    return amp


def build_loaders(config: TrainConfig, labels: list[str], train_samples, eval_samples):
    common = dict(class_names=labels, reduce_labels=config.reduce_labels, size=config.size, seed=config.seed,
                  skip_bad=config.skip_bad, uint8=True)  # bytes from the workers, normalised on the device
    train_set = build_dataset(train_samples, train=True, recipe=config.augment, **common)
    eval_set = build_dataset(eval_samples, train=False, eval_mode=config.eval_mode, **common)
    train_loader = build_loader(train_set, batch_size=config.batch_size, num_workers=config.workers, seed=config.seed)
    return train_loader, build_eval_loader(config, eval_set)


def build_eval_loader(config: TrainConfig, eval_set):
    """Aspect-preserving evaluation keeps each image's own size: one image per batch."""
    return build_loader(eval_set, batch_size=1 if config.eval_mode == "aspect" else config.batch_size,
                        num_workers=config.workers, seed=config.seed)


def build_model(config: TrainConfig, labels: list[str], resume: Path | None) -> SegFormer:
    if resume:
        return SegFormer.from_pretrained(resume)
    id2label = dict(enumerate(labels))
    if config.pretrained:
        return SegFormer.from_pretrained(config.pretrained, num_labels=len(labels), id2label=id2label)
    return SegFormer.from_variant(config.model, num_labels=len(labels), id2label=id2label)


def get_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW with up to four groups: encoder / decode head (lr x head_lr_mult), with / without weight
    decay (the weights and biases of norm layers, when decay_norm_bias is off)."""
    norms = (nn.LayerNorm, nn.BatchNorm2d, nn.SyncBatchNorm)
    norm_params = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    groups = {}
    for name, param in model.named_parameters():
        head = name.startswith("decoder.")
        no_decay = not config.decay_norm_bias and id(param) in norm_params
        key = ("head" if head else "encoder") + (", no decay" if no_decay else "")
        if key not in groups:
            groups[key] = {"name": key, "params": [], "lr": config.lr * (config.head_lr_mult if head else 1.0),
                           "weight_decay": 0.0 if no_decay else config.weight_decay}
        groups[key]["params"].append(param)
    # fused=True: one kernel per step for all tensors instead of a dozen per tensor, as transformers' Trainer
    # defaults to (adamw_torch_fused) with torch >= 2.8; the same update, on the CPU and on CUDA.
    return torch.optim.AdamW(list(groups.values()), lr=config.lr, fused=True)


def poly_schedule(warmup_steps: int, total_steps: int, power: float):
    """Multiplier of the base lr at a step: linear warmup from 0, then (1 - progress) ** power."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1 - progress) ** power
    return factor


# ---- evaluation ----------------------------------------------------------------------------------------

def to_device(batch: dict, device: torch.device, *, channels_last: bool = False):
    """A loader's batch -> (pixel values, labels) on the device: bytes become the normalised float input
    there (4x less to move than floats), labels int64."""
    pixel_values = batch["pixel_values"].to(device, non_blocking=True)
    if pixel_values.dtype == torch.uint8:
        valid = batch.get("valid")
        pixel_values = normalize_batch(pixel_values, valid)
    if channels_last:
        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
    return pixel_values, batch["labels"].to(device, non_blocking=True).long()


@dataclass
class Evaluation:
    metrics: dict  # mean_iou, ..., per_category_iou (float64 arrays, NaN where undefined)
    confusion: np.ndarray  # (K, K) pixel counts, rows: labels, columns: predictions
    shown: tuple = ()  # (uint8 images, predictions) of the first few samples, to look at


@torch.no_grad()
def evaluate(model, loader, *, num_labels: int, device, autocast, show: int = 0) -> Evaluation:
    """Mean IoU over the loader, summed over all processes. Predictions are the logits upsampled to
    the label size, then argmax, as in the guide's compute_metrics. A validation set with no labelled
    pixel (every sample skipped as bad, or all ignored) is an error, not a NaN."""
    model.eval()
    confusion = ConfusionMatrix(num_labels, ignore_index=IGNORE_INDEX, device=device)
    reasons, shown = [], ()
    for batch in loader:
        reasons += batch["skip_reasons"]
        if "pixel_values" not in batch:  # every sample of the batch was skipped
            continue
        pixel_values, labels = to_device(batch, device)
        with autocast():
            logits = model(pixel_values)
        predictions = logits_to_predictions(logits.float(), labels.shape[-2:])
        confusion.update(predictions, labels)
        if show and not shown and batch["pixel_values"].dtype == torch.uint8 and predictions.shape[-2:] == \
                batch["pixel_values"].shape[-2:]:
            shown = (batch["pixel_values"][:show], predictions[:show].cpu())
    confusion.all_reduce()
    model.train()
    if confusion.counts.sum() == 0:
        raise DataError(f"nothing to evaluate: no labelled pixel in the validation split ({len(reasons)} sample(s) "
                        f"skipped as bad{': ' + '; '.join(reasons[:3]) if reasons else ''})")
    return Evaluation(confusion.compute(), confusion.matrix.cpu().numpy(), shown)


# ---- the run -------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What a training run holds: built once by `build_run`, then advanced step by step."""
    config: TrainConfig
    out: Path
    rank: int
    world_size: int
    device: torch.device
    labels: list[str]
    raw_model: SegFormer  # what we save: unwrapped, uncompiled
    model: nn.Module  # what we run: maybe DistributedDataParallel, maybe compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    train_loader: torch.utils.data.DataLoader
    eval_loader: torch.utils.data.DataLoader
    total_steps: int
    loss_options: dict  # segmentation_loss's keyword arguments
    palette: tuple | None = None  # the data's class colours, saved with each checkpoint for overlays
    log: object = None  # metrics.jsonl, open on rank 0
    tensorboard: object = None  # training.report.TensorBoard, on rank 0 with --report-to tensorboard
    pusher: object = None  # training.hub.HubPusher, on rank 0 with --push-to-hub
    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # batches of the current epoch already trained on (per process)
    best_miou: float = -1.0
    skipped: int = 0  # bad samples skipped (--skip-bad), with the first reasons
    skip_reasons: list = field(default_factory=list)
    trained_batches: int = 0  # micro-batches that reached the model
    unlabelled_batches: int = 0  # micro-batches whose every pixel is ignored: no loss, no gradient
    metrics: dict = field(default_factory=dict)
    window: dict = field(default_factory=lambda: dict(loss=0.0, steps=0, images=0, start=time.perf_counter()))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.config.amp], enabled=self.config.amp != "off")

    @property
    def metric_classes(self) -> list[str]:
        return predicted_classes(self.labels)

    def training_state(self) -> dict:
        """What --resume needs besides the weights (every process takes part: the RNG gather)."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                "batches_done": self.batches_done, "best_miou": self.best_miou, "world_size": self.world_size,
                "rng": gather_rng_states(self.world_size)}

    def checkpoint(self, name: str) -> Path:
        """Save as `name` (every process takes part); never weights that are not all finite."""
        bad = non_finite_tensor(self.raw_model)
        if any_process(bad is not None, self.world_size, self.device):
            where = bad or "on another process"
            raise FloatingPointError(f"the model's weights are not finite after step {self.step} ({where}); "
                                     f"stopping without saving: {last_checkpoint_note(self.out)}")
        state = self.training_state()
        path = self.out / name
        if self.is_main:
            card = model_card(self.config, self.metric_classes, self.metrics, step=self.step,
                              variant=self.raw_model.config.variant)
            save_checkpoint(path, model=self.raw_model, state=state, config=self.config, palette=self.palette,
                            card=card)
        return path


def non_finite_tensor(model: nn.Module) -> str | None:
    """The name of the first parameter or buffer holding a NaN or an infinity, or None (one sync)."""
    tensors = [(name, t) for name, t in model.state_dict().items() if t.is_floating_point()]
    finite = torch.stack([t.isfinite().all() for _, t in tensors])
    if bool(finite.all()):
        return None
    return tensors[int((~finite).nonzero()[0])][0]


def open_data(config: TrainConfig, *, resume: Path | None, rank: int, world_size: int, device: torch.device):
    """Both splits, the label set decided once, and the settings they make concrete. Returns
    (config, labels, train_loader, eval_loader)."""
    split_options = dict(test_size=config.test_size, image_column=config.image_column,
                         annotation_column=config.annotation_column, dataset_config=config.dataset_config)
    train_samples = open_source(config.data, config.train_split, train=True, **split_options)
    eval_samples = open_source(config.data, config.eval_split, train=False, **split_options)
    overlap = set(train_samples.names()) & set(eval_samples.names())
    if overlap:
        raise ConfigError(f"{len(overlap)} of the {len(eval_samples)} validation samples of {config.data} are also "
                          f"training samples (e.g. {min(overlap)}): --train-split {config.train_split} and "
                          f"--eval-split {config.eval_split} must not share images")
    labels = decide_labels(config, train_samples, resumed=resume)
    config = resolve_for_run(config, labels=labels, samples=train_samples, world_size=world_size, device=device)
    mapping = train_samples.mapping.with_reduce(config.reduce_labels)
    if rank == 0:
        print(f"data: {train_samples.layout} {config.data}: {len(train_samples)} training / {len(eval_samples)} "
              f"validation samples; labels: {mapping.describe()}")
        warn_about_class_zero(train_samples, mapping)
    if config.class_weights and config.class_weight_values is None:  # decided once, then recorded
        weights = class_weights(config, labels, train_samples, mapping) if rank == 0 else None
        if world_size > 1:
            shared = [weights]
            dist.broadcast_object_list(shared, src=0)
            weights = shared[0]
        config = replace(config, class_weight_values=tuple(weights))
    return (config, labels, *build_loaders(config, labels, train_samples, eval_samples))


def warn_about_class_zero(samples, mapping, *, look_at: int = 16, share: float = 0.25) -> None:
    """ADE's reduction on data that does not say it follows ADE's convention: say so when 0, which it
    ignores, covers much of the first annotations (a background class, say)."""
    if samples.known or not mapping.reduce or len(samples) == 0:
        return
    zeros = total = 0
    for i in range(min(look_at, len(samples))):
        try:
            annotation, _, _ = samples.peek(i)
            raw = annotation_to_tensor(annotation, samples.name(i), mapping)
        except DataError:
            continue  # reported when the sample is loaded
        zeros, total = zeros + int((raw == 0).sum()), total + raw.numel()
    if total and zeros / total > share:
        print(f"warning: {100 * zeros / total:.0f}% of the pixels of the first {min(look_at, len(samples))} "
              f"annotations are 0, which the ADE convention ignores as 'unlabelled'. If 0 is one of your classes "
              f"(a background, say), pass --no-reduce-labels (or \"reduce_labels\": false in a dataset.json).")


def class_weights(config: TrainConfig, labels: list[str], samples, mapping) -> list[float]:
    """--class-weights: a JSON file, or 'auto': median frequency balancing over the training split."""
    if config.class_weights != "auto":
        return read_class_weights(config.class_weights, labels)
    weights = median_frequency_weights(collect(samples, mapping, len(labels), description="class weights"))
    print("class weights (median frequency balancing): "
          + ", ".join(f"{name.strip()} {w:.3g}" for name, w in list(zip(labels, weights))[:10])
          + (" ..." if len(weights) > 10 else ""))
    return weights


def loss_options(config: TrainConfig, device: torch.device) -> dict:
    weights = config.class_weight_values
    return dict(kind=config.loss, label_smoothing=config.label_smoothing, ohem_threshold=config.ohem,
                ohem_min_kept=config.ohem_min_kept, memory_efficient=True,  # the fused cross-entropy
                class_weights=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None)


def build_run(command: Command, *, rank: int, world_size: int, device: torch.device) -> Run:
    """Data, model, optimizer, schedule and, on --resume, the saved state: everything but the loop."""
    seed_everything(command.config.seed)  # the same initial weights on every process
    out = Path(command.config.out)
    config, labels, train_loader, eval_loader = open_data(command.config, resume=command.resume, rank=rank,
                                                          world_size=world_size, device=device)
    steps_per_epoch = len(train_loader) // config.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"the training split has {len(train_loader.dataset)} images: too few for one step of "
                          f"{config.batch_size} x {config.grad_accum} x {world_size} processes")
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    raw_model = build_model(config, labels, command.resume).to(device)
    if config.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    model = raw_model
    if world_size > 1:
        if config.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model)
    optimizer = get_optimizer(config, raw_model)
    schedule = poly_schedule(config.warmup_steps, total_steps, config.poly_power)
    run = Run(config=config, out=out, rank=rank, world_size=world_size, device=device, labels=labels,
              raw_model=raw_model, model=model, optimizer=optimizer,
              scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
              scaler=torch.amp.GradScaler(device.type, enabled=config.amp == "fp16"),
              train_loader=train_loader, eval_loader=eval_loader, total_steps=total_steps,
              loss_options=loss_options(config, device), palette=train_loader.dataset.samples.palette)
    if command.resume:
        restore(run, command.resume, schedule)
    if run.is_main:
        run.log = open_log(out, resumed_at=run.step if command.resume else None)
        if config.report_to == "tensorboard":
            run.tensorboard = TensorBoard(out, palette(len(run.metric_classes), dict(enumerate(run.metric_classes))))
        if config.push_to_hub:
            run.pusher = HubPusher(config.push_to_hub, private=config.hub_private)
        print(f"training {raw_model.config.variant or 'custom'} on {config.data} ({len(train_loader.dataset)} train / "
              f"{len(eval_loader.dataset)} eval images, {len(labels)} classes) for {total_steps} steps of "
              f"{config.batch_size * config.grad_accum * world_size} images on {world_size} x {device.type}, "
              f"amp={config.amp}")
    return run


def open_log(out: Path, *, resumed_at: int | None):
    """metrics.jsonl for appending. Resuming from an earlier checkpoint drops the records of the steps
    after it, which the run is about to train again: no step is ever reported twice."""
    path = out / "metrics.jsonl"
    if resumed_at is not None and path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        kept = [line for line in lines if json.loads(line).get("step", 0) <= resumed_at]
        if len(kept) < len(lines):
            atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))
    return open(path, "a")


def restore(run: Run, directory: Path, schedule) -> None:
    """Put the optimizer, schedule, scaler, RNGs and data position back where the checkpoint left them."""
    state = load_training_state(directory)
    if state["world_size"] != run.world_size:
        raise ConfigError(f"{directory} was trained on {state['world_size']} processes; resume it on as many "
                          f"(the data order and per-process batches depend on it), not {run.world_size}")
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.step, run.epoch, run.batches_done = state["step"], state["epoch"], state["batches_done"]
    run.best_miou = state["best_miou"]
    # The rates of the next step come from the schedule of this run, which --max-steps/--epochs may extend.
    for group, base_lr in zip(run.optimizer.param_groups, run.scheduler.base_lrs):
        group["lr"] = base_lr * schedule(run.step)
    set_rng_states(rng_from_plain(state["rng"][run.rank]))
    if run.is_main:
        print(f"resumed from {directory} at step {run.step} (epoch {run.epoch}, batch {run.batches_done})")


def train_step(run: Run, micro_batches: list[dict]) -> tuple[float, float]:
    """One optimizer step over grad_accum micro-batches. Returns (loss, learning rate of the step)."""
    config, step_loss = run.config, 0.0
    for i, batch in enumerate(micro_batches):
        run.skipped += batch["skipped"]
        run.skip_reasons += batch["skip_reasons"][:3 - len(run.skip_reasons)]
        if "pixel_values" not in batch:
            continue
        labelled = bool((batch["labels"] != IGNORE_INDEX).any())  # on the CPU: no device sync
        pixel_values, labels = to_device(batch, run.device, channels_last=config.channels_last)
        sync = i == len(micro_batches) - 1 or run.world_size == 1  # DDP: all-reduce on the last one only
        with (nullcontext() if sync else run.model.no_sync()), run.autocast():
            logits = run.model(pixel_values)
            # Nothing labelled (e.g. a crop of 'unlabelled' only): the mean over no pixel would be NaN. A zero
            # that still reaches every parameter keeps DDP's gradient all-reduce in step on every process.
            loss = (segmentation_loss(logits, labels, **run.loss_options) if labelled else logits.sum() * 0.0)
            loss = loss / config.grad_accum
        run.scaler.scale(loss).backward()
        step_loss += loss.item()
        run.trained_batches += labelled
        run.unlabelled_batches += not labelled
        run.window["images"] += pixel_values.shape[0]
    if any_process(not math.isfinite(step_loss), run.world_size, run.device):  # all stop at the same step
        raise FloatingPointError(f"the loss is {step_loss} at step {run.step + 1}; stopping without saving: "
                                 f"{last_checkpoint_note(run.out)}")
    if config.clip_grad:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), config.clip_grad)
    lr = run.optimizer.param_groups[0]["lr"]  # the encoder's rate for this step
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.step += 1
    run.batches_done += len(micro_batches)
    return step_loss, lr


def write_log(run: Run, record: dict) -> None:
    if run.log:
        run.log.write(json.dumps(record) + "\n")
        run.log.flush()
    if run.tensorboard:
        run.tensorboard.scalars(record["step"], record, "validation" if "mean_iou" in record else "train")


def report_evaluation(run: Run, evaluation: Evaluation) -> None:
    """What an evaluation leaves to look at: its confusion matrix and per-class table, the refreshed
    curves, and in TensorBoard a few images with their predictions (training/report.py)."""
    write_evaluation(run.out / "evaluations" / f"step-{run.step}", evaluation.confusion, run.metric_classes,
                     evaluation.metrics, draw=run.config.plots)
    if run.config.plots:  # from metrics.jsonl, which write_log has just flushed
        draw_curves([(run.out.name, read_log(run.out / "metrics.jsonl"))], run.out / "curves.png")
    if run.tensorboard and evaluation.shown:
        run.tensorboard.predictions(run.step, *evaluation.shown)


def check_something_trained(run: Run) -> None:
    """--skip-bad must not turn a data set of bad samples into a run that trained on nothing."""
    if run.trained_batches == 0:
        reasons = "; ".join(run.skip_reasons) or "every batch had only ignored pixels"
        raise DataError(f"no training sample reached the model ({run.skipped} skipped as bad, "
                        f"{run.unlabelled_batches} batches without a labelled pixel); first reasons: {reasons}")


def after_step(run: Run, loss: float, lr: float, stop: "StopRequest", progress: tqdm) -> None:
    """Log, evaluate and keep the best, checkpoint, and stop here if any process was asked to."""
    config, step, window = run.config, run.step, run.window
    last = step == run.total_steps
    window["loss"] += loss
    window["steps"] += 1
    images_per_s = window["images"] * run.world_size / (time.perf_counter() - window["start"])
    progress.update(1)
    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
    if step % config.log_every == 0 or last:
        write_log(run, {"step": step, "epoch": run.epoch, "loss": window["loss"] / window["steps"], "lr": lr,
                        "images_per_s": images_per_s})
        run.window = dict(loss=0.0, steps=0, images=0, start=time.perf_counter())
    if last:
        check_something_trained(run)
    if step % config.eval_every == 0 or last:
        # the plain module: no DDP collectives, so shards of unequal length are fine
        evaluation = evaluate(run.raw_model, run.eval_loader, num_labels=len(run.metric_classes), device=run.device,
                              autocast=run.autocast, show=4 if run.tensorboard else 0)
        run.metrics = evaluation.metrics
        if run.is_main:
            progress.write(f"step {step}: mean IoU {run.metrics['mean_iou']:.4f}, mean accuracy "
                           f"{run.metrics['mean_accuracy']:.4f}, overall accuracy "
                           f"{run.metrics['overall_accuracy']:.4f}")
        write_log(run, {"step": step, "loss": loss, "lr": lr, **jsonable(run.metrics)})
        if run.is_main:
            report_evaluation(run, evaluation)
        if run.metrics["mean_iou"] > run.best_miou:
            run.best_miou = run.metrics["mean_iou"]
            run.checkpoint("best")
        run.window.update(images=0, start=time.perf_counter())
    if step % config.save_every == 0 or last:
        path = run.checkpoint(f"checkpoint-{step}")
        if run.is_main:
            prune_checkpoints(run.out, config.save_total_limit)
            if run.pusher and config.hub_strategy == "every_save":
                run.pusher.push(path, f"checkpoint at step {step}")
    if any_process(stop.signal is not None, run.world_size, run.device):
        progress.close()
        path = run.checkpoint(f"checkpoint-{step}")
        if run.is_main:
            print(f"interrupted: saved {path}; continue with --resume {path}")
        sys.exit(128 + (stop.signal or signal.SIGTERM))  # 130 for Ctrl-C, 143 for SIGTERM


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


def train(run: Run) -> dict:
    progress = tqdm(total=run.total_steps, initial=run.step, disable=not run.is_main, dynamic_ncols=True)
    run.model.train()
    stop = StopRequest()
    try:
        while run.step < run.total_steps:
            run.train_loader.sampler.set_position(run.epoch, run.batches_done * run.config.batch_size)
            for micro_batches in groups_of(run.train_loader, run.config.grad_accum):
                loss, lr = train_step(run, micro_batches)
                after_step(run, loss, lr, stop, progress)
                if run.step == run.total_steps:
                    break
            else:  # the epoch ran out (an incomplete last group of micro-batches is dropped)
                run.epoch, run.batches_done = run.epoch + 1, 0
                check_something_trained(run)
    finally:
        stop.restore()
        progress.close()
    if run.is_main:
        report_end(run)
    return {"step": run.step, "best_miou": run.best_miou, "skipped": run.skipped,
            "unlabelled_batches": run.unlabelled_batches, **run.metrics}


def report_end(run: Run) -> None:
    if run.metrics and run.config.plots:
        draw_per_class(run.metrics, run.metric_classes, run.out / "per_class_iou.png")
    if run.pusher and (run.out / "best").is_dir():
        if run.pusher.push(run.out / "best", f"best at step {run.step}: mean IoU {run.best_miou:.4f}"):
            print(f"pushed {run.out / 'best'} to {run.pusher.url}")
    if run.tensorboard:
        run.tensorboard.close()
    if run.skipped:
        print(f"skipped {run.skipped} bad training samples, e.g. {run.skip_reasons[0]}")
    if run.unlabelled_batches:
        print(f"{run.unlabelled_batches} training batches had no labelled pixel and contributed nothing")
    if run.metrics:
        print(class_table(run.metrics, run.metric_classes))
    best = run.out / "best"
    print(f"\nbest mean IoU {run.best_miou:.4f}: {best}\nlast checkpoint: {run.out / f'checkpoint-{run.step}'}")
    print(f"try it:  python infer.py --checkpoint {best} <image or folder> --out {run.out / 'predictions'}")


def evaluate_checkpoint(command: Command, *, rank: int, device: torch.device) -> dict:
    """--eval-only: the checkpoint's labels, input size and label reduction, on --eval-split."""
    config = command.config
    model = SegFormer.from_pretrained(command.checkpoint).to(device)
    labels = model.config.label_names()
    preprocessor = read_preprocessor_config(command.checkpoint)
    size = config.size if "size" in command.given else read_input_size(command.checkpoint) or config.size
    reduce = config.reduce_labels
    if "reduce_labels" not in command.given and "do_reduce_labels" in preprocessor:
        reduce = preprocessor["do_reduce_labels"]
    samples = open_source(config.data, config.eval_split, train=False, test_size=config.test_size,
                          image_column=config.image_column, annotation_column=config.annotation_column,
                          dataset_config=config.dataset_config)
    check_same_classes(labels, f"the checkpoint {command.checkpoint}", source_class_names(samples, reduce),
                       f"the data {config.data}")
    config = replace(config, size=size, reduce_labels=reduce, amp=resolve_amp(config.amp, device))
    eval_set = build_dataset(samples, train=False, eval_mode=config.eval_mode, class_names=labels,
                             reduce_labels=reduce, size=size, skip_bad=config.skip_bad)

    def autocast():
        return torch.autocast(device.type, dtype=AMP_DTYPES[config.amp], enabled=config.amp != "off")
    classes = predicted_classes(labels)
    metrics = evaluate(model, build_eval_loader(config, eval_set), num_labels=len(classes), device=device,
                       autocast=autocast).metrics
    if rank == 0:
        print(f"{command.checkpoint} on {config.data} {config.eval_split} ({len(eval_set)} images, {config.eval_mode}, "
              f"size {size}, {'reduced' if reduce else 'raw'} labels):")
        print(class_table(metrics, classes))
    return metrics


def cleanup(world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def main(argv=None) -> dict:
    command = parse_command_line(argv, description=__doc__)
    rank, world_size, device = setup_distributed(command.config.device)
    lock = None
    try:
        if command.eval_only:
            return evaluate_checkpoint(command, rank=rank, device=device)
        out = Path(command.config.out)
        if rank == 0:  # one run per folder; then mend what a killed run left, and never overwrite another run
            lock = RunLock(out)
            for note in clean_up_after_a_kill(out):
                print(note)
            check_output_dir(out, resume=command.resume, overwrite=command.overwrite)
        run = build_run(command, rank=rank, world_size=world_size, device=device)
        try:
            return train(run)
        finally:
            if run.log:
                run.log.close()
    finally:
        if lock:
            lock.release()
        cleanup(world_size)


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError, RunLocked, FloatingPointError, DataError, LayoutError, HubError,
            FileNotFoundError, ImportError) as e:  # the message says it all
        sys.exit(f"error: {e}")
