"""Decoders: SegFormer's all-MLP decoder (paper section 3.2, eq. 4), and mmsegmentation 1.x's variant.

The protocol of a decoder (what `SegFormer` builds and calls; write your own to it):

    Decoder(config, channels)           config: the SegFormerConfig; channels: the encoder's widths C_i
    forward(features) -> logits         four (B, C_i, H/s_i, W/s_i) maps -> (B, num_labels, H/4, W/4)
    classifier                          the last 1x1 conv, (num_labels, D, 1, 1): a head re-initialised for
                                        other labels is this module
    level_terms(features)               optional: (B, D, H/4, W/4) terms, one per level, that add up to the
                                        fused feature, drawn one by one in explain.py's tour

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

At evaluation the BatchNorm is a fixed affine map, s * x + t per channel, so it folds into the same
per-level maps too: rows of W_i P_i scaled by s, and the shift t added to the stride-4 level's bias
(upsampling passes constants through). The stored weights never change; only the arithmetic does.

The folded form is derived by hand from the paper's, `forward_paper`, which is the one to read and to edit.
Which one runs is chosen in the open: `folded` (the default; `SegFormerConfig.fold_decoder`, train.py's
--no-fold-decoder). A folded decoder checks, when built, that its arithmetic still computes
`forward_paper` (in training and evaluation mode, on random numbers): an edit to the paper's form is never
silently ignored; it stops the build, saying to run unfolded.

And the upsampling itself: bilinear interpolation along one axis is multiplication by an (out x in)
matrix with two non-zeros per row, so Up(Y) = V Y H^T, and the three coarse levels come up to the
stride-4 grid and add up in one batched matrix product, [V_1 V_2 V_3] @ [Y_1 H_1^T; Y_2 H_2^T; Y_3 H_3^T]
(computed on the channels-last maps, so that nothing changes layout):
dense, but at matrix-multiply speed instead of three resamplings and additions of full-size maps
(the same numbers as F.interpolate to float rounding; 1.05x eager, 1.1x in ONNX Runtime).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SegFormerConfig


class AllMLPDecoder(nn.Module):
    def __init__(self, config: SegFormerConfig, channels=None, *, folded: bool | None = None):
        super().__init__()
        D = config.decoder_hidden_size
        self.channels = list(channels or config.hidden_sizes)
        self.proj = nn.ModuleList([nn.Linear(c, D) for c in self.channels])
        self.fuse = nn.Conv2d(D * len(self.channels), D, kernel_size=1, bias=False)
        self.norm = nn.BatchNorm2d(D)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Conv2d(D, config.num_labels, kernel_size=1)
        self.folded = config.fold_decoder if folded is None else folded
        # How the folded form upsamples the coarse levels: "matmul", one batched matrix product (the fastest
        # in eager PyTorch and ONNX Runtime), or "interpolate", three bilinear resamplings (OpenVINO runs
        # those in bf16 but the matrix product in fp32: its export sets this). The same numbers either way.
        self.upsampling = "matmul"
        if self.folded:
            self.check_folding()

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.forward_folded(features) if self.folded else self.forward_paper(features)

    def forward_paper(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The decoder exactly as written in the paper and the reference code, the four steps above: read
        this first, and edit this one (then build with folded=False, which the folded form says if you
        forget). `forward_folded` computes the same function."""
        B, _, H, W = features[0].shape
        levels = []
        for x, proj in zip(features, self.proj):
            y = proj(x.flatten(2).transpose(1, 2))  # (B, H_i * W_i, D)
            y = y.transpose(1, 2).reshape(B, -1, *x.shape[-2:])  # (B, D, H_i, W_i)
            levels.append(F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False))
        x = self.fuse(torch.cat(levels[::-1], dim=1))  # (B, D, H, W)
        x = F.relu(self.norm(x))
        return self.classifier(self.dropout(x))

    # ---- how we compute it: the same function, in less work (module docstring) ----

    def level_maps(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each level i, the (D, C_i) weight and (D,) bias of the map straight to the fused width:
        W_i P_i and W_i b_i, with the BatchNorm folded in when it is not training."""
        D = self.fuse.out_channels
        # (D, L*D) -> L blocks of (D, D), reversed so that blocks[i] belongs to level i.
        blocks = self.fuse.weight.flatten(1).split(D, dim=1)[::-1]
        maps = [(block @ proj.weight, block @ proj.bias) for proj, block in zip(self.proj, blocks)]  # (D, C_i), (D,)
        if self.training:
            return maps
        norm = self.norm
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # (D,)
        shift = norm.bias - norm.running_mean * scale
        return [(scale[:, None] * weight, scale * bias + (shift if level == 0 else 0))
                for level, (weight, bias) in enumerate(maps)]

    def level_terms(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each level's term of the fused feature, Up(W_i P_i F_i + W_i b_i): (B, D, H/4, W/4) maps that add up
        to it (normalised when not training), drawn one by one in explain.py's tour."""
        H, W = features[0].shape[-2:]
        levels = [F.conv2d(x, weight[:, :, None, None], bias) for x, (weight, bias) in zip(features, self.level_maps())]
        return [levels[0]] + [F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False) for y in levels[1:]]

    def forward_folded(self, features: list[torch.Tensor]) -> torch.Tensor:
        B, _, H, W = features[0].shape  # the stride-4 map sets the output size
        levels = [F.conv2d(x, weight[:, :, None, None], bias)  # (B, D, H_i, W_i): project and fuse in one map
                  for x, (weight, bias) in zip(features, self.level_maps())]
        coarse = levels[1:]
        if self.upsampling == "interpolate":
            fused = levels[0]
            for y in coarse:
                fused = fused + F.interpolate(y, size=(H, W), mode="bilinear", align_corners=False)
        else:
            rows = torch.cat([bilinear_matrix(H, y.shape[-2], y) for y in coarse], dim=1)  # (H, sum H_i)
            # The product is laid out as the stride-4 level it is added to (adding maps of two layouts, or
            # making one contiguous for the product, costs more than the product): contiguous (B, D, H, W),
            # or channels-last, as the convolutions give it for a batch of more than one. A graph being traced
            # (torch.export, torch.compile) takes the first form: its reshapes hold at every size, and the
            # compiler lays memory out itself.
            if levels[0].is_contiguous() or torch.compiler.is_compiling():
                columns = torch.cat([y @ bilinear_matrix(W, y.shape[-1], y).T  # (B, D, sum H_i, W)
                                     for y in coarse], dim=2)
                upsampled = rows @ columns  # (B, D, H, W)
            else:  # on the (B, H_i, W_i, D) memory: the columns first, then the rows
                columns = torch.cat([bilinear_matrix(W, y.shape[-1], y) @ y.permute(0, 2, 3, 1)  # (B, sum H_i, W, D)
                                     for y in coarse], dim=1)
                upsampled = (rows @ columns.flatten(2)).view(B, H, W, -1).permute(0, 3, 1, 2)  # (B, D, H, W)
            fused = levels[0] + upsampled  # the coarse levels upsampled and added
        x = F.relu(self.norm(fused) if self.training else fused)  # at evaluation the norm is in the maps
        return self.classifier(self.dropout(x))  # (B, num_labels, H, W)

    @torch.no_grad()
    def check_folding(self) -> None:
        """Raise unless `forward_folded` computes `forward_paper`, in training (batch statistics) and in
        evaluation mode (random running statistics), on random maps, dropout aside (its mask follows the
        memory layout, which differs). Nothing is changed: the random numbers come from a generator of their
        own, and the state is put back."""
        state, mode = {name: t.clone() for name, t in self.state_dict().items()}, self.training
        generator = torch.Generator().manual_seed(0)
        sizes = [(9, 11), (5, 6), (3, 3), (2, 2)]  # odd sizes: the upsampling's edges count too
        features = [torch.randn(2, c, *sizes[min(i, 3)], generator=generator) for i, c in enumerate(self.channels)]
        self.norm.running_mean.copy_(torch.randn(self.norm.num_features, generator=generator))
        self.norm.running_var.copy_(0.5 + torch.rand(self.norm.num_features, generator=generator))
        try:
            for training in (True, False):
                self.train(training)
                self.dropout.eval()
                outputs = [self.forward_paper(features), self.forward_folded(features)]
                if not torch.allclose(*outputs, atol=1e-4, rtol=1e-4):
                    raise RuntimeError(
                        f"{type(self).__name__}.forward_paper no longer computes what forward_folded does (in "
                        f"{'training' if training else 'evaluation'} mode; max difference "
                        f"{(outputs[0] - outputs[1]).abs().max():.2e}): an edit to the paper's form runs only "
                        f"unfolded: build with fold_decoder=False (train.py --no-fold-decoder)")
        finally:
            self.load_state_dict(state)
            self.train(mode)


