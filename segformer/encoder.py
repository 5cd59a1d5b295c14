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

Names follow timm's `pvt_v2.py` (PVTv2 is MiT's sibling); `segformer/layouts.py` maps them to the
transformers and NVlabs checkpoint layouts.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SegFormerConfig


class OverlapPatchEmbed(nn.Module):
    """Overlapped patch merging (paper section 3.1): a strided conv with padding kernel // 2, so that
    neighbouring patches share pixels, then LayerNorm over channels."""

    def __init__(self, in_channels: int, hidden_size: int, *, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)  # (B, C, H, W), H = ceil(H_in / stride)
        _, _, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, C), N = H * W
        return self.norm(x), H, W


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a spatially reduced sequence
    (paper eq. 2). The paper reshapes N x C to N/R x (C*R) and projects back to C; the code (and every
    checkpoint) does the same with a conv of kernel = stride = sr_ratio, so R = sr_ratio**2, followed
    by a LayerNorm. This cuts the attention cost from O(N^2) to O(N^2 / R)."""

    def __init__(self, hidden_size: int, *, num_heads: int, sr_ratio: int, attention_dropout: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(hidden_size, hidden_size)
        self.v = nn.Linear(hidden_size, hidden_size)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(hidden_size, hidden_size, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.proj_drop = nn.Dropout(dropout)

    def project(self, x: torch.Tensor, H: int, W: int):
        """Queries from every token; keys and values from the spatially reduced map. Returns q
        (B, heads, N, d), k and v (B, heads, N', d), and the (H', W') grid of the N' reduced tokens."""
        B, N, C = x.shape
        heads = self.num_heads
        q = self.q(x).view(B, N, heads, C // heads).transpose(1, 2)  # (B, heads, N, d)
        reduced, grid = x, (H, W)
        if self.sr_ratio > 1:  # the reduction: a conv of kernel = stride = sr_ratio over the (H, W) map
            reduced = reduced.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
            reduced = self.sr(reduced)  # (B, C, H', W'), H' = H // sr_ratio
            grid = tuple(reduced.shape[-2:])
            reduced = self.sr_norm(reduced.flatten(2).transpose(1, 2))  # (B, N', C), N' = H' * W'
        k = self.k(reduced).view(B, -1, heads, C // heads).transpose(1, 2)  # (B, heads, N', d)
        v = self.v(reduced).view(B, -1, heads, C // heads).transpose(1, 2)  # (B, heads, N', d)
        return q, k, v, grid

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v, _ = self.project(x, H, W)
        # softmax(Q K^T / sqrt(d)) V: each of the N queries attends to the N' reduced keys (paper eq. 2),
        # computed by PyTorch's fused kernel; `attention_weights` writes the softmax out.
        dropout_p = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, heads, N, d)
        y = y.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(y))

    def attention_weights(self, x: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """softmax(Q K^T / sqrt(d)) written out: (B, heads, N, N') weights, each row summing to 1, and
        the (H', W') grid of the reduced keys. What the forward's fused kernel computes, for explain.py."""
        q, k, _, grid = self.project(x, H, W)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, heads, N, N')
        return scores.softmax(-1), grid


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv -> GELU -> Linear (paper eq. 3). The two per-token linear maps are
    computed as 1x1 convolutions on the (B, C, H, W) map, the same maps on the same weights: the tokens
    then change layout once each way at width C, rather than twice at width 4C around the depthwise conv
    (measured 1.13-1.2x for the whole model on a CPU, eager and in ONNX Runtime)."""

    def __init__(self, hidden_size: int, *, mlp_ratio: int, dropout: float):
        super().__init__()
        inner = hidden_size * mlp_ratio
        self.fc1 = nn.Linear(hidden_size, inner)
        self.dwconv = nn.Conv2d(inner, inner, kernel_size=3, padding=1, groups=inner)
        self.fc2 = nn.Linear(inner, hidden_size)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        x = F.conv2d(x, self.fc1.weight[:, :, None, None], self.fc1.bias)  # fc1: (B, C_inner, H, W)
        x = self.drop(F.gelu(self.dwconv(x)))  # (B, C_inner, H, W)
        x = F.conv2d(x, self.fc2.weight[:, :, None, None], self.fc2.bias)  # fc2: (B, C, H, W)
        return self.drop(x.flatten(2).transpose(1, 2))  # (B, N, C)


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
                 dropout: float, attention_dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.attn = EfficientSelfAttention(hidden_size, num_heads=num_heads, sr_ratio=sr_ratio,
                                           attention_dropout=attention_dropout, dropout=dropout)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.ffn = MixFFN(hidden_size, mlp_ratio=mlp_ratio, dropout=dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        x = x + self.drop_path(self.ffn(self.norm2(x), H, W))
        return x


class Stage(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int, *, depth: int, patch_size: int, stride: int,
                 drop_paths: list[float], **block_kwargs):
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_channels, hidden_size, patch_size=patch_size, stride=stride)
        self.blocks = nn.ModuleList([Block(hidden_size, drop_path=p, **block_kwargs) for p in drop_paths])
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, H, W = self.patch_embed(x)  # (B, N, C)
        for block in self.blocks:
            x = block(x, H, W)
        x = self.norm(x)
        return x.transpose(1, 2).reshape(x.shape[0], -1, H, W)  # (B, C, H, W)


class MixTransformer(nn.Module):
    """Returns the four stage outputs; `channels` and `reduction` declare their widths and their
    downsampling relative to the input, 4/8/16/32 (a map has ceil(H_in / reduction) rows). Not to be
    confused with `config.strides`, each patch embedding's own stride (4/2/2/2), whose products these are."""

    def __init__(self, config: SegFormerConfig):
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
            ))
        self.channels = list(config.hidden_sizes)
        self.reduction = [math.prod(config.strides[:i + 1]) for i in range(len(config.strides))]  # 4, 8, 16, 32

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)  # (B, C_i, H / reduction_i, W / reduction_i)
            features.append(x)
        return features
