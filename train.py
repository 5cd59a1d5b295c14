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

Reading order: `build_run` (labels, data, model, optimizer, schedule, restored state), then `train`, whose
loop body is the cycle: a step, then log, evaluate (and keep the best), checkpoint, stop if asked.
"""

import math
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from data import DataError, batch_to_device
from data.spec import agree
from segformer import SegFormer, SegFormerConfig, segmentation_loss
from segformer.loss import distillation_loss
from segformer.checkpoint import CheckpointFacts, describe, read_model_config
from segformer.config import PARTS, VARIANTS
from segformer.device import autocast
from segformer.errors import CheckpointError, ConfigError
from segformer.parts import resolve, resolve_all, untrusted_parts
from training.data import open_data
from training.distributed import any_process, cleanup, seed_everything, setup_distributed
from training.eval_only import evaluate_checkpoint
from training.evaluation import Evaluation, evaluate
from training.finetune import add_lora, freeze_stages, frozen_to_eval, learning_rate_scales, merged
from training.hub import HubPusher, model_card
from training.loop import (Diverged, LoopState, Meter, StopRequest, after_step, checkpoint_state, due, exit_status,
                           log, restore_loop_state, resume_then_open_log, run_in_out_folder, sample_list, start_line,
                           steps, stopped)
from training.plots import draw_curves, draw_per_class
from training.run_folder import last_checkpoint_note, load_training_state, prune_checkpoints, save_checkpoint
from training.run_log import TensorBoard, jsonable, read_log
from training.settings import Command
from training.tables import class_table, write_evaluation
from training.train_config import TrainConfig, parse_command_line

# ---- model, optimizer, schedule, loss ----------------------------------------------------------------------

def image_bands(spec) -> int:
    """The bands of the run's images: the data's (multi-band rasters), else RGB's 3."""
    return spec.bands.count if spec.bands else 3


def build_model(config: TrainConfig, spec, *, resumed: CheckpointFacts | None, trust_code: bool,
                given: frozenset = frozenset()) -> SegFormer:
    """The model to train: the resumed checkpoint's, --pretrained weights (with a fresh classifier where the
    classes differ), or fresh weights of --model (b0..b5 or a config.json) with the parts the flags name.
    Parts named by a file (a checkpoint, a config.json, a resumed run's saved settings) that are code from
    outside this project are imported with --trust-code, or where the same names were typed on this command
    line (`given`: the settings it gives)."""
    labels = dict(num_labels=spec.num_labels, id2label=spec.id2label,
                  in_channels=image_bands(spec))  # 3-band weights are adapted to other bands
    parts = {part: getattr(config, part, None) for part in PARTS if getattr(config, part, None) is not None}
    typed = {part: name for part, name in parts.items() if part in given}  # the user's own word, this time
    options = dict(fold_decoder=config.fold_decoder) | (
        {"drop_path_rate": config.drop_path_rate} if config.drop_path_rate is not None else {})
    if resumed is not None and not config.lora_rank:  # (a LoRA run's checkpoint holds merged weights: the model is
        return SegFormer.from_pretrained(resumed, trust_code=trust_code, **options)  # rebuilt as at the start, and
    # its weights with their adapters come from training_state.pt)
    if config.pretrained:
        facts = describe(config.pretrained)
        trusted = trust_code or untrusted_parts(facts.config).items() <= typed.items()
        return SegFormer.from_pretrained(facts, **labels, trust_code=trusted, **options, **parts)
    if config.model in VARIANTS:
        base = SegFormerConfig.from_variant(config.model)
    elif Path(config.model).is_file():
        base = read_model_config(config.model)
    else:
        raise ConfigError(f"--model {config.model}: expected one of {', '.join(VARIANTS)} or a config.json")
    model_config = replace(base, **parts, **labels, **options)
    resolve_all(model_config, trust_code=trust_code or untrusted_parts(model_config).items() <= typed.items(),
                source=f"--resume {resumed.source}: its training_args.json" if resumed
                else f"--model {config.model}")
    return SegFormer(model_config)


