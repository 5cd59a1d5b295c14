"""Typed settings, the machine every training script's configuration runs on: a frozen dataclass of
fields made by `setting` (a default, a one-line help, a range, whether --resume may change it), checked when
made, written to `training_args.json` and read back (`Settings`), and the command line generated from it
(`parse_settings`). train.py's settings: training/train_config.py; pretrain.py's: in pretrain.py.

Every setting is resolved in one place (`parse_settings`), in this order:

    the dataclass's defaults  <-  --recipe  <-  the saved run (on --resume)  <-  flags given on the command line

A flag that is not given leaves the value below it alone (`argparse.SUPPRESS`), so a saved `True` is
never lost to a flag's default `False`. The run writes the resolved settings to `training_args.json`
(`asdict`), and `Settings.load` reads them back to an equal config; an unknown key or a value of
the wrong type or range there is an error naming the file and the key.

On --resume the saved optimizer, model and data position fix most settings: changing one of them is an
error naming its flag. The settings marked `may_change` (how long to train, how often to evaluate, save
and log, where and how fast to run) apply and are recorded.
"""

import argparse
import math
import textwrap
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, get_args, get_origin, get_type_hints

from segformer.config import VARIANTS
from segformer.errors import ConfigError
from segformer.files import read_json


def setting(default, help: str, *, low=None, high=None, may_change: bool = False, flag: bool = True):
    """A Settings field: its default, a one-line help, an allowed range (inclusive; for floats a
    `low` of the form (x,) means > x), whether --resume may change it, and whether it has a flag (the
    values the run itself fills in have none)."""
    return field(default=default, metadata=dict(help=help, low=low, high=high, may_change=may_change, flag=flag))


class Settings:
    """What a script's typed settings share (TrainConfig, PretrainConfig in pretrain.py): fields made by
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
        values = read_json(path, error=ConfigError)  # not a file, not JSON, too deep: named
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


def build_parser(description: str, settings, recipes, *, evaluation: bool) -> argparse.ArgumentParser:
    """The command line of `settings` (a Settings dataclass: one flag per field), with the actions --resume,
    --overwrite, --trust-code, and with `evaluation` --eval-only and --checkpoint."""
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
PATH_SETTINGS = ("out", "data", "dataset_config", "id2label", "class_weights", "pretrained", "model", "teacher")
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


def parse_settings(argv, *, settings, recipes, description: str = "", evaluation: bool = False) -> Command:
    """The Command of a script's flags: its `settings` (a Settings dataclass) resolved in the documented
    order from its `recipes` ({"default": ..., name: ...}), the saved run (--resume) and the flags given;
    `evaluation`: with train.py's --eval-only and its options."""
    parser = build_parser(description, settings, recipes, evaluation=evaluation)
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
