"""The parts a SegFormer is built from, by name: SegFormer's own, the built-in alternatives, and yours.

    SegFormerConfig(attention="linear")                             a built-in alternative, by name
    SegFormerConfig(attention="my_pkg.my_module:MyAttention")       yours, by import path
    SegFormer.from_variant("b0", attention=MyAttention)             yours, as a class (stored as its path)

| part       | built-in names (the first is SegFormer's)        | called as -> returns                          |
|------------|--------------------------------------------------|-----------------------------------------------|
| encoder    | mit (the Mix Transformer, built from the next 4) | (pixel_values) -> four maps (B, C_i, H/2^(i+2), W/2^(i+2)) |
| attention  | efficient, linear (PVTv2), full, tome (SegFormer++) | (x (B, N=H*W, C), H, W) -> (B, N, C)           |
| mlp        | mix_ffn                                          | (x (B, N, C), H, W) -> (B, N, C)               |
| norm       | layer_norm, rms_norm                             | Norm(width)(x) over the last dim -> x's shape  |
| activation | gelu, relu, silu                                 | Act()(x) -> x's shape                          |
| decoder    | all_mlp, mmseg (mmsegmentation 1.x's head)       | (four maps) -> logits (B, num_labels, H/4, W/4) |

(the constructors: CONSTRUCTED_AS below; the built-in classes in segformer/encoder.py, attention.py and
decoder.py). A part of one's own is checked when the model is built: its constructor against the seam's call
(check_constructor), then its output shapes on one 64x64 forward (check_part_shapes), each failure one line
naming the part and the shapes.

The names go into the checkpoint's config.json, so every tool rebuilds the same model from it. Code named
by a checkpoint is imported only when the caller says it trusts the checkpoint (`trust_code=True`,
`--trust-code`), as transformers' `trust_remote_code`: a file from elsewhere cannot make us import a module.
The project's own classes (import paths under `segformer.`) need no trust.
"""

import importlib
import inspect

import torch.nn as nn

from .attention import EfficientSelfAttention, FullSelfAttention, LinearReductionAttention
from .config import PARTS, SegFormerConfig
from .decoder import AllMLPDecoder, MMSegHead
from .encoder import MixFFN, MixTransformer
from .errors import CheckpointError, ConfigError, first_line
from .token_merging import TokenMergingAttention

BUILT_IN = {
    "encoder": {"mit": MixTransformer},
    "attention": {"efficient": EfficientSelfAttention, "linear": LinearReductionAttention, "full": FullSelfAttention,
                  "tome": TokenMergingAttention},
    "mlp": {"mix_ffn": MixFFN},
    "norm": {"layer_norm": nn.LayerNorm} | ({"rms_norm": nn.RMSNorm} if hasattr(nn, "RMSNorm") else {}),
    "activation": {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU},
    "decoder": {"all_mlp": AllMLPDecoder, "mmseg": MMSegHead},
}


# What each seam passes to a part's constructor (segformer/encoder.py, segformer/model.py), as a sample call:
# a part of one's own whose constructor cannot take it is named when it is resolved, not deep in the build.
CONSTRUCTED_AS = {
    "encoder": ("config, attention=, mlp=, norm_layer=, act_layer=",
                lambda: ((None,), dict(attention=None, mlp=None, norm_layer=None, act_layer=None))),
    "attention": ("hidden_size, num_heads=, sr_ratio=, attention_dropout=, dropout=, norm_layer=, act_layer=",
                  lambda: ((64,), dict(num_heads=1, sr_ratio=1, attention_dropout=0.0, dropout=0.0, norm_layer=None,
                                       act_layer=None))),
    "mlp": ("hidden_size, mlp_ratio=, dropout=, act_layer=",
            lambda: ((64,), dict(mlp_ratio=4, dropout=0.0, act_layer=None))),
    "norm": ("width", lambda: ((64,), {})),
    "activation": ("no arguments", lambda: ((), {})),
    "decoder": ("config, channels (the encoder's widths per stage)", lambda: ((None, [32, 64, 160, 256]), {})),
}


def check_constructor(part: str, name: str, cls: type) -> None:
    """A ConfigError naming the part when its class's constructor cannot take what the seam passes."""
    expected, sample = CONSTRUCTED_AS[part]
    args, kwargs = sample()
    try:
        if cls.__init__ is nn.Module.__init__ and (args or kwargs):  # its (*args, **kwargs) take nothing
            raise TypeError(f"{cls.__name__} has no __init__ of its own, and nn.Module's takes no arguments")
        inspect.signature(cls).bind(*args, **kwargs)
    except ValueError:  # no signature to read (a C extension): left to the build
        return
    except TypeError as e:
        raise ConfigError(f"{part} {name}: its constructor must take ({expected}), as the {part} seam calls it; "
                          f"{e}") from None


def is_own_code(name: str) -> bool:
    """A built-in name, or an import path of this project's own classes."""
    return ":" not in name or name.split(":")[0].split(".")[0] == "segformer"


def untrusted_parts(config: SegFormerConfig) -> dict[str, str]:
    """The parts of `config` that name code from outside this project."""
    return {part: name for part, name in config.parts.items() if not is_own_code(name)}


