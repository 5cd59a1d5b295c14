"""Shared helpers: reference models from `transformers` (the test oracle) with random weights."""

import pytest
import torch

from segformer.config import VARIANTS


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter and buffer random values, so that a swapped or dropped weight (a zero
    bias, a unit LayerNorm) cannot hide. Norm scales stay near 1 and variances positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif ("norm" in name or "layer_norm" in name) and name.endswith("weight"):
                t.copy_(1 + 0.1 * noise)
            else:
                t.copy_(0.05 * noise)
    return model


def hf_config(variant: str = "b0", num_labels: int = 7, **kwargs):
    from transformers import SegformerConfig
    hidden_sizes, depths, decoder = VARIANTS[variant]
    return SegformerConfig(hidden_sizes=list(hidden_sizes), depths=list(depths), decoder_hidden_size=decoder,
                           num_labels=num_labels, **kwargs)


def hf_segmentation_model(variant: str = "b0", num_labels: int = 7, seed: int = 0, **kwargs):
    from transformers import SegformerForSemanticSegmentation
    torch.manual_seed(seed)
    return randomize_(SegformerForSemanticSegmentation(hf_config(variant, num_labels, **kwargs)), seed).eval()


@pytest.fixture(scope="session")
def hf_b0_dir(tmp_path_factory):
    """A random-weight reference B0 (7 labels) saved in the hub layout, shared by several tests."""
    directory = tmp_path_factory.mktemp("hf_b0")
    hf_segmentation_model("b0", 7).save_pretrained(directory)
    return directory
