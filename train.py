"""Fine-tune SegFormer: the Hugging Face semantic-segmentation guide's `Trainer` run, written out.

    python train.py                                   # synthetic scenes, B0 from scratch, ~4 min on a CPU
    python train.py --recipe guide                    # the guide: scene_parse_150 train[:50], nvidia/mit-b0
    python train.py --recipe paper --data ADEChallengeData2016/   # the paper's 160k-iteration schedule
    torchrun --nproc_per_node 8 train.py --recipe paper --data ADEChallengeData2016/
    python train.py --eval-only --checkpoint runs/synthetic/best

One step: batch -> forward under autocast -> loss (logits upsampled to the labels, cross-entropy
ignoring 255) -> backward (x grad_accum) -> clip -> AdamW step -> poly schedule. Every --eval-every
steps: mean IoU on the validation split; every --save-every steps: a checkpoint directory that
`SegFormer.from_pretrained` and transformers both load, plus the state to resume exactly.
"""

import argparse
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data import DataError, build_dataset, build_loader
from segformer import SegFormer, segmentation_loss
from segformer.checkpoint import read_input_size, write_json, write_preprocessor_config
from segformer.labels import read_id2label
from segformer.layouts import LayoutError
from segformer.metrics import ConfusionMatrix, logits_to_predictions

