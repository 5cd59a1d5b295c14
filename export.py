"""Export a SegFormer checkpoint to ONNX for ONNX Runtime (with --portable, for any ONNX runtime), and check it.

    python export.py --checkpoint runs/synthetic/best --out exported/              # pixel_values -> logits
    python export.py --checkpoint nvidia/segformer-b0-finetuned-ade-512-512 --out exported/ --label-map
    python export.py --checkpoint runs/synthetic/best --out exported/ --int8       # also model.int8.onnx
    python export.py --checkpoint runs/synthetic/best --out exported/ --int8 static --calibration-images DIR
    python export.py --checkpoint runs/synthetic/best --out portable/ --portable   # standard ONNX operators only
    python infer.py --onnx exported/model.onnx photo.jpg --out predictions/         # the same CLI, through ORT

The graphs (batch, height and width are dynamic: one file serves every image size):
  default      pixel_values (B, 3, H, W) float32, normalised as the image processor does (a model of
               several bands: (B, C, H, W), normalised per band as its preprocessor_config.json says)
               -> logits (B, K, ceil(H/4), ceil(W/4))
  --label-map  image (B, 3, H, W) uint8 RGB -> label_map (B, H, W) int64: the processor's resize to
               size x size (bilinear, antialiased) and normalisation, the model, the upsampling of the
               logits to the image's own size and the argmax, all in the graph: a service needs no numpy.

Attention is ONNX Runtime's fused MultiHeadAttention operator (com.microsoft domain, in every ONNX Runtime
build): one kernel where standard operators take a matrix product, a softmax and another matrix product
over stage 1's 16384 x 256 attention matrix, 4-7% faster for the whole model under ONNX Runtime.
`--portable` writes standard ONNX operators only (opset 20), for TensorRT, OpenVINO and other runtimes.

A checkpoint calibrated by `train.py --eval-only --calibrate` (calibration.json) has its temperature in the
logits graph: the classifier's weights divided by it, so the graph's logits are the calibrated ones (the
label map graph's argmax does not change).

Written beside the graph: preprocessor_config.json (input size, normalisation, label reduction),
id2label.json (class names), palette.json where the checkpoint has one. Checked after writing: ONNX
Runtime against our eager model at two input shapes. With --int8, model.int8.onnx and the agreement of its
label maps with fp32 ones on images (--check-images, or generated scenes), measured and printed:
  dynamic  onnxruntime's dynamic quantization: int8 weights, activations quantised on the fly at every
           call; no data needed, but slower than fp32 on a CPU (its integer convolution is slow)
  static   int8 weights and activations of every convolution and matrix product, the activations' ranges
           calibrated on --calibration-images (default: generated training scenes, right only for the
           built-in demo data); faster than fp32 where the CPU has int8 dot products (AVX512-VNNI, AMX)
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

from data.spec import decide_labels
from segformer import SegFormer
from segformer.checkpoint import describe, write_preprocessor_config
from segformer.files import writable_folder, write_json
from segformer.errors import ConfigError, DataError, UserError
from segformer.images import is_image_file, read_image, to_tensor
from segformer.onnx import onnx_session
from segformer.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize, resize_image

MIN_SIDE = 32  # the first stage's 8x8 key/value reduction needs a map of at least 8 = 32 / 4
# The traced graph serves every size; tracing assumes every stage's reduced key/value map is at least 2 x 2
# (a size of 1 broadcasts differently), which holds from 61 pixels up. Stating it lets torch.export trace
# once instead of failing and retrying (half the export time); ONNX Runtime still runs 32 x 32 exactly.
TRACE_MIN_SIDE = 61
CALIBRATION_COUNT = 16  # images whose activation ranges fix the static int8 scales


class ExportError(UserError):
    """The model cannot be traced, or the written graph does not reproduce it (then the file is there, but
    not to be trusted)."""

    exit_code = 1


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


def attention_as_onnxruntime_operator():
    """A translation of PyTorch's scaled_dot_product_attention into ONNX Runtime's MultiHeadAttention.

    Our attention hands the kernel (B, heads, N, d) tensors; the operator takes (B, N, heads * d) ones and
    splits the heads itself, so the translation moves the heads back beside d, and the operator's output
    back to (B, heads, N, d). Each of those transposes meets the model's own opposite one, and ONNX
    Runtime removes both. The operator's schema is declared to onnx here (onnxruntime defines it in C++ only),
    with just the inputs and attribute we use."""
    from onnx import defs
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    if not defs.has("MultiHeadAttention", domain="com.microsoft"):
        parameter = defs.OpSchema.FormalParameter
        defs.register_schema(defs.OpSchema(
            "MultiHeadAttention", "com.microsoft", 1,
            inputs=[parameter("query", "T"), parameter("key", "T"), parameter("value", "T")],
            outputs=[parameter("output", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "")],
            attributes=[defs.OpSchema.Attribute("num_heads", defs.OpSchema.AttrType.INT, "number of heads")]))
    multi_head_attention = Op(Opset("com.microsoft", 1), "MultiHeadAttention",
                              defs.get_schema("MultiHeadAttention", 1, "com.microsoft"))

    def translate(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                  scale: float | None = None, enable_gqa: bool = False):
        if attn_mask is not None or is_causal or scale is not None:
            raise ValueError("the attention translation covers SegFormer's: no mask, not causal, 1/sqrt(d)")
        heads = query.shape[1]  # static: (B, heads, N, d)
        merged = op.Constant(value_ints=[0, 0, -1])
        query, key, value = (op.Reshape(op.Transpose(t, perm=[0, 2, 1, 3]), merged) for t in (query, key, value))
        output = multi_head_attention(query, key, value, num_heads=heads)  # (B, N, heads * d)
        output = op.Reshape(output, op.Constant(value_ints=[0, 0, heads, -1]))
        return op.Transpose(output, perm=[0, 2, 1, 3])  # (B, heads, N, d)

    return {torch.ops.aten.scaled_dot_product_attention.default: translate}


def export_onnx(model: SegFormer, path: str | Path, *, label_map_size: int | None = None, portable: bool = False):
    """Write `model` (in eval mode) as an ONNX graph with dynamic batch, height and width; attention as ONNX
    Runtime's fused operator unless `portable`. Returns the `torch.onnx.ONNXProgram`, whose
    `exported_program` is the torch.export graph it came from."""
    model = model.eval()
    batch = torch.export.Dim("batch", max=1024)
    height = torch.export.Dim("height", min=TRACE_MIN_SIDE, max=16384)
    width = torch.export.Dim("width", min=TRACE_MIN_SIDE, max=16384)
    if label_map_size:
        graph, example, names = LabelMapGraph(model, label_map_size).eval(), \
            torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8), (["image"], ["label_map"])
    else:  # a batch of 2 in the example: a batch of 1 would be specialised
        graph, example, names = model, torch.randn(2, model.config.in_channels, 96, 128), (["pixel_values"], ["logits"])
    translations = None if portable else attention_as_onnxruntime_operator()
    log = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=names[0], output_names=names[1],
                                    dynamic_shapes={names[0][0]: {0: batch, 2: height, 3: width}},
                                    verbose=False, custom_translation_table=translations)
    program.save(str(path))
    return program


def export_any(model: SegFormer, path: Path, *, label_map_size: int | None, portable: bool):
    """`export_onnx`, falling back to standard operators where ONNX Runtime's fused attention does not cover
    the model's attention (said in one line); a model torch.export cannot trace is an ExportError naming its
    parts and the first line of why."""
    def why(error: Exception) -> str:
        text = str(error).strip()
        return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
    try:
        return export_onnx(model, path, label_map_size=label_map_size, portable=portable)
    except Exception as error:
        if portable:
            raise ExportError(f"torch.export cannot trace {model.config.describe()} ({why(error)})") from None
        print(f"ONNX Runtime's fused attention does not cover {model.config.describe()} ({why(error)}): standard "
              f"operators instead, as with --portable")
    try:
        return export_onnx(model, path, label_map_size=label_map_size, portable=True)
    except Exception as error:
        raise ExportError(f"torch.export cannot trace {model.config.describe()} ({why(error)})") from None


def quantize_int8(source: str | Path, target: str | Path, calibration: list[torch.Tensor] | None = None) -> None:
    """onnxruntime's quantization to int8. Without `calibration`, dynamic: int8 weights of the convolutions
    and matrix products, their inputs quantised at run time. With calibration inputs ((3, H, W) normalised
    images), static: the activation ranges seen on them (min to max) fix the scale of every convolution's
    and matrix product's input, weights per output channel, written as QuantizeLinear/DequantizeLinear
    pairs that ONNX Runtime fuses into int8 kernels. Its pre-processing first folds the decoder's per-level
    weights (computed from parameters in the graph) into constants, which the quantizer needs."""
    import tempfile

    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Inputs(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter({"pixel_values": x[None].numpy()} for x in calibration)

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared))
        if calibration is None:
            quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8)
        else:
            quantize_static(str(prepared), str(target), Inputs(), quant_format=QuantFormat.QDQ, per_channel=True,
                            op_types_to_quantize=["Conv", "MatMul"], activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8)


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


def check_images(folder: str | None, size: int, count: int = 8, split: str = "test") -> list[torch.Tensor]:
    """Normalised (3, size, size) inputs: the first `count` images of a folder, or generated scenes of `split`.
    A folder without images is a DataError naming it."""
    if folder:
        files = sorted(p for p in Path(folder).rglob("*") if is_image_file(p))[:count]
        if not files:
            raise DataError(f"{folder}: no images in it")
        images = [read_image(p) for p in files]
    else:
        from data.synthetic import SyntheticScenes
        scenes = SyntheticScenes(split, length=count)
        images = [to_tensor(scenes[i][0]) for i in range(count)]
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


def write_sidecars(spec, out: Path) -> None:
    """What a service needs beside the graph: the preprocessing, the class names, the colours."""
    write_preprocessor_config(out, size=spec.size, reduce_labels=spec.reduce_labels, bands=spec.bands)
    write_json({str(i): name for i, name in spec.id2label.items()}, out / "id2label.json")
    write_json([list(c) for c in spec.palette], out / "palette.json")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, weights file or hub id")
    p.add_argument("--out", required=True, help="output folder (model.onnx and its side files)")
    p.add_argument("--label-map", action="store_true",
                   help="uint8 image in, label map at the image's size out (preprocessing and argmax in the graph)")
    p.add_argument("--size", type=int, help="the model input size of --label-map (default: the checkpoint's "
                                            "preprocessor_config.json, else 512)")
    p.add_argument("--portable", action="store_true",
                   help="standard ONNX operators only, for runtimes other than ONNX Runtime (default: attention as "
                        "ONNX Runtime's fused MultiHeadAttention, 4-7%% faster there)")
    p.add_argument("--int8", nargs="?", const="dynamic", choices=["dynamic", "static"],
                   help="also write model.int8.onnx and report its mask agreement with fp32: dynamic (the default; "
                        "no data) or static (calibrated; the fast one)")
    p.add_argument("--calibration-images", metavar="DIR",
                   help=f"--int8 static: the first {CALIBRATION_COUNT} images of this folder (recursively) set the "
                        "activation ranges; use images like the ones the model will see (default: generated "
                        "training scenes, right only for the built-in demo data)")
    p.add_argument("--check-images", metavar="DIR",
                   help="a folder of images for the int8 agreement (default: generated test scenes)")
    p.add_argument("--trust-code", action="store_true",
                   help="import the code from outside this project that the checkpoint names as a part of its model")
    return p.parse_args(argv)


def export_checkpoint(checkpoint: str, out: Path, *, label_map: bool = False, size: int | None = None,
                      portable: bool = False, int8: str | None = None, calibration_folder: str | None = None,
                      check_folder: str | None = None, trust_code: bool = False):
    """Everything main does; returns the ONNXProgram. A problem is a UserError naming it."""
    facts = describe(checkpoint)
    spec, _ = decide_labels(checkpoint=facts, size=size)  # input size, label reduction, names, colours
    model = SegFormer.from_pretrained(facts, trust_code=trust_code).eval()
    size = spec.size
    if size < MIN_SIDE:
        raise ConfigError(f"--size {size}: at least {MIN_SIDE}")
    if spec.bands is not None and (label_map or int8):
        raise ConfigError(f"{checkpoint} reads {spec.bands.count}-band images at full precision: --label-map and "
                          f"--int8 take 8-bit RGB images; export the logits graph (without them), which takes the "
                          f"bands normalised as preprocessor_config.json says")
    if int8 and label_map:
        raise ConfigError("--int8 goes with the logits graph (export without --label-map)")
    if calibration_folder and int8 != "static":
        raise ConfigError("--calibration-images goes with --int8 static")
    calibration = inputs = None
    if int8:  # read before the export, so that a folder without images stops it at once
        if int8 == "static":
            calibration = check_images(calibration_folder, size, count=CALIBRATION_COUNT, split="train")
        inputs = check_images(check_folder, size)
    if facts.temperature and not label_map:  # calibration.json: logits / T, baked into the classifier
        classifier = getattr(model.decoder, "classifier", None)
        if not isinstance(classifier, torch.nn.Conv2d):
            raise ExportError(f"{checkpoint}: its decoder {model.config.decoder} has no `classifier` convolution to "
                              f"divide by the temperature of calibration.json; move that file aside to export")
        with torch.no_grad():
            classifier.weight /= facts.temperature
            if classifier.bias is not None:
                classifier.bias /= facts.temperature
        print(f"the logits are divided by the temperature {facts.temperature:.4g} of calibration.json (in the graph)")
    path = writable_folder(out) / "model.onnx"
    print(f"exporting {checkpoint} ({model.config.describe()}, {model.config.num_labels} classes) "
          f"to {path} ...")
    program = export_any(model, path, label_map_size=size if label_map else None, portable=portable)
    if not label_map:
        try:
            bands = model.config.in_channels
            worst = check_logits(model, path, [(1, bands, size, size), (2, bands, 320, 480)])
        except Exception as e:  # a graph that runs at the traced size only, an operator ORT lacks
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{path}: ONNX Runtime cannot run the graph of {model.config.describe()} at every size "
                              f"({first})") from None
        print(f"ONNX Runtime vs eager, 1x{bands}x{size}x{size} and 2x{bands}x320x480: max |logits difference| "
              f"{worst:.2e}")
        if worst > 1e-4:
            raise ExportError(f"{path} does not reproduce the model (max difference {worst:.2e} > 1e-4)")
    write_sidecars(spec, out)
    if int8:
        quantize_int8(path, out / "model.int8.onnx", calibration)
        agreement = mask_agreement(path, out / "model.int8.onnx", inputs)
        calibrated = "" if calibration is None else f", calibrated on {len(calibration)} " + \
            (f"images of {calibration_folder}" if calibration_folder else "generated training scenes")
        checked = f"images of {check_folder}" if check_folder else "generated test scenes"
        print(f"int8 ({int8}{calibrated}): {out / 'model.int8.onnx'}; its label maps agree with fp32 on "
              f"{100 * agreement:.2f}% of pixels ({checked})")
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} in {out}/")
    return program


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        export_checkpoint(args.checkpoint, Path(args.out), label_map=args.label_map, size=args.size,
                          portable=args.portable, int8=args.int8, calibration_folder=args.calibration_images,
                          check_folder=args.check_images, trust_code=args.trust_code)
    except UserError as e:  # the message names the file, key or flag
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
