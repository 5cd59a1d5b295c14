"""A training run's settings: one typed dataclass, the recipes, and the command line built from it.

Every setting is resolved in one place (`parse_command_line`), in this order:

    TrainConfig() defaults  <-  --recipe  <-  the saved run (on --resume)  <-  flags given on the command line

A flag that is not given leaves the value below it alone (`argparse.SUPPRESS`), so a saved `True` is
never lost to a flag's default `False`. The run writes the resolved settings to `training_args.json`
(`asdict`), and `TrainConfig.load` reads them back to an equal config; an unknown key or a value of
the wrong type or range there is an error naming the file and the key.

On --resume the saved optimizer, model and data position fix most settings: changing one of them is an
error naming its flag. The settings marked `may_change` below (how long to train, how often to
evaluate, save and log, where and how fast to run) apply and are recorded.
"""

import argparse
import json
import math
import textwrap
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

from segformer.config import VARIANTS
from segformer.errors import ConfigError
from segformer.metrics import MAX_LABELS


def setting(default, help: str, *, low=None, high=None, may_change: bool = False, flag: bool = True):
    """A TrainConfig field: its default, a one-line help, an allowed range (inclusive; for floats a
    `low` of the form (x,) means > x), whether --resume may change it, and whether it has a flag (the
    values the run itself fills in have none)."""
    return field(default=default, metadata=dict(help=help, low=low, high=high, may_change=may_change, flag=flag))


class Settings:
    """What a script's typed settings share (TrainConfig here, PretrainConfig in pretrain.py): fields made by
    `setting`, checked when made, written to and read from `training_args.json`."""

    def __post_init__(self):
        hints = get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # JSON has lists where the settings hold tuples
                object.__setattr__(self, f.name, value := tuple(value))
            check_value(f, hints[f.name], value, where=f"setting {f.name!r}")

    def save(self, path: str | Path) -> None:
        from segformer.files import write_json
        write_json(asdict(self), path)

    @classmethod
    def load(cls, path: str | Path):
        """Read a `training_args.json`; anything unknown, missing or mistyped is named with the file."""
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the run's settings ({type(e).__name__}: {e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a JSON object of settings, got {type(values).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]!r}" + (f" (and {unknown[1:]})" if unknown[1:] else "")
                              + f"; expected the keys of {cls.__name__}")
        missing = sorted(known - set(values))
        if missing:
            raise ConfigError(f"{path}: missing key {missing[0]!r}" + (f" (and {missing[1:]})" if missing[1:] else ""))
        try:
            return cls(**values)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None


