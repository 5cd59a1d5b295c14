"""The data of a segmentation run, made ready once before its first step: both splits, the label spec
(data.spec.decide_labels), the checks that every annotation is readable and in range, the class weights,
and the loaders."""

from dataclasses import replace

import torch

from data import build_dataset, build_loader, decide_labels, measure_bands, open_source
from data.stats import collect, median_frequency_weights, problems, read_class_weights, zero_share
from segformer.checkpoint import CheckpointFacts, describe
from segformer.device import resolve_amp
from segformer.errors import ConfigError, DataError
from segformer.labels import read_id2label
from training.train_config import TrainConfig
from training.distributed import broadcast


# ---- data and labels -------------------------------------------------------------------------------------

def open_split(config: TrainConfig, split: str, *, train: bool):
    return open_source(config.data, split, train=train, test_size=config.test_size,
                       image_column=config.image_column, annotation_column=config.annotation_column,
                       dataset_config=config.dataset_config, allow_outside=config.allow_outside_data)


def decide_run_labels(config: TrainConfig, samples, *, resumed: CheckpointFacts | None):
    """The run's label spec (data.spec.decide_labels) from the data, the resumed checkpoint, --pretrained
    and the flags; the lines to say come with it."""
    pretrained = describe(config.pretrained) if config.pretrained and resumed is None else None
    return decide_labels(data=samples.labels, checkpoint=resumed, pretrained=pretrained,
                         id2label=read_id2label(config.id2label) if config.id2label else None,
                         id2label_origin=f"--id2label {config.id2label}", num_labels=config.num_labels,
                         reduce_labels=config.reduce_labels, size=config.size)


