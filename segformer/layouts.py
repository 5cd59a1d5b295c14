"""Checkpoint layouts: pure `state_dict -> state_dict` conversions that account for every key.

Three layouts hold SegFormer weights in the wild:

* ``hf``: the Hugging Face hub layout of `SegformerForSemanticSegmentation`
  (`segformer.encoder.block.0.0.attention.self.query.weight`, `decode_head.linear_c.0.proj.weight`, ...).
  `SegformerForImageClassification` (what `nvidia/mit-b0` holds) is the same encoder plus a
  `classifier.*` ImageNet head, which we do not use.
* ``nvlabs``: the original NVlabs/mmsegmentation code (`backbone.block1.0.attn.q.weight`,
  `decode_head.linear_fuse.conv.weight`, ...). Stages count from 1, keys and values share one `attn.kv`
  projection (split here), and mmseg's unused `decode_head.conv_seg.*` is dropped. The ImageNet
  backbones (`mit_b0.pth`) have the same keys without `backbone.` and with a `head.*` classifier.
* ``native``: our own module names (`encoder.stages.0.blocks.0.attn.q.weight`, `decoder.fuse.weight`).

Every converter raises `LayoutError` naming any key it cannot place; keys that are dropped on purpose
(ImageNet heads, `conv_seg`) are returned by name so the caller can say so.
"""

import re

from .config import VARIANTS, SegFormerConfig
from .errors import CheckpointError

# The segmentation classifier's weight in each layout: (num_labels, decoder width, 1, 1).
CLASSIFIER_KEYS = ("decoder.classifier.weight", "decode_head.classifier.weight", "decode_head.linear_pred.weight")


class LayoutError(CheckpointError):
    """Weights that fit no known layout, or do not fit the model: every key at fault is named."""


def classifier_rows(shapes: dict) -> int | None:
    """The number of classes of the segmentation head in weights of any layout (name -> shape), or None
    where there is no head (an ImageNet encoder)."""
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


def _compile(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{s\}", r"(?P<s>\d+)").replace(r"\{b\}", r"(?P<b>\d+)")
    return re.compile(pattern + r"\.(?P<leaf>[a-z_]+)$")


def _rename(state_dict: dict, rules: list[tuple[str, str]], *, stage_offset: int, layout: str) -> dict:
    """Rename every key by the first rule whose source prefix matches it; stage indices shift by
    `stage_offset` (target = source + offset). Raises LayoutError listing the keys no rule matches."""
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
        raise LayoutError(f"{len(unmatched)} keys do not belong to the {layout} SegFormer layout: {shorten(unmatched)}")
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


def detect_layout(state_dict: dict, *, source: str) -> str:
    keys = list(state_dict)
    if any(k.startswith("encoder.stages.") for k in keys):
        return "native"
    if any(k.startswith("segformer.encoder.") for k in keys):
        return "hf"
    if any(k.startswith(("backbone.patch_embed1.", "patch_embed1.")) for k in keys):
        return "nvlabs"
    raise LayoutError(f"{source}: not a SegFormer checkpoint; expected keys like 'segformer.encoder.block.0.0...' "
                      f"(Hugging Face), 'backbone.block1.0...' (NVlabs) or 'encoder.stages.0...', got {shorten(keys)}")


def to_native(state_dict: dict, *, source: str) -> tuple[dict, list[str]]:
    """Any layout -> ours. Returns (converted, keys dropped on purpose: image-classification heads)."""
    layout = detect_layout(state_dict, source=source)
    if layout == "hf":
        return hf_to_native(state_dict)
    if layout == "nvlabs":
        return nvlabs_to_native(state_dict)
    dropped = [k for k in state_dict if k.startswith("classifier.")]  # an image classifier's head (ours)
    return {k: v for k, v in state_dict.items() if k not in dropped}, dropped


def infer_config(state_dict: dict, **overrides) -> SegFormerConfig:
    """Settings read off native-layout weights, for checkpoints without a config.json.

    Widths, depths, patch sizes, reduction ratios, MLP ratios, the decoder width and the number of
    labels are in the shapes. Heads and strides are not; they take the values every variant shares
    (heads 1/2/5/8, strides 4/2/2/2). An encoder-only checkpoint gets its variant's decoder width."""
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
        raise LayoutError("cannot infer the model settings: no 'encoder.stages.0.patch_embed.proj.weight'")
    settings = dict(hidden_sizes=tuple(hidden_sizes), depths=tuple(depths), patch_sizes=tuple(patch_sizes),
                    sr_ratios=tuple(sr_ratios), mlp_ratios=tuple(mlp_ratios), in_channels=in_channels)
    if "decoder.proj.0.weight" in state_dict:
        settings["decoder_hidden_size"] = shape("decoder.proj.0.weight")[0]
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
