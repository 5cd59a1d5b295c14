"""Checkpoint layouts: pure `state_dict -> state_dict` conversions that account for every key.

These layouts hold SegFormer weights in the wild:

* ``hf``: the Hugging Face hub layout of `SegformerForSemanticSegmentation`
  (`segformer.encoder.block.0.0.attention.self.query.weight`, `decode_head.linear_c.0.proj.weight`, ...).
  `SegformerForImageClassification` (what `nvidia/mit-b0` holds) is the same encoder plus a
  `classifier.*` ImageNet head, which we do not use.
* ``nvlabs``: the original NVlabs/mmsegmentation code (`backbone.block1.0.attn.q.weight`,
  `decode_head.linear_fuse.conv.weight`, ...). Stages count from 1, keys and values share one `attn.kv`
  projection (split here), and mmseg's unused `decode_head.conv_seg.*` is dropped. The ImageNet
  backbones (`mit_b0.pth`) have the same keys without `backbone.` and with a `head.*` classifier.
* ``mmseg``: mmsegmentation 1.x's zoo (`backbone.layers.0.1.0.attn.attn.in_proj_weight`, ...), as its
  `tools/model_converters/mit2mmseg.py` writes MiT backbones: stage i is `layers.i` = (patch embedding,
  blocks, norm), q, k and v are one `in_proj` of torch's MultiheadAttention, the Mix-FFN's linears are
  1x1 convolutions (`ffn.layers.0`, `.4`; `.1` the depth-wise conv). Its SegformerHead
  (`decode_head.convs.*`, `fusion_conv`, `conv_seg`) is our `decoder="mmseg"` (segformer/decoder.py).
* ``smp``: segmentation_models_pytorch's `Segformer` (`encoder.block1.0.attn.q.weight`: NVlabs' encoder
  keys under `encoder.`; `decoder.mlp_stage.<i>.linear` for stage 4 - i, `decoder.fuse_stage.0/1`,
  `segmentation_head.0`): the all-MLP decoder, the same numbers; smp upsamples the logits x4 itself.
* ``native``: our own module names (`encoder.stages.0.blocks.0.attn.q.weight`, `decoder.fuse.weight`).

Every converter raises `WeightLayoutError` naming any key it cannot place; keys that are dropped on purpose
(ImageNet heads, `conv_seg`) are returned by name so the caller can say so.
"""

import re
from dataclasses import dataclass
from typing import Callable

import torch

from .config import VARIANTS, SegFormerConfig
from .errors import CheckpointError

# The segmentation classifier's weight in each layout: (num_labels, decoder width, 1, 1).
CLASSIFIER_KEYS = ("decoder.classifier.weight", "decode_head.classifier.weight", "decode_head.linear_pred.weight",
                   "segmentation_head.0.weight")  # mmseg 1.x's conv_seg: see classifier_rows


class WeightLayoutError(CheckpointError):
    """Weights that fit no known layout, or do not fit the model: every key at fault is named."""


def classifier_rows(shapes: dict) -> int | None:
    """The number of classes of the segmentation head in weights of any layout (name -> shape), or None
    where there is no head (an ImageNet encoder)."""
    if any(key.startswith("backbone.layers.") for key in shapes) and "decode_head.conv_seg.weight" in shapes:
        return shapes["decode_head.conv_seg.weight"][0]  # mmseg 1.x's classifier (NVlabs' conv_seg is unused)
    return next((shapes[key][0] for key in CLASSIFIER_KEYS if key in shapes), None)