# Each recipe fills in the flags the command line leaves unset.
RECIPES = {
    # No network, no GPU: learn the built-in synthetic scenes from scratch in a few CPU minutes.
    "default": dict(data="synthetic", model="b0", size=128, batch_size=8, lr=1e-3, weight_decay=0.01,
                    max_steps=1200, warmup_steps=100, eval_every=300, save_every=300, log_every=20,
                    save_total_limit=2, out="runs/synthetic", augment="guide"),
    # The Hugging Face guide: 50 images of SceneParse150, 80/20 split, mit-b0, Trainer defaults
    # (AdamW, linear decay = poly with power 1, no warmup, no weight decay).
    "guide": dict(data="scene_parse_150", train_split="train[:50]", eval_split="train[:50]", test_size=0.2,
                  pretrained="nvidia/mit-b0", num_labels=150, size=512, batch_size=2, lr=6e-5, weight_decay=0.0,
                  epochs=50, warmup_steps=0, eval_every=20, save_every=20, log_every=1, save_total_limit=3,
                  out="runs/guide", augment="guide"),
    # SegFormer paper, ADE20K: 160k iterations, 16 images per step in total, AdamW 6e-5, weight decay
    # 0.01, head lr x10, poly(1) after 1500 linear warmup steps, mmseg augmentation, 512 crops.
    "paper": dict(data="scene_parse_150", train_split="train", eval_split="validation", pretrained="nvidia/mit-b0",
                  num_labels=150, size=512, total_batch_size=16, lr=6e-5, weight_decay=0.01, head_lr_mult=10.0,
                  max_steps=160_000, warmup_steps=1500, eval_every=16_000, save_every=16_000, log_every=50,
                  save_total_limit=3, out="runs/paper", augment="paper", eval_mode="aspect", workers=4),
}
DEFAULTS = dict(model="b0", pretrained=None, num_labels=None, train_split="train", eval_split="validation",
                test_size=None, batch_size=2, total_batch_size=None, grad_accum=1, epochs=None, max_steps=None,
                head_lr_mult=1.0, poly_power=1.0, clip_grad=None, eval_mode="resize", workers=0,
                save_total_limit=None, log_every=10, amp=None, seed=0)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--recipe", choices=list(RECIPES), default="default", help="preset of every flag below (default: %(default)s)")
    a("--data", help="'synthetic', an ADE-layout folder, a save_to_disk dir, parquet files or a hub dataset id")
    a("--train-split", help="training split expression, e.g. 'train' or 'train[:50]'")
    a("--eval-split", help="validation split expression")
    a("--test-size", type=float, help="hold out this fraction of the split (the guide's train_test_split)")
    a("--image-column", default="image", help="image column of a Hugging Face dataset")
    a("--annotation-column", default="annotation", help="annotation column of a Hugging Face dataset")
    a("--id2label", help="JSON file naming the classes ({\"0\": \"wall\", ...})")
    a("--skip-bad", action="store_true", help="skip undecodable or invalid samples with a warning instead of stopping")
    a("--no-reduce-labels", action="store_true",
      help="annotations already hold class ids 0..N-1 (255 ignored); by default 0 is 'unlabelled' (ADE)")
    a("--model", help="variant to build with fresh weights: b0..b5")
    a("--pretrained", help="weights to start from: a .safetensors/.pth file, a directory or a hub id "
                           "(e.g. nvidia/mit-b0)")
    a("--num-labels", type=int, help="classes after label reduction (150 for ADE20K)")
    a("--size", type=int, help="training crop / resize size and evaluation size")
    a("--augment", choices=["guide", "paper"], help="training augmentation: the guide's ColorJitter or the paper's")
    a("--eval-mode", choices=["resize", "aspect"],
      help="evaluation resize: the processor's square or the paper's aspect-preserving")
    a("--batch-size", type=int, help="images per step per process")
    a("--grad-accum", type=int, help="micro-batches accumulated per optimizer step")
    a("--lr", type=float, help="peak learning rate of AdamW")
    a("--weight-decay", type=float, help="AdamW weight decay")
    a("--no-decay-norm-bias", action="store_true", help="no weight decay on norm weights and biases")
    a("--head-lr-mult", type=float, help="learning-rate multiplier for the decode head (the paper: 10)")
    a("--warmup-steps", type=int, help="linear warmup steps before the poly decay")
    a("--poly-power", type=float, help="power of the poly decay (1 = linear)")
    a("--clip-grad", type=float, help="clip the gradient norm to this value")
    a("--max-steps", type=int, help="optimizer steps in total (overrides --epochs)")
    a("--epochs", type=int, help="passes over the training set")
    a("--eval-every", type=int, help="evaluate every N steps")
    a("--save-every", type=int, help="write a checkpoint every N steps")
    a("--save-total-limit", type=int, help="keep only the newest N checkpoint-<step> directories")
    a("--log-every", type=int, help="log loss and lr every N steps")
    a("--out", help="output directory")
    a("--overwrite", action="store_true", help="replace the run already in --out (by default that is an error)")
    a("--resume", help="checkpoint directory to continue from, exactly")
    a("--seed", type=int, help="seed of weights, shuffling and augmentation")
    a("--amp", choices=["off", "bf16", "fp16"], help="autocast dtype (default: bf16 on CUDA, off on CPU)")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--channels-last", action="store_true", help="channels-last memory format")
    a("--sync-bn", action="store_true", help="SyncBatchNorm for the decode head under torchrun")
    a("--workers", type=int, help="DataLoader worker processes per training process")
    a("--device", help="cuda, cpu, ... (default: cuda if available)")
    a("--eval-only", action="store_true", help="evaluate --checkpoint on --eval-split and print the table")
    a("--checkpoint", help="checkpoint to evaluate with --eval-only")
    args = p.parse_args(argv)
    presets = {**DEFAULTS, **RECIPES[args.recipe]}
    if args.resume:  # continue with the flags of the interrupted run, unless given again
        saved = Path(args.resume) / "training_args.json"
        if not (saved.is_file() and (Path(args.resume) / "training_state.pt").is_file()):
            p.error(f"--resume {args.resume}: no training_args.json and training_state.pt there "
                    f"(is it a checkpoint-<step> directory?)")
        saved = json.loads(saved.read_text())
        presets.update({k: v for k, v in saved.items() if k not in ("resume", "eval_only", "checkpoint")})
    if args.eval_only and args.checkpoint and args.size is None:  # evaluate at the size it was trained at
        args.size = read_input_size(args.checkpoint)
    if args.batch_size is not None:  # an explicit per-process batch size wins over a recipe's total
        presets["total_batch_size"] = None
    for key, value in presets.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