def resolve(part: str, name: str) -> type:
    """The class a part's name stands for: a built-in one, or the class at an import path. Whatever cannot
    be resolved, or is no nn.Module, is a ConfigError naming the part and the name."""
    if ":" not in name:
        if name not in BUILT_IN[part]:
            raise ConfigError(f"{part} {name!r}: not a built-in {part} ({', '.join(BUILT_IN[part])}) nor an import "
                              f"path 'package.module:Class'")
        return BUILT_IN[part][name]
    module_name, _, qualname = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{part} {name}: cannot import {module_name} ({e}); is it installed, or on PYTHONPATH?") \
            from None
    found = module
    for attribute in qualname.split("."):
        found = getattr(found, attribute, None)
        if found is None:
            raise ConfigError(f"{part} {name}: {module_name} has no {qualname}" + (
                " (a class defined inside a function cannot be rebuilt from its name: define it at the top level "
                "of a module)" if "<locals>" in qualname else ""))
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise ConfigError(f"{part} {name}: not a torch.nn.Module class, got {type(found).__name__}")
    check_constructor(part, name, found)
    return found


def resolve_all(config: SegFormerConfig, *, trust_code: bool = True, source: str | None = None) -> dict[str, type]:
    """{part: class} for every part of `config`. With `trust_code=False` (a config read from a file), code
    from outside this project is refused, naming it and how to allow it."""
    untrusted = untrusted_parts(config)
    if untrusted and not trust_code:
        named = ", ".join(f"{part} {name}" for part, name in untrusted.items())
        raise CheckpointError(f"{source or 'the config'} names code from outside this project ({named}): import it "
                              f"only if you trust the checkpoint, with --trust-code (trust_code=True in Python)")
    return {part: resolve(part, getattr(config, part)) for part in PARTS}


def build_encoder(config: SegFormerConfig, parts: dict[str, type] | None = None):
    """The encoder `config` names, its blocks built from the attention, Mix-FFN, norm and activation it
    names (`parts`: what `resolve_all` returned, not to resolve them twice)."""
    parts = parts or resolve_all(config)
    return parts["encoder"](config, attention=parts["attention"], mlp=parts["mlp"], norm_layer=parts["norm"],
                            act_layer=parts["activation"])


# What each seam expects a part to return, given what it passed (the first positional input; for the decoder
# the encoder's four maps), as (description, the expected shape or None where any is right).
def expected_output(part: str, model, inputs) -> tuple[str, tuple | None]:
    first = inputs[0]
    if part in ("attention", "mlp"):
        return "(B, N, C): the tokens' shape it was given", tuple(first.shape)
    if part in ("norm", "activation"):
        return "its input's shape", tuple(first.shape)
    if part == "decoder":
        B, _, h, w = first[0].shape
        return "(B, num_labels, H/4, W/4): one logit per class at the first map's size", \
            (B, model.config.num_labels, h, w)
    return "four maps (B, C_i, H/2^(i+2), W/2^(i+2)), C_i the encoder's channels", None


def check_part_shapes(model: nn.Module, parts: dict[str, type], custom: dict[str, str]) -> None:
    """Run a model with parts of one's own (`custom`: {part: name}) once on a 64x64 image, each such part
    watched: one whose output is not the shape its seam expects, or that raises, is a ConfigError naming the
    part and the shapes, instead of a size mismatch deep in the next layer."""
    import torch
    watched = {cls: part for part, cls in parts.items() if part in custom}  # the class of each part of one's own
    running = []  # the watched parts now inside their forward, innermost last

    def shape_of(value):
        return tuple(value.shape) if hasattr(value, "shape") else [shape_of(v) for v in value] \
            if isinstance(value, (list, tuple)) else type(value).__name__

    def before(module, args, kwargs):
        running.append((module, args))

    def after(module, args, kwargs, output):
        part = watched[type(module)]
        running.pop()
        description, expected = expected_output(part, model, args)
        if part == "encoder":
            channels = list(model.encoder.channels)
            got = [tuple(o.shape) for o in output] if isinstance(output, (list, tuple)) else None
            if got is None or len(got) != 4 or any(len(s) != 4 or s[1] != c for s, c in zip(got, channels)):
                expected = f"channels {channels}"
            else:
                return
        elif hasattr(output, "shape") and tuple(output.shape) == expected:
            return
        raise ConfigError(f"{part} {custom[part]}: returned {shape_of(output)} for an input of {shape_of(args[0])}; "
                          f"the {part} seam expects {description}, here {expected}")

    handles = [h for module in model.modules() if type(module) in watched
               for h in (module.register_forward_pre_hook(before, with_kwargs=True),
                         module.register_forward_hook(after, with_kwargs=True))]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, model.config.in_channels, 64, 64))
    except ConfigError:
        raise
    except Exception as e:
        first = first_line(e)
        if running:
            module, args = running[-1]
            part = watched[type(module)]
            raise ConfigError(f"{part} {custom[part]}: raised {type(e).__name__} ({first}) on an input of "
                              f"{shape_of(args[0])}, a 64x64 image's") from None
        raise ConfigError(f"a model with {', '.join(f'{p} {n}' for p, n in custom.items())} fails on a 64x64 "
                          f"image: {type(e).__name__} ({first})") from None
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