# (hf prefix, native prefix); {s} is the stage and {b} the block index, both counted from 0.
_HF_RULES = [
    ("segformer.encoder.patch_embeddings.{s}.proj", "encoder.stages.{s}.patch_embed.proj"),
    ("segformer.encoder.patch_embeddings.{s}.layer_norm", "encoder.stages.{s}.patch_embed.norm"),
    ("segformer.encoder.block.{s}.{b}.layer_norm_1", "encoder.stages.{s}.blocks.{b}.norm1"),
    ("segformer.encoder.block.{s}.{b}.attention.self.query", "encoder.stages.{s}.blocks.{b}.attn.q"),
    ("segformer.encoder.block.{s}.{b}.attention.self.key", "encoder.stages.{s}.blocks.{b}.attn.k"),
    ("segformer.encoder.block.{s}.{b}.attention.self.value", "encoder.stages.{s}.blocks.{b}.attn.v"),
    ("segformer.encoder.block.{s}.{b}.attention.self.sr", "encoder.stages.{s}.blocks.{b}.attn.sr"),
    ("segformer.encoder.block.{s}.{b}.attention.self.layer_norm", "encoder.stages.{s}.blocks.{b}.attn.sr_norm"),
    ("segformer.encoder.block.{s}.{b}.attention.output.dense", "encoder.stages.{s}.blocks.{b}.attn.proj"),
    ("segformer.encoder.block.{s}.{b}.layer_norm_2", "encoder.stages.{s}.blocks.{b}.norm2"),
    ("segformer.encoder.block.{s}.{b}.mlp.dense1", "encoder.stages.{s}.blocks.{b}.ffn.fc1"),
    ("segformer.encoder.block.{s}.{b}.mlp.dwconv.dwconv", "encoder.stages.{s}.blocks.{b}.ffn.dwconv"),
    ("segformer.encoder.block.{s}.{b}.mlp.dense2", "encoder.stages.{s}.blocks.{b}.ffn.fc2"),
    ("segformer.encoder.layer_norm.{s}", "encoder.stages.{s}.norm"),
    ("decode_head.linear_c.{s}.proj", "decoder.proj.{s}"),
    ("decode_head.linear_fuse", "decoder.fuse"),
    ("decode_head.batch_norm", "decoder.norm"),
    ("decode_head.classifier", "decoder.classifier"),
]

# (nvlabs prefix, native prefix); here {s} counts stages from 1, as the original code does.
# `attn.kv` is split into k and v before renaming (see nvlabs_to_native).
_NVLABS_RULES = [
    ("backbone.patch_embed{s}.proj", "encoder.stages.{s}.patch_embed.proj"),
    ("backbone.patch_embed{s}.norm", "encoder.stages.{s}.patch_embed.norm"),
    ("backbone.block{s}.{b}.norm1", "encoder.stages.{s}.blocks.{b}.norm1"),
    ("backbone.block{s}.{b}.attn.q", "encoder.stages.{s}.blocks.{b}.attn.q"),
    ("backbone.block{s}.{b}.attn.k", "encoder.stages.{s}.blocks.{b}.attn.k"),
    ("backbone.block{s}.{b}.attn.v", "encoder.stages.{s}.blocks.{b}.attn.v"),
    ("backbone.block{s}.{b}.attn.sr", "encoder.stages.{s}.blocks.{b}.attn.sr"),
    ("backbone.block{s}.{b}.attn.norm", "encoder.stages.{s}.blocks.{b}.attn.sr_norm"),
    ("backbone.block{s}.{b}.attn.proj", "encoder.stages.{s}.blocks.{b}.attn.proj"),
    ("backbone.block{s}.{b}.norm2", "encoder.stages.{s}.blocks.{b}.norm2"),
    ("backbone.block{s}.{b}.mlp.fc1", "encoder.stages.{s}.blocks.{b}.ffn.fc1"),
    ("backbone.block{s}.{b}.mlp.dwconv.dwconv", "encoder.stages.{s}.blocks.{b}.ffn.dwconv"),
    ("backbone.block{s}.{b}.mlp.fc2", "encoder.stages.{s}.blocks.{b}.ffn.fc2"),
    ("backbone.norm{s}", "encoder.stages.{s}.norm"),
    ("decode_head.linear_c{s}.proj", "decoder.proj.{s}"),
    ("decode_head.linear_fuse.conv", "decoder.fuse"),
    ("decode_head.linear_fuse.bn", "decoder.norm"),
    ("decode_head.linear_pred", "decoder.classifier"),
]


