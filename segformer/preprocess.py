"""The image processor's steps, on uint8 (3, H, W) tensors: bilinear antialiased resize, rescale by
1/255 and ImageNet normalisation. Shared by the data pipeline and the predictor."""

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 512  # SegformerImageProcessor's size: the input size of a model whose files name none


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear with antialiasing, on uint8 natively on the CPU: the bytes torchvision's resize gives (a test
    checks), without importing torchvision where only inference runs. Elsewhere (CUDA has no uint8 kernel)
    in float, rounded back to uint8: within one grey level of the CPU's bytes."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    if image.dtype == torch.uint8 and image.device.type != "cpu":
        return resize_in_float(image, size)
    return F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]


def resize_in_float(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """resize_image of a uint8 image through float32, where a device has no uint8 kernel for it."""
    resized = F.interpolate(image[None].float(), size=tuple(size), mode="bilinear", align_corners=False,
                            antialias=True)[0]
    return resized.round_().clamp_(0, 255).to(torch.uint8)


def normalize(image: torch.Tensor) -> torch.Tensor:
    """uint8 (3, H, W) -> float (3, H, W): (x / 255 - mean) / std, as one multiply-add per pixel."""
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    scale = 1 / (255 * std)
    shift = -torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1) / std
    return torch.addcmul(shift, image.float(), scale)


def aspect_size(height: int, width: int, short_side: int, *, multiple: int = 32) -> tuple[int, int]:
    """The paper's test size: short side to `short_side`, the other side scaled alike, both rounded
    to a multiple of 32."""
    scale = short_side / min(height, width)
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))
