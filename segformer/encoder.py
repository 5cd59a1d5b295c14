"""Mix Transformer (MiT), the SegFormer encoder (paper section 3.1).

A hierarchy of four stages. Each stage
  1. shrinks the image with an *overlapping* patch embedding (a strided conv whose kernel is larger
     than its stride: 7/4 for stage 1, 3/2 after), giving feature maps at 1/4, 1/8, 1/16, 1/32;
  2. runs `depth` pre-norm transformer blocks over the tokens of that map;
  3. closes with a LayerNorm and hands the map, reshaped to (B, C, H, W), to the decoder.

A block is    x = x + DropPath(EfficientSelfAttention(LN(x)))
              x = x + DropPath(MixFFN(LN(x)))
There is no position embedding: the 3x3 depthwise conv inside Mix-FFN leaks enough zero-padding
position information (paper eq. 3), which is why SegFormer copes with any input resolution.

The seams, timm-style: `Block`, `Stage` and `MixTransformer` take the classes they build from, as
`attention` (segformer/attention.py: the protocol, SegFormer's and two alternatives), `mlp` (`MixFFN`'s
protocol: `MLP(hidden_size, *, mlp_ratio, dropout, act_layer)`, forward(x (B, N, C), H, W) -> (B, N, C)),
`norm_layer` (`Norm(width)` over the last dimension) and `act_layer` (`Act()`). The defaults are SegFormer's,
with the module names and numbers of every checkpoint.

Names follow timm's `pvt_v2.py` (PVTv2 is MiT's sibling); `segformer/weight_layouts.py` maps them to the
transformers and NVlabs checkpoint layouts.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention import EfficientSelfAttention
from .config import SegFormerConfig


class OverlapPatchEmbed(nn.Module):
    """Overlapped patch merging (paper section 3.1): a strided conv with padding kernel // 2, so that
    neighbouring patches share pixels, then LayerNorm over channels."""

    def __init__(self, in_channels: int, hidden_size: int, *, patch_size: int, stride: int, norm_layer=nn.LayerNorm):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = norm_layer(hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)  # (B, C, H, W), H = ceil(H_in / stride)
        _, _, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, C), N = H * W
        return self.norm(x), H, W


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv -> GELU -> Linear (paper eq. 3). The two per-token linear maps are
    computed as 1x1 convolutions on the (B, C, H, W) map, the same maps on the same weights: the tokens
    then change layout once each way at width C, rather than twice at width 4C around the depthwise conv
    (measured 1.13-1.2x for the whole model on a CPU, eager and in ONNX Runtime)."""

    def __init__(self, hidden_size: int, *, mlp_ratio: int, dropout: float, act_layer=nn.GELU):
        super().__init__()
        inner = hidden_size * mlp_ratio
        self.fc1 = nn.Linear(hidden_size, inner)
        self.dwconv = nn.Conv2d(inner, inner, kernel_size=3, padding=1, groups=inner)
        self.act = act_layer()
        self.fc2 = nn.Linear(inner, hidden_size)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        x = per_pixel(self.fc1, x)  # fc1: (B, C_inner, H, W)
        x = self.drop(self.act(self.dwconv(x)))  # (B, C_inner, H, W)
        x = per_pixel(self.fc2, x)  # fc2: (B, C, H, W)
        return self.drop(x.flatten(2).transpose(1, 2))  # (B, N, C)


