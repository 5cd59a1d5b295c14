"""A tour of SegFormer on one image: what each part of the model computes, drawn.

    python explain.py --checkpoint runs/synthetic/best scene.png --pixel 70 40 --out tour/
    python explain.py --checkpoint nvidia/segformer-b0-finetuned-ade-512-512 room.jpg

Writes tour/tour.png (every panel in one figure, in the order of the computation) and each panel as its
own PNG:
  input.png               the image as the model sees it: resized to the checkpoint's input size
  stage1..4.png           the four encoder maps (strides 4, 8, 16, 32) as images: their first three
                          principal components as red, green and blue; the shape in the title
  attention_stage1..4.png where the query pixel (the cross) attends in each stage's last block:
                          softmax(Q K^T / sqrt(d)) over the reduced keys, averaged over heads, on the
                          grid the spatial reduction actually uses (16x16 keys at stride 32, ...)
  attention_heads.png     the same for each head of the last stage separately
  decoder_level1..4.png   each level's share of the decoder's fused feature: the decoder computes
                          sum_i Up(W_i P_i F_i), so each term can be drawn alone, on the same three
                          colour axes as the sum (fused.png): what 1/32 adds that 1/4 does not
  prediction.png          the predicted classes over the image, with a legend of the classes present

It runs on the CPU in seconds, with any checkpoint. Needs matplotlib (pip install matplotlib).
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from segformer import SegFormer
from segformer.bands import display_rgb, read_bands, to_band_tensor
from segformer.cli import SIZE_RANGE, bounded, run_main
from segformer.errors import ConfigError
from segformer.files import writable_folder
from segformer.images import load_image, to_tensor
from segformer.metrics import logits_to_predictions
from segformer.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize, resize_image
from segformer.runtimes import load_for_inference
from segformer.visual import overlay, pyplot, save_figure


def principal_colours(features: torch.Tensor, basis: torch.Tensor | None = None):
    """(C, H, W) features -> (H, W, 3) colours: the projection on three principal directions (of these
    features, or the given (C, 3) basis), each scaled to 0..1. Returns (colours, basis)."""
    C, H, W = features.shape
    flat = features.reshape(C, -1).T  # (H*W, C)
    centred = flat - flat.mean(0)
    if basis is None:
        basis = torch.linalg.svd(centred, full_matrices=False).Vh[:3].T  # (C, 3)
    projected = centred @ basis  # (H*W, 3)
    low, high = projected.quantile(0.01, dim=0), projected.quantile(0.99, dim=0)
    colours = ((projected - low) / (high - low).clamp(min=1e-8)).clamp(0, 1)
    return colours.T.reshape(3, H, W).permute(1, 2, 0).numpy(), basis


@torch.no_grad()
def tour(model: SegFormer, image: Image.Image, *, size: int, pixel: tuple[int, int], bands=None,
         pixels=None) -> dict:
    """Every intermediate the panels draw, from the model's own computation (`forward_intermediates`). A
    model of several bands (`bands`) sees the image's stored values `pixels`; `image` is what is drawn."""
    if bands is None:
        x = normalize(resize_image(to_tensor(image), (size, size)))[None]  # (1, 3, size, size)
    else:
        x = bands.normalize(resize_image(to_band_tensor(pixels, "the image", bands.count), (size, size)))[None]
    row, col = (min(max(p, 0), size - 1) for p in (round(pixel[0] * size / image.height),
                                                     round(pixel[1] * size / image.width)))
    steps = model.forward_intermediates(x, attention=True)
    attention = []  # where the query pixel attends in each stage's last block (None: not written out)
    for features, blocks in zip(steps["stages"], steps["attention"]):
        if not blocks or blocks[-1] is None:
            attention.append(None)
            continue
        weights, grid = blocks[-1]  # (1, heads, N, N'), the (H', W') grid of the keys
        H, W = features.shape[-2:]
        stride = size / H
        query = min(int(row / stride), H - 1) * W + min(int(col / stride), W - 1)
        attention.append((weights[0, :, query].reshape(-1, *grid), (H, W), grid))
    levels = steps["levels"]  # the decoder's per-level terms, which add up to its fused feature (or None)
    logits = steps["logits"]
    prediction = logits_to_predictions(F.interpolate(logits, size=(image.height, image.width), mode="bilinear",
                                                     align_corners=False), (image.height, image.width))[0]
    return dict(input=x[0], query=(row, col), stages=steps["stages"], attention=attention, levels=levels,
                fused=sum(levels) if levels else None, logits=logits, prediction=prediction)