class ConvModule(nn.Sequential):
    """mmcv's ConvModule as mmseg's heads use it: a 1x1 conv without bias, BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU()


class MMSegHead(nn.Module):
    """mmsegmentation 1.x's SegformerHead (mmseg/models/decode_heads/segformer_head.py), the head of its
    SegFormer configs: each level through its own 1x1 conv + BatchNorm + ReLU to D channels, upsampled to
    1/4, concatenated in level order, fused by another 1x1 conv + BatchNorm + ReLU, then dropout and the
    classifier. It departs from the paper's all-MLP decoder by the BatchNorm and ReLU on every level (no
    longer linear before the fuse: nothing folds), and the order of the concatenation."""

    def __init__(self, config: SegFormerConfig, channels=None):
        super().__init__()
        D = config.decoder_hidden_size
        channels = list(channels or config.hidden_sizes)
        self.convs = nn.ModuleList([ConvModule(c, D) for c in channels])
        self.fusion_conv = ConvModule(D * len(channels), D)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Conv2d(D, config.num_labels, kernel_size=1)

    def upsampled_levels(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each level through its ConvModule, upsampled to the stride-4 grid: (B, D, H/4, W/4) each."""
        H, W = features[0].shape[-2:]
        return [F.interpolate(conv(x), size=(H, W), mode="bilinear", align_corners=False)
                for x, conv in zip(features, self.convs)]

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.fusion_conv(torch.cat(self.upsampled_levels(features), dim=1))  # (B, D, H/4, W/4)
        return self.classifier(self.dropout(x))  # (B, num_labels, H/4, W/4)

    def level_terms(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each level's term of the fusion conv's output (before its BatchNorm and ReLU): the conv over the
        concatenation is the sum of one (D, D) block per level, so the terms add up to it."""
        D = self.fusion_conv.conv.out_channels
        blocks = self.fusion_conv.conv.weight.flatten(1).split(D, dim=1)  # (D, D) each, in level order
        return [F.conv2d(y, block[:, :, None, None]) for y, block in zip(self.upsampled_levels(features), blocks)]


def bilinear_matrix(out_size: int, in_size: int, like: torch.Tensor) -> torch.Tensor:
    """(out_size, in_size) matrix of 1-D bilinear resampling as F.interpolate computes it with
    align_corners=False: output i reads source position (i + 0.5) * in / out - 0.5 (clamped at 0)
    from its two neighbours, weighted by distance. Built in float32 (positions such as 100.5 do not
    fit in bf16), then cast to the dtype of `like`."""
    position = (torch.arange(out_size, device=like.device, dtype=torch.float32) + 0.5) * (in_size / out_size) - 0.5
    position = position.clamp(min=0)
    first = position.floor()
    weight = position - first  # of the second neighbour
    second = torch.clamp(first + 1, max=in_size - 1)
    source = torch.arange(in_size, device=like.device, dtype=torch.float32)
    matrix = (1 - weight)[:, None] * (source == first[:, None]) + weight[:, None] * (source == second[:, None])
    return matrix.to(like.dtype)
