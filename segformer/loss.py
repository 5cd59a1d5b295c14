"""The training loss, defined as the reference defines it: logits are upsampled to the label size
(bilinear, align_corners=False) and compared with cross-entropy that ignores `ignore_index` pixels.
With a single label the reference uses a per-pixel sigmoid (binary cross-entropy) instead.

For imbalanced classes, on the same upsampled logits and with the same ignored pixels:
* `class_weights` and `label_smoothing`: `F.cross_entropy`'s own (weighted mean over labelled pixels);
* `ohem_threshold`: online hard example mining as mmsegmentation's `OHEMPixelSampler` does it: keep the
  labelled pixels whose probability of their true class is below max(threshold, the probability of the
  `ohem_min_kept * batch`-th hardest pixel), and average their cross-entropy over *all* pixels of the
  batch, as mmseg's `CrossEntropyLoss` (avg_non_ignore=False) does;
* `kind="dice"`: soft multi-class Dice (Milletari et al., 2016), `1 - mean_c (2 sum(p_c y_c) + 1) /
  (sum(p_c) + sum(y_c) + 1)` over the labelled pixels of the batch, averaged over the classes labelled in
  it; `kind="ce+dice"` adds it to the cross-entropy.

`memory_efficient=True` computes the plain cross-entropy as one fused operation (`UpsampledCrossEntropy`):
the same loss and gradients to float rounding, with one B x K x H x W tensor alive instead of three and
1.6x faster. Without it, the default is the reference's arithmetic bit for bit.
"""

import torch
import torch.nn.functional as F

KINDS = ("ce", "dice", "ce+dice")


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = 255, kind: str = "ce",
                      class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0,
                      ohem_threshold: float | None = None, ohem_min_kept: int = 100_000,
                      memory_efficient: bool = False) -> torch.Tensor:
    """logits (B, K, h, w), labels (B, H, W) int64 -> scalar loss. With the defaults: the reference's
    loss, the mean cross-entropy over labelled pixels."""
    if kind not in KINDS:
        raise ValueError(f"loss kind must be one of {', '.join(KINDS)}, got {kind!r}")
    B, K = logits.shape[:2]
    plain = kind == "ce" and class_weights is None and not label_smoothing and ohem_threshold is None
    if memory_efficient and plain and K > 1:
        return UpsampledCrossEntropy.apply(logits.float(), labels, ignore_index)
    # Same numbers as the reference, laid out channels-last: the upsampling and the softmax then both
    # run along contiguous class vectors, which makes the loss about 1.7x faster on CPU (it costs more
    # than the decoder at 512x512: 150 classes x 262k pixels).
    logits = logits.contiguous(memory_format=torch.channels_last)
    logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)  # (B, K, H, W)
    if K == 1:
        if kind != "ce" or class_weights is not None or label_smoothing or ohem_threshold is not None:
            raise ValueError("class weights, label smoothing, OHEM and Dice need two or more classes; one label "
                             "is the reference's binary (sigmoid) head")
        valid = ((labels >= 0) & (labels != ignore_index)).float()
        per_pixel = F.binary_cross_entropy_with_logits(logits.squeeze(1), labels.float(), reduction="none")
        return (per_pixel * valid).mean()

    per_pixel = logits.permute(0, 2, 3, 1).reshape(-1, K)  # (B*H*W, K), a view
    target = labels.reshape(-1)
    loss = per_pixel.new_zeros(())
    if kind in ("ce", "ce+dice"):
        if ohem_threshold is None:
            loss = F.cross_entropy(per_pixel, target, weight=class_weights, ignore_index=ignore_index,
                                   label_smoothing=label_smoothing)
        else:
            keep = ohem_keep(per_pixel, target, threshold=ohem_threshold, min_kept=ohem_min_kept * B,
                             ignore_index=ignore_index)
            per_pixel_ce = F.cross_entropy(per_pixel, target, weight=class_weights, ignore_index=ignore_index,
                                           label_smoothing=label_smoothing, reduction="none")
            loss = (per_pixel_ce * keep).sum() / target.numel()
    if kind in ("dice", "ce+dice"):
        loss = loss + dice_loss(per_pixel, target, ignore_index=ignore_index)
    return loss


@torch.no_grad()
def ohem_keep(per_pixel: torch.Tensor, target: torch.Tensor, *, threshold: float, min_kept: int,
              ignore_index: int) -> torch.Tensor:
    """mmseg's OHEMPixelSampler: 1 for the labelled pixels kept, 0 elsewhere. (N, K) logits, (N,) labels."""
    valid = target != ignore_index
    keep = torch.zeros_like(target, dtype=per_pixel.dtype)
    true_class = torch.where(valid, target, 0)
    probability = per_pixel.float().softmax(-1).gather(1, true_class[:, None])[:, 0]  # p of the true class
    valid_probability = probability[valid]
    if valid_probability.numel() == 0:
        return keep
    k = min(min_kept, valid_probability.numel() - 1)  # mmseg: sort_prob[min(batch_kept, numel - 1)]
    floor = valid_probability.kthvalue(k + 1).values  # the (k+1)-th smallest
    keep[valid] = (valid_probability < max(floor.item(), threshold)).to(keep.dtype)
    return keep


