"""Token merging for fast high-resolution inference without retraining: SegFormer++'s attention (Kienzle et
al., "Segformer++: Efficient Token-Merging Strategies for High-Resolution Semantic Segmentation", 2024), on
the weights of any trained SegFormer.

Bipartite soft matching (Bolya et al., "Token Merging", 2023, in its 2-D form for images, ToMeSD): the tokens
of an H x W grid are split into destinations, one per sy x sx window (its top-left token), and sources, the
rest. Each source finds its most similar destination (cosine similarity); the r sources with the most similar
match are averaged into it, the others stay. Attention then runs on fewer tokens, and `unmerge` copies each
merged token's output back to every position it stands for, so the block's output has every token again.

`TokenMergingAttention` is SegFormer's attention (the same modules, so the same checkpoints) with SegFormer++'s
high-quality preset: in the high-resolution stages (spatial reduction >= 4: MiT's stages 1 and 2) 60% of the
reduced keys and values are merged (2 x 2 windows); in the others (3 and 4) 80% of the queries (4 x 4 windows),
unmerged after the attention. On a trained checkpoint:

    model = SegFormer.from_pretrained("runs/synthetic/best", attention="tome")   # the same weights
    set_token_merging(model, kv_ratio=0.6, q_ratio=0.8)                          # or 0: stock, exactly

The merge is computed per image from its own tokens (sorting, gathers and scatter-adds: torch.export and ONNX
trace it).
"""

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import EfficientSelfAttention

KV_PRESET = (0.6, 2)  # (share of the tokens merged, window side): SegFormer++'s "hq" preset, stages 1-2
Q_PRESET = (0.8, 4)  # stages 3-4


