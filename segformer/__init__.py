"""A pure-PyTorch SegFormer (Xie et al., 2021): the Mix Transformer encoder, the all-MLP decoder,
checkpoint layouts, loss, metrics and inference. It never imports `transformers`."""

from .config import VARIANTS, SegFormerConfig
from .loss import segmentation_loss
from .model import SegFormer

__all__ = ["SegFormer", "SegFormerConfig", "VARIANTS", "segmentation_loss"]