# ---- processes, devices, seeds ---------------------------------------------------------------------

def setup_distributed(args):
    """Under torchrun: one process per device, NCCL on GPUs, gloo on CPUs. Returns (rank, world, device)."""
    if "RANK" not in os.environ:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return 0, 1, device
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
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


# ---- data, model, optimizer ------------------------------------------------------------------------

def get_eval_dataset(args, *, num_labels: int | None, class_names: list[str] | None):
    return build_dataset(args.data, args.eval_split, train=False, eval_mode=args.eval_mode,
                         **data_options(args, num_labels=num_labels, class_names=class_names))


def get_eval_loader(args, eval_set):
    """Aspect-preserving evaluation keeps each image's own size: one image per batch."""
    return build_loader(eval_set, batch_size=1 if args.eval_mode == "aspect" else args.batch_size,
                        num_workers=args.workers, seed=args.seed)


def data_options(args, *, num_labels: int | None, class_names: list[str] | None) -> dict:
    """The build_dataset arguments shared by the training and evaluation splits."""
    return dict(num_labels=num_labels, class_names=class_names, size=args.size, test_size=args.test_size,
                seed=args.seed, reduce_labels=not args.no_reduce_labels, image_column=args.image_column,
                annotation_column=args.annotation_column, skip_bad=args.skip_bad)


def get_model(args, num_labels: int, class_names: list[str]) -> SegFormer:
    id2label = dict(enumerate(class_names))
    if args.pretrained:
        return SegFormer.from_pretrained(args.pretrained, num_labels=num_labels, id2label=id2label)
    return SegFormer.from_variant(args.model, num_labels=num_labels, id2label=id2label)


def get_optimizer(args, model: SegFormer) -> torch.optim.AdamW:
    """AdamW with up to four groups: encoder / decode head (x head_lr_mult), with / without decay."""
    groups = {}
    for name, param in model.named_parameters():
        head = name.startswith("decoder.")
        no_decay = args.no_decay_norm_bias and (param.ndim == 1)  # norm weights and all biases are 1-D
        key = (head, no_decay)
        if key not in groups:
            groups[key] = {"params": [], "lr": args.lr * (args.head_lr_mult if head else 1.0),
                           "weight_decay": 0.0 if no_decay else args.weight_decay}
        groups[key]["params"].append(param)
    return torch.optim.AdamW(list(groups.values()), lr=args.lr)


def poly_schedule(warmup_steps: int, total_steps: int, power: float):
    """Multiplier of the base lr at a step: linear warmup from 0, then (1 - progress) ** power."""
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1 - progress) ** power
    return factor