def resolve_for_run(config: TrainConfig, *, spec, world_size: int, device: torch.device) -> TrainConfig:
    """Settings whose value depends on the data, the machine or the number of processes, made concrete
    once, so that `training_args.json` records what the run actually does."""
    batch_size = config.batch_size
    if config.total_batch_size:  # the recipe fixes the images per step over all processes
        batch_size = max(1, config.total_batch_size // (world_size * config.grad_accum))
    return replace(config, amp=resolve_amp(config.amp, device), reduce_labels=spec.reduce_labels,
                   num_labels=spec.num_labels, batch_size=batch_size)


def open_data(config: TrainConfig, *, resumed: CheckpointFacts | None, rank: int, world_size: int,
              device: torch.device):
    """Both splits and the label spec decided once. Returns (config made concrete, spec, train and
    evaluation loaders)."""
    train_samples = open_split(config, config.train_split, train=True)
    eval_samples = open_split(config, config.eval_split, train=False)
    overlap = set(train_samples.names()) & set(eval_samples.names())
    if overlap:
        raise ConfigError(f"{len(overlap)} of the {len(eval_samples)} validation samples of {config.data} are also "
                          f"training samples (e.g. {min(overlap)}): --train-split {config.train_split} and "
                          f"--eval-split {config.eval_split} must not share images")
    spec, notes = decide_run_labels(config, train_samples, resumed=resumed)
    if isinstance(spec.bands, int):  # full-precision bands without statistics: measured once, then recorded
        bands = broadcast(measure_bands(train_samples, spec.bands) if rank == 0 else None, world_size)
        spec = replace(spec, bands=bands)
        notes.append(f"bands: the data's {bands.describe()}, measured on the training images; put \"mean\" and "
                     f"\"std\" in its dataset.json to fix them")
    check_loss_options(config, spec)
    config = resolve_for_run(config, spec=spec, world_size=world_size, device=device)
    if rank == 0:
        print(f"data: {train_samples.layout} {config.data}: {len(train_samples)} training / {len(eval_samples)} "
              f"validation samples; {spec.describe()}")
        for note in notes:
            print(note)
        if not spec.convention_stated:
            warn_about_class_zero(train_samples, spec)
    train_stats = broadcast(check_data(config, spec, train_samples, eval_samples) if rank == 0 else None, world_size)
    if config.class_weights and config.class_weight_values is None:  # decided once, then recorded
        weights = broadcast(class_weights(config, spec, train_stats) if rank == 0 else None, world_size)
        config = replace(config, class_weight_values=tuple(weights))
    train_set = build_dataset(train_samples, spec=spec, train=True, recipe=config.augment, seed=config.seed,
                              skip_bad=config.skip_bad)
    eval_set = build_dataset(eval_samples, spec=spec, train=False, eval_mode=config.eval_mode, skip_bad=config.skip_bad)
    train_loader = build_loader(train_set, batch_size=config.batch_size, num_workers=config.workers, seed=config.seed)
    return config, spec, train_loader, build_eval_loader(config, eval_set)


def build_eval_loader(config: TrainConfig, eval_set):
    """Aspect-preserving evaluation keeps each image's own size: one image per batch."""
    return build_loader(eval_set, batch_size=1 if config.eval_mode == "aspect" else config.batch_size,
                        num_workers=config.workers, seed=config.seed)


def warn_about_class_zero(samples, spec, *, share: float = 0.25) -> None:
    """ADE's reduction on data that does not say it follows ADE's convention: say so when 0, which it
    ignores, covers much of the first annotations (a background class, say)."""
    zeros, looked_at = zero_share(samples, spec.mapping)
    if spec.reduce_labels and zeros > share:
        print(f"warning: {100 * zeros:.0f}% of the pixels of the first {looked_at} annotations are 0, which the ADE "
              f"convention ignores as 'unlabelled'. If 0 is one of your classes (a background, say), pass "
              f"--no-reduce-labels (or \"reduce_labels\": false in a dataset.json).")


def check_data(config: TrainConfig, spec, train_samples, eval_samples):
    """Every annotation of both splits read once before training (size, mode, colours, values): a bad file
    is found now, not at the first evaluation. Returns the training split's statistics (class weights use
    them), or None for the built-in scenes, which are made, not read."""
    if train_samples.generated:
        return None
    stats = {split: collect(samples, spec.mapping, spec.num_labels, description=f"checking the {split} split")
             for split, samples in (("training", train_samples), ("validation", eval_samples))}
    bad = [line for split_stats in stats.values() for line in problems(split_stats)]
    if bad and not config.skip_bad:
        raise DataError(f"{len(bad)} bad sample(s) in {config.data}, e.g. {bad[0]}; `python -m data {config.data}` "
                        f"lists them all: fix them, or pass --skip-bad to train without them")
    if bad:
        print(f"warning: {len(bad)} bad sample(s) will be skipped (--skip-bad), e.g. {bad[0]}")
    return stats["training"]


def check_loss_options(config: TrainConfig, spec) -> None:
    """One label trains the reference's binary (sigmoid) head, which takes none of the options for imbalanced
    classes: refused now, not at the first step."""
    asked = {"--class-weights": config.class_weights, "--label-smoothing": config.label_smoothing or None,
             "--ohem": config.ohem, "--loss": None if config.loss == "ce" else config.loss}
    given = [f"{flag} {value}" for flag, value in asked.items() if value is not None]
    if spec.num_labels == 1 and given:
        raise ConfigError(f"{given[0]}: one label trains the binary (sigmoid) head, which takes no class weights, "
                          f"label smoothing, OHEM or Dice; drop it, or train two classes (background and the label: "
                          f"--num-labels 2)")


def class_weights(config: TrainConfig, spec, stats) -> list[float]:
    """--class-weights: a JSON file, or 'auto': median frequency balancing over the training split (its
    statistics from the data check; read here for the built-in scenes)."""
    if config.class_weights != "auto":
        return read_class_weights(config.class_weights, list(spec.class_names))
    weights = median_frequency_weights(stats or collect(open_split(config, config.train_split, train=True),
                                                        spec.mapping, spec.num_labels, description="class weights"))
    print("class weights (median frequency balancing): "
          + ", ".join(f"{name.strip()} {w:.3g}" for name, w in list(zip(spec.class_names, weights))[:10])
          + (" ..." if len(weights) > 10 else ""))
    return weights
