"""Pre-train the Mix Transformer as an image classifier, as NVlabs did on ImageNet before segmentation.

    python pretrain.py                                            # synthetic scene crops, B0, a few CPU minutes
    python pretrain.py --data imagenet/ --recipe imagenet         # train/<class>/*.JPEG, val/<class>/...
    python pretrain.py --attention linear --out runs/pretrain-linear   # a modified encoder
    torchrun --nproc_per_node 8 pretrain.py --data imagenet/ --recipe imagenet
    python pretrain.py --resume runs/pretrain/checkpoint-600      # continue exactly
    python train.py --pretrained runs/pretrain/best               # then fine-tune it for segmentation

The model is transformers' SegformerForImageClassification (segformer/classification.py): the encoder's last
map averaged over positions, then a Linear. The recipe is DeiT's (Touvron et al. 2021), which PVT and
SegFormer's MiT were pre-trained with: AdamW (weight decay 0.05, none on biases and norms), a cosine
schedule after a linear warm-up, label smoothing 0.1, mixup 0.8 / cutmix 1.0 (one of them per batch),
RandAugment (2 ops, magnitude 9), random erasing 0.25, stochastic depth 0.1; top-1 and top-5 accuracy on
the validation split. `--recipe imagenet` is all of it at full size. The default run, 600 steps on 4,000
synthetic crops of 64x64, leaves mixup, cutmix and random erasing off (measured: with them, top-1 was
still at chance after 100 steps, without them 0.23; at 300 steps 0.72), and its random crops keep at
least half of the image, not 8%: a smaller one would often show another class than the crop's label.

Checkpoints are the hub's encoder-only layout (what `nvidia/mit-b0` holds), which transformers'
SegformerForImageClassification and `SegFormer.from_pretrained` (as an encoder) load. The run's machinery
is train.py's: one typed configuration (training_args.json, --resume restores every setting), checkpoints
written atomically, a lock on --out, Ctrl-C and SIGTERM saving after the step, the NaN guard, plots and
torchrun.

Reading order: `build_run`, then `train`, whose loop body is the cycle: a step (batch -> erasing ->
mixup/cutmix -> forward -> soft-target cross-entropy -> backward -> AdamW -> schedule), then log,
evaluate (and keep the best), checkpoint, stop if asked.
"""

import math
import signal
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import DataError, batch_to_device, build_loader
from data.classification import ClassificationDataset, open_images
from segformer.checkpoint import read_model_config
from segformer.classification import ImageClassifier
from segformer.cli import SIZE_RANGE
from segformer.config import PARTS, VARIANTS, SegFormerConfig
from segformer.device import autocast, resolve_amp
from segformer.errors import ConfigError
from segformer.parts import resolve_all, untrusted_parts
from training.distributed import any_process, cleanup, seed_everything, setup_distributed
from training.loop import (Diverged, LoopState, Meter, StopRequest, after_step, checkpoint_state, due, exit_status,
                           log, restore_loop_state, resume_then_open_log, run_in_out_folder, sample_list, start_line,
                           steps, stopped)
from training.plots import CLASSIFICATION_METRICS, draw_curves
from training.run_folder import last_checkpoint_note, load_training_state, prune_checkpoints, save_checkpoint
from training.run_log import jsonable, read_log
from training.settings import Settings, parse_settings, setting


