"""SegFormer = Mix Transformer encoder + all-MLP decoder, with loading and saving of checkpoints.

    model = SegFormer.from_pretrained("nvidia/segformer-b0-finetuned-ade-512-512")  # or a dir / file
    logits = model(pixel_values)  # (B, 3, H, W) -> (B, num_labels, ceil(H/4), ceil(W/4))
"""

import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint, weight_layouts
from .files import write_json, write_safetensors
from .parts import BUILT_IN, build_encoder, check_part_shapes, resolve_all
from .bands import adapt_input_conv
from .config import PARTS, SegFormerConfig
from .errors import CheckpointError

logger = logging.getLogger(__name__)


def same_weights(parts: dict[str, str]) -> dict[str, str]:
    """The parts that decide the weights: token merging (attention "tome") is SegFormer's attention, the same
    modules, so a checkpoint of either loads into the other."""
    return {part: name for part, name in parts.items() if (part, name) != ("attention", "tome")}


class SegFormer(nn.Module):
    """An encoder (the Mix Transformer, built from its parts) and a decoder, both named by the config: see
    segformer/parts.py for the parts, their protocols and the built-in alternatives."""

    def __init__(self, config: SegFormerConfig):
        super().__init__()
        self.config = config
        parts = resolve_all(config)
        self.encoder = build_encoder(config, parts)
        self.decoder = parts["decoder"](config, self.encoder.channels)
        self.apply(_init_weights)
        if hasattr(self.decoder, "classifier"):
            nn.init.normal_(self.decoder.classifier.weight, std=0.01)  # mmseg's decode heads start near uniform
        custom = {part: name for part, name in config.parts.items() if name not in BUILT_IN[part]}
        if custom:  # a part of one's own that returns the wrong shape is named now, with the shapes
            check_part_shapes(self, parts, custom)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(pixel_values))  # (B, num_labels, H/4, W/4)

    def forward_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's four maps, (B, C_i, H / reduction_i, W / reduction_i)."""
        return self.encoder(pixel_values)

    def forward_intermediates(self, pixel_values: torch.Tensor, *, attention: bool = False) -> dict:
        """Everything the model computes on the way, without hooks: the encoder's `stages` (four maps),
        every block's output (`blocks`), with `attention` every block's attention probabilities (None for an
        attention without `attention_weights`), the decoder's per-level terms (`levels`, where the decoder
        has `level_terms`) and the `logits`."""
        steps = self.encoder.forward_intermediates(pixel_values, attention=attention)
        levels = getattr(self.decoder, "level_terms", None)
        return {"stages": steps.stages, "blocks": steps.blocks, "attention": steps.attention,
                "levels": levels(steps.stages) if levels else None, "logits": self.decoder(steps.stages)}

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.config.label_names()))

    @classmethod
    def from_variant(cls, name: str = "b0", **overrides) -> "SegFormer":
        """A freshly initialised variant ('b0'..'b5'); keyword arguments override config fields, parts
        included, as names or classes: `SegFormer.from_variant("b0", attention="linear", decoder=MyHead)`."""
        return cls(SegFormerConfig.from_variant(name, **overrides))

    # ---- loading -------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: "str | Path | checkpoint.CheckpointFacts", num_labels: int | None = None,
                        id2label: dict[int, str] | None = None, *, trust_code: bool = False,
                        **overrides) -> "SegFormer":
        """Load a checkpoint in any layout (see `weight_layouts.py`) from a `.safetensors` or `.pth` file, a
        directory holding `model.safetensors` (+ `config.json`), or a hub repo id (or what `describe`
        said of one, not to read it twice).

        The settings come from `config.json` when there is one, else from the weights' shapes
        (`checkpoint.describe`). Asking for another `num_labels` than the checkpoint's classifier has
        re-initialises it; an encoder-only checkpoint (ImageNet) gets a fresh decoder, by default for
        ADE20K's 150 labels. Both are logged in one line. Missing, unexpected or mis-shaped weights raise
        an error naming them, and so does a config.json that disagrees with the weights on the number of
        classes (unless `num_labels` asks for the weights' own). Other keyword arguments replace config
        fields (e.g. `drop_path_rate=0.0`; `in_channels=4` adapts 3-band weights to 4-band images, said),
        but not the parts: a checkpoint loads into the model it holds,
        whose parts its config.json names (but for attention="tome": SegFormer's attention with token
        merging, segformer/token_merging.py, the same weights); code from outside this project is imported only with
        `trust_code=True` (segformer/parts.py)."""
        facts = source if isinstance(source, checkpoint.CheckpointFacts) else checkpoint.describe(source)
        source = facts.source
        asked = replace(facts.config, **{part: name for part, name in overrides.items() if part in PARTS})
        if same_weights(asked.parts) != same_weights(facts.config.parts):
            raise CheckpointError(f"{source} holds {facts.config.describe()}, not {asked.describe()}: a checkpoint "
                                  f"loads into the model it was trained as")
        resolve_all(facts.config, trust_code=trust_code, source=str(facts.config_file or source))
        state_dict, dropped = weight_layouts.to_native(checkpoint.read_state_dict(facts.weights), source=str(facts.weights))
        head, changes, notes = facts.head_labels, dict(overrides), []
        if id2label is not None:
            changes["id2label"] = {int(k): str(v) for k, v in id2label.items()}
            num_labels = len(id2label) if num_labels is None else num_labels
        encoder_only = not any(k.startswith("decoder.") for k in state_dict)
        if encoder_only:
            notes.append(f"the checkpoint holds an encoder only (pre-trained on image classification): its "
                         f"{len(state_dict)} encoder tensors are loaded, the decode head is freshly initialised")
            num_labels = num_labels or 150  # no head to read it from: ADE20K-sized, the common fine-tuning target
        elif facts.conflict and num_labels is None:
            raise CheckpointError(f"{facts.conflict}; correct config.json, or load with num_labels={head} to keep "
                                  f"that classifier")
        elif facts.conflict and num_labels == head:
            notes.append(f"{facts.conflict}: the classifier fits the {head} labels asked for, and is kept")
        num_labels = head if num_labels is None else num_labels
        missing_ok = "decoder." if encoder_only else None
        if num_labels is not None and num_labels != facts.config.num_labels:
            changes["num_labels"] = num_labels
            changes.setdefault("id2label", {})
        if head is not None and num_labels != head:
            notes.append(f"the classifier is re-initialised for {num_labels} labels (the checkpoint's has {head})")
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("decoder.classifier.")}
            missing_ok = "decoder.classifier."
        key = "encoder.stages.0.patch_embed.proj.weight"
        stored = state_dict[key].shape[1] if key in state_dict else facts.config.in_channels
        if changes.get("in_channels", stored) != stored:  # e.g. RGB weights for 4-band images
            state_dict[key] = adapt_input_conv(state_dict[key], changes["in_channels"])
            how = "the RGB filters summed" if changes["in_channels"] == 1 else \
                f"the RGB filters repeated, x 3/{changes['in_channels']}"
            notes.append(f"the first patch embedding is adapted from {stored} to {changes['in_channels']} input "
                         f"bands (timm's adapt_input_conv: {how})")
        model = cls(replace(facts.config, **changes))
        model.load_native_state_dict(state_dict, source=str(facts.weights), missing_ok=missing_ok)
        if dropped:
            notes.append(f"unused weights ignored: {weight_layouts.shorten(dropped, 3)}")
        if notes:
            logger.warning(f"SegFormer.from_pretrained({source}): " + "; ".join(notes))
        return model

    def load_native_state_dict(self, state_dict: dict, *, source: str, missing_ok: str | None = None) -> None:
        """`load_state_dict` that names every missing, unexpected, mis-shaped, integer-for-float and
        non-finite tensor. Missing keys under the prefix `missing_ok` keep their fresh initialisation, and
        so does BatchNorm's `num_batches_tracked` (bookkeeping that PyTorch's own loading does without,
        and that files converted by other tools often lack)."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict and not (missing_ok and k.startswith(missing_ok))
                   and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state_dict if k not in own]
        common = [k for k in state_dict if k in own]
        mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                      for k in common if state_dict[k].shape != own[k].shape]
        integer = [f"{k} ({state_dict[k].dtype})" for k in common
                   if own[k].is_floating_point() and not state_dict[k].is_floating_point()]
        non_finite = [k for k in common if state_dict[k].is_floating_point() and not state_dict[k].isfinite().all()]
        problems = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched),
                           ("integer where floats belong", integer), ("not finite (NaN or inf)", non_finite)):
            if keys:
                problems.append(f"{len(keys)} {what}: {weight_layouts.shorten(keys)}")
        if problems:
            raise weight_layouts.WeightLayoutError(f"{source} does not fit the model {self.config.variant or 'custom'} "
                                      f"(num_labels={self.config.num_labels}): " + "; ".join(problems))
        self.load_state_dict(state_dict, strict=False)

    # ---- saving --------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `model.safetensors` and `config.json`: SegFormer itself in the hub layout, which both this
        class and `transformers.SegformerForSemanticSegmentation.from_pretrained(directory)` load; a model
        with other parts in our own layout, with the parts named in config.json (transformers cannot build
        them)."""
        directory = Path(directory)
        state_dict = self.state_dict() if self.config.parts else weight_layouts.native_to_hf(self.state_dict())
        write_safetensors(state_dict, directory / "model.safetensors")
        write_json(self.config.to_hf_dict(), directory / "config.json")


def _init_weights(module: nn.Module) -> None:
    """The original code's initialisation (NVlabs mix_transformer.py)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, std=math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
