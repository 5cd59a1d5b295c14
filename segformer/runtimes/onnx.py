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
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import CheckpointError, ConfigError, ExportError
from ..files import writable_folder
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD
from .graph import (GraphModel, bake_temperature, check_parity, check_size, dynamic_shapes, example_input,
                    label_agreement, largest_difference, write_side_files)
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
    if label_map_size:
        graph, example, names = LabelMapGraph(model, label_map_size).eval(), \
            torch.randint(0, 256, (2, 3, 96, 128), dtype=torch.uint8), (["image"], ["label_map"])
    else:
        graph, example, names = model, example_input(model), (["pixel_values"], ["logits"])
    translations = None if portable else attention_as_onnxruntime_operator()
    log = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=names[0], output_names=names[1],
                                    dynamic_shapes=dynamic_shapes(names[0][0]),
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
    return largest_difference(OnnxModel.run_session(onnx_session(path)), model, shapes)


def mask_agreement(reference: Path, candidate: Path, inputs: list[torch.Tensor]) -> float:
    """The fraction of pixels whose class the two graphs agree on (label maps at the logits' size)."""
    return label_agreement(OnnxModel.run_session(onnx_session(reference)),
                           OnnxModel.run_session(onnx_session(candidate)), inputs)


def write(model: nn.Module, facts, out: Path, options) -> "torch.onnx.ONNXProgram":
    """export.py's ONNX export of a model loaded for inference (`facts`: its ModelFacts; `options`: the
    ExportOptions asked for): the graph, checked against the model, its side files and, with `options.int8`,
    model.int8.onnx with its agreement measured. Returns the ONNXProgram. A problem is a UserError naming it."""
    size, label_map, int8 = facts.size, options.label_map, options.int8
    check_size(facts)
    if model.config.attention == "tome":
        raise ExportError(f"{facts.source} merges tokens (attention tome): how many depends on the image size, "
                          f"which torch.export cannot bound for a graph of every size; export it at the size you "
                          f"serve, from Python: torch.onnx.export(model, (torch.randn(1, 3, H, W),), 'tome.onnx', "
                          f"dynamo=True), or export the same weights without it (attention efficient)")
    if options.precision:
        raise ConfigError("--precision goes with --runtime openvino (ONNX's int8: --int8 static or dynamic)")
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
    if not label_map:
        bake_temperature(model, facts)
    path = writable_folder(out) / "model.onnx"
    print(f"exporting {facts.source} ({model.config.describe()}, {model.config.num_labels} classes) "
          f"to {path} ...")
    program = export_any(model, path, label_map_size=size if label_map else None, portable=options.portable)
    if not label_map:
        check_parity(OnnxModel.run_session(onnx_session(path)), model, facts, path, "ONNX Runtime")
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


class OnnxModel(GraphModel):
    """The logits graph of export.py: pixel_values (B, 3, H, W) -> logits (B, K, H/4, W/4), on the CPU."""
    runtime = "ONNX Runtime's CPU provider"

    def __init__(self, path: str | Path, *, threads: int | None = None):
        self.session = onnx_session(path, threads)
        inputs = [i.name for i in self.session.get_inputs()]
        if inputs != ["pixel_values"]:
            raise CheckpointError(f"{path}: a graph with inputs {inputs}; this needs export.py's logits graph "
                                  f"(pixel_values -> logits), not --label-map")
        super().__init__(path)
        self.run = self.run_session(self.session)

    @staticmethod
    def run_session(session):
        """A session of the logits graph as a function of tensors."""
        def run(pixel_values: torch.Tensor) -> torch.Tensor:
            feed = {"pixel_values": pixel_values.detach().float().cpu().numpy()}
            return torch.from_numpy(session.run(None, feed)[0])
        return run

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.run(pixel_values)


def load(source: str | Path, *, trust_code: bool = False, threads: int | None = None):
    """(OnnxModel, what the files beside the graph say). The temperature is in the graph already: not
    applied again. No code is imported from a graph: `trust_code` has nothing to allow."""
    model = OnnxModel(source, threads=threads)
    return model, model.facts()