def per_pixel(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A token-wise linear map applied to a (B, C, H, W) map: a 1x1 convolution with the Linear's own weight.
    A Linear wrapped by another module (a LoRA adapter from peft) is run as itself, on the tokens, so that
    what the wrapper adds is not lost."""
    if type(linear) is nn.Linear:
        return F.conv2d(x, linear.weight[:, :, None, None], linear.bias)
    B, C, H, W = x.shape
    y = linear(x.flatten(2).transpose(1, 2))  # (B, H * W, C_out)
    return y.transpose(1, 2).reshape(B, -1, H, W)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): drop a sample's whole residual branch with probability p."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    def __init__(self, hidden_size: int, *, num_heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float,
                 dropout: float, attention_dropout: float, attention=EfficientSelfAttention, mlp=MixFFN,
                 norm_layer=nn.LayerNorm, act_layer=nn.GELU):
        super().__init__()
        self.norm1 = norm_layer(hidden_size)
        self.attn = attention(hidden_size, num_heads=num_heads, sr_ratio=sr_ratio, attention_dropout=attention_dropout,
                              dropout=dropout, norm_layer=norm_layer, act_layer=act_layer)
        self.norm2 = norm_layer(hidden_size)
        self.ffn = mlp(hidden_size, mlp_ratio=mlp_ratio, dropout=dropout, act_layer=act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        x = x + self.drop_path(self.ffn(self.norm2(x), H, W))
        return x


class Stage(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int, *, depth: int, patch_size: int, stride: int,
                 drop_paths: list[float], norm_layer=nn.LayerNorm, **block_kwargs):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_channels, hidden_size, patch_size=patch_size, stride=stride,
                                             norm_layer=norm_layer)
        self.blocks = nn.ModuleList([Block(hidden_size, drop_path=p, norm_layer=norm_layer, **block_kwargs)
                                     for p in drop_paths])
        self.norm = norm_layer(hidden_size)
        self.grad_checkpointing = False  # MixTransformer.set_grad_checkpointing

    def forward(self, x: torch.Tensor, *, each_block=None) -> torch.Tensor:
        """(B, C_in, H_in, W_in) -> (B, C, H, W). `each_block(block, inputs, outputs, H, W)`, where given, sees
        every block's (B, N, C) input and output as they pass (MixTransformer.forward_intermediates)."""
        x, H, W = self.patch_embed(x)  # (B, N, C)
        for block in self.blocks:
            inputs = x
            if self.grad_checkpointing and torch.is_grad_enabled():  # keep the block's input only; recompute
                x = checkpoint(block, x, H, W, use_reentrant=False)  # the rest in the backward (same RNG draws)
            else:
                x = block(x, H, W)
            if each_block is not None:
                each_block(block, inputs, x, H, W)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, H, W)  # (B, C, H, W)


@dataclass
class Intermediates:
    """What `MixTransformer.forward_intermediates` returns: every stage's map, every block's output, and
    where asked, every block's attention probabilities (None where the attention cannot write them out)."""
    stages: list[torch.Tensor] = field(default_factory=list)  # (B, C_i, H_i, W_i), the encoder's output
    blocks: list[list[torch.Tensor]] = field(default_factory=list)  # per stage, each block's (B, N_i, C_i)
    attention: list[list] = field(default_factory=list)  # per stage, each block's ((B, heads, N, N'), grid)


class MixTransformer(nn.Module):
    """Returns the four stage outputs; `channels` and `reduction` declare their widths and their
    downsampling relative to the input, 4/8/16/32 (a map has ceil(H_in / reduction) rows). Not to be
    confused with `config.strides`, each patch embedding's own stride (4/2/2/2), whose products these are.
    `attention`, `mlp`, `norm_layer` and `act_layer` are the classes its blocks are built from."""

    def __init__(self, config: SegFormerConfig, *, attention=EfficientSelfAttention, mlp=MixFFN,
                 norm_layer=nn.LayerNorm, act_layer=nn.GELU):
        super().__init__()
        # Stochastic depth rises linearly from 0 to drop_path_rate over all blocks of all stages.
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths)).tolist()
        in_channels = (config.in_channels,) + config.hidden_sizes[:-1]
        self.stages = nn.ModuleList()
        for i, depth in enumerate(config.depths):
            first = sum(config.depths[:i])
            self.stages.append(Stage(
                in_channels[i], config.hidden_sizes[i], depth=depth,
                patch_size=config.patch_sizes[i], stride=config.strides[i],
                drop_paths=rates[first:first + depth], num_heads=config.num_heads[i],
                sr_ratio=config.sr_ratios[i], mlp_ratio=config.mlp_ratios[i],
                dropout=config.dropout, attention_dropout=config.attention_dropout,
                attention=attention, mlp=mlp, norm_layer=norm_layer, act_layer=act_layer,
            ))
        self.channels = list(config.hidden_sizes)
        self.reduction = [math.prod(config.strides[:i + 1]) for i in range(len(config.strides))]  # 4, 8, 16, 32

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block (timm's name): each block keeps its input only and recomputes
        its activations in the backward, with the same random draws (dropout, drop path): the same gradients
        for less memory (benchmarks/bench_checkpointing.py), and the blocks' forward computed twice."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)  # (B, C_i, H / reduction_i, W / reduction_i)
            features.append(x)
        return features

    def forward_intermediates(self, x: torch.Tensor, *, attention: bool = False) -> Intermediates:
        """The forward (`Stage.forward` itself), keeping every block's output and, with `attention`, each
        block's attention probabilities (from its `attention_weights`, where it has one)."""
        out = Intermediates()
        for stage in self.stages:
            blocks, weights = [], []

            def keep(block, inputs, outputs, H, W):
                if attention:
                    explain = getattr(block.attn, "attention_weights", None)
                    weights.append(explain(block.norm1(inputs), H, W) if explain else None)
                blocks.append(outputs)
            x = stage(x, each_block=keep)  # (B, C, H, W)
            out.stages.append(x)
            out.blocks.append(blocks)
            out.attention.append(weights)
        return out
