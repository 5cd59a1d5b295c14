"""The all-MLP decoder (paper section 3.2, eq. 4).

The paper's four steps, for encoder maps F_i of widths C_i at strides 4, 8, 16, 32:
    F_i' = Linear(C_i -> D)(F_i)                      unify the widths
    F_i' = Upsample(H/4 x W/4)(F_i')                  bilinear, align_corners=False
    F    = Linear(4D -> D)(Concat(F_i'))              fuse (a 1x1 conv, no bias, + BatchNorm + ReLU
                                                      in the code: mmseg's ConvModule)
    M    = Linear(D -> N_cls)(Dropout(F))             classify (a 1x1 conv)
The checkpoints concatenate the levels deepest first ([F_4', F_3', F_2', F_1']), so the fuse weight's
input channels come in that order.

How we compute it (same function, same weights, far less work). Everything before the BatchNorm is
linear, and a per-pixel linear map commutes with bilinear upsampling (whose weights sum to one, so
biases pass through too). Splitting the fuse weight into one D x D block W_i per level,
    Fuse(Concat(Up(P_i F_i + b_i))) = sum_i Up((W_i P_i) F_i + W_i b_i),
so each level is mapped straight to D channels *at its own resolution* by the D x C_i matrix W_i P_i,
and only D channels per level are upsampled. The reference instead upsamples 4D channels and runs a
4D -> D conv at 1/4 resolution, which is most of SegFormer-B0's inference time. `W_i P_i` is formed
on every call, so gradients reach the stored `proj` and `fuse` weights exactly as in the reference.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SegFormerConfig


class AllMLPDecoder(nn.Module):
    def __init__(self, config: SegFormerConfig):
        super().__init__()
        D = config.decoder_hidden_size
        self.proj = nn.ModuleList([nn.Linear(c, D) for c in config.hidden_sizes])
        self.fuse = nn.Conv2d(D * len(config.hidden_sizes), D, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(D)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Conv2d(D, config.num_labels, kernel_size=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        B, _, H, W = features[0].shape  # the stride-4 map sets the output size
        D = self.fuse.out_channels
        # (D, L*D) -> L blocks of (D, D), reversed so that blocks[i] belongs to level i.
        blocks = self.fuse.weight.flatten(1).split(D, dim=1)[::-1]
        fused = None
        for level, (x, proj, fuse_block) in enumerate(zip(features, self.proj, blocks)):
            weight = fuse_block @ proj.weight  # (D, C_i): project and fuse in one map
            bias = fuse_block @ proj.bias  # (D,)
            y = F.conv2d(x, weight[:, :, None, None], bias)  # (B, D, H_i, W_i)
            if level > 0:  # the coarser levels come up to the stride-4 grid
                y = F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False)  # (B, D, H, W)
            fused = y if fused is None else fused + y
        x = F.relu(self.norm(fused))
        return self.classifier(self.dropout(x))  # (B, num_labels, H, W)

    def forward_reference(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The decoder exactly as written in the paper and the reference code; kept to show and test
        that `forward` computes the same function."""
        B, _, H, W = features[0].shape
        levels = []
        for x, proj in zip(features, self.proj):
            y = proj(x.flatten(2).transpose(1, 2))  # (B, H_i * W_i, D)
            y = y.transpose(1, 2).reshape(B, -1, *x.shape[-2:])  # (B, D, H_i, W_i)
            levels.append(F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False))
        x = self.fuse(torch.cat(levels[::-1], dim=1))  # (B, D, H, W)
        x = F.relu(self.norm(x))
        return self.classifier(self.dropout(x))
