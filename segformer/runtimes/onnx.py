"""The ONNX Runtime runtime: export.py's graphs written (`write`) and run (`load`, `OnnxModel`) where a
`SegFormer` would run at inference:

    model, facts = segformer.load_for_inference("exported/model.onnx")      # the class names, size, colours beside it
    predictor = Predictor(model, **facts.predictor_options)               # every mode and TTA, as with the model

The graph: batch, height and width dynamic; attention as ONNX Runtime's fused MultiHeadAttention operator
(or standard operators only, `portable`); checked against the eager model at two shapes after writing; int8
by onnxruntime's quantization (dynamic, or static on calibration images) with its label maps' agreement with
fp32 measured. Beside it: preprocessor_config.json, id2label.json, palette.json. onnxruntime, onnx and
onnxscript are an optional dependency (`pip install -e ".[onnx]"`), imported here only.
"""

import contextlib
import io
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import read_side_files, write_preprocessor_config
from ..errors import CheckpointError, ConfigError, ExportError
from ..files import writable_folder, write_json
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD

MIN_SIDE = 32  # the first stage's 8x8 key/value reduction needs a map of at least 8 = 32 / 4
# The traced graph serves every size; tracing assumes every stage's reduced key/value map is at least 2 x 2
# (a size of 1 broadcasts differently), which holds from 61 pixels up. Stating it lets torch.export trace
# once instead of failing and retrying (half the export time); ONNX Runtime still runs 32 x 32 exactly.
TRACE_MIN_SIDE = 61
CALIBRATION_COUNT = 16  # images whose activation ranges fix the static int8 scales


# ---- the writer ---------------------------------------------------------------------------------------------

class LabelMapGraph(nn.Module):
    """uint8 RGB images -> label maps at their own size: preprocessing, model and post-processing."""

    def __init__(self, model: nn.Module, size: int):
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


def export_onnx(model: nn.Module, path: str | Path, *, label_map_size: int | None = None, portable: bool = False):
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


def export_any(model: nn.Module, path: Path, *, label_map_size: int | None, portable: bool):
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


def check_logits(model: nn.Module, path: Path, shapes) -> float:
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


def mask_agreement(reference: Path, candidate: Path, inputs: list[torch.Tensor]) -> float:
    """The fraction of pixels whose class the two graphs agree on (label maps at the logits' size)."""
    a, b = onnx_session(reference), onnx_session(candidate)
    same = total = 0
    for x in inputs:
        feed = {"pixel_values": x[None].numpy()}
        ours, theirs = (np.asarray(s.run(None, feed)[0]).argmax(1) for s in (a, b))
        same, total = same + int((ours == theirs).sum()), total + ours.size
    return same / total

def write(model: nn.Module, facts, out: Path, options) -> "torch.onnx.ONNXProgram":
    """export.py's ONNX export of a model loaded for inference (`facts`: its ModelFacts; `options`: the
    ExportOptions asked for): the graph, checked against the model, its side files and, with `options.int8`,
    model.int8.onnx with its agreement measured. Returns the ONNXProgram. A problem is a UserError naming it."""
    size, label_map, int8 = facts.size, options.label_map, options.int8
    if size < MIN_SIDE:
        raise ConfigError(f"--size {size}: at least {MIN_SIDE}")
    if facts.bands is not None and (label_map or int8):
        raise ConfigError(f"{facts.source} reads {facts.bands.count}-band images at full precision: --label-map and "
                          f"--int8 take 8-bit RGB images; export the logits graph (without them), which takes the "
                          f"bands normalised as preprocessor_config.json says")
    if int8 and label_map:
        raise ConfigError("--int8 goes with the logits graph (export without --label-map)")
    if options.calibration_folder and int8 != "static":
        raise ConfigError("--calibration-images goes with --int8 static")
    calibration = inputs = None
    if int8:  # read before the export, so that a folder without images stops it at once
        if int8 == "static":
            calibration = options.images(options.calibration_folder, size, count=CALIBRATION_COUNT, split="train")
        inputs = options.images(options.check_folder, size)
    if facts.temperature and not label_map:  # calibration.json: logits / T, baked into the classifier
        classifier = getattr(model.decoder, "classifier", None)
        if not isinstance(classifier, torch.nn.Conv2d):
            raise ExportError(f"{facts.source}: its decoder {model.config.decoder} has no `classifier` convolution to "
                              f"divide by the temperature of calibration.json; move that file aside to export")
        with torch.no_grad():
            classifier.weight /= facts.temperature
            if classifier.bias is not None:
                classifier.bias /= facts.temperature
        print(f"the logits are divided by the temperature {facts.temperature:.4g} of calibration.json (in the graph)")
    path = writable_folder(out) / "model.onnx"
    print(f"exporting {facts.source} ({model.config.describe()}, {model.config.num_labels} classes) "
          f"to {path} ...")
    program = export_any(model, path, label_map_size=size if label_map else None, portable=options.portable)
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
    write_side_files(facts, out)
    if int8:
        quantize_int8(path, out / "model.int8.onnx", calibration)
        agreement = mask_agreement(path, out / "model.int8.onnx", inputs)
        calibrated = "" if calibration is None else f", calibrated on {len(calibration)} " + \
            (f"images of {options.calibration_folder}" if options.calibration_folder else "generated training scenes")
        checked = f"images of {options.check_folder}" if options.check_folder else "generated test scenes"
        print(f"int8 ({int8}{calibrated}): {out / 'model.int8.onnx'}; its label maps agree with fp32 on "
              f"{100 * agreement:.2f}% of pixels ({checked})")
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} in {out}/")
    return program