@dataclass(frozen=True)
class PretrainConfig(Settings):
    recipe: Literal["default", "imagenet"] = setting("default", "the preset these settings started from")
    out: str = setting("runs/pretrain", "output directory of the run", may_change=True)
    seed: int = setting(0, "seed of weights, shuffling, augmentation and dropout", low=0)
    # Data.
    data: str = setting("synthetic", "'synthetic' (scene crops), an image folder (<split>/<class>/*.jpg), a "
                                     "save_to_disk dir, parquet files or a hub image-classification dataset")
    train_split: str = setting("train", "training split expression, e.g. 'train' or 'train[:5000]'")
    eval_split: str = setting("validation", "validation split expression")
    test_size: float | None = setting(None, "hold out this fraction of the split for validation", low=(0.0,),
                                      high=0.99)
    image_column: str = setting("image", "image column of a Hugging Face dataset")
    label_column: str = setting("label", "label column of a Hugging Face dataset")
    size: int = setting(64, "training crop and evaluation size", low=SIZE_RANGE[0], high=SIZE_RANGE[1])
    min_crop: float = setting(0.5, "RandomResizedCrop's smallest share of the image (DeiT: 0.08)", low=(0.0,),
                              high=1.0)
    workers: int = setting(0, "DataLoader worker processes per training process", low=0, high=256,
                           may_change=True)
    # The model: the encoder to pre-train, and its parts (segformer/parts.py).
    model: str = setting("b0", "variant to build: b0..b5, or a config.json of your own")
    attention: str | None = setting(None, "the blocks' attention: efficient, linear, full, tome or package.module:Class")
    mlp: str | None = setting(None, "the blocks' Mix-FFN: mix_ffn or package.module:Class")
    norm: str | None = setting(None, "the norm layers: layer_norm, rms_norm or package.module:Class")
    activation: str | None = setting(None, "the activations: gelu, relu, silu or package.module:Class")
    drop_path_rate: float = setting(0.1, "stochastic depth at the last block (DeiT: 0.1)", low=0.0, high=0.99)
    # Optimisation: DeiT's recipe.
    batch_size: int = setting(32, "images per step per process (DeiT: 1024 over all)", low=1, high=65536)
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step", low=1, high=65536)
    lr: float = setting(1e-3, "peak learning rate of AdamW (DeiT: 5e-4 x images per step / 512)", low=(0.0,),
                        high=10.0)
    weight_decay: float = setting(0.05, "AdamW weight decay, on all but biases and norms", low=0.0, high=10.0)
    warmup_steps: int = setting(100, "linear warm-up steps before the cosine decay", low=0)
    label_smoothing: float = setting(0.1, "label smoothing", low=0.0, high=0.99)
    mixup: float = setting(0.0, "mixup's Beta(alpha, alpha), 0: off (DeiT: 0.8)", low=0.0, high=100.0)
    cutmix: float = setting(0.0, "cutmix's Beta(alpha, alpha), 0: off (DeiT: 1.0); with mixup, one of the two "
                                 "per batch", low=0.0, high=100.0)
    random_erasing: float = setting(0.0, "probability of erasing a random rectangle of an image (DeiT: 0.25)",
                                    low=0.0, high=1.0)
    clip_grad: float | None = setting(None, "clip the gradient norm to this value", low=(0.0,))
    amp: Literal["auto", "off", "bf16", "fp16"] = setting("auto", "autocast dtype (auto: bf16 on CUDA, off on CPU)")
    max_steps: int | None = setting(600, "optimizer steps in total (wins over --epochs)", low=1, may_change=True)
    epochs: int | None = setting(None, "passes over the training set", low=1, may_change=True)
    # What happens between steps.
    eval_every: int = setting(100, "evaluate every N steps", low=1, may_change=True)
    save_every: int = setting(300, "write a checkpoint every N steps", low=1, may_change=True)
    save_total_limit: int | None = setting(2, "keep only the newest N checkpoint-<step> directories", low=1,
                                           may_change=True)
    log_every: int = setting(20, "log loss and lr every N steps", low=1, may_change=True)
    plots: bool = setting(True, "draw curves.png at each evaluation (matplotlib)", may_change=True)
    # Where and how fast it runs.
    device: str | None = setting(None, "cuda, cpu, cuda:1, ... (default: cuda if available)", may_change=True)
    compile: bool = setting(False, "torch.compile the model", may_change=True)
    channels_last: bool = setting(False, "channels-last memory format", may_change=True)


DEFAULT = PretrainConfig()  # offline: the synthetic scenes' crops, B0 at 64x64, about five CPU minutes
RECIPES = {
    "default": DEFAULT,
    # DeiT-S / MiT on ImageNet-1k: 1024 images per step over 8 processes, 300 epochs of 1251 steps, 5 of warm-up.
    "imagenet": replace(DEFAULT, recipe="imagenet", out="runs/pretrain-imagenet", size=224, min_crop=0.08,
                        mixup=0.8, cutmix=1.0, random_erasing=0.25, batch_size=128, lr=1e-3,
                        warmup_steps=5 * 1251, max_steps=None, epochs=300, eval_every=1251,
                        save_every=1251, log_every=100, workers=10),
}


