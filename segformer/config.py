"""SegFormer settings: one dataclass, one table of variants (B0..B5), and the mapping to the
`config.json` that transformers writes and reads.

The variants come from Table 6 of the paper (Xie et al., 2021, "SegFormer: Simple and Efficient
Design for Semantic Segmentation with Transformers"): they share heads (1, 2, 5, 8), reduction
ratios (8, 4, 2, 1), patch sizes (7, 3, 3, 3) and strides (4, 2, 2, 2), and differ in widths,
depths and the decoder width.
"""

from dataclasses import dataclass, field, replace

from .errors import CheckpointError
from .labels import default_name, is_default_names

# The parts a model is built from and SegFormer's own (segformer/parts.py has the alternatives).
PARTS = {"encoder": "mit", "attention": "efficient", "mlp": "mix_ffn", "norm": "layer_norm", "activation": "gelu",
         "decoder": "all_mlp"}

VARIANTS = {
    #       hidden_sizes            depths          decoder_hidden_size
    "b0": ((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "b1": ((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "b2": ((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "b3": ((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "b4": ((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "b5": ((64, 128, 320, 512), (3, 6, 40, 3), 768),
}


@dataclass
class SegFormerConfig:
    # Mix Transformer encoder: one entry per stage.
    hidden_sizes: tuple[int, ...] = (32, 64, 160, 256)
    depths: tuple[int, ...] = (2, 2, 2, 2)
    num_heads: tuple[int, ...] = (1, 2, 5, 8)
    sr_ratios: tuple[int, ...] = (8, 4, 2, 1)  # the paper's R is sr_ratio**2 (a strided conv per axis)
    patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
    strides: tuple[int, ...] = (4, 2, 2, 2)
    mlp_ratios: tuple[int, ...] = (4, 4, 4, 4)
    in_channels: int = 3
    drop_path_rate: float = 0.1  # stochastic depth, rising linearly over all blocks
    dropout: float = 0.0  # after the attention output and inside Mix-FFN (transformers: hidden_dropout_prob)
    attention_dropout: float = 0.0
    # All-MLP decoder.
    decoder_hidden_size: int = 256
    classifier_dropout: float = 0.1
    num_labels: int = 150
    id2label: dict[int, str] = field(default_factory=dict)  # empty: LABEL_<i> names
    # The parts (segformer/parts.py): a built-in name, or an import path "package.module:Class" of your
    # own (a class passed here is stored as its import path). Recorded in config.json where not SegFormer's.
    encoder: str = "mit"  # the Mix Transformer, or yours: Encoder(config, *, attention, mlp, norm_layer, act_layer)
    attention: str = "efficient"  # segformer/attention.py: "efficient" (SegFormer's), "linear" (PVTv2), "full"
    mlp: str = "mix_ffn"
    norm: str = "layer_norm"  # or "rms_norm"
    activation: str = "gelu"  # or "relu", "silu"
    decoder: str = "all_mlp"  # or "mmseg" (mmsegmentation 1.x's SegformerHead)
    # How the all-MLP decoder computes (not what): folded (fast) or as the paper writes it (segformer/decoder.py).
    fold_decoder: bool = True

    def __post_init__(self):
        for part in PARTS:
            value = getattr(self, part)
            if isinstance(value, type):  # a class: its import path, so that a checkpoint can name it
                value = f"{value.__module__}:{value.__qualname__}"
            if not isinstance(value, str) or not value:
                raise ValueError(f"{part} must be a built-in name or an import path 'package.module:Class', got "
                                 f"{value!r}")
            setattr(self, part, value)
        for name in ("hidden_sizes", "depths", "num_heads", "sr_ratios", "patch_sizes", "strides", "mlp_ratios"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != len(self.hidden_sizes):
                raise ValueError(f"{name} has {len(value)} entries, expected one per stage ({len(self.hidden_sizes)})")
            setattr(self, name, value)
        for width, heads in zip(self.hidden_sizes, self.num_heads):
            if width % heads:
                raise ValueError(f"hidden size {width} is not divisible by its {heads} attention heads")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        if self.id2label and sorted(self.id2label) != list(range(self.num_labels)):
            raise ValueError(f"id2label must name the classes 0..{self.num_labels - 1}, "
                             f"got ids {sorted(self.id2label)[:10]}...")

    @classmethod
    def from_variant(cls, name: str, **overrides) -> "SegFormerConfig":
        if name.lower() not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")
        hidden_sizes, depths, decoder_hidden_size = VARIANTS[name.lower()]
        base = cls(hidden_sizes=hidden_sizes, depths=depths, decoder_hidden_size=decoder_hidden_size)
        if "num_labels" in overrides and "id2label" not in overrides:
            overrides["id2label"] = {}
        return replace(base, **overrides)

    @property
    def variant(self) -> str | None:
        """'b0'..'b5' when the widths, depths and decoder width are those of a variant, else None."""
        settings = (self.hidden_sizes, self.depths, self.decoder_hidden_size)
        return next((name for name, row in VARIANTS.items() if row == settings), None)

    @property
    def parts(self) -> dict[str, str]:
        """The parts that are not SegFormer's own: {} for the model of the paper and of every hub checkpoint."""
        return {part: getattr(self, part) for part in PARTS if getattr(self, part) != PARTS[part]}

    def describe(self) -> str:
        """'b0', 'b0 with attention linear, decoder mmseg', or 'custom' widths and depths."""
        parts = ", ".join(f"{part} {name}" for part, name in self.parts.items())
        return (self.variant or "custom") + (f" with {parts}" if parts else "")

    def label_names(self) -> list[str]:
        return [self.id2label.get(i, default_name(i)) for i in range(self.num_labels)]

    # ---- transformers' config.json -------------------------------------------------------------

    def to_hf_dict(self, architecture: str = "SegformerForSemanticSegmentation") -> dict:
        """The `config.json` of `SegformerForSemanticSegmentation` (or another of transformers' SegFormer
        architectures, SegformerForImageClassification) for these settings."""
        names = self.label_names()
        return {
            "architectures": [architecture],
            "model_type": "segformer",
            "num_channels": self.in_channels,
            "num_encoder_blocks": len(self.hidden_sizes),
            "hidden_sizes": list(self.hidden_sizes),
            "depths": list(self.depths),
            "num_attention_heads": list(self.num_heads),
            "sr_ratios": list(self.sr_ratios),
            "patch_sizes": list(self.patch_sizes),
            "strides": list(self.strides),
            "mlp_ratios": list(self.mlp_ratios),
            "hidden_act": "gelu",
            "hidden_dropout_prob": self.dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "drop_path_rate": self.drop_path_rate,
            "classifier_dropout_prob": self.classifier_dropout,
            "decoder_hidden_size": self.decoder_hidden_size,
            "initializer_range": 0.02,
            # transformers' default value of a field its SegFormer never reads: every LayerNorm there, and
            # here, uses PyTorch's 1e-5. Written for a faithful config.json; not a reason to change the model.
            "layer_norm_eps": 1e-6,
            "reshape_last_stage": True,
            "semantic_loss_ignore_index": 255,
            "num_labels": self.num_labels,
            "id2label": {str(i): name for i, name in enumerate(names)},
            "label2id": {name: i for i, name in enumerate(names)},
        } | ({PARTS_KEY: self.parts} if self.parts else {})  # ours; transformers keeps it as an attribute

    @classmethod
    def from_hf_dict(cls, hf: dict, *, source: str = "config.json") -> "SegFormerConfig":
        """Read a transformers `SegformerConfig` dict; fields it lacks keep transformers' defaults. A key
        of the wrong type or range is an error naming `source` and the key."""
        if not isinstance(hf, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        if hf.get("model_type", "segformer") != "segformer":
            raise CheckpointError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'segformer'")
        if hf.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'gelu')")
        if hf.get("reshape_last_stage", True) is not True:
            raise CheckpointError(f"{source}: reshape_last_stage=False is not supported")
        kwargs = {ours: _read_key(hf, theirs, kind, source)
                  for ours, (theirs, kind) in _HF_KEYS.items() if theirs in hf}
        id2label = hf.get("id2label", {})
        if not isinstance(id2label, dict) or not all(str(k).isdigit() for k in id2label):
            raise CheckpointError(f"{source}: key 'id2label' must map class ids to names, got {str(id2label)[:60]}")
        id2label = {int(k): str(v) for k, v in id2label.items()}
        kwargs["num_labels"] = (_read_key(hf, "num_labels", "count", source) if "num_labels" in hf
                                else len(id2label) or 2)
        kwargs["id2label"] = {} if is_default_names(id2label) else id2label
        parts = hf.get(PARTS_KEY, {})
        if not isinstance(parts, dict) or not all(p in PARTS and isinstance(v, str) and v for p, v in parts.items()):
            raise CheckpointError(f"{source}: key {PARTS_KEY!r} must map some of {', '.join(PARTS)} to names or "
                                  f"import paths, got {str(parts)[:80]}")
        kwargs.update(parts)
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None


PARTS_KEY = "segformer_parts"  # config.json: the parts of a model that are not SegFormer's own

# our field <- (transformers' key, what it must hold)
_HF_KEYS = {
    "in_channels": ("num_channels", "count"), "hidden_sizes": ("hidden_sizes", "counts"),
    "depths": ("depths", "counts"), "num_heads": ("num_attention_heads", "counts"),
    "sr_ratios": ("sr_ratios", "counts"), "patch_sizes": ("patch_sizes", "counts"), "strides": ("strides", "counts"),
    "mlp_ratios": ("mlp_ratios", "counts"), "dropout": ("hidden_dropout_prob", "probability"),
    "attention_dropout": ("attention_probs_dropout_prob", "probability"),
    "drop_path_rate": ("drop_path_rate", "probability"),
    "classifier_dropout": ("classifier_dropout_prob", "probability"),
    "decoder_hidden_size": ("decoder_hidden_size", "count"),
}


def _read_key(hf: dict, key: str, kind: str, source: str):
    value = hf[key]

    def is_count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1
    if kind == "count" and is_count(value):
        return value
    if kind == "counts" and isinstance(value, list) and value and all(is_count(v) for v in value):
        return tuple(value)
    if kind == "probability" and isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1:
        return float(value)
    expected = {"count": "a whole number >= 1", "counts": "a list of whole numbers >= 1",
                "probability": "a number in [0, 1)"}[kind]
    raise CheckpointError(f"{source}: key {key!r} must be {expected}, got {value!r}")