def load_teacher(config: TrainConfig, spec, *, device: torch.device, trust_code: bool) -> SegFormer | None:
    """--teacher: a trained model whose class probabilities the model also learns, loaded as any checkpoint is
    (its parts from outside this project with --trust-code). Frozen: no gradient, evaluation mode (no dropout,
    BatchNorm's running statistics), so its logits are a function of the image alone and a resumed run sees the
    same ones. It must predict the run's classes, in the run's order."""
    if config.teacher is None:
        return None
    try:
        facts = describe(config.teacher)
    except CheckpointError as e:
        raise CheckpointError(f"--teacher {e}") from None
    # code it names is imported only with --trust-code: refused before anything else is read of it
    resolve_all(facts.config, trust_code=trust_code, source=f"--teacher {facts.config_file or config.teacher}")
    if facts.config.num_labels != spec.num_labels:
        raise ConfigError(f"--teacher {config.teacher}: it predicts {facts.config.num_labels} classes, the run has "
                          f"{spec.num_labels}; a teacher must predict the run's classes")
    in_channels = image_bands(spec)
    if facts.config.in_channels != in_channels:
        raise ConfigError(f"--teacher {config.teacher}: it reads {facts.config.in_channels}-band images, the run's "
                          f"have {in_channels}")
    theirs = [facts.config.id2label.get(i, f"LABEL_{i}") for i in range(spec.num_labels)]
    if not agree(spec.class_names, theirs):
        i = next(i for i, (a, b) in enumerate(zip(theirs, spec.class_names)) if a.strip() != b.strip())
        raise ConfigError(f"--teacher {config.teacher}: its class {i} is {theirs[i]!r}, the run's is "
                          f"{spec.class_names[i]!r}; a teacher must predict the run's classes in the run's order")
    teacher = SegFormer.from_pretrained(facts, trust_code=trust_code).requires_grad_(False).eval().to(device)
    return teacher.to(memory_format=torch.channels_last) if config.channels_last else teacher