def bipartite_merge(metric: torch.Tensor, H: int, W: int, ratio: float, window: int):
    """(merge, unmerge) for tokens (B, N = H W, C) of an H x W grid: merge(x) (B, N, C') -> (B, N - r, C'),
    the r = ratio N sources most similar to a destination averaged into it (r at most the sources' count);
    unmerge(y) (B, N - r, C') -> (B, N, C'), every token given its merged token's value."""
    B, N, C = metric.shape
    device = metric.device
    rows = torch.arange(H, device=device)[:, None]
    cols = torch.arange(W, device=device)[None, :]
    # destinations: the top-left token of every whole window (the tokens past the last whole window are sources)
    is_dst = ((rows % window == 0) & (cols % window == 0) & (rows < H // window * window)
              & (cols < W // window * window)).flatten()  # (N,)
    position = torch.arange(N, device=device)
    order = torch.argsort(is_dst.long() * N + position)  # the sources, then the destinations, in grid order
    n_dst = (H // window) * (W // window)
    n_src = N - n_dst
    if n_dst == 0:  # a grid smaller than one window (a small image's last stages): nothing to merge into
        return (lambda x: x), (lambda y: y)
    # r = ratio N, at most the sources' share of N (1 - 1 / window^2 <= n_src / N), in integer arithmetic:
    # a size torch.export follows for every image size
    per_mille = min(round(ratio * 1000), 1000 - -(-1000 // window ** 2))
    r = N * per_mille // 1000
    torch._check(r <= n_src)
    src_idx, dst_idx = order[:n_src], order[n_src:]
    with torch.no_grad():  # which tokens merge is a choice, not a function to differentiate
        unit = F.normalize(metric.float(), dim=-1)
        scores = unit[:, src_idx] @ unit[:, dst_idx].transpose(1, 2)  # (B, sources, destinations) cosines
        best, target = scores.max(dim=-1)  # each source's most similar destination
        ranked = best.argsort(dim=-1, descending=True)  # (B, sources), the most similar first
        merged, kept = ranked[:, :r], ranked[:, r:]  # indices into the sources
        target = target.gather(1, merged)  # (B, r): the destination each merged source joins
        counts = torch.ones(B, n_dst, 1, device=device).scatter_add(1, target[..., None],
                                                                     torch.ones(B, r, 1, device=device))
    inverse = torch.argsort(order)  # grid position -> its place in (sources, destinations)

    def pick(x, index):  # x (B, M, C'), index (B, K) -> (B, K, C')
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = x[:, src_idx], x[:, dst_idx]
        sums = dst.scatter_add(1, target[..., None].expand(-1, -1, x.shape[-1]), pick(src, merged))
        return torch.cat([pick(src, kept), sums / counts.to(x.dtype)], dim=1)  # (B, N - r, C')

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        kept_y, dst = y[:, :n_src - r], y[:, n_src - r:]
        src = torch.empty(B, n_src, y.shape[-1], device=y.device, dtype=y.dtype)
        src = src.scatter(1, kept[..., None].expand(-1, -1, y.shape[-1]), kept_y)
        src = src.scatter(1, merged[..., None].expand(-1, -1, y.shape[-1]), pick(dst, target))
        return torch.cat([src, dst], dim=1)[:, inverse]  # (B, N, C'), in grid order

    return merge, unmerge


class TokenMergingAttention(EfficientSelfAttention):
    """SegFormer's attention (the same modules and weights) with SegFormer++'s token merging: of the reduced
    keys and values (`kv_ratio`, `kv_window`) in the stages whose spatial reduction is 4 or more, of the
    queries (`q_ratio`, `q_window`, unmerged after) in the others. A ratio of 0 is SegFormer's attention."""

    def __init__(self, hidden_size: int, *, num_heads: int, sr_ratio: int, attention_dropout: float,
                 dropout: float, norm_layer=nn.LayerNorm, act_layer=None):
        super().__init__(hidden_size, num_heads=num_heads, sr_ratio=sr_ratio, attention_dropout=attention_dropout,
                         dropout=dropout, norm_layer=norm_layer, act_layer=act_layer)
        self.use_preset()

    def use_preset(self) -> None:
        """SegFormer++'s high-quality preset (KV_PRESET, Q_PRESET)."""
        (self.kv_ratio, self.kv_window), (self.q_ratio, self.q_window) = KV_PRESET, Q_PRESET

    @property
    def merges_keys(self) -> bool:
        """Keys and values in the high-resolution stages (spatial reduction 4 or more), else queries."""
        return self.sr_ratio >= 4

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        heads = self.num_heads
        queries, unmerge = x, None
        if not self.merges_keys and self.q_ratio > 0:
            merge, unmerge = bipartite_merge(x, H, W, self.q_ratio, self.q_window)
            queries = merge(x)  # (B, N_q, C)
        reduced, (h, w) = self.reduce(x, H, W)  # (B, N', C)
        if self.merges_keys and self.kv_ratio > 0:
            reduced = bipartite_merge(reduced, h, w, self.kv_ratio, self.kv_window)[0](reduced)  # (B, N'', C)
        q = self.q(queries).view(B, -1, heads, C // heads).transpose(1, 2)  # (B, heads, N_q, d)
        k = self.k(reduced).view(B, -1, heads, C // heads).transpose(1, 2)  # (B, heads, N'', d)
        v = self.v(reduced).view(B, -1, heads, C // heads).transpose(1, 2)
        dropout_p = self.attention_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, heads, N_q, d)
        y = self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, -1, C)))  # (B, N_q, C)
        return unmerge(y) if unmerge is not None else y  # (B, N, C)


def set_token_merging(model: nn.Module, *, kv_ratio: float | None = None, q_ratio: float | None = None,
                      kv_window: int | None = None, q_window: int | None = None) -> int:
    """Change the merging of every TokenMergingAttention in `model` (None: keep); returns how many. 0 ratios:
    SegFormer's attention, the same outputs bit for bit."""
    layers = [m for m in model.modules() if isinstance(m, TokenMergingAttention)]
    for layer in layers:
        for name, value in (("kv_ratio", kv_ratio), ("q_ratio", q_ratio), ("kv_window", kv_window),
                            ("q_window", q_window)):
            if value is not None:
                setattr(layer, name, value)
    return len(layers)


def enable_token_merging(model: nn.Module, *, kv_ratio: float = KV_PRESET[0], q_ratio: float = Q_PRESET[0]) -> int:
    """Give a loaded model's SegFormer attention token merging, in place (the same modules and weights: each
    becomes a TokenMergingAttention), for infer.py --token-merging; returns how many. A model whose
    attention is another kind is left as it is (0)."""
    layers = [m for m in model.modules() if type(m) is EfficientSelfAttention]
    for layer in layers:
        layer.__class__ = TokenMergingAttention
        layer.use_preset()
    if layers and hasattr(model, "config"):
        model.config = replace(model.config, attention="tome")
    set_token_merging(model, kv_ratio=kv_ratio, q_ratio=q_ratio)
    return len(layers)
