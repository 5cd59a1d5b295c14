"""Export a SegFormer checkpoint to ONNX for ONNX Runtime (or any ONNX runtime), and check the result.

    python export.py --checkpoint runs/synthetic/best --out exported/              # pixel_values -> logits
    python export.py --checkpoint nvidia/segformer-b0-finetuned-ade-512-512 --out exported/ --label-map
    python export.py --checkpoint runs/synthetic/best --out exported/ --int8       # also model.int8.onnx
    python infer.py --onnx exported/model.onnx photo.jpg --out predictions/         # the same CLI, through ORT

The graphs (batch, height and width are dynamic: one file serves every image size):
  default      pixel_values (B, 3, H, W) float32, normalised as the image processor does
               -> logits (B, K, ceil(H/4), ceil(W/4))
  --label-map  image (B, 3, H, W) uint8 RGB -> label_map (B, H, W) int64: the processor's resize to
               size x size (bilinear, antialiased) and normalisation, the model, the upsampling of the
               logits to the image's own size and the argmax, all in the graph: a service needs no numpy.

Written beside the graph: preprocessor_config.json (input size, normalisation, label reduction),
id2label.json (class names), palette.json where the checkpoint has one. Checked after writing: ONNX
Runtime against our eager model at two input shapes; with --int8 (onnxruntime's dynamic quantization:
int8 weights, activations quantised on the fly), the agreement of the int8 label maps with fp32 ones on
images (--check-images, or generated scenes), measured and printed.
"""

import argparse
import contextlib
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from segformer import SegFormer
from segformer.checkpoint import (read_input_size, read_palette, read_preprocessor_config, write_json,
                                  write_preprocessor_config)
from segformer.onnx import onnx_session
from segformer.preprocess import IMAGENET_MEAN, IMAGENET_STD

MIN_SIDE = 32  # the first stage's 8x8 key/value reduction needs a map of at least 8 = 32 / 4
# The traced graph serves every size; tracing assumes every stage's reduced key/value map is at least 2 x 2
# (a size of 1 broadcasts differently), which holds from 61 pixels up. Stating it lets torch.export trace
# once instead of failing and retrying (half the export time); ONNX Runtime still runs 32 x 32 exactly.
TRACE_MIN_SIDE = 61


class LabelMapGraph(nn.Module):
    """uint8 RGB images -> label maps at their own size: preprocessing, model and post-processing."""

    def __init__(self, model: SegFormer, size: int):
        super().__init__()
        self.model, self.size = model, size
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        self.register_buffer("scale", 1 / (255 * std), persistent=False)
        self.register_buffer("shift", -torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) / std, persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        H, W = image.shape[-2:]
        x = F.interpolate(image.float(), size=(self.size, self.size), mode="bilinear", align_corners=False,
                          antialias=True).round().clamp(0, 255)  # as the uint8 resize of the processor
        logits = self.model(x * self.scale + self.shift)  # (B, K, size/4, size/4)
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)  # (B, K, H, W)
        return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def export_onnx(model: SegFormer, path: str | Path, *, label_map_size: int | None = None):
    """Write `model` (in eval mode) as an ONNX graph with dynamic batch, height and width. Returns the
    `torch.onnx.ONNXProgram`, whose `exported_program` is the torch.export graph it came from."""
    model = model.eval()
    batch = torch.export.Dim("batch", max=1024)
    height = torch.export.Dim("height", min=TRACE_MIN_SIDE, max=16384)
    width = torch.export.Dim("width", min=TRACE_MIN_SIDE, max=16384)
    if label_map_size:
        graph, example, names = LabelMapGraph(model, label_map_size).eval(), \
            torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8), (["image"], ["label_map"])
    else:  # a batch of 2 in the example: a batch of 1 would be specialised
        graph, example, names = model, torch.randn(2, 3, 96, 128), (["pixel_values"], ["logits"])
    log = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(graph, (example,), dynamo=True, input_names=names[0], output_names=names[1],
                                        dynamic_shapes={names[0][0]: {0: batch, 2: height, 3: width}},
                                        verbose=False)
        except Exception:
            sys.stderr.write(log.getvalue())
            raise
    program.save(str(path))
    return program


