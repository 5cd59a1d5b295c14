"""A pure-PyTorch SegFormer (Xie et al., 2021): the Mix Transformer encoder, the all-MLP decoder,
checkpoint layouts, loss, metrics and inference. It never imports `transformers`.

    model, facts = segformer.load_for_inference("nvidia/segformer-b0-finetuned-ade-512-512")  # or exported/model.onnx
    prediction = segformer.Predictor(model, **facts.predictor_options)(segformer.load_image("room.jpg"))
"""

from .config import VARIANTS, SegFormerConfig
from .images import load_image
from .inference import Predictor
from .loss import segmentation_loss
from .model import SegFormer
from .runtimes import RUNTIMES, ModelFacts, load_for_inference

__all__ = ["SegFormer", "SegFormerConfig", "VARIANTS", "segmentation_loss", "Predictor", "load_for_inference",
           "load_image", "ModelFacts", "RUNTIMES"]
