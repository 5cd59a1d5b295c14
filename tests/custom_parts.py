"""Parts written outside the project, as a researcher would (test_architecture.py builds models from them by
import path: `custom_parts:TalkingHeadsAttention`)."""

import torch
import torch.nn as nn


class TalkingHeadsAttention(nn.Module):
    """Full attention whose heads mix their logits before the softmax (Shazeer et al., "Talking-Heads
    Attention", 2020), written without `attention_weights`: the tour has no attention panels for it."""

    def __init__(self, hidden_size, *, num_heads, sr_ratio, attention_dropout, dropout, norm_layer, act_layer):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.talk = nn.Parameter(torch.eye(num_heads))
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, H, W):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, heads, N, d) each
        logits = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # (B, heads, N, N)
        logits = torch.einsum("gh,bhnm->bgnm", self.talk, logits)  # the heads talk
        return self.out((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C))


class LightHead(nn.Module):
    """A decoder of the smallest kind: the stride-4 map and the stride-32 map, upsampled and added, then the
    classifier; no `level_terms`."""

    def __init__(self, config, channels):
        super().__init__()
        self.fine = nn.Conv2d(channels[0], config.decoder_hidden_size, 1)
        self.coarse = nn.Conv2d(channels[-1], config.decoder_hidden_size, 1)
        self.classifier = nn.Conv2d(config.decoder_hidden_size, config.num_labels, 1)

    def forward(self, features):
        fine = self.fine(features[0])
        coarse = nn.functional.interpolate(self.coarse(features[-1]), size=fine.shape[-2:], mode="bilinear")
        return self.classifier(torch.relu(fine + coarse))


class ScaleNorm(nn.Module):
    """A norm of one's own (Nguyen & Salazar, 2019): x / ||x|| * g, one learned scale."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(width ** 0.5))

    def forward(self, x):
        return self.scale * x / x.norm(dim=-1, keepdim=True).clamp(min=1e-5)


class HalfWidthAttention(TalkingHeadsAttention):
    """A mistake a researcher makes: half the channels back (the residual add would fail far from here)."""

    def forward(self, x, H, W):
        return super().forward(x, H, W)[..., ::2]


class TransposedAttention(TalkingHeadsAttention):
    """Another: the tokens back as (B, C, N), which raises inside the next part."""

    def forward(self, x, H, W):
        return super().forward(x, H, W).transpose(1, 2)


class ThreeClassHead(LightHead):
    """A decoder whose classifier ignores config.num_labels."""

    def __init__(self, config, channels):
        super().__init__(config, channels)
        self.classifier = nn.Conv2d(config.decoder_hidden_size, 3, 1)