@dataclass(frozen=True)
class TrainConfig(Settings):
    # The run.
    recipe: Literal["default", "guide", "paper"] = setting("default", "the preset these settings started from")
    out: str = setting("runs/synthetic", "output directory of the run", may_change=True)
    seed: int = setting(0, "seed of weights, shuffling, augmentation and dropout", low=0)
    # Data: where it comes from and how labels are read.
    data: str = setting("synthetic", "'synthetic', a dataset folder, a save_to_disk dir, parquet files or a hub id")
    train_split: str = setting("train", "training split expression, e.g. 'train' or 'train[:50]'")
    eval_split: str = setting("validation", "validation split expression")
    test_size: float | None = setting(None, "hold out this fraction of the split for validation "
                                            "(the guide's train_test_split)", low=(0.0,), high=0.99)
    image_column: str = setting("image", "image column of a Hugging Face dataset")
    annotation_column: str = setting("annotation", "annotation column of a Hugging Face dataset")
    dataset_config: str | None = setting(None, "a dataset.json describing the data (default: the folder's own)")
    id2label: str | None = setting(None, "JSON file naming the classes ({\"0\": \"wall\", ...})")
    num_labels: int | None = setting(None, "number of classes (default: the data's or the checkpoint's)",
                                     low=1, high=MAX_LABELS)
    reduce_labels: bool | None = setting(None, "ADE convention: annotation 0 is 'unlabelled' (ignored) and k is "
                                               "class k-1 (default: the data source's convention)")
    skip_bad: bool = setting(False, "skip undecodable or invalid samples with a warning instead of stopping",
                             may_change=True)
    size: int = setting(128, "training crop / resize size and evaluation size", low=32, high=8192)
    augment: Literal["guide", "paper"] = setting("guide", "training augmentation: the guide's ColorJitter or "
                                                          "the paper's rescale/crop/flip/photometric")
    eval_mode: Literal["resize", "aspect"] = setting("resize", "evaluation resize: the processor's square or "
                                                               "the paper's aspect-preserving")
    workers: int = setting(0, "DataLoader worker processes per training process", low=0, high=256,
                           may_change=True)
    # The model.
    model: str = setting("b0", "variant to build with fresh weights: b0..b5, or a config.json of your own (the "
                               "fields of SegFormerConfig or transformers' SegformerConfig: depths, widths, parts)")
    attention: str | None = setting(None, "the blocks' attention: efficient (SegFormer's), linear (PVTv2), full, or "
                                          "package.module:Class of your own (default: the model's)")
    mlp: str | None = setting(None, "the blocks' Mix-FFN: mix_ffn, or package.module:Class (default: the model's)")
    norm: str | None = setting(None, "the norm layers: layer_norm, rms_norm, or package.module:Class (default: "
                                     "the model's)")
    activation: str | None = setting(None, "the activations: gelu, relu, silu, or package.module:Class (default: "
                                           "the model's)")
    decoder: str | None = setting(None, "the decode head: all_mlp (SegFormer's), mmseg (mmsegmentation 1.x's), or "
                                        "package.module:Class (default: the model's)")
    pretrained: str | None = setting(None, "weights to start from: a .safetensors/.pth file, a directory or "
                                           "a hub id (e.g. nvidia/mit-b0)")
    sync_bn: bool = setting(False, "SyncBatchNorm for the decode head under torchrun")
    # Optimisation.
    batch_size: int = setting(8, "images per step per process", low=1, high=65536)
    total_batch_size: int | None = setting(None, "images per step over all processes (sets --batch-size)",
                                           low=1, high=65536)
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step", low=1, high=65536)
    lr: float = setting(1e-3, "peak learning rate of AdamW", low=(0.0,), high=10.0)
    weight_decay: float = setting(0.01, "AdamW weight decay", low=0.0, high=10.0)
    decay_norm_bias: bool = setting(True, "weight decay on the weights and biases of norm layers")
    head_lr_mult: float = setting(1.0, "learning-rate multiplier for the decode head (the paper: 10)",
                                  low=(0.0,), high=1000.0)
    warmup_steps: int = setting(100, "linear warmup steps before the poly decay", low=0)
    poly_power: float = setting(1.0, "power of the poly decay (1 = linear)", low=0.0, high=100.0)
    clip_grad: float | None = setting(None, "clip the gradient norm to this value", low=(0.0,))
    # Fine-tuning controls (for small data and large images).
    freeze_stages: int = setting(0, "freeze the first N encoder stages (patch embedding, blocks, norm; 4: the whole "
                                    "encoder): no gradient, no optimizer state, dropout and drop path off", low=0,
                                 high=4)
    layer_decay: float | None = setting(None, "layer-wise learning-rate decay over the encoder's blocks: block i of L "
                                              "gets lr x decay^(L + 1 - i) (BEiT's fine-tuning; e.g. 0.75)",
                                        low=(0.0,), high=1.0)
    drop_path_rate: float | None = setting(None, "stochastic depth: the drop-path rate of the last block, rising "
                                                 "linearly from 0 (default: the model's, 0.1)", low=0.0, high=0.99)
    ema: float | None = setting(None, "keep an exponential moving average of the weights with this decay (e.g. "
                                      "0.999), evaluated beside them and saved in each checkpoint", low=(0.0,),
                                high=0.999999)
    ema_best: bool = setting(False, "keep best/ from the moving average's weights and evaluations")
    patience: int | None = setting(None, "early stopping: end the run when the validation mean IoU has not "
                                         "improved for N evaluations", low=1, may_change=True)
    grad_checkpointing: bool = setting(False, "recompute each block's activations in the backward instead of keeping "
                                              "them: the same gradients for less memory (B0, 1024x1024: 0.74x)",
                                       may_change=True)
    lora_rank: int | None = setting(None, "LoRA (the peft library) of this rank on the encoder's attention and "
                                          "Mix-FFN projections, the encoder otherwise frozen, the decoder trained; "
                                          "checkpoints hold the merged weights", low=1, high=1024)
    lora_alpha: float = setting(16.0, "LoRA's scale is alpha / rank", low=(0.0,))
    # The loss.
    loss: Literal["ce", "dice", "ce+dice"] = setting("ce", "cross-entropy (the reference's), soft Dice, or both")
    class_weights: str | None = setting(None, "cross-entropy class weights: 'auto' (median frequency balancing "
                                              "over the training split) or a JSON file")
    class_weight_values: tuple[float, ...] | None = setting(None, "the class weights in use", flag=False)
    label_smoothing: float = setting(0.0, "cross-entropy label smoothing", low=0.0, high=0.99)
    ohem: float | None = setting(None, "online hard example mining: keep pixels whose true-class probability "
                                       "is below this (mmseg's OHEMPixelSampler)", low=(0.0,), high=1.0)
    ohem_min_kept: int = setting(100_000, "OHEM keeps at least this many pixels per image", low=1)
    amp: Literal["auto", "off", "bf16", "fp16"] = setting("auto", "autocast dtype (auto: bf16 on CUDA, off on "
                                                                   "CPU; fp16 uses a GradScaler)")
    max_steps: int | None = setting(1200, "optimizer steps in total (wins over --epochs)", low=1, may_change=True)
    epochs: int | None = setting(None, "passes over the training set (given alone, clears the recipe's "
                                       "--max-steps)", low=1, may_change=True)
    # What happens between steps.
    eval_every: int = setting(300, "evaluate every N steps", low=1, may_change=True)
    save_every: int = setting(300, "write a checkpoint every N steps", low=1, may_change=True)
    save_total_limit: int | None = setting(2, "keep only the newest N checkpoint-<step> directories", low=1,
                                           may_change=True)
    log_every: int = setting(20, "log loss and lr every N steps", low=1, may_change=True)
    # What the run shows and shares.
    plots: bool = setting(True, "draw curves.png and each evaluation's confusion heatmap (matplotlib, a second or "
                                "two each); --no-plots writes the numbers only", may_change=True)
    report_to: Literal["none", "tensorboard"] = setting("none", "also log to TensorBoard (<out>/tensorboard)",
                                                        may_change=True)
    push_to_hub: str | None = setting(None, "upload best/ to this hub repository (HF_TOKEN or `hf auth login`)",
                                      may_change=True)
    hub_private: bool = setting(False, "create the hub repository private", may_change=True)
    hub_strategy: Literal["end", "every_save"] = setting("end", "push best/ at the end, or every checkpoint too",
                                                         may_change=True)
    # Where and how fast it runs: no effect on the numbers.
    device: str | None = setting(None, "cuda, cpu, cuda:1, ... (default: cuda if available)", may_change=True)
    compile: bool = setting(False, "torch.compile the model", may_change=True)
    channels_last: bool = setting(False, "channels-last memory format", may_change=True)
    fold_decoder: bool = setting(True, "run the all-MLP decoder folded (fast); --no-fold-decoder runs its paper "
                                       "form as written (segformer/decoder.py), for an edited decoder",
                                 may_change=True)

