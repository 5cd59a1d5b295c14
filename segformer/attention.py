"""Self-attention for the Mix Transformer's blocks: SegFormer's own, and two alternatives that prove the seam.

The protocol of an attention (what `Block` builds and calls; write your own to it):

    Attention(hidden_size, *, num_heads, sr_ratio, attention_dropout, dropout, norm_layer, act_layer)
    forward(x: (B, N, C), H, W) -> (B, N, C)                 tokens of an H x W map in, the same shape out
    attention_weights(x, H, W) -> ((B, heads, N, N'), (H', W'))   optional: the softmax, written out, and
                                                                 the grid of the N' keys (explain.py's tour)

All three here are `ReducedKeysAttention`: queries from every token, keys and values from a reduced set
of tokens, then softmax(Q K^T / sqrt(d)) V. They differ only in `reduce`, how the keys' tokens are made:

* `EfficientSelfAttention` (SegFormer, Xie et al. 2021, eq. 2): a conv of kernel = stride = sr_ratio,
  then LayerNorm. N' = N / sr_ratio^2: the cost falls with the image, but stays quadratic in it.
* `LinearReductionAttention` (PVTv2's "linear SRA", Wang et al. 2022, section 3.1): average pooling to a
  fixed 7 x 7 grid, a 1x1 conv, LayerNorm, GELU. N' = 49 whatever the image: linear in its size.
* `FullSelfAttention` (ViT, Dosovitskiy et al. 2021): no reduction, N' = N; quadratic, for comparison.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class ReducedKeysAttention(nn.Module):
    """Multi-head attention of every token over a reduced set of tokens; subclasses say how to reduce
    (`reduce`). Module names (`q`, `k`, `v`, then the reduction's, then `proj`) are the checkpoints'."""

    def __init__(self, hidden_size: int, *, num_heads: int, attention_dropout: float, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(hidden_size, hidden_size)
        self.v = nn.Linear(hidden_size, hidden_size)

    def add_output(self, hidden_size: int, dropout: float) -> None:
        """The output projection, registered after the reduction's modules (the checkpoints' order)."""
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.proj_drop = nn.Dropout(dropout)

    def reduce(self, x: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, N, C) tokens of an H x W map -> (B, N', C) tokens for the keys and values, and their grid."""
        raise NotImplementedError

    def project(self, x: torch.Tensor, H: int, W: int):
        """Queries from every token; keys and values from the reduced tokens. Returns q (B, heads, N, d),
        k and v (B, heads, N', d), and the (H', W') grid of the N' reduced tokens."""
        B, N, C = x.shape
        heads = self.num_heads
        q = self.q(x).view(B, N, heads, C // heads).transpose(1, 2)  # (B, heads, N, d)
        reduced, grid = self.reduce(x, H, W)  # (B, N', C)
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


class EfficientSelfAttention(ReducedKeysAttention):
    """SegFormer's attention (paper eq. 2). The paper reshapes N x C to N/R x (C*R) and projects back to C;
    the code (and every checkpoint) does the same with a conv of kernel = stride = sr_ratio, so
    R = sr_ratio**2, followed by a LayerNorm. This cuts the attention cost from O(N^2) to O(N^2 / R)."""

    def __init__(self, hidden_size: int, *, num_heads: int, sr_ratio: int, attention_dropout: float,
                 dropout: float, norm_layer=nn.LayerNorm, act_layer=None):
        super().__init__(hidden_size, num_heads=num_heads, attention_dropout=attention_dropout, dropout=dropout)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(hidden_size, hidden_size, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_norm = norm_layer(hidden_size)
        self.add_output(hidden_size, dropout)

    def reduce(self, x, H, W):
        if self.sr_ratio == 1:
            return x, (H, W)
        B, N, C = x.shape
        reduced = self.sr(x.transpose(1, 2).reshape(B, C, H, W))  # (B, C, H', W'), H' = H // sr_ratio
        grid = tuple(reduced.shape[-2:])
        return self.sr_norm(reduced.flatten(2).transpose(1, 2)), grid  # (B, N', C), N' = H' * W'


class LinearReductionAttention(ReducedKeysAttention):
    """PVTv2's linear spatial-reduction attention (Wang et al., "PVT v2", 2022, section 3.1 and Fig. 2;
    timm's pvt_v2.py `linear_attn`): the keys come from the map average-pooled to a fixed pool x pool grid
    (7 x 7), then a 1x1 conv, LayerNorm and GELU. Linear in the image size; `sr_ratio` is not used.

    The pooling is nn.AdaptiveAvgPool2d(7), written as two matrix products (`pooling_matrix`): the same
    numbers, and a graph that torch.export and ONNX trace once for every image size."""

    def __init__(self, hidden_size: int, *, num_heads: int, sr_ratio: int, attention_dropout: float,
                 dropout: float, norm_layer=nn.LayerNorm, act_layer=nn.GELU, pool: int = 7):
        super().__init__(hidden_size, num_heads=num_heads, attention_dropout=attention_dropout, dropout=dropout)
        self.pool = pool
        self.sr = nn.Conv2d(hidden_size, hidden_size, kernel_size=1)
        self.sr_norm = norm_layer(hidden_size)
        self.act = act_layer()
        self.add_output(hidden_size, dropout)

    def reduce(self, x, H, W):
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        pooled = pooling_matrix(self.pool, H, x) @ x @ pooling_matrix(self.pool, W, x).T  # (B, C, 7, 7)
        reduced = self.sr(pooled)  # (B, C, 7, 7)
        return self.act(self.sr_norm(reduced.flatten(2).transpose(1, 2))), (self.pool, self.pool)  # (B, 49, C)


def pooling_matrix(out_size: int, in_size: int, like: torch.Tensor) -> torch.Tensor:
    """(out_size, in_size) matrix of adaptive average pooling along one axis, as F.adaptive_avg_pool2d:
    output i is the mean of inputs floor(i * in / out) .. ceil((i + 1) * in / out) - 1."""
    i = torch.arange(out_size, device=like.device)
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil
    j = torch.arange(in_size, device=like.device)
    inside = ((j >= start[:, None]) & (j < end[:, None])).to(like.dtype)  # (out_size, in_size)
    return inside / inside.sum(1, keepdim=True)


class FullSelfAttention(ReducedKeysAttention):
    """Plain multi-head self-attention (Vaswani et al. 2017; ViT): every token attends to every token,
    N' = N, O(N^2) in the image size. `sr_ratio` is not used."""

    def __init__(self, hidden_size: int, *, num_heads: int, sr_ratio: int, attention_dropout: float,
                 dropout: float, norm_layer=None, act_layer=None):
        super().__init__(hidden_size, num_heads=num_heads, attention_dropout=attention_dropout, dropout=dropout)
        self.add_output(hidden_size, dropout)

    def reduce(self, x, H, W):
        return x, (H, W)