# ---- evaluation ----------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, loader, *, num_labels: int, device, autocast) -> dict:
    """Mean IoU over the loader, summed over all processes. Predictions are the logits upsampled to
    the label size, then argmax, as in the guide's compute_metrics."""
    model.eval()
    confusion = ConfusionMatrix(num_labels, ignore_index=255, device=device)
    for batch in loader:
        if "pixel_values" not in batch:  # every sample of the batch was skipped
            continue
        pixel_values = batch["pixel_values"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        with autocast():
            logits = model(pixel_values)
        confusion.update(logits_to_predictions(logits.float(), labels.shape[-2:]), labels)
    confusion.all_reduce()
    model.train()
    return confusion.compute()


def class_table(metrics: dict, class_names: list[str]) -> str:
    """Per-class IoU and accuracy (%) of the classes seen in the labels or the predictions."""
    rows = [f"{'class':<24}{'IoU':>8}{'acc':>8}"]
    absent = 0
    for name, iou, acc in zip(class_names, metrics["per_category_iou"], metrics["per_category_accuracy"]):
        if math.isnan(iou):
            absent += 1
            continue
        rows.append(f"{name.strip()[:23]:<24}{_pct(iou):>8}{_pct(acc):>8}")
    if absent:
        rows.append(f"({absent} classes neither labelled nor predicted: not shown, not in the means)")
    rows.append(f"{'mean':<24}{_pct(metrics['mean_iou']):>8}{_pct(metrics['mean_accuracy']):>8}")
    rows.append(f"overall accuracy {_pct(metrics['overall_accuracy'])}")
    return "\n".join(rows)


def _pct(x) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def jsonable(metrics: dict) -> dict:
    """NaN -> null, arrays -> lists: strict JSON."""
    def clean(x):
        if isinstance(x, (np.ndarray, list, tuple)):
            return [clean(v) for v in x]
        x = float(x)
        return None if math.isnan(x) else x
    return {k: clean(v) if not isinstance(v, (int, str)) else v for k, v in metrics.items()}


# ---- checkpoints -----------------------------------------------------------------------------------

def save_checkpoint(directory: Path, model: SegFormer, training_state: dict, args) -> None:
    """Write a checkpoint directory atomically: build it under a temporary name, then rename it into
    place (an existing directory of that name is replaced only once the new one is complete)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        model.save_pretrained(tmp)
        write_preprocessor_config(tmp, size=args.size, reduce_labels=not args.no_reduce_labels)
        torch.save(training_state, tmp / "training_state.pt")
        write_json(vars(args), tmp / "training_args.json")  # the flags, for --resume and for people
        old = directory.with_name(f".{directory.name}.old")
        if directory.exists():
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(out: Path, *, resume: bool, overwrite: bool, is_main: bool) -> None:
    """A new run never overwrites an earlier one unless asked to."""
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True)
    earlier = checkpoints + [out / "best"] * (out / "best").exists()
    if not earlier or resume:
        return
    if not overwrite:
        newest = f"--resume {checkpoints[0]}, " if checkpoints else ""
        raise SystemExit(f"{out} already holds a run ({', '.join(p.name for p in earlier[:4])}): continue it with "
                         f"{newest}choose another --out, or pass --overwrite to replace it")
    if is_main:
        for path in earlier:
            shutil.rmtree(path)
        (out / "metrics.jsonl").unlink(missing_ok=True)


def prune_checkpoints(out: Path, keep: int | None) -> None:
    if not keep:
        return
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in checkpoints[:-keep]:
        shutil.rmtree(old)


# ---- the loop ------------------------------------------------------------------------------------

def main(args) -> dict:
    rank, world_size, device = setup_distributed(args)
    is_main = rank == 0
    amp = args.amp or ("bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off")
    if amp == "fp16" and device.type != "cuda":
        raise SystemExit("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    dtype = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=amp != "off")

    seed_everything(args.seed)  # the same initial weights on every process
    if args.eval_only:
        return evaluate_checkpoint(args, device, autocast)

    out = Path(args.out)
    check_output_dir(out, resume=bool(args.resume), overwrite=args.overwrite, is_main=is_main)

    # Data.
    class_names = list(read_id2label(args.id2label).values()) if args.id2label else None
    options = data_options(args, num_labels=args.num_labels, class_names=class_names)
    train_set = build_dataset(args.data, args.train_split, train=True, recipe=args.augment, **options)
    eval_set = get_eval_dataset(args, num_labels=args.num_labels, class_names=class_names)
    class_names = train_set.class_names
    if args.total_batch_size:  # the recipe fixes the images per step over all processes
        args.batch_size = max(1, args.total_batch_size // (world_size * args.grad_accum))
    train_loader = build_loader(train_set, batch_size=args.batch_size, num_workers=args.workers, seed=args.seed)
    eval_loader = get_eval_loader(args, eval_set)
    steps_per_epoch = len(train_loader) // args.grad_accum
    if steps_per_epoch == 0:
        raise SystemExit(f"the training split has {len(train_set)} images: too few for one step of "
                         f"{args.batch_size} x {args.grad_accum} x {world_size} processes")
    total_steps = args.max_steps or args.epochs * steps_per_epoch

    # Model: the raw module is what we save; `model` is what we run (maybe compiled, maybe DDP).
    if args.resume:
        raw_model = SegFormer.from_pretrained(args.resume).to(device)
    else:
        raw_model = get_model(args, train_set.num_labels, class_names).to(device)
    if args.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    model = raw_model
    if world_size > 1:
        if args.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)

    optimizer = get_optimizer(args, raw_model)
    schedule = poly_schedule(args.warmup_steps, total_steps, args.poly_power)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    step, epoch, batches_done, best_miou = 0, 0, 0, -1.0
    if args.resume:
        state = torch.load(Path(args.resume) / "training_state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, batches_done, best_miou = state["step"], state["epoch"], state["batches_done"], state["best_miou"]
        set_rng_states(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        if is_main:
            print(f"resumed from {args.resume} at step {step} (epoch {epoch}, batch {batches_done})")

    def training_state():
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "epoch": epoch, "batches_done": batches_done, "best_miou": best_miou,
                "rng": gather_rng_states(world_size)}

    def checkpoint(name: str) -> Path:
        state = training_state()  # every process takes part (RNG gather), rank 0 writes
        path = out / name
        if is_main:
            save_checkpoint(path, raw_model, state, args)
        return path

    log = None
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "metrics.jsonl", "a")
        print(f"training {raw_model.config.variant or 'custom'} on {args.data} ({len(train_set)} train / "
              f"{len(eval_set)} eval images, {train_set.num_labels} classes) for {total_steps} steps of "
              f"{args.batch_size * args.grad_accum * world_size} images on {world_size} x {device.type}, amp={amp}")
    progress = tqdm(total=total_steps, initial=step, disable=not is_main, dynamic_ncols=True)
    model.train()
    skipped, loss_sum, loss_count, images_seen, t0 = 0, 0.0, 0, 0, time.perf_counter()
    metrics = {}
    stop = StopRequest()
    try:
        while step < total_steps:
            train_loader.sampler.set_position(epoch, batches_done * args.batch_size)
            for micro_batches in groups_of(train_loader, args.grad_accum):
                # One optimizer step over grad_accum micro-batches.
                step_loss = 0.0
                for i, batch in enumerate(micro_batches):
                    skipped += batch["skipped"]
                    if "pixel_values" not in batch:
                        continue
                    pixel_values = batch["pixel_values"].to(device, non_blocking=True)
                    labels = batch["labels"].to(device, non_blocking=True)
                    if args.channels_last:
                        pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
                    sync = i == len(micro_batches) - 1 or world_size == 1
                    with (nullcontext() if sync else model.no_sync()), autocast():
                        loss = segmentation_loss(model(pixel_values), labels) / args.grad_accum
                    scaler.scale(loss).backward()
                    step_loss += loss.item()
                    images_seen += pixel_values.shape[0]
                if any_process(not math.isfinite(step_loss), world_size, device):  # all stop at the same step
                    raise FloatingPointError(f"the loss is {step_loss} at step {step + 1}; stopping without "
                                             f"saving (the last good checkpoint in {out} is kept)")
                if args.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.clip_grad)
                lr = optimizer.param_groups[0]["lr"]  # the encoder's rate for this step
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                batches_done += len(micro_batches)
                loss_sum, loss_count = loss_sum + step_loss, loss_count + 1

                images_per_s = images_seen * world_size / (time.perf_counter() - t0)
                progress.update(1)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
                if step % args.log_every == 0 or step == total_steps:
                    if log:
                        log.write(json.dumps({"step": step, "epoch": epoch, "loss": loss_sum / loss_count,
                                              "lr": lr, "images_per_s": images_per_s}) + "\n")
                        log.flush()
                    loss_sum, loss_count, images_seen, t0 = 0.0, 0, 0, time.perf_counter()
                if step % args.eval_every == 0 or step == total_steps:
                    # the plain module: no DDP collectives, so shards of unequal length are fine
                    metrics = evaluate(raw_model, eval_loader, num_labels=train_set.num_labels, device=device,
                                       autocast=autocast)
                    if log:
                        progress.write(f"step {step}: mean IoU {metrics['mean_iou']:.4f}, "
                                       f"mean accuracy {metrics['mean_accuracy']:.4f}, "
                                       f"overall accuracy {metrics['overall_accuracy']:.4f}")
                        log.write(json.dumps({"step": step, "loss": step_loss, "lr": lr, **jsonable(metrics)}) + "\n")
                        log.flush()
                    if metrics["mean_iou"] > best_miou:
                        best_miou = metrics["mean_iou"]
                        checkpoint("best")
                    images_seen, t0 = 0, time.perf_counter()
                if step % args.save_every == 0 or step == total_steps:
                    checkpoint(f"checkpoint-{step}")
                    if is_main:
                        prune_checkpoints(out, args.save_total_limit)
                if any_process(stop.requested, world_size, device):
                    progress.close()
                    path = checkpoint(f"checkpoint-{step}")
                    if is_main:
                        print(f"interrupted: saved {path}; continue with --resume {path}")
                    cleanup(world_size)
                    sys.exit(130)
                if step == total_steps:
                    break
            else:  # the epoch ran out (an incomplete last group of micro-batches is dropped)
                epoch, batches_done = epoch + 1, 0
    finally:
        stop.restore()
    progress.close()

    if is_main:
        if skipped:
            print(f"skipped {skipped} bad training samples (see the warnings above)")
        if metrics:
            print(class_table(metrics, class_names))
        best = out / "best"
        print(f"\nbest mean IoU {best_miou:.4f}: {best}\nlast checkpoint: {out / f'checkpoint-{step}'}")
        print(f"try it:  python infer.py --checkpoint {best} <image or folder> --out {out / 'predictions'}")
        log.close()
    cleanup(world_size)
    return {"step": step, "best_miou": best_miou, **metrics}


class StopRequest:
    """Ctrl-C (SIGINT) asks the loop to stop at the end of the current step, so that the checkpoint
    it writes is exactly the state after a whole step (a step cut short has already moved BatchNorm's
    running statistics). A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self.handler)

    def handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to abort)", file=sys.stderr)

    def restore(self):
        signal.signal(signal.SIGINT, self.previous)