def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unpack(hint) -> tuple[type, bool, tuple | None]:
    """(base type, accepts None, allowed values) of a field's annotation."""
    args = get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if get_origin(hint) is Literal:
        return str, optional, get_args(hint)
    return hint, optional, None


def check_value(f, hint, value, *, where: str):
    """Raise ConfigError unless `value` has the field's type and lies in its range; `where` names it."""
    try:
        _check_value(f, hint, value, where=where)
    except ConfigError as e:
        raise ConfigError(str(e).strip()) from None


def _check_value(f, hint, value, *, where: str):
    base, optional, choices = _unpack(hint)
    if value is None:
        if optional:
            return
        raise ConfigError(f"{where} must not be null".strip())
    if get_origin(base) is tuple:  # tuple[float, ...]
        if not isinstance(value, tuple) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                    and math.isfinite(v) for v in value):
            raise ConfigError(f"{where} must be a list of numbers, got {value!r}")
        return
    ok_type = isinstance(value, base) and not (base is int and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        ok_type = True
    if not ok_type:
        raise ConfigError(f"{where} must be {_describe(base, optional)}, got {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    if base in (int, float):
        if base is float and not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        low, high = f.metadata["low"], f.metadata["high"]
        if isinstance(low, tuple) and not value > low[0]:
            raise ConfigError(f"{where} must be > {low[0]}, got {value!r}")
        if low is not None and not isinstance(low, tuple) and value < low:
            raise ConfigError(f"{where} must be >= {low}, got {value!r}")
        if high is not None and value > high:
            raise ConfigError(f"{where} must be <= {high}, got {value!r}")


def _describe(base, optional) -> str:
    name = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[base]
    return name + (" or null" if optional else "")


# ---- the recipes -------------------------------------------------------------------------------------

DEFAULT = TrainConfig()  # no network, no GPU: the built-in synthetic scenes, B0 from scratch, a few CPU minutes

RECIPES = {
    "default": DEFAULT,
    # The Hugging Face semantic-segmentation guide: 50 images of SceneParse150 split 80/20, nvidia/mit-b0,
    # and the Trainer's defaults it relies on.
    "guide": replace(
        DEFAULT, recipe="guide", out="runs/guide",
        data="scene_parse_150", train_split="train[:50]", eval_split="train[:50]", test_size=0.2,
        pretrained="nvidia/mit-b0", size=512,
        batch_size=2, lr=6e-5,
        weight_decay=0.0,  # Trainer: no weight decay
        warmup_steps=0,  # Trainer: lr_scheduler_type "linear" (poly with power 1), no warmup
        clip_grad=1.0,  # Trainer: max_grad_norm 1.0
        max_steps=None, epochs=50, eval_every=20, save_every=20, save_total_limit=3, log_every=1,
    ),
    # The paper on ADE20K, as NVlabs' local_configs/segformer/B0/segformer.b0.512x512.ade.160k.py sets it.
    "paper": replace(
        DEFAULT, recipe="paper", out="runs/paper",
        data="scene_parse_150", train_split="train", eval_split="validation", pretrained="nvidia/mit-b0",
        size=512,  # crop_size (512, 512)
        augment="paper",  # resize to (2048, 512) x ratio 0.5-2.0, crop with cat_max_ratio 0.75, flip, photometric
        eval_mode="aspect",  # test: keep_ratio resize to short side 512
        total_batch_size=16,  # samples_per_gpu 2 x 8 GPUs, divided over however many processes run
        lr=6e-5, weight_decay=0.01,  # AdamW(lr=0.00006, betas=(0.9, 0.999), weight_decay=0.01)
        decay_norm_bias=False,  # paramwise_cfg custom_keys 'norm': decay_mult 0
        head_lr_mult=10.0,  # paramwise_cfg custom_keys 'head': lr_mult 10
        warmup_steps=1500, poly_power=1.0,  # lr_config: poly, power 1, min_lr 0, linear warmup 1500 iterations
        max_steps=160_000,  # runner: IterBasedRunner, max_iters 160000
        sync_bn=True,  # norm_cfg SyncBN (when several processes run)
        eval_every=16_000, save_every=16_000, save_total_limit=3, log_every=50,  # evaluation/checkpoint 16000
        workers=4,  # workers_per_gpu 4
    ),
}

# A setting given on the command line clears a competing one that came from below it.
CLEARS = {"epochs": "max_steps", "batch_size": "total_batch_size"}


# ---- the command line ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    config: "Settings"  # TrainConfig, or a PretrainConfig
    resume: Path | None = None  # the checkpoint directory to continue from
    overwrite: bool = False
    eval_only: bool = False
    checkpoint: str | None = None  # what --eval-only evaluates
    report: str | None = None  # --eval-only's report folder
    calibrate: bool = False  # --eval-only: fit the logits' temperature, saved beside the checkpoint
    corruptions: str | None = None  # --eval-only --report: the robustness evaluation's corruptions
    given: frozenset = frozenset()  # the settings given on the command line
    trust_code: bool = False  # import the code from outside this project that a file names as a part


def _parse_value(f, hint):
    """argparse `type=` for a field: converts and range-checks, so a bad value is an error naming the flag."""
    base, optional, _ = _unpack(hint)

    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_describe(base, optional)}, got {text!r}") from None
        try:
            check_value(f, hint, value, where="")
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value
    return parse


def _recipe_lines(recipes: dict) -> str:
    lines = []
    for name, recipe in recipes.items():
        if name == "default":
            continue
        changed = [f"{f.name}={getattr(recipe, f.name)}" for f in fields(recipe)
                   if f.name != "recipe" and getattr(recipe, f.name) != getattr(recipes["default"], f.name)]
        lines.append(textwrap.fill(" ".join(changed), width=100, initial_indent=f"  {name}: ",
                                   subsequent_indent=" " * (len(name) + 4)))
    return "\n".join(lines)


def build_parser(description: str, settings=None, recipes=None, *, evaluation: bool = True) -> argparse.ArgumentParser:
    """The command line of `settings` (a Settings dataclass: one flag per field), with the actions --resume,
    --overwrite, --trust-code, and with `evaluation` --eval-only and --checkpoint."""
    settings, recipes = settings or TrainConfig, recipes or RECIPES
    may_change = [flag(f.name) for f in fields(settings) if f.metadata["may_change"] and f.metadata["flag"]]
    epilog = ("Recipes (each sets these on top of the defaults shown above):\n" + _recipe_lines(recipes) + "\n\n"
              "Order: defaults <- --recipe <- the saved run (--resume) <- the flags you give.\n"
              "On --resume these may change: " + " ".join(may_change) + ";\nevery other setting is fixed by the "
              "saved optimizer, model and data position, and giving it a different value is an error.")
    parser = argparse.ArgumentParser(description=description, epilog=epilog, argument_default=argparse.SUPPRESS,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = get_type_hints(settings)
    for f in fields(settings):
        if not f.metadata["flag"]:
            continue
        base, optional, choices = _unpack(hints[f.name])
        shown = "none" if f.default is None else f.default
        help = f"{f.metadata['help']} [default: {shown}]"
        if base is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=help)
        else:
            metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
            if optional:
                help += " ('none' to unset)"
            parser.add_argument(flag(f.name), type=_parse_value(f, hints[f.name]), metavar=metavar, help=help)
    actions = parser.add_argument_group("actions")
    actions.add_argument("--resume", metavar="DIR", help="continue the run saved in this checkpoint directory, "
                                                         "exactly (its settings come with it)")
    actions.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    actions.add_argument("--trust-code", action="store_true",
                         help="import the code from outside this project that a checkpoint or --model config.json "
                              "names as a part of the model (--resume, --eval-only, --pretrained)")
    if evaluation:
        actions.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on --eval-split and "
                                                                      "print the per-class table")
        actions.add_argument("--checkpoint", metavar="DIR", help="the checkpoint --eval-only evaluates (its input "
                                                                 "size, label reduction and labels come with it)")
        actions.add_argument("--report", metavar="DIR", help="--eval-only: also write the evaluation report there "
                                                             "(per class and per image, Boundary IoU, calibration, "
                                                             "the worst images, report.json, and README.md: the "
                                                             "checkpoint's model card with the results)")
        actions.add_argument("--calibrate", action="store_true",
                             help="--eval-only: fit the temperature of the logits on --eval-split (lowest NLL) and "
                                  "save it beside the checkpoint (calibration.json), which infer.py and export.py "
                                  "apply; the report shows ECE, NLL and Brier score before and after")
        actions.add_argument("--corruptions", metavar="LIST",
                             help="--eval-only --report: also evaluate under common corruptions at 5 severities "
                                  "(data/corruptions.py, 17): all, a family (noise, blur, weather, digital) "
                                  "or names (gaussian_noise, glass_blur, snow, ...), comma-separated")
    return parser