# (mmseg 1.x prefix, native prefix); {s} counts from 0. `attn.attn.in_proj_*` is split into q, k and v,
# and the 1x1-conv Mix-FFN linears reshaped, before renaming (see mmseg_to_native).
_MMSEG_RULES = [
    ("backbone.layers.{s}.0.projection", "encoder.stages.{s}.patch_embed.proj"),
    ("backbone.layers.{s}.0.norm", "encoder.stages.{s}.patch_embed.norm"),
    ("backbone.layers.{s}.1.{b}.norm1", "encoder.stages.{s}.blocks.{b}.norm1"),
    ("backbone.layers.{s}.1.{b}.attn.q", "encoder.stages.{s}.blocks.{b}.attn.q"),
    ("backbone.layers.{s}.1.{b}.attn.k", "encoder.stages.{s}.blocks.{b}.attn.k"),
    ("backbone.layers.{s}.1.{b}.attn.v", "encoder.stages.{s}.blocks.{b}.attn.v"),
    ("backbone.layers.{s}.1.{b}.attn.attn.out_proj", "encoder.stages.{s}.blocks.{b}.attn.proj"),
    ("backbone.layers.{s}.1.{b}.attn.sr", "encoder.stages.{s}.blocks.{b}.attn.sr"),
    ("backbone.layers.{s}.1.{b}.attn.norm", "encoder.stages.{s}.blocks.{b}.attn.sr_norm"),
    ("backbone.layers.{s}.1.{b}.norm2", "encoder.stages.{s}.blocks.{b}.norm2"),
    ("backbone.layers.{s}.1.{b}.ffn.layers.0", "encoder.stages.{s}.blocks.{b}.ffn.fc1"),
    ("backbone.layers.{s}.1.{b}.ffn.layers.1", "encoder.stages.{s}.blocks.{b}.ffn.dwconv"),
    ("backbone.layers.{s}.1.{b}.ffn.layers.4", "encoder.stages.{s}.blocks.{b}.ffn.fc2"),
    ("backbone.layers.{s}.2", "encoder.stages.{s}.norm"),
    ("decode_head.convs.{s}.conv", "decoder.convs.{s}.conv"),
    ("decode_head.convs.{s}.bn", "decoder.convs.{s}.bn"),
    ("decode_head.fusion_conv.conv", "decoder.fusion_conv.conv"),
    ("decode_head.fusion_conv.bn", "decoder.fusion_conv.bn"),
    ("decode_head.conv_seg", "decoder.classifier"),
]

# smp's decoder (the encoder is NVlabs' under `encoder.`); mlp_stage.<i> projects stage 4 - i, see smp_to_native.
_SMP_DECODER_RULES = [
    ("decoder.fuse_stage.0", "decoder.fuse"),
    ("decoder.fuse_stage.1", "decoder.norm"),
    ("segmentation_head.0", "decoder.classifier"),
]


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{s\}", r"(?P<s>\d+)").replace(r"\{b\}", r"(?P<b>\d+)")
    return re.compile(pattern + r"\.(?P<leaf>[a-z_]+)$")


def _rename(state_dict: dict, rules: list[tuple[str, str]], *, stage_offset: int, layout: str) -> dict:
    """Rename every key by the first rule whose source prefix matches it; stage indices shift by
    `stage_offset` (target = source + offset). Raises WeightLayoutError listing the keys no rule matches."""
    compiled = [(_compile(src), dst) for src, dst in rules]
    out, unmatched = {}, []
    for key, value in state_dict.items():
        for pattern, dst in compiled:
            m = pattern.match(key)
            if m:
                groups = m.groupdict()
                stage = int(groups["s"]) + stage_offset if groups.get("s") is not None else None
                out[dst.format(s=stage, b=groups.get("b")) + "." + groups["leaf"]] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise WeightLayoutError(f"{len(unmatched)} keys do not belong to the {layout} SegFormer layout: {shorten(unmatched)}")
    return out


def _swap(rules):
    return [(dst, src) for src, dst in rules]


def hf_to_native(state_dict: dict) -> tuple[dict, list[str]]:
    """Hub layout (semantic segmentation or image classification) -> ours.
    Returns (converted, dropped keys): the ImageNet `classifier.*` head is dropped."""
    dropped = [k for k in state_dict if k.startswith("classifier.")]
    kept = {k: v for k, v in state_dict.items() if k not in dropped}
    return _rename(kept, _HF_RULES, stage_offset=0, layout="Hugging Face"), dropped