def missing_parts(model: SegFormer) -> list[str]:
    """What the tour cannot draw for this model, in a line each: an attention without `attention_weights`,
    a decoder without `level_terms`."""
    lines = []
    attention = model.encoder.stages[0].blocks[0].attn if hasattr(model.encoder, "stages") else None
    if attention is not None and not hasattr(attention, "attention_weights"):
        lines.append(f"the attention {model.config.attention} has no attention_weights(x, H, W): the attention "
                     f"panels are left out")
    if not hasattr(model.decoder, "level_terms"):
        lines.append(f"the decoder {model.config.decoder} has no level_terms(features): the decoder panels are "
                     f"left out")
    return lines


def panels(model: SegFormer, image: Image.Image, result: dict, colours: list, size: int) -> dict:
    """name -> (title, (H, W, 3) float image or (H, W) map, and what to draw on it)."""
    shown = {}
    if result["input"].shape[0] == 3:  # RGB: the normalisation undone
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        picture = (result["input"] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    else:  # bands: the drawn image at the input size
        picture = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    grey = picture.mean(2)
    shown["input"] = (f"input {size}x{size}\n(after the processor's resize)", picture, result["query"], size, None)
    for i, features in enumerate(result["stages"]):
        rgb, _ = principal_colours(features[0])
        C, H, W = features.shape[1:]
        shown[f"stage{i + 1}"] = (f"stage {i + 1}: {C} x {H} x {W}\n(stride {size // H})", rgb, result["query"], size,
                                  None)
    for i, attention in enumerate(result["attention"]):
        if attention is None:
            continue
        weights, (H, W), grid = attention
        heads = weights.shape[0]
        shown[f"attention_stage{i + 1}"] = (
            f"stage {i + 1} attention: {H * W} queries\n-> {grid[0]}x{grid[1]} keys, {heads} head{'s' * (heads > 1)}",
            weights.mean(0).numpy(), result["query"], size, grey)
    if result["levels"] is not None:
        fused_rgb, basis = principal_colours(result["fused"][0])
        for i, level in enumerate(result["levels"]):
            rgb, _ = principal_colours(level[0], basis)
            shown[f"decoder_level{i + 1}"] = (f"decoder: stage {i + 1}'s term\n(from 1/{4 * 2 ** i})", rgb, None, size,
                                              None)
        shown["fused"] = ("decoder: the sum of the four\n(fused feature)", fused_rgb, None, size, None)
    return shown


def draw(shown: dict, heads: tuple | None, prediction: Image.Image, out: Path) -> None:
    plt = pyplot()  # main has checked that matplotlib is there

    def one(axis, title, picture, query, size, background=None):
        if background is not None:  # the image in grey under the attention weights
            axis.imshow(background, cmap="gray", extent=(0, size, size, 0))
        axis.imshow(picture, cmap="magma" if picture.ndim == 2 else None, extent=(0, size, size, 0),
                    interpolation="nearest", alpha=0.65 if background is not None else 1.0)
        if query is not None:
            axis.plot(query[1], query[0], "c+", markersize=14, markeredgewidth=2)
        axis.set_title(title, fontsize=8)
        axis.axis("off")

    for name, panel in shown.items():  # each panel alone
        figure, axis = plt.subplots(figsize=(4, 4))
        one(axis, *panel)
        save_figure(plt, figure, out / f"{name}.png")
    if heads is not None:  # the last stage's heads, each alone
        weights, stage, size, query, background = heads
        figure, axes = plt.subplots(1, len(weights), figsize=(2.2 * len(weights), 2.6))
        for h, axis in enumerate(np.atleast_1d(axes)):
            one(axis, f"stage {stage}, head {h + 1}", weights[h].numpy(), query, size, background)
        save_figure(plt, figure, out / "attention_heads.png")
    prediction.save(out / "prediction.png")

    rows = [["input", "stage1", "stage2", "stage3", "stage4"],
            ["prediction", "attention_stage1", "attention_stage2", "attention_stage3", "attention_stage4"],
            ["fused", "decoder_level1", "decoder_level2", "decoder_level3", "decoder_level4"]]
    figure, axes = plt.subplots(3, 5, figsize=(17, 10.5))
    for row, names in zip(axes, rows):
        for axis, name in zip(row, names):
            if name == "prediction":
                axis.imshow(np.asarray(prediction))
                axis.set_title("prediction (and the classes present)", fontsize=8)
                axis.axis("off")
            elif name in shown:
                one(axis, *shown[name])
            else:  # a part of this model the tour cannot look into (said when it started)
                axis.text(0.5, 0.5, f"{name.replace('_', ' ')}:\nnot exposed by this model", ha="center",
                          va="center", fontsize=8)
                axis.axis("off")
    figure.suptitle("SegFormer, step by step: encoder maps (top), where one pixel attends (middle), the "
                    "decoder's four terms and their sum (bottom)", fontsize=11)
    save_figure(plt, figure, out / "tour.png", dpi=90)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", help="an image file")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, weights file or hub id")
    p.add_argument("--pixel", type=int, nargs=2, metavar=("ROW", "COL"),
                   help="the query pixel of the attention panels, in the image's own pixels (default: its centre)")
    p.add_argument("--size", type=bounded(int, *SIZE_RANGE),
                   help=f"input size, {SIZE_RANGE[0]}..{SIZE_RANGE[1]} (default: the checkpoint's "
                        f"preprocessor_config.json, else 512)")
    p.add_argument("--out", default="tour", help="output folder (default: tour/)")
    p.add_argument("--trust-code", action="store_true",
                   help="import the code from outside this project that the checkpoint names as a part of its model")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: explain.py draws with matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    return run_main(lambda: explain(args))


