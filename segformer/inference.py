"""Inference: what `pipeline("image-segmentation")` and the guide's manual inference do, plus the
paper's sliding window and test-time augmentation.

    predictor = Predictor(SegFormer.from_pretrained("nvidia/segformer-b0-finetuned-ade-512-512"))
    result = predictor(load_image("room.jpg"))
    result.label_map   # (H, W) int64 class ids at the image's own size
    result.segments    # [{"label": "wall", "score": None, "mask": PIL L image (0/255)}, ...]

Logits always come back to the image's size the way `post_process_semantic_segmentation` brings
them: bilinear upsampling (align_corners=False), then argmax.

Modes: "resize" squashes to size x size (the image processor, the guide; default); "aspect" keeps
the aspect ratio (short side `size`, sides multiples of 32); "slide" runs `window` x `window` crops
every `stride` pixels over the image at its own resolution and averages the overlapping logits
(smaller images are padded). `tta=True` averages the softmax probabilities over `scales` and their
horizontal flips (the paper's multi-scale + flip testing).
"""

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .metrics import predicted_classes
from .model import SegFormer
from .preprocess import aspect_size, normalize, resize_image


def load_image(path) -> Image.Image:
    """Open an image as the reference pipeline does: EXIF orientation applied, RGB."""
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")


@dataclass
class Prediction:
    label_map: torch.Tensor  # (H, W) int64
    probabilities: torch.Tensor | None  # (K, H, W) float, when asked for
    id2label: dict[int, str] = field(repr=False)

    @property
    def segments(self) -> list[dict]:
        """One {"label", "score", "mask"} per class present, in ascending class id (the pipeline's)."""
        labels = self.label_map.cpu().numpy()
        out = []
        for class_id in np.unique(labels):
            mask = Image.fromarray(((labels == class_id) * 255).astype(np.uint8))
            out.append({"label": self.id2label.get(int(class_id), f"LABEL_{class_id}"), "score": None, "mask": mask})
        return out


class Predictor:
    def __init__(self, model: SegFormer, *, size: int = 512, mode: str = "resize", window: int = 512,
                 stride: int = 341, tta: bool = False, scales=(0.75, 1.0, 1.25), flip: bool = True,
                 device=None, amp: str = "off", batch_size: int = 4):
        if mode not in ("resize", "aspect", "slide"):
            raise ValueError(f"mode must be 'resize', 'aspect' or 'slide', got {mode!r}")
        if amp not in ("off", "bf16", "fp16"):
            raise ValueError(f"amp must be 'off', 'bf16' or 'fp16', got {amp!r}")
        if mode == "slide" and not 0 < stride <= window:
            raise ValueError(f"the stride ({stride}) must be in 1..window ({window})")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.size, self.mode, self.window, self.stride = size, mode, window, stride
        self.scales = tuple(scales) if tta else (1.0,)
        self.flip = tta and flip
        self.amp, self.batch_size = amp, batch_size
        self.id2label = dict(enumerate(predicted_classes(model.config.label_names())))

    @torch.no_grad()
    def __call__(self, images, *, probabilities: bool = False):
        """One image (PIL, any mode, or uint8 (3, H, W) tensor) -> Prediction; a list -> list.
        In "resize" mode a list runs through the model `batch_size` images at a time."""
        single = not isinstance(images, (list, tuple))
        images = [to_uint8_tensor(image).to(self.device) for image in ([images] if single else images)]
        results = []
        for start in range(0, len(images), self.batch_size):
            for probs in self.probabilities(images[start:start + self.batch_size]):  # (K, H, W) each
                results.append(Prediction(probs.argmax(0), probs if probabilities else None, self.id2label))
        return results[0] if single else results

    def probabilities(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 (3, H_i, W_i) images -> (K, H_i, W_i) class probabilities, averaged over the TTA views."""
        views = [(scale, flipped) for scale in self.scales for flipped in ((False, True) if self.flip else (False,))]
        totals = [0.0] * len(images)
        for scale, flipped in views:
            inputs = [image.flip(-1) if flipped else image for image in images]
            for i, logits in enumerate(self.logits(inputs, scale)):
                logits = logits.flip(-1) if flipped else logits  # back to the image's orientation
                totals[i] = totals[i] + class_probabilities(logits)
        return [total / len(views) for total in totals]

    def logits(self, images: list[torch.Tensor], scale: float = 1.0) -> list[torch.Tensor]:
        """uint8 (3, H_i, W_i) images -> (K, H_i, W_i) logits, upsampled to each image's size."""
        inputs = [normalize(resize_image(image, self.input_size(*image.shape[-2:], scale))) for image in images]
        if self.mode == "resize":  # one size for all: one batch
            outputs = list(self.forward(torch.stack(inputs)))  # B x (K, h, w)
        else:
            run = self.slide if self.mode == "slide" else self.forward
            outputs = [run(x[None])[0] for x in inputs]
        return [F.interpolate(out[None], size=image.shape[-2:], mode="bilinear", align_corners=False)[0]
                for out, image in zip(outputs, images)]

    def input_size(self, H: int, W: int, scale: float) -> tuple[int, int]:
        if self.mode == "resize":
            return (round(self.size * scale),) * 2
        if self.mode == "aspect":
            return aspect_size(H, W, round(self.size * scale))
        return max(1, round(H * scale)), max(1, round(W * scale))  # slide: the image's own resolution

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.amp]
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.amp != "off"):
            return self.model(x).float()

    def slide(self, x: torch.Tensor) -> torch.Tensor:
        """Average the logits of overlapping window x window crops (mmseg's slide_inference)."""
        _, _, H, W = x.shape
        win, stride = self.window, self.stride
        pad_h, pad_w = max(win - H, 0), max(win - W, 0)
        x = F.pad(x, (0, pad_w, 0, pad_h))  # zeros after normalisation: the mean colour
        Hp, Wp = x.shape[-2:]
        total = torch.zeros(1, self.model.config.num_labels, Hp, Wp, device=x.device)
        count = torch.zeros(1, 1, Hp, Wp, device=x.device)
        rows = range(0, max(Hp - win + stride - 1, 0) // stride + 1)
        cols = range(0, max(Wp - win + stride - 1, 0) // stride + 1)
        for r in rows:
            for c in cols:
                y2, x2 = min(r * stride + win, Hp), min(c * stride + win, Wp)
                y1, x1 = max(y2 - win, 0), max(x2 - win, 0)
                logits = self.forward(x[:, :, y1:y2, x1:x2])
                total[:, :, y1:y2, x1:x2] += F.interpolate(logits, size=(y2 - y1, x2 - x1), mode="bilinear",
                                                           align_corners=False)
                count[:, :, y1:y2, x1:x2] += 1
        return (total / count)[:, :, :H, :W]


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """(K, H, W) logits -> (K, H, W) softmax; one channel (the binary head) -> (2, H, W) [1 - p, p]."""
    if logits.shape[0] == 1:
        p = logits.sigmoid()
        return torch.cat([1 - p, p])
    return logits.softmax(0)


def to_uint8_tensor(image) -> torch.Tensor:
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3:
        return image
    raise TypeError(f"expected a PIL image or a uint8 (3, H, W) tensor, got {type(image).__name__}"
                    + (f" {image.dtype} {tuple(image.shape)}" if isinstance(image, torch.Tensor) else ""))