# ---- data, model, optimizer, schedule -----------------------------------------------------------------------

def open_data(config: PretrainConfig):
    splits = {split: open_images(config.data, expression, train=split == "train", test_size=config.test_size,
                                 image_column=config.image_column, label_column=config.label_column)
              for split, expression in (("train", config.train_split), ("validation", config.eval_split))}
    overlap = set(splits["train"].names()) & set(splits["validation"].names())
    if overlap:
        raise ConfigError(f"{len(overlap)} validation images of {config.data} are also training images (e.g. "
                          f"{min(overlap)}): --train-split and --eval-split must not share images")
    if splits["train"].class_names != splits["validation"].class_names:
        raise DataError(f"{config.data}: the training split's classes ({len(splits['train'].class_names)}) are not "
                        f"the validation split's ({len(splits['validation'].class_names)})")
    train_set = ClassificationDataset(splits["train"], train=True, size=config.size, min_crop=config.min_crop,
                                      seed=config.seed)
    eval_set = ClassificationDataset(splits["validation"], train=False, size=config.size)
    return (build_loader(train_set, batch_size=config.batch_size, num_workers=config.workers, seed=config.seed),
            build_loader(eval_set, batch_size=config.batch_size, num_workers=config.workers, seed=config.seed))


def build_model(config: PretrainConfig, class_names: list[str], *, resumed: Path | None,
                trust_code: bool) -> ImageClassifier:
    if resumed is not None:
        return ImageClassifier.from_pretrained(resumed, trust_code=trust_code, drop_path_rate=config.drop_path_rate)
    typed = {part: getattr(config, part, None) for part in PARTS if getattr(config, part, None) is not None}
    if config.model in VARIANTS:
        base = SegFormerConfig.from_variant(config.model)
    else:
        base = read_model_config(config.model)
    model_config = replace(base, **typed, num_labels=len(class_names), id2label=dict(enumerate(class_names)),
                           drop_path_rate=config.drop_path_rate)
    resolve_all(model_config, trust_code=trust_code or untrusted_parts(model_config).items() <= typed.items(),
                source=f"--model {config.model}")
    return ImageClassifier(model_config)


def get_optimizer(config: PretrainConfig, model: nn.Module) -> torch.optim.AdamW:
    """AdamW, weight decay on the matrices and convolutions, none on the vectors: biases and norm layers'
    weights (timm's and DeiT's rule)."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, fused=True)


def cosine_schedule(warmup_steps: int, total_steps: int):
    """Multiplier of the base lr at a step: linear warm-up from 0, then half a cosine down to 0."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


class BatchAugment:
    """The recipe's batch-level part, where the model runs, seeded per (seed, process, epoch, batch) so that
    a resumed run draws what the straight one drew: random erasing of each image, then mixup or cutmix (one
    of the two, at random), and label smoothing of the mixed targets."""

    def __init__(self, config: PretrainConfig, num_classes: int, rank: int = 0):
        self.seed, self.num_classes, self.smoothing = (config.seed, rank), num_classes, config.label_smoothing
        self.erase = T.RandomErasing(p=config.random_erasing, value="random") if config.random_erasing else None
        mixes = ([T.MixUp(alpha=config.mixup, num_classes=num_classes)] if config.mixup else []) + \
            ([T.CutMix(alpha=config.cutmix, num_classes=num_classes)] if config.cutmix else [])
        self.mix = T.RandomChoice(mixes) if mixes else None

    def __call__(self, pixel_values, labels, *, epoch: int, batch: int):
        """(B, 3, H, W) normalised images, (B,) class ids -> the augmented images, (B, K) soft targets."""
        with torch.random.fork_rng(devices=[pixel_values.device] if pixel_values.is_cuda else []):
            torch.manual_seed(hash((*self.seed, epoch, batch)) % 2**63)
            if self.erase is not None:
                pixel_values = torch.stack([self.erase(image) for image in pixel_values])
            if self.mix is not None and len(labels) > 1:
                pixel_values, targets = self.mix(pixel_values, labels)
            else:
                targets = F.one_hot(labels, self.num_classes).float()
        return pixel_values, targets * (1 - self.smoothing) + self.smoothing / self.num_classes