def distill(run: "Run", pixel_values: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The distillation term of a micro-batch: the teacher's logits on the same images (no graph kept),
    T^2 KL(teacher || model) over the labelled pixels, weighted."""
    with torch.no_grad():
        teacher_logits = run.teacher(pixel_values)
    return run.config.distill_weight * distillation_loss(logits, teacher_logits, labels,
                                                         temperature=run.config.distill_temperature)


def get_optimizer(config: TrainConfig, model: SegFormer) -> torch.optim.AdamW:
    """AdamW over the parameters that train (frozen ones get no state), grouped by learning rate (the decode
    head's x head_lr_mult; with --layer-decay, each encoder block its own) and weight decay (none on the
    weights and biases of norm layers, when decay_norm_bias is off). The parts are found by structure, not
    by name: whatever `model.decoder` holds is the head, any norm layer's tensors are norms."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, resolve("norm", model.config.norm)) + (
        (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
    norm_params = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    head_params = {id(p) for p in model.decoder.parameters()}
    scales = learning_rate_scales(model, layer_decay=config.layer_decay, head_lr_mult=config.head_lr_mult)
    groups = {}
    for param in (p for p in model.parameters() if p.requires_grad):
        head, scale = id(param) in head_params, scales[id(param)]
        no_decay = not config.decay_norm_bias and id(param) in norm_params
        key = ("head" if head else "encoder" if config.layer_decay is None else f"encoder x{scale:.4g}") + \
            (", no decay" if no_decay else "")
        if key not in groups:
            groups[key] = {"name": key, "params": [], "lr": config.lr * scale,
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


def loss_options(config: TrainConfig, device: torch.device) -> dict:
    weights = config.class_weight_values
    return dict(kind=config.loss, label_smoothing=config.label_smoothing, ohem_threshold=config.ohem,
                ohem_min_kept=config.ohem_min_kept, memory_efficient=True,  # the fused cross-entropy
                class_weights=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None)


# ---- the run ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    """What a training run holds: built once by `build_run`, then advanced step by step."""
    config: TrainConfig
    out: Path
    rank: int
    world_size: int
    device: torch.device
    spec: object  # data.spec.LabelSpec: classes, label mapping, colours, input size
    raw_model: SegFormer  # what we save: unwrapped, uncompiled
    model: nn.Module  # what we run: maybe DistributedDataParallel, maybe compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    train_loader: torch.utils.data.DataLoader
    eval_loader: torch.utils.data.DataLoader
    loop: LoopState  # where the run is: step, epoch, batch; how many steps it takes
    loss_options: dict  # segmentation_loss's keyword arguments
    log: object = None  # metrics.jsonl, open on rank 0
    tensorboard: object = None  # training.run_log.TensorBoard, on rank 0 with --report-to tensorboard
    pusher: object = None  # training.hub.HubPusher, on rank 0 with --push-to-hub
    best_miou: float = -1.0
    metrics: dict = field(default_factory=dict)  # of the last evaluation
    meter: Meter = field(default_factory=Meter)
    frozen: list = field(default_factory=list)  # the encoder stages frozen (--freeze-stages): kept in eval mode
    ema: object = None  # torch.optim.swa_utils.AveragedModel of raw_model (--ema)
    since_best: int = 0  # evaluations since the best mean IoU (--patience)
    teacher: nn.Module | None = None  # --teacher: frozen, in evaluation mode

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        return autocast(self.device.type, self.config.amp)


def build_run(command: Command, *, rank: int, world_size: int, device: torch.device) -> Run:
    """Labels, data, model, optimizer, schedule and, on --resume, the saved state: everything but the loop."""
    if command.config.ema_best and command.config.ema is None:  # said now, not at the first evaluation
        raise ConfigError("--ema-best keeps best/ from the moving average's evaluations: it needs --ema DECAY "
                          "(e.g. --ema 0.999)")
    seed_everything(command.config.seed)  # the same initial weights on every process
    resumed = describe(command.resume) if command.resume else None
    config, spec, train_loader, eval_loader = open_data(command.config, resumed=resumed, rank=rank,
                                                        world_size=world_size, device=device)
    steps_per_epoch = len(train_loader) // config.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"the training split has {len(train_loader.dataset)} images: too few for one step of "
                          f"{config.batch_size} x {config.grad_accum} x {world_size} processes")
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    raw_model = build_model(config, spec, resumed=resumed, trust_code=command.trust_code, given=command.given)
    frozen = freeze_stages(raw_model, config.freeze_stages)  # no gradient, no optimizer state, evaluation mode
    if config.lora_rank:
        add_lora(raw_model, rank=config.lora_rank, alpha=config.lora_alpha)
    if config.grad_checkpointing:
        raw_model.encoder.set_grad_checkpointing(True)
    raw_model = raw_model.to(device)
    if config.channels_last:
        raw_model = raw_model.to(memory_format=torch.channels_last)
    ema = AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True) \
        if config.ema else None
    model = raw_model
    if world_size > 1:
        if config.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        model = torch.compile(model)
    optimizer = get_optimizer(config, raw_model)
    schedule = poly_schedule(config.warmup_steps, total_steps, config.poly_power)
    run = Run(config=config, out=Path(config.out), rank=rank, world_size=world_size, device=device, spec=spec,
              raw_model=raw_model, model=model, optimizer=optimizer,
              scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
              scaler=torch.amp.GradScaler(device.type, enabled=config.amp == "fp16"),
              train_loader=train_loader, eval_loader=eval_loader, loop=LoopState(total_steps),
              loss_options=loss_options(config, device), frozen=frozen, ema=ema,
              teacher=load_teacher(config, spec, device=device, trust_code=command.trust_code))
    resume_then_open_log(run, command.resume, schedule, restore)
    if run.is_main:
        if config.report_to == "tensorboard":
            run.tensorboard = TensorBoard(run.out, spec.palette)
        if config.push_to_hub:
            run.pusher = HubPusher(config.push_to_hub, private=config.hub_private)
        print(start_line(run, "training", spec.num_labels))
    return run


def restore(run: Run, directory: Path, schedule) -> None:
    """Put the optimizer, schedule, scaler, RNGs and data position back where the checkpoint left them."""
    state = load_training_state(directory)
    restore_loop_state(run, state, directory, schedule, samples=training_samples(run))
    check_same_labels(run, state.get("labels"), directory)
    run.best_miou, run.since_best = state["best_miou"], state.get("since_best", 0)
    if run.config.lora_rank:  # the model with its adapters, onto the same architecture rebuilt as at the start
        run.raw_model.load_state_dict(state["adapted"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])


def label_terms(spec) -> dict:
    """What the run's labels are, term by term: the classes and how stored values become them."""
    return {"classes": list(spec.class_names), **(spec.mapping.terms() if spec.mapping is not None else {})}


def check_same_labels(run: Run, saved: dict | None, directory: Path) -> None:
    """A dataset.json whose classes, label mapping or ignored values changed since the run started would be
    resumed without a word, and its mIoU would jump: refused, naming what changed."""
    now = label_terms(run.spec)
    if saved is None or saved == now:  # (None: a checkpoint written before the labels were kept)
        return
    changed = [f"{key} was {saved.get(key)!r}, is now {now.get(key)!r}" for key in sorted(set(saved) | set(now))
               if saved.get(key) != now.get(key)]
    raise ConfigError(f"{run.config.data}: the labels changed since {directory} was trained ({'; '.join(changed[:3])}"
                      f"{' ...' if len(changed) > 3 else ''}): the run would go on with other labels. Put its "
                      f"dataset.json back, or start a new run from these weights: --pretrained {directory} "
                      f"--out <new folder>")


def training_samples(run: Run) -> list:
    samples = run.train_loader.dataset.samples
    return sample_list(samples.names(), samples.labels.source)


def train_step(run: Run, micro_batches: list[dict]) -> tuple[float, float]:
    """One optimizer step over grad_accum micro-batches. Returns (loss, learning rate of the step)."""
    config, step_loss = run.config, 0.0
    for i, batch in enumerate(micro_batches):
        labelled = run.meter.add_batch(batch)
        if "pixel_values" not in batch:  # every sample of it was skipped as bad
            continue
        pixel_values, labels = batch_to_device(batch, run.device, channels_last=config.channels_last)
        sync = i == len(micro_batches) - 1 or run.world_size == 1  # DDP: all-reduce on the last one only
        with (nullcontext() if sync else run.model.no_sync()), run.autocast():
            logits = run.model(pixel_values)
            # Nothing labelled (e.g. a crop of 'unlabelled' only): the mean over no pixel would be NaN. A zero
            # that still reaches every parameter keeps DDP's gradient all-reduce in step on every process.
            loss = (segmentation_loss(logits, labels, **run.loss_options) if labelled else logits.sum() * 0.0)
            if run.teacher is not None:
                loss = loss + distill(run, pixel_values, logits, labels)
            loss = loss / config.grad_accum
        run.scaler.scale(loss).backward()
        step_loss += loss.item()
    if any_process(not math.isfinite(step_loss), run.world_size, run.device):  # all stop at the same step
        samples = run.train_loader.dataset.samples
        names = [samples.name(i) for batch in micro_batches for i in batch.get("indices", [])]
        raise Diverged(f"the loss is {step_loss} at step {run.loop.step + 1} (its samples: {', '.join(names[:4])}"
                       f"{f' and {len(names) - 4} more' if len(names) > 4 else ''}); stopping without saving: "
                       f"{last_checkpoint_note(run.out)}")
    if config.clip_grad:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), config.clip_grad)
    group = run.optimizer.param_groups[0]
    lr = config.lr * group["lr"] / group["initial_lr"]  # the base rate of this step (the schedule's)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    if run.ema is not None:
        run.ema.update_parameters(run.raw_model)
    run.loop.advance(len(micro_batches))
    return step_loss, lr