def quantize_int8(source: str | Path, target: str | Path) -> None:
    """onnxruntime's dynamic quantization: int8 weights, activations quantised at run time. Its
    pre-processing first folds the decoder's per-level weights (computed from parameters in the graph)
    into constants, which the quantizer needs."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)


def check_logits(model: SegFormer, path: Path, shapes) -> float:
    """The largest |ONNX Runtime - eager| over random inputs of the given shapes."""
    runner, worst = onnx_session(path), 0.0
    generator = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = model(x)
        got = torch.from_numpy(runner.run(None, {"pixel_values": x.numpy()})[0])
        if got.shape != expected.shape:
            raise RuntimeError(f"{path}: logits of shape {tuple(got.shape)} for {shape}, expected "
                               f"{tuple(expected.shape)}")
        worst = max(worst, (got - expected).abs().max().item())
    return worst


def check_images(folder: str | None, size: int, count: int = 8) -> list[torch.Tensor]:
    """Normalised (3, size, size) inputs: the images of a folder, or generated scenes."""
    from segformer.inference import load_image, to_uint8_tensor
    from segformer.preprocess import normalize, resize_image
    if folder:
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:count]
        images = [to_uint8_tensor(load_image(p)) for p in files]
    else:
        from data.synthetic import SyntheticScenes
        scenes = SyntheticScenes("test", length=count)
        images = [to_uint8_tensor(scenes[i][0]) for i in range(count)]
    return [normalize(resize_image(image, (size, size))) for image in images]


def mask_agreement(reference: Path, candidate: Path, inputs: list[torch.Tensor]) -> float:
    """The fraction of pixels whose class the two graphs agree on (label maps at the logits' size)."""
    a, b = onnx_session(reference), onnx_session(candidate)
    same = total = 0
    for x in inputs:
        feed = {"pixel_values": x[None].numpy()}
        ours, theirs = (np.asarray(s.run(None, feed)[0]).argmax(1) for s in (a, b))
        same, total = same + int((ours == theirs).sum()), total + ours.size
    return same / total


def write_sidecars(checkpoint: str, model: SegFormer, out: Path, size: int) -> None:
    """What a service needs beside the graph: the preprocessing, the class names, the colours."""
    reduce = read_preprocessor_config(checkpoint).get("do_reduce_labels", True) if Path(checkpoint).exists() else True
    write_preprocessor_config(out, size=size, reduce_labels=reduce)
    write_json({str(i): name for i, name in enumerate(model.config.label_names())}, out / "id2label.json")
    colours = read_palette(checkpoint) if Path(checkpoint).exists() else None
    if colours:
        write_json([list(c) for c in colours], out / "palette.json")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, weights file or hub id")
    p.add_argument("--out", required=True, help="output folder (model.onnx and its side files)")
    p.add_argument("--label-map", action="store_true",
                   help="uint8 image in, label map at the image's size out (preprocessing and argmax in the graph)")
    p.add_argument("--size", type=int, help="the model input size of --label-map (default: the checkpoint's "
                                            "preprocessor_config.json, else 512)")
    p.add_argument("--int8", action="store_true", help="also write model.int8.onnx (dynamic quantization) and "
                                                       "report its mask agreement with fp32")
    p.add_argument("--check-images", help="a folder of images for the int8 agreement (default: generated scenes)")
    return p.parse_args(argv)


def export_checkpoint(checkpoint: str, out: Path, *, label_map: bool = False, size: int | None = None,
                      int8: bool = False, check_folder: str | None = None):
    """Everything main does; returns the ONNXProgram. Raises ValueError / FileNotFoundError naming the problem."""
    model = SegFormer.from_pretrained(checkpoint).eval()
    size = size or read_input_size(checkpoint) or 512
    if size < MIN_SIDE:
        raise ValueError(f"--size {size}: at least {MIN_SIDE}")
    if int8 and label_map:
        raise ValueError("--int8 goes with the logits graph (export without --label-map)")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    print(f"exporting {checkpoint} ({model.config.variant or 'custom'}, {model.config.num_labels} classes) "
          f"to {path} ...")
    program = export_onnx(model, path, label_map_size=size if label_map else None)
    if not label_map:
        worst = check_logits(model, path, [(1, 3, size, size), (2, 3, 320, 480)])
        print(f"ONNX Runtime vs eager, 1x3x{size}x{size} and 2x3x320x480: max |logits difference| {worst:.2e}")
        if worst > 1e-4:
            raise ValueError(f"{path} does not reproduce the model (max difference {worst:.2e} > 1e-4)")
    write_sidecars(checkpoint, model, out, size)
    if int8:
        quantize_int8(path, out / "model.int8.onnx")
        agreement = mask_agreement(path, out / "model.int8.onnx", check_images(check_folder, size))
        print(f"int8: {out / 'model.int8.onnx'}; its label maps agree with fp32 on {100 * agreement:.2f}% of pixels "
              f"({'images of ' + check_folder if check_folder else 'generated scenes'})")
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} in {out}/")
    return program


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        export_checkpoint(args.checkpoint, Path(args.out), label_map=args.label_map, size=args.size, int8=args.int8,
                          check_folder=args.check_images)
    except (FileNotFoundError, PermissionError, ValueError) as e:  # the message names the file, key or flag
        print(f"error: {e}", file=sys.stderr)
        return 2 if not str(e).startswith(str(Path(args.out) / "model.onnx")) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