# ---- the run ----------------------------------------------------------------------------------------------

@dataclass
class Run:
    config: PretrainConfig
    out: Path
    rank: int
    world_size: int
    device: torch.device
    raw_model: ImageClassifier
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    train_loader: torch.utils.data.DataLoader
    eval_loader: torch.utils.data.DataLoader
    loop: LoopState  # where the run is: step, epoch, batch; how many steps it takes
    augment: BatchAugment
    log: object = None
    best_top1: float = -1.0
    metrics: dict = field(default_factory=dict)
    meter: Meter = field(default_factory=Meter)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return autocast(self.device.type, self.config.amp)


def build_run(command, *, rank: int, world_size: int, device: torch.device) -> Run:
    config = replace(command.config, amp=resolve_amp(command.config.amp, device))
    seed_everything(config.seed)
    train_loader, eval_loader = open_data(config)
    class_names = train_loader.dataset.class_names
    steps_per_epoch = len(train_loader) // config.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"the training split has {len(train_loader.dataset)} images: too few for one step of "
                          f"{config.batch_size} x {config.grad_accum} x {world_size} processes")
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    raw_model = build_model(config, class_names, resumed=command.resume, trust_code=command.trust_code).to(device)
    if config.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    model = DistributedDataParallel(raw_model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world_size > 1 else raw_model
    if config.compile:
        model = torch.compile(model)
    optimizer = get_optimizer(config, raw_model)
    schedule = cosine_schedule(config.warmup_steps, total_steps)
    run = Run(config=config, out=Path(config.out), rank=rank, world_size=world_size, device=device,
              raw_model=raw_model, model=model, optimizer=optimizer,
              scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
              scaler=torch.amp.GradScaler(device.type, enabled=config.amp == "fp16"), train_loader=train_loader,
              eval_loader=eval_loader, loop=LoopState(total_steps), augment=BatchAugment(config, len(class_names), rank))
    resume_then_open_log(run, command.resume, schedule, restore)
    if run.is_main:
        print(start_line(run, "pre-training", len(class_names)))
    return run


def restore(run: Run, directory: Path, schedule) -> None:
    state = load_training_state(directory)
    restore_loop_state(run, state, directory, schedule, samples=training_samples(run))
    run.best_top1 = state["best_miou"]  # the best validation score: top-1 accuracy here


def training_samples(run: Run) -> list:
    samples = run.train_loader.dataset.samples
    return sample_list(samples.names(), samples.source)


def train_step(run: Run, micro_batches: list[dict]) -> tuple[float, float]:
    """One optimizer step over grad_accum micro-batches. Returns (loss, learning rate of the step)."""
    config, step_loss = run.config, 0.0
    for i, batch in enumerate(micro_batches):
        if not run.meter.add_batch(batch, ignore_index=None):  # every sample of it was skipped
            continue
        pixel_values, labels = batch_to_device(batch, run.device, channels_last=config.channels_last)
        pixel_values, targets = run.augment(pixel_values, labels, epoch=run.loop.epoch,
                                            batch=run.loop.batches_done + i)  # (B, 3, H, W), (B, K)
        sync = i == len(micro_batches) - 1 or run.world_size == 1  # DDP: all-reduce on the last one only
        with (run.model.no_sync() if not sync else torch.enable_grad()), run.autocast():
            loss = F.cross_entropy(run.model(pixel_values).float(), targets) / config.grad_accum  # soft targets
        run.scaler.scale(loss).backward()
        step_loss += loss.item()
    if any_process(not math.isfinite(step_loss), run.world_size, run.device):
        raise Diverged(f"the loss is {step_loss} at step {run.loop.step + 1}; stopping without saving: "
                       f"{last_checkpoint_note(run.out)}")
    if config.clip_grad:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), config.clip_grad)
    lr = config.lr * run.optimizer.param_groups[0]["lr"] / run.optimizer.param_groups[0]["initial_lr"]
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    run.loop.advance(len(micro_batches))
    return step_loss, lr