def write_side_files(facts, out: Path) -> None:
    """What a service needs beside the graph: the preprocessing, the class names, the colours."""
    write_preprocessor_config(out, size=facts.size, reduce_labels=facts.reduce_labels, bands=facts.bands)
    write_json({str(i): name for i, name in facts.id2label.items()}, out / "id2label.json")
    write_json([list(c) for c in facts.palette], out / "palette.json")


# ---- the runner ---------------------------------------------------------------------------------------------

def onnx_session(path: str | Path, threads: int | None = None, *, spinning: bool = True):
    """An ONNX Runtime CPU session with every graph optimisation (operator fusions, NCHWc layouts);
    `threads` sets its intra-op threads; `spinning=False` lets them sleep as soon as a call ends instead
    of busy-waiting for the next one (for benchmarks that alternate runtimes). Errors name the file."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise CheckpointError(f"{path}: running an ONNX graph needs onnxruntime: pip install onnxruntime") from None
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such ONNX file")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # not ONNX, truncated, an unknown operator
        raise CheckpointError(f"{path}: ONNX Runtime cannot load it ({str(e).strip().splitlines()[0]})") from None


class OnnxModel:
    """The logits graph of export.py: pixel_values (B, 3, H, W) -> logits (B, K, H/4, W/4), on the CPU."""

    def __init__(self, path: str | Path, *, threads: int | None = None):
        path = Path(path)
        self.session = onnx_session(path, threads)
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs != ["pixel_values"]:
            raise CheckpointError(f"{path}: a graph with inputs {inputs}; this needs export.py's logits graph "
                                  f"(pixel_values -> logits), not --label-map")
        names = path.parent / "id2label.json"
        if not names.is_file():
            raise CheckpointError(f"{names}: the class names export.py writes beside the graph are missing")
        try:
            id2label = {int(k): str(v) for k, v in json.loads(names.read_text()).items()}
        except (ValueError, AttributeError) as e:
            raise CheckpointError(f"{names}: expected {{\"0\": \"name\", ...}} ({e})") from None
        self.id2label, self.path = dict(sorted(id2label.items())), path
        self.side_files = read_side_files(path.parent)  # input size, normalisation, colours

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(None, {"pixel_values": pixel_values.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(logits)

    def eval(self) -> "OnnxModel":
        return self

    def to(self, device=None, memory_format=None) -> "OnnxModel":
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError("OnnxModel runs on the CPU (ONNX Runtime's CPU provider)")  # a caller's mistake
        return self


def load(source: str | Path, *, trust_code: bool = False, threads: int | None = None):
    """(OnnxModel, what the files beside the graph say). The temperature is in the graph already: not
    applied again. No code is imported from a graph: `trust_code` has nothing to allow."""
    model = OnnxModel(source, threads=threads)
    return model, {**model.side_files, "class_names": tuple(model.id2label.values()), "temperature": None}