def any_process(flag: bool, world_size: int, device) -> bool:
    """True on every process when the flag is true on any of them, so that all act at the same step."""
    if world_size == 1:
        return flag
    total = torch.tensor([float(flag)], device=device)
    dist.all_reduce(total)
    return total.item() > 0


def groups_of(loader, n: int):
    """Consecutive lists of n batches; a shorter last group is dropped."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []


def gather_rng_states(world_size: int) -> list:
    """Every process's RNG states (dropout and drop path draw from them), so a resume is exact."""
    states = rng_states()
    if world_size == 1:
        return [states]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, states)
    return gathered


def evaluate_checkpoint(args, device, autocast) -> dict:
    if not args.checkpoint:
        raise SystemExit("--eval-only needs --checkpoint <dir|file|hub id>")
    model = SegFormer.from_pretrained(args.checkpoint).to(device)
    eval_set = get_eval_dataset(args, num_labels=model.config.num_labels, class_names=model.config.label_names())
    metrics = evaluate(model, get_eval_loader(args, eval_set), num_labels=model.config.num_labels, device=device,
                       autocast=autocast)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"{args.checkpoint} on {args.data} {args.eval_split} ({len(eval_set)} images, {args.eval_mode}):")
        print(class_table(metrics, model.config.label_names()))
    cleanup(dist.get_world_size() if dist.is_initialized() else 1)
    return metrics


def cleanup(world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(get_args())
    except (FloatingPointError, DataError, LayoutError, FileNotFoundError) as e:  # the message says it all
        sys.exit(f"error: {e}")