@torch.no_grad()
def evaluate(run: Run, stop: StopRequest) -> dict | None:
    """Top-1 and top-5 accuracy and the loss over the validation split, summed over all processes (None: a
    stop cut it short)."""
    model = run.raw_model.eval()
    counts, cut_short = torch.zeros(4, dtype=torch.float64, device=run.device), False  # top1, top5, loss, images
    for batch in run.eval_loader:
        if stop.signal is not None:
            cut_short = True
            break
        pixel_values, labels = batch_to_device(batch, run.device)
        with run.autocast():
            logits = model(pixel_values).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        counts += torch.stack([(top[:, 0] == labels).sum(), (top == labels[:, None]).any(1).sum(),
                               F.cross_entropy(logits, labels, reduction="sum"),
                               torch.tensor(len(labels), device=run.device)]).double()
    if run.world_size > 1:
        dist.all_reduce(counts)
    model.train()
    if cut_short:
        return None
    top1, top5, loss, images = counts.tolist()
    return {"top1": top1 / images, "top5": top5 / images, "eval_loss": loss / images}


def save(run: Run, name: str) -> Path:
    state = checkpoint_state(run, samples=training_samples(run), best=run.best_top1)
    path = run.out / name
    if run.is_main:
        save_checkpoint(path, model=run.raw_model, state=state, config=run.config, size=run.config.size)
    return path


def train(run: Run) -> dict:
    """The cycle: a step, then log, evaluate and keep the best, checkpoint, and stop if asked."""
    config, meter = run.config, run.meter
    progress = tqdm(total=run.loop.total_steps, initial=run.loop.step, disable=not run.is_main, dynamic_ncols=True)
    run.model.train()
    stop = StopRequest()
    try:
        for micro_batches in steps(run):
            loss, lr = train_step(run, micro_batches)
            after_step(run, progress, loss, lr)
            step, last = run.loop.step, run.loop.last
            metrics = evaluate(run, stop) if due(step, config.eval_every, last) else None
            if metrics is not None:
                run.metrics = metrics
                log(run, {"step": step, "loss": loss, "lr": lr, **jsonable(metrics)})
                if run.is_main:
                    progress.write(f"step {step}: top-1 {metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}")
                    if config.plots:
                        draw_curves([(run.out.name, read_log(run.out / "metrics.jsonl")[0])],
                                    run.out / "curves.png", CLASSIFICATION_METRICS)
                if metrics["top1"] > run.best_top1:
                    run.best_top1 = metrics["top1"]
                    save(run, "best")
                meter.restart_clock()
            saved = save(run, f"checkpoint-{step}") if due(step, config.save_every, last) else None
            if saved and run.is_main:
                prune_checkpoints(run.out, config.save_total_limit)
            if stopped(run, stop, saved, lambda name: save(run, name), progress):
                return {"step": run.loop.step, "interrupted": stop.signal or signal.SIGTERM, **run.metrics}
    finally:
        stop.restore()
        progress.close()
    if run.is_main:
        print(f"best top-1 {run.best_top1:.4f}: {run.out / 'best'}\nfine-tune it for segmentation:  python train.py "
              f"--pretrained {run.out / 'best'}")
    return {"step": run.loop.step, "best_top1": run.best_top1, "interrupted": None, **run.metrics}


# ---- entry points -----------------------------------------------------------------------------------------

def execute(argv=None) -> dict:
    """Everything `main` does, for Python callers; a problem the user can fix is raised as a UserError."""
    command = parse_settings(argv, description=__doc__, settings=PretrainConfig, recipes=RECIPES)
    rank, world_size, device = setup_distributed(command.config.device)
    try:
        return run_in_out_folder(command, build_run, train, rank=rank, world_size=world_size, device=device)
    finally:
        cleanup(world_size)


def main(argv=None) -> int:
    """The command line: 0 when done, 128 + the signal when stopped (after saving), a problem as one line."""
    return exit_status(execute, argv)


if __name__ == "__main__":
    sys.exit(main())