def native_to_hf(state_dict: dict) -> dict:
    return _rename(state_dict, _swap(_HF_RULES), stage_offset=0, layout="native")


def nvlabs_to_native(state_dict: dict) -> tuple[dict, list[str]]:
    """Original NVlabs/mmseg layout (full model or ImageNet backbone) -> ours.
    Returns (converted, dropped keys): `decode_head.conv_seg.*` and an ImageNet `head.*` are dropped."""
    if not any(k.startswith("backbone.") for k in state_dict):  # an ImageNet backbone, mit_b*.pth
        state_dict = {k if k.startswith("head.") else "backbone." + k: v for k, v in state_dict.items()}
    dropped = [k for k in state_dict if k.startswith(("decode_head.conv_seg.", "head."))]
    split = {}
    for key, value in state_dict.items():
        if key in dropped:
            continue
        if ".attn.kv." in key:  # one (2C, C) projection: rows [0, C) make the keys, [C, 2C) the values
            k, v = value.chunk(2, dim=0)
            split[key.replace(".attn.kv.", ".attn.k.")] = k
            split[key.replace(".attn.kv.", ".attn.v.")] = v
        else:
            split[key] = value
    return _rename(split, _NVLABS_RULES, stage_offset=-1, layout="NVlabs"), dropped


def mmseg_to_native(state_dict: dict) -> tuple[dict, list[str]]:
    """mmsegmentation 1.x layout (a segmentor, or a backbone as mit2mmseg writes it) -> ours.
    Returns (converted, dropped keys): a backbone file's ImageNet `head.*`, if any."""
    if not any(k.startswith("backbone.") for k in state_dict):  # a backbone alone: mit_b0.pth after mit2mmseg
        state_dict = {k if k.startswith("head.") else "backbone." + k: v for k, v in state_dict.items()}
    dropped = [k for k in state_dict if k.startswith("head.")]
    split = {}
    for key, value in state_dict.items():
        if key in dropped:
            continue
        if ".attn.attn.in_proj_" in key:  # torch's MultiheadAttention: rows [q; k; v], C each
            leaf = key.rsplit("in_proj_", 1)[1]
            for name, part in zip("qkv", value.chunk(3, dim=0)):
                split[key.replace(f".attn.attn.in_proj_{leaf}", f".attn.{name}.{leaf}")] = part
        elif re.search(r"\.ffn\.layers\.[04]\.weight$", key):  # a 1x1 conv: (out, in, 1, 1) -> Linear (out, in)
            split[key] = value.flatten(1)
        else:
            split[key] = value
    return _rename(split, _MMSEG_RULES, stage_offset=0, layout="mmsegmentation 1.x"), dropped


def native_to_mmseg(state_dict: dict) -> dict:
    """Ours -> mmsegmentation 1.x: the encoder as `backbone.layers.*`, the decoder if it is mmseg's own
    SegformerHead (`decoder="mmseg"`); the all-MLP decoder has no place in that layout."""
    if any(k.startswith(("decoder.proj.", "decoder.fuse.")) for k in state_dict):
        raise WeightLayoutError("mmsegmentation 1.x's SegformerHead has a BatchNorm and ReLU on every level: the all-MLP "
                          "decoder's weights do not fit it; build the model with decoder='mmseg', or convert the "
                          "encoder alone")
    renamed = _rename(state_dict, _swap(_MMSEG_RULES), stage_offset=0, layout="native")
    out = {}
    for key, value in renamed.items():
        if re.search(r"\.attn\.q\.(weight|bias)$", key):  # q, k, v -> one in_proj
            leaf = key.rsplit(".", 1)[1]
            parts = [renamed[key.replace(".attn.q.", f".attn.{name}.")] for name in "qkv"]
            out[key.replace(f".attn.q.{leaf}", f".attn.attn.in_proj_{leaf}")] = torch.cat(parts)
        elif re.search(r"\.attn\.[kv]\.(weight|bias)$", key):
            continue
        elif re.search(r"\.ffn\.layers\.[04]\.weight$", key):
            out[key] = value[:, :, None, None]
        else:
            out[key] = value
    return out


