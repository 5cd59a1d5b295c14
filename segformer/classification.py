"""The Mix Transformer with an image-classification head: how its encoder is pre-trained.

NVlabs pre-trained MiT on ImageNet-1k as a classifier before any segmentation (paper section 4.1); the hub's
`nvidia/mit-b0` .. `mit-b5` hold such classifiers, transformers' `SegformerForImageClassification`:

    logits = Linear(C_4 -> num_classes)(mean over positions of the encoder's last map)   (B, num_classes)

Saved in that layout (`segformer.encoder.*` + `classifier.*`, config.json's architecture
SegformerForImageClassification), so transformers loads it, and `SegFormer.from_pretrained` reads it as an
encoder to fine-tune (its classifier left aside, said in one line). A model with other parts
(segformer/parts.py) is saved in our own layout, its parts named in config.json, as `SegFormer` does.
"""

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint, weight_layouts
from .files import write_json, write_safetensors
from .parts import build_encoder, resolve_all
from .config import PARTS, SegFormerConfig
from .errors import CheckpointError
from .model import _init_weights

ARCHITECTURE = "SegformerForImageClassification"
HEAD = "classifier."  # the image head's keys, in the hub's layout and in ours


class ImageClassifier(nn.Module):
    """transformers' SegformerForImageClassification: `config.num_labels` image classes, `config.id2label`."""

    def __init__(self, config: SegFormerConfig):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        self.classifier = nn.Linear(self.encoder.channels[-1], config.num_labels)
        self.apply(_init_weights)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        last = self.encoder(pixel_values)[-1]  # (B, C_4, H/32, W/32)
        return self.classifier(last.flatten(2).mean(-1))  # global average pooling, then (B, num_labels)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.config.label_names()))

    @classmethod
    def from_variant(cls, name: str = "b0", **overrides) -> "ImageClassifier":
        return cls(SegFormerConfig.from_variant(name, **overrides))

    @classmethod
    def from_pretrained(cls, source: str | Path, *, trust_code: bool = False, **overrides) -> "ImageClassifier":
        """A classifier saved by `save_pretrained` (or the hub's `nvidia/mit-b*`): its encoder and its head.
        Keyword arguments replace config fields, not the parts."""
        facts = checkpoint.describe(source)
        asked = replace(facts.config, **{part: name for part, name in overrides.items() if part in PARTS})
        if asked.parts != facts.config.parts:
            raise CheckpointError(f"{source} holds {facts.config.describe()}, not {asked.describe()}: a checkpoint "
                                  f"loads into the model it was trained as")
        resolve_all(facts.config, trust_code=trust_code, source=str(facts.config_file or source))
        state_dict = checkpoint.read_state_dict(facts.weights)
        head = {key: value for key, value in state_dict.items() if key.startswith(HEAD)}
        if not head:
            raise CheckpointError(f"{facts.weights}: no image-classification head ({HEAD}weight); it holds "
                                  f"{'a segmentation model' if facts.head_labels else 'an encoder only'}")
        encoder, _ = weight_layouts.to_native({k: v for k, v in state_dict.items() if not k.startswith(HEAD)},
                                       source=str(facts.weights))
        config = replace(facts.config, num_labels=head[HEAD + "weight"].shape[0], **overrides)
        if len(config.id2label) not in (0, config.num_labels):
            config = replace(config, id2label={})
        model = cls(config)
        model.load_native_state_dict({**encoder, **head}, source=str(facts.weights))
        return model

    def load_native_state_dict(self, state_dict: dict, *, source: str) -> None:
        """load_state_dict that names every missing, unexpected or mis-shaped tensor."""
        own = self.state_dict()
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        mismatched = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                      for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
        problems = [f"{len(keys)} {what}: {weight_layouts.shorten(keys)}" for what, keys in
                    (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)) if keys]
        if problems:
            raise weight_layouts.WeightLayoutError(f"{source} does not fit the classifier {self.config.describe()}: "
                                      + "; ".join(problems))
        self.load_state_dict(state_dict)

    def save_pretrained(self, directory: str | Path) -> None:
        """`model.safetensors` and `config.json` in the hub's layout of SegformerForImageClassification (what
        `nvidia/mit-b0` holds), which transformers and `SegFormer.from_pretrained` (as an encoder) load; a
        model with other parts in our own layout, its parts named in config.json."""
        directory = Path(directory)
        state = self.state_dict()
        encoder = {k: v for k, v in state.items() if not k.startswith(HEAD)}
        head = {k: v for k, v in state.items() if k.startswith(HEAD)}
        weights = encoder if self.config.parts else weight_layouts.native_to_hf(encoder)
        write_safetensors({**weights, **head}, directory / "model.safetensors")
        write_json(self.config.to_hf_dict(architecture=ARCHITECTURE), directory / "config.json")