# Settings that name files or folders. They are stored resolved (absolute), so that a run resumes from any
# working directory, and the same folder given again in another spelling is the same setting.
PATH_SETTINGS = ("out", "data", "dataset_config", "id2label", "class_weights", "pretrained", "model")
NOT_PATHS = ("synthetic", "auto", *VARIANTS)  # the built-in data set, automatic class weights, b0..b5


def resolve_paths(config: Settings, names=PATH_SETTINGS) -> dict:
    """{name: absolute path} for the path settings of `config` that name something on this machine (`out`,
    where the run writes, always)."""
    resolved = {}
    for name in (n for n in names if hasattr(config, n)):
        value = getattr(config, name)
        if isinstance(value, str) and value not in NOT_PATHS and (name == "out" or Path(value).exists()):
            resolved[name] = str(Path(value).resolve())
    return resolved


def parse_command_line(argv=None, *, description: str = "", settings=None, recipes=None) -> Command:
    """The Command of a script's flags: its `settings` (TrainConfig by default) resolved in the documented
    order from its `recipes`, the saved run (--resume) and the flags given."""
    settings, recipes = settings or TrainConfig, recipes or RECIPES
    parser = build_parser(description, settings, recipes, evaluation=settings is TrainConfig)
    args = vars(parser.parse_args(argv))
    given = {name: args.pop(name) for name in list(args) if name in {f.name for f in fields(settings)}}
    paths = [name for name in PATH_SETTINGS if name in given]
    given.update(resolve_paths(replace(recipes["default"], **given), paths))
    resume = args.get("resume")
    eval_only = args.get("eval_only", False)
    checkpoint = args.get("checkpoint")
    if eval_only and not checkpoint:
        raise ConfigError("--eval-only needs --checkpoint <dir|file|hub id>")
    if checkpoint and not eval_only:
        raise ConfigError("--checkpoint goes with --eval-only (to start from weights, use --pretrained)")
    if resume and eval_only:
        raise ConfigError("--resume and --eval-only do not go together")
    for option in ("report", "calibrate", "corruptions"):
        if args.get(option) and not eval_only:
            raise ConfigError(f"--{option} goes with --eval-only --checkpoint <dir|file|hub id>")
    if args.get("corruptions") and not args.get("report"):
        raise ConfigError("--corruptions goes with --report DIR (its table and heat map are written there)")
    if args.get("corruptions"):
        from data.corruptions import parse_corruptions
        try:
            parse_corruptions(args["corruptions"])
        except ValueError as e:
            raise ConfigError(f"--corruptions {args['corruptions']}: {e}") from None
    if "model" in given and given["model"] not in VARIANTS and not Path(given["model"]).is_file():
        raise ConfigError(f"--model {given['model']}: expected one of {', '.join(VARIANTS)}, or a config.json file")

    if resume:
        saved = Path(resume) / "training_args.json"
        if not saved.is_file() or not (Path(resume) / "training_state.pt").is_file():
            raise ConfigError(f"--resume {resume}: no training_args.json and training_state.pt there "
                              f"(is it a checkpoint-<step> directory?)")
        base = settings.load(saved)
        # A resumed run belongs in the folder that holds its checkpoint, wherever that has moved, unless
        # --out says otherwise.
        base = replace(base, **{**resolve_paths(base), "out": str(Path(resume).resolve().parent)})
        fixed = [name for name, value in given.items()
                 if value != getattr(base, name) and not _field(settings, name).metadata["may_change"]]
        if fixed:
            name = fixed[0]
            raise ConfigError(f"{flag(name)} {_show(given[name])}: the run in {resume} was trained with "
                              f"{_show(getattr(base, name))}, which its saved state fixes; start a new run "
                              f"(another --out) to change it" + (f" (also {', '.join(map(flag, fixed[1:]))})"
                                                                if fixed[1:] else ""))
    elif eval_only and (Path(checkpoint) / "training_args.json").is_file():
        base = settings.load(Path(checkpoint) / "training_args.json")  # evaluate as its run did
    else:
        base = recipes[given.get("recipe", "default")]
    for name, cleared in CLEARS.items():
        if name in given and cleared not in given and hasattr(base, cleared):
            given[cleared] = None
    config = replace(base, **given)
    config = replace(config, **resolve_paths(config))
    return Command(config, resume=Path(resume) if resume else None, overwrite=args.get("overwrite", False),
                   eval_only=eval_only, checkpoint=checkpoint, report=args.get("report"),
                   calibrate=args.get("calibrate", False), corruptions=args.get("corruptions"), given=frozenset(given),
                   trust_code=args.get("trust_code", False))


def _field(settings, name: str):
    return next(f for f in fields(settings) if f.name == name)


def _show(value) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