def smp_to_native(state_dict: dict) -> tuple[dict, list[str]]:
    """segmentation_models_pytorch's Segformer -> ours. Returns (converted, dropped keys: none)."""
    encoder = {"backbone." + k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
    decoder = {k: v for k, v in state_dict.items() if not k.startswith("encoder.")}
    converted, _ = nvlabs_to_native(encoder)
    stages = len({m.group(1) for k in decoder if (m := re.match(r"decoder\.mlp_stage\.(\d+)\.", k))})
    projections = {}
    for key, value in decoder.items():
        if m := re.match(r"decoder\.mlp_stage\.(\d+)\.linear\.([a-z_]+)$", key):  # stage 4 - i first
            projections[f"decoder.proj.{stages - 1 - int(m.group(1))}.{m.group(2)}"] = value
    rest = {k: v for k, v in decoder.items() if not k.startswith("decoder.mlp_stage.")}
    converted.update(projections)
    converted.update(_rename(rest, _SMP_DECODER_RULES, stage_offset=0, layout="segmentation_models_pytorch"))
    return converted, []


def native_to_smp(state_dict: dict) -> dict:
    """Ours (the all-MLP decoder) -> segmentation_models_pytorch's Segformer."""
    if any(k.startswith("decoder.convs.") for k in state_dict):
        raise WeightLayoutError("segmentation_models_pytorch's Segformer has the all-MLP decoder: mmseg's head "
                          "(decoder='mmseg') does not fit it")
    encoder = {k: v for k, v in state_dict.items() if k.startswith("encoder.")}
    nvlabs = _rename(encoder, _swap(_NVLABS_RULES), stage_offset=1, layout="native")
    out = {}
    for key, value in nvlabs.items():
        if ".attn.k." in key:  # k and v -> one kv
            out[key.replace(".attn.k.", ".attn.kv.")] = torch.cat([value, nvlabs[key.replace(".attn.k.", ".attn.v.")]])
        elif ".attn.v." not in key:
            out[key] = value
    out = {"encoder." + k[len("backbone."):]: v for k, v in out.items()}
    stages = len({m.group(1) for k in state_dict if (m := re.match(r"decoder\.proj\.(\d+)\.", k))})
    for key, value in state_dict.items():
        if m := re.match(r"decoder\.proj\.(\d+)\.([a-z_]+)$", key):
            out[f"decoder.mlp_stage.{stages - 1 - int(m.group(1))}.linear.{m.group(2)}"] = value
    rest = {k: v for k, v in state_dict.items() if k.startswith("decoder.") and not k.startswith("decoder.proj.")}
    out.update(_rename(rest, _swap(_SMP_DECODER_RULES), stage_offset=0, layout="native"))
    return out


def native_to_native(state_dict: dict) -> tuple[dict, list[str]]:
    """Ours -> ours. Returns (the weights, dropped keys): an image classifier's `classifier.*` head (ours)."""
    dropped = [k for k in state_dict if k.startswith("classifier.")]
    return {k: v for k, v in state_dict.items() if k not in dropped}, dropped


@dataclass(frozen=True)
class WeightLayout:
    """A row of the table below: how to recognise a layout's keys and convert them both ways."""
    name: str  # said in messages
    marks: tuple[str, ...]  # a key starting with one of these is in this layout
    example: str  # a key of it, for the message that no layout fits
    to_native: Callable[[dict], tuple[dict, list[str]]]  # -> (converted, keys dropped on purpose)
    from_native: Callable[[dict], dict] | None = None  # convert.py --to: ours -> this layout


# Detection tries the rows in this order and takes the first whose marks a key has. Ours comes first: its
# `encoder.stages.` would never be mistaken for another's; smp's `encoder.patch_embed1.` is checked after
# NVlabs', whose ImageNet backbones start with `patch_embed1.` too. A layout is one row + its two functions.
WEIGHT_LAYOUTS = {
    "native": WeightLayout("native", ("encoder.stages.",), "encoder.stages.0...", native_to_native),
    "hf": WeightLayout("Hugging Face", ("segformer.encoder.",), "segformer.encoder.block.0.0...", hf_to_native,
                       native_to_hf),
    "nvlabs": WeightLayout("NVlabs", ("backbone.patch_embed1.", "patch_embed1."), "backbone.block1.0...",
                           nvlabs_to_native),
    "mmseg": WeightLayout("mmsegmentation 1.x", ("backbone.layers.0.0.projection.", "layers.0.0.projection."),
                          "backbone.layers.0.1.0...", mmseg_to_native, native_to_mmseg),
    "smp": WeightLayout("segmentation_models_pytorch", ("encoder.patch_embed1.",), "encoder.block1.0...",
                        smp_to_native, native_to_smp),
}


def detect_weight_layout(state_dict: dict, *, source: str) -> str:
    """The key of the first row of WEIGHT_LAYOUTS whose marks a key of `state_dict` has."""
    keys = list(state_dict)
    for key, layout in WEIGHT_LAYOUTS.items():
        if any(k.startswith(layout.marks) for k in keys):
            return key
    expected = [f"'{layout.example}' ({layout.name})" for layout in WEIGHT_LAYOUTS.values()]
    raise WeightLayoutError(f"{source}: not a SegFormer checkpoint; expected keys like {', '.join(expected[:-1])} or "
                            f"{expected[-1]}, got {shorten(keys)}")


def to_native(state_dict: dict, *, source: str) -> tuple[dict, list[str]]:
    """Any layout -> ours. Returns (converted, keys dropped on purpose: image-classification heads)."""
    return WEIGHT_LAYOUTS[detect_weight_layout(state_dict, source=source)].to_native(state_dict)


def infer_config(state_dict: dict, **overrides) -> SegFormerConfig:
    """Settings read off native-layout weights, for checkpoints without a config.json.

    Widths, depths, patch sizes, reduction ratios, MLP ratios, the decoder width and the number of
    labels are in the shapes, and which decoder it is. Heads and strides are not; they take the values
    every variant shares (heads 1/2/5/8, strides 4/2/2/2). An encoder-only checkpoint gets its variant's
    decoder width."""
    def shape(key):
        return tuple(state_dict[key].shape)

    hidden_sizes, patch_sizes, depths, sr_ratios, mlp_ratios = [], [], [], [], []
    s = 0
    while f"encoder.stages.{s}.patch_embed.proj.weight" in state_dict:
        C, in_ch, k, _ = shape(f"encoder.stages.{s}.patch_embed.proj.weight")
        if s == 0:
            in_channels = in_ch
        hidden_sizes.append(C)
        patch_sizes.append(k)
        depths.append(len({m.group(1) for key in state_dict
                           if (m := re.match(rf"encoder\.stages\.{s}\.blocks\.(\d+)\.", key))}))
        sr_key = f"encoder.stages.{s}.blocks.0.attn.sr.weight"
        sr_ratios.append(shape(sr_key)[-1] if sr_key in state_dict else 1)
        mlp_ratios.append(shape(f"encoder.stages.{s}.blocks.0.ffn.fc1.weight")[0] // C)
        s += 1
    if not hidden_sizes:
        raise WeightLayoutError("cannot infer the model settings: no 'encoder.stages.0.patch_embed.proj.weight'")
    settings = dict(hidden_sizes=tuple(hidden_sizes), depths=tuple(depths), patch_sizes=tuple(patch_sizes),
                    sr_ratios=tuple(sr_ratios), mlp_ratios=tuple(mlp_ratios), in_channels=in_channels)
    if "decoder.proj.0.weight" in state_dict:
        settings["decoder_hidden_size"] = shape("decoder.proj.0.weight")[0]
    elif "decoder.convs.0.conv.weight" in state_dict:  # mmseg 1.x's SegformerHead
        settings.update(decoder="mmseg", decoder_hidden_size=shape("decoder.convs.0.conv.weight")[0])
    else:  # encoder only: the decoder width of the matching variant (256 for B0/B1, 768 above)
        widths = [decoder_width for widths_, depths_, decoder_width in VARIANTS.values()
                  if (widths_, depths_) == (tuple(hidden_sizes), tuple(depths))]
        settings["decoder_hidden_size"] = widths[0] if widths else 256
    if "decoder.classifier.weight" in state_dict:
        settings["num_labels"] = shape("decoder.classifier.weight")[0]
    settings.update(overrides)
    return SegFormerConfig(**settings)


def shorten(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