def save(run: Run, name: str, *, metrics: dict | None = None) -> Path:
    """Save the run as `out/name` (every process takes part: the RNG gather); never weights that are not
    all finite. `metrics`: those of its model card, by default the last evaluation's."""
    state = checkpoint_state(run, samples=training_samples(run), best=run.best_miou) | {
        "since_best": run.since_best, "labels": label_terms(run.spec)}
    if run.config.lora_rank:  # the model with its adapters (model.safetensors holds it merged)
        state["adapted"] = run.raw_model.state_dict()
    if run.ema is not None:
        state["ema"] = run.ema.state_dict()
    path = run.out / name
    if run.is_main:
        card = model_card(run.config, run.spec.predicted_classes, metrics or run.metrics, step=run.loop.step,
                          variant=run.raw_model.config.variant, parts=run.raw_model.config.parts)
        ema = merged(run.ema.module) if run.ema is not None and run.config.lora_rank else \
            run.ema.module if run.ema is not None else None
        best_from_ema = name == "best" and run.config.ema_best
        model = ema if best_from_ema else merged(run.raw_model) if run.config.lora_rank else run.raw_model
        save_checkpoint(path, model=model, state=state, config=run.config, size=run.spec.size,
                        reduce_labels=run.spec.reduce_labels, palette=run.spec.palette, bands=run.spec.bands,
                        card=card, ema=None if best_from_ema else ema)
    return path