def dice_loss(per_pixel: torch.Tensor, target: torch.Tensor, *, ignore_index: int, smooth: float = 1.0):
    """Soft multi-class Dice over the labelled pixels, averaged over the classes labelled in the batch.
    (N, K) logits, (N,) labels; no one-hot tensor: the per-class sums come from index_add."""
    valid = target != ignore_index
    probabilities = per_pixel[valid].float().softmax(-1)  # (M, K)
    classes = target[valid]
    K = per_pixel.shape[1]
    intersection = probabilities.new_zeros(K).index_add_(0, classes, probabilities.gather(1, classes[:, None])[:, 0])
    labelled = torch.bincount(classes, minlength=K).to(probabilities.dtype)  # sum of y_c
    predicted = probabilities.sum(0)  # sum of p_c
    dice = (2 * intersection + smooth) / (predicted + labelled + smooth)
    present = labelled > 0
    if not present.any():
        return per_pixel.sum() * 0.0
    return 1 - dice[present].mean()


class UpsampledCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (B, K, h, w) bilinearly upsampled to labels (B, H, W), in fewer passes
    over the B x K x H x W upsampled logits U than log_softmax + nll_loss take. Forward: U (channels-last,
    so that each pixel's classes are contiguous), each pixel's log-sum-exp (a band of rows at a time) and
    its label's logit. Backward: U itself becomes softmax - one-hot, in place (no log-softmax tensor, no
    zero-filled gradient buffer), and goes back through the upsampling's own backward kernel. One
    B x K x H x W tensor alive instead of three; measured 1.6x faster than the plain form on a CPU."""

    ROWS = 64

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        size = labels.shape[-2:]
        up = F.interpolate(logits.contiguous(memory_format=torch.channels_last), size=size, mode="bilinear",
                           align_corners=False)  # (B, K, H, W), channels-last
        valid = labels != ignore_index  # (B, H, W)
        target = torch.where(valid, labels, 0)
        log_sum = up.new_empty(labels.shape)
        classes_last = up.permute(0, 2, 3, 1)  # (B, H, W, K), the same memory: each pixel's classes contiguous
        for image in range(labels.shape[0]):  # a band of rows at a time: small temporaries
            for top in range(0, size[0], UpsampledCrossEntropy.ROWS):
                band = classes_last[image, top:top + UpsampledCrossEntropy.ROWS]  # (rows, W, K), contiguous
                # over the last, contiguous axis of a (pixels, K) matrix: reduced in vector registers, 2x
                # faster than the same numbers reduced over axis 1 of (B, K, rows, W)
                log_sum[image, top:top + band.shape[0]] = torch.logsumexp(band.reshape(-1, band.shape[-1]), -1) \
                    .view(band.shape[:2])
        target_logit = up.gather(1, target[:, None])[:, 0]
        count = valid.sum()
        ctx.save_for_backward(up, target, valid, log_sum)
        ctx.count, ctx.input_size = count.clamp(min=1), list(logits.shape)
        return ((log_sum - target_logit) * valid).sum() / count  # NaN with nothing labelled, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        up, target, valid, log_sum = ctx.saved_tensors
        softmax = up.sub_(log_sum[:, None]).exp_()  # U, in place: it is not needed again
        softmax.scatter_add_(1, target[:, None], torch.full_like(log_sum[:, None], -1.0))  # - one-hot
        softmax.mul_((valid * (grad / ctx.count))[:, None])  # d loss / d U
        grad_logits = torch.ops.aten.upsample_bilinear2d_backward(softmax, list(up.shape[-2:]), ctx.input_size,
                                                                  False, None, None)
        return grad_logits, None, None


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None, *,
                      temperature: float = 1.0, ignore_index: int = 255) -> torch.Tensor:
    """Logit distillation (Hinton et al. 2015), per pixel: T^2 KL(softmax(teacher / T) || softmax(student / T)),
    averaged over the pixels of the student's logits (B, K, h, w). The teacher's logits are resized to the
    student's size where they differ (bilinear). With `labels` (B, H, W), the pixels whose label at the logits'
    resolution (nearest) is `ignore_index` are left out: a crop's padding teaches nothing. T^2 keeps the
    gradient's scale the same whatever T (its gradient is (softmax(s/T) - softmax(t/T)) T / pixels).
    A one-logit (sigmoid) head is the two-class softmax of [0, logit]."""
    if teacher.shape[-2:] != student.shape[-2:]:
        teacher = F.interpolate(teacher.float(), size=student.shape[-2:], mode="bilinear", align_corners=False)
    if student.shape[1] == 1:
        student, teacher = (torch.cat([torch.zeros_like(x), x], dim=1) for x in (student, teacher))
    log_p_student = F.log_softmax(student.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
    per_pixel = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)  # (B, h, w)
    if labels is None:
        return per_pixel.mean() * temperature ** 2
    kept = F.interpolate(labels[:, None].float(), size=student.shape[-2:], mode="nearest")[:, 0] != ignore_index
    # over no kept pixel (a crop of padding only): zero, still reaching the student's graph
    return (per_pixel * kept).sum() / kept.sum().clamp(min=1) * temperature ** 2