def explain(args) -> int:
    """Load the model (the eager one: the tour reads inside it), read the image, run the tour, draw it."""
    model, facts = load_for_inference(args.checkpoint, size=args.size, trust_code=args.trust_code, runtime="eager")
    pixels = read_bands(args.image) if facts.bands is not None else None  # full precision, every band
    image = load_image(args.image) if facts.bands is None else display_rgb(pixels)
    if facts.bands is not None:
        to_band_tensor(pixels, args.image, facts.bands.count)  # the band count, checked
    size = facts.size
    pixel = tuple(args.pixel) if args.pixel else (image.height // 2, image.width // 2)
    if not (0 <= pixel[0] < image.height and 0 <= pixel[1] < image.width):
        raise ConfigError(f"--pixel {pixel[0]} {pixel[1]}: outside the {image.width}x{image.height} image")
    for line in missing_parts(model):
        print(f"note: {line}")
    result = tour(model, image, size=size, pixel=pixel, bands=facts.bands, pixels=pixels)
    names, colours = dict(enumerate(facts.predicted_classes)), facts.palette
    out = writable_folder(args.out)
    shown = panels(model, image, result, colours, size)
    last = result["attention"][-1]
    heads = (last[0], len(result["attention"]), size, result["query"], shown["input"][1].mean(2)) if last else None
    draw(shown, heads, overlay(image, result["prediction"].numpy(), colours, names), out)
    print(f"wrote {out / 'tour.png'} and its {len(shown) + 1 + (heads is not None)} panels in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