def report_evaluation(run: Run, evaluation: Evaluation, progress: tqdm) -> None:
    """What an evaluation leaves to look at (rank 0): a line, its confusion matrix and per-class table, the
    refreshed curves, and in TensorBoard a few images with their predictions (training/tables.py, plots.py, run_log.py)."""
    metrics = evaluation.metrics
    progress.write(f"step {run.loop.step}: mean IoU {metrics['mean_iou']:.4f}, mean accuracy "
                   f"{metrics['mean_accuracy']:.4f}, overall accuracy {metrics['overall_accuracy']:.4f}")
    write_evaluation(run.out / "evaluations" / f"step-{run.loop.step}", evaluation.confusion, run.spec.predicted_classes,
                     metrics, draw=run.config.plots)
    if run.config.plots:  # from metrics.jsonl, which `log` has just flushed
        draw_curves([(run.out.name, read_log(run.out / "metrics.jsonl")[0])], run.out / "curves.png")
    if run.tensorboard and evaluation.shown:
        run.tensorboard.predictions(run.loop.step, *evaluation.shown)


def train(run: Run) -> dict:
    """The training cycle: a step, then log, evaluate and keep the best, checkpoint, and stop if any process
    was asked to. Returns the run's summary (with `interrupted`: the signal that stopped it, or None)."""
    config, meter = run.config, run.meter
    progress = tqdm(total=run.loop.total_steps, initial=run.loop.step, disable=not run.is_main, dynamic_ncols=True)
    run.model.train()
    frozen_to_eval(run.frozen)
    stop = StopRequest()
    try:
        for micro_batches in steps(run, at_epoch_end=meter.check_something_trained):
            loss, lr = train_step(run, micro_batches)
            after_step(run, progress, loss, lr)
            step, last = run.loop.step, run.loop.last
            if last:
                meter.check_something_trained()
            evaluated = due(step, config.eval_every, last) and evaluate_run(run, loss=loss, lr=lr, stop=stop,
                                                                             progress=progress)
            patience_out = evaluated and config.patience and run.since_best >= config.patience
            saved = save(run, f"checkpoint-{step}") if due(step, config.save_every, last) or patience_out else None
            if saved and run.is_main:
                prune_checkpoints(run.out, config.save_total_limit)
                if run.pusher and config.hub_strategy == "every_save":
                    run.pusher.push(saved, f"checkpoint at step {step}")
            if stopped(run, stop, saved, lambda name: save(run, name), progress):
                return summary(run, interrupted=stop.signal or signal.SIGTERM)
            if patience_out:  # early stopping: no better mean IoU in --patience evaluations
                log(run, {"step": step, "early_stop": True, "best_mean_iou": run.best_miou})
                if run.is_main:
                    progress.write(f"early stop at step {step}: no better mean IoU in {config.patience} "
                                   f"evaluations (best {run.best_miou:.4f}); saved {saved}")
                break
    except DataError as e:  # a file that went bad during the run: the steps trained are kept
        raise DataError(f"{e}; {keep_trained_steps(run)}") from None
    finally:
        stop.restore()
        progress.close()
    if run.is_main:
        report_end(run)
    return summary(run)


