"""Fine-tuning controls for small data and large images, each one function that train.py calls:

* `freeze_stages`: the first N encoder stages take no gradient and no optimizer state, and run in
  evaluation mode (no dropout, no drop path) while the rest trains (mmseg's frozen_stages, timm's freezing).
* `learning_rate_scales`: each parameter's multiplier of the base rate, layer-wise decay over the encoder's
  blocks (BEiT, Bao et al. 2022, section 2.3: block i of L at decay^(L + 1 - i)) and the decode head's.
* `add_lora` / `merged`: LoRA (Hu et al. 2021) through the peft library on the encoder's attention and
  Mix-FFN projections, as PEFT's semantic-segmentation guide does with SegFormer; a checkpoint holds the
  merged weights, a plain SegFormer that every tool (and transformers) loads.

The moving average of the weights (`--ema`) is torch's own `AveragedModel`, in train.py.
"""

import copy

import torch.nn as nn

from segformer.errors import ConfigError

# The attention's and Mix-FFN's projections (nn.Linear), not the patch embeddings' `proj` convolutions.
LORA_TARGETS = r".*\.(attn\.(q|k|v|proj)|ffn\.(fc1|fc2))"


def freeze_stages(model: nn.Module, count: int) -> list[nn.Module]:
    """Freeze the first `count` encoder stages; returns them (to be put back in evaluation mode whenever
    the model is put in training mode: `frozen_to_eval`)."""
    stages = list(model.encoder.stages)
    if count > len(stages):
        raise ConfigError(f"--freeze-stages {count}: the encoder has {len(stages)} stages")
    for stage in stages[:count]:
        stage.requires_grad_(False)
    return stages[:count]


def frozen_to_eval(frozen: list[nn.Module]) -> None:
    for module in frozen:
        module.eval()


def layer_of_each_parameter(model: nn.Module) -> tuple[dict[int, int], int]:
    """({id(parameter): layer}, L) over the encoder: layer 0 is the first patch embedding, layers 1..L the
    blocks in order; a later stage's patch embedding goes with its first block, a stage's closing norm with
    its last. The decoder is layer L + 1."""
    layers, block = {}, 0
    for stage in model.encoder.stages:
        for p in stage.patch_embed.parameters():
            layers[id(p)] = block if block == 0 else block + 1
        for module in stage.blocks:
            block += 1
            for p in module.parameters():
                layers[id(p)] = block
        for p in stage.norm.parameters():
            layers[id(p)] = block
    for p in model.decoder.parameters():
        layers[id(p)] = block + 1
    return layers, block


def learning_rate_scales(model: nn.Module, *, layer_decay: float | None, head_lr_mult: float) -> dict[int, float]:
    """{id(parameter): multiplier of the base learning rate}: the decode head's `head_lr_mult`, and with
    `layer_decay` the encoder's layer l (see `layer_of_each_parameter`) at layer_decay^(L + 1 - l)."""
    layers, depth = layer_of_each_parameter(model)
    head = {id(p) for p in model.decoder.parameters()}
    scales = {}
    for p in model.parameters():
        if id(p) in head:
            scales[id(p)] = head_lr_mult
        elif layer_decay is not None:
            scales[id(p)] = layer_decay ** (depth + 1 - layers.get(id(p), 0))
        else:
            scales[id(p)] = 1.0
    return scales


def add_lora(model: nn.Module, *, rank: int, alpha: float) -> nn.Module:
    """LoRA adapters of `rank` on the encoder's attention and Mix-FFN projections (peft's
    inject_adapter_in_model); the rest of the encoder frozen, the decoder trained in full."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("--lora-rank needs the peft library: pip install peft") from None
    model.encoder.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS), model.encoder)
    return model


def merged(model: nn.Module) -> nn.Module:
    """A copy of `model` with each LoRA adapter merged into the weight it adapts, and the adapter removed:
    the plain model, computing what the adapted one computes."""
    copied = copy.deepcopy(model)
    for name, module in list(copied.named_modules()):
        if hasattr(module, "base_layer") and hasattr(module, "merge"):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(copied.get_submodule(parent) if parent else copied, child, module.get_base_layer())
    return copied