def evaluate_run(run: Run, *, loss: float, lr: float, stop: StopRequest, progress: tqdm) -> bool:
    """Evaluate the model (and with --ema its moving average), log, draw, keep the best. The plain modules:
    no DDP collectives, so shards of unequal length are fine. A stop asked for during it ends it at once
    (it counts for nothing: False), within a grace period's time."""
    options = dict(num_labels=len(run.spec.predicted_classes), device=run.device, autocast=run.autocast,
                   stop=lambda: stop.signal is not None)
    evaluation = evaluate(run.raw_model, run.eval_loader, show=4 if run.tensorboard else 0, **options)
    averaged = evaluate(run.ema.module, run.eval_loader, **options) if run.ema and evaluation else None
    frozen_to_eval(run.frozen)  # evaluate put the model back in training mode, its frozen stages too
    if any_process(evaluation is None or (run.ema is not None and averaged is None), run.world_size, run.device):
        return False
    run.metrics = evaluation.metrics
    log(run, {"step": run.loop.step, "loss": loss, "lr": lr, **jsonable(run.metrics)}
        | ({f"ema_{key}": value for key, value in jsonable(averaged.metrics).items()} if averaged else {}))
    if run.is_main:
        report_evaluation(run, evaluation, progress)
        if averaged:
            progress.write(f"step {run.loop.step}: moving average: mean IoU {averaged.metrics['mean_iou']:.4f}")
    judged = averaged.metrics if run.config.ema_best else run.metrics
    if judged["mean_iou"] > run.best_miou:
        run.best_miou, run.since_best = judged["mean_iou"], 0
        save(run, "best", metrics=judged)
    else:
        run.since_best += 1
    run.meter.restart_clock()
    return True


def keep_trained_steps(run: Run) -> str:
    """Save the steps trained before a data error (one process: every process would have to take part), and
    say where they are."""
    path = run.out / f"checkpoint-{run.loop.step}"
    if run.loop.step == 0 or run.meter.trained_batches == 0 or run.world_size > 1:
        return last_checkpoint_note(run.out)
    if not path.exists():
        save(run, path.name)
    return f"the {run.loop.step} steps trained are saved in {path}: fix the file, then --resume {path}"


def summary(run: Run, *, interrupted: int | None = None) -> dict:
    return {"step": run.loop.step, "best_miou": run.best_miou, "skipped": len(run.meter.skipped),
            "unlabelled_batches": run.meter.unlabelled_batches, "interrupted": interrupted,
            "stopped_early": bool(run.config.patience and run.since_best >= run.config.patience), **run.metrics}


def report_end(run: Run) -> None:
    meter, classes = run.meter, run.spec.predicted_classes
    if run.metrics and run.config.plots:
        draw_per_class(run.metrics, classes, run.out / "per_class_iou.png")
    if run.pusher and (run.out / "best").is_dir():
        if run.pusher.push(run.out / "best", f"best at step {run.loop.step}: mean IoU {run.best_miou:.4f}"):
            print(f"pushed {run.out / 'best'} to {run.pusher.url}")
    if run.tensorboard:
        run.tensorboard.close()
    if meter.skipped:
        print(f"skipped {len(meter.skipped)} bad training sample(s), e.g. {meter.skip_reasons[0]}")
    if meter.unlabelled_batches:
        print(f"{meter.unlabelled_batches} training batches had no labelled pixel and contributed nothing")
    if run.metrics:
        print(class_table(run.metrics, classes))
    best = run.out / "best"
    print(f"\nbest mean IoU {run.best_miou:.4f}: {best}\nlast checkpoint: {run.out / f'checkpoint-{run.loop.step}'}")
    print(f"try it:  python infer.py --checkpoint {best} <image or folder> --out {run.out / 'predictions'}")


# ---- entry points -------------------------------------------------------------------------------------------

def execute(argv=None) -> dict:
    """Everything `main` does, for Python callers: the run's summary (or --eval-only's metrics); a problem
    the user can fix is raised as a UserError."""
    command = parse_command_line(argv, description=__doc__)
    rank, world_size, device = setup_distributed(command.config.device)
    try:
        if command.eval_only:
            return evaluate_checkpoint(command, rank=rank, device=device)
        return run_in_out_folder(command, build_run, train, rank=rank, world_size=world_size, device=device)
    finally:
        cleanup(world_size)


def main(argv=None) -> int:
    """The command line: 0 when done, 128 + the signal when stopped by Ctrl-C or SIGTERM (after saving),
    and a problem the user can fix as one line, with its type's exit code."""
    return exit_status(execute, argv)


if __name__ == "__main__":
    sys.exit(main())
