"""The OpenVINO runtime: the model converted by `openvino.convert_model` straight from PyTorch (no ONNX in
between: measured as fast, benchmarks/bench_runtimes.py), written as OpenVINO IR (model.xml + model.bin), and
run by OpenVINO's CPU plugin in the precision it was exported for:

    python export.py --checkpoint runs/synthetic/best --out ov/ --runtime openvino                    # fp32
    python export.py --checkpoint runs/synthetic/best --out ov/ --runtime openvino --precision bf16
    python export.py --checkpoint runs/synthetic/best --out ov/ --runtime openvino --precision int8 \\
        --calibration-images photos/
    python infer.py --checkpoint ov/model.xml photo.jpg                       # or serve.py --checkpoint ov/model.xml

Precisions (the IR's weights are fp32 in every case; the precision is how the CPU runs it, kept in the IR's
runtime info and applied when it is loaded):
  fp32  forced explicitly: on a CPU with bf16 (AMX, AVX512-BF16) OpenVINO would otherwise run in bf16
  bf16  OpenVINO's bf16 inference precision: matrix products and convolutions in bf16 (AMX), where the CPU
        has it; on one without, OpenVINO runs fp32 and says so here
  int8  NNCF's post-training quantization in its transformer mode (LayerNorm, softmax and GELU stay in
        float, SmoothQuant on the matrix products' inputs), calibrated on the images the user gives; the
        attention's spatial reductions, the first two patch embeddings and the classifier stay in float
        (what it takes for >= 99% of the labels, KEPT_IN_FLOAT), the float operations in fp32

The IR has a dynamic batch, height and width; the runner compiles it once per input shape it meets (a
static shape is 1.3-1.4x faster on OpenVINO's CPU plugin than the dynamic graph) and keeps the last few.
openvino and nncf are an optional dependency (`pip install -e ".[openvino]"`), imported here only.
"""

import contextlib
import io
import logging
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, ExportError, first_line
from ..files import writable_folder
from .graph import (GraphModel, bake_temperature, check_parity, check_size, example_input, label_agreement,
                    write_side_files)

PRECISIONS = ("fp32", "bf16", "int8")
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # INFERENCE_PRECISION_HINT of the float operations
CALIBRATION_COUNT = 32  # images NNCF calibrates the int8 scales on (more than ONNX's 16: SmoothQuant's too)
SHAPES_KEPT = 4  # compiled input shapes the runner keeps
RT_INFO = ["segformer", "precision"]  # where model.xml keeps the precision it was exported for
# int8: the layers kept in float, measured on the demo checkpoint and the 4 ADE20K sample photos
# (benchmarks/bench_runtimes.py --int8-scopes): with every convolution and matrix product int8, the label maps
# agree with fp32 on 92.7% of the photos' pixels; the attention's spatial-reduction convolutions (their 8x8,
# 4x4, 2x2 kernels sum 64, 16, 4 pixels of a channel into one key: the widest reductions in the model) in
# float give 97.3%, and the first two patch embeddings too (the first reads the image itself) 99.2%. The
# classifier decides the labels: float as well.
KEPT_IN_FLOAT = [".*classifier.*", ".*attn\\.sr.*", ".*stages\\.[01]\\.patch_embed.*"]


def openvino():
    try:
        import openvino as ov
    except ImportError:
        raise ConfigError("the OpenVINO runtime needs openvino: pip install -e \".[openvino]\"") from None
    return ov


def bf16_supported(core) -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 on this CPU (AMX or AVX512-BF16)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def compile_options(precision: str, threads: int | None) -> dict:
    """The CPU plugin's settings for a precision: the inference precision, latency mode, threads."""
    options = {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        options["INFERENCE_NUM_THREADS"] = threads
    return options


# ---- the writer ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def upsampling_by_interpolation(model: torch.nn.Module):
    """The stock decoder's coarse levels upsampled by three resamplings, not one matrix product, while the
    graph is traced: OpenVINO runs the resamplings in bf16 but that product in fp32, with layout conversions
    around it (14 of B0's 62 ms at 512x512 in bf16; 3 ms as resamplings). Other decoders as they are."""
    decoder = getattr(model, "decoder", None)
    saved = getattr(decoder, "upsampling", None)
    if saved is not None:
        decoder.upsampling = "interpolate"
    try:
        yield
    finally:
        if saved is not None:
            decoder.upsampling = saved


def convert(model: torch.nn.Module):
    """openvino.Model of `model` (in eval mode): pixel_values (?, C, ?, ?) -> logits."""
    ov = openvino()
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            upsampling_by_interpolation(model):
        warnings.simplefilter("ignore")
        graph = ov.convert_model(model.eval(), example_input=example_input(model),
                                 input=[ov.PartialShape([-1, model.config.in_channels, -1, -1])])
    graph.inputs[0].get_tensor().set_names({"pixel_values"})
    graph.outputs[0].get_tensor().set_names({"logits"})
    return graph


def quantize(graph, calibration: list[torch.Tensor], kept_in_float: list[str] = KEPT_IN_FLOAT):
    """NNCF's int8 post-training quantization of an openvino.Model, calibrated on (C, H, W) inputs, the layers
    whose names match `kept_in_float` (regular expressions) left in float."""
    try:
        import nncf
    except ImportError:
        raise ConfigError("--precision int8 needs nncf: pip install -e \".[openvino]\"") from None
    logging.getLogger("nncf").setLevel(logging.ERROR)
    data = nncf.Dataset([x[None].numpy() for x in calibration])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return nncf.quantize(graph, data, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calibration),
                             ignored_scope=nncf.IgnoredScope(patterns=kept_in_float, validate=False))


def write(model: torch.nn.Module, facts, out: Path, options):
    """export.py's OpenVINO export of a model loaded for inference: model.xml/.bin in `options.precision`,
    checked (fp32 against eager at two shapes; bf16 and int8 by their label maps' agreement with fp32 on
    `options.check_folder`'s images), with the side files. Returns the path of model.xml."""
    precision = options.precision or "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision}: OpenVINO writes {', '.join(PRECISIONS)}")
    for flag, asked in (("--label-map", options.label_map), ("--portable", options.portable),
                        ("--int8", options.int8)):
        if asked:
            raise ConfigError(f"{flag} is the ONNX export's; OpenVINO writes the logits graph (int8: --precision int8)")
    if options.calibration_folder and precision != "int8":
        raise ConfigError("--calibration-images goes with --precision int8")
    check_size(facts)
    if facts.bands is not None and precision == "int8":
        raise ConfigError(f"{facts.source} reads {facts.bands.count}-band images: --precision int8 calibrates on "
                          f"8-bit RGB images; export fp32 or bf16")
    ov = openvino()
    core = ov.Core()
    calibration = inputs = None
    if precision != "fp32":  # read before the conversion, so that a folder without images stops it at once
        if precision == "int8":
            calibration = options.images(options.calibration_folder, facts.size, count=CALIBRATION_COUNT,
                                         split="train")
        inputs = options.images(options.check_folder, facts.size)
    bake_temperature(model, facts)
    path = writable_folder(out) / "model.xml"
    print(f"converting {facts.source} ({model.config.describe()}, {model.config.num_labels} classes) for OpenVINO "
          f"{ov.__version__} ...")
    try:
        graph = convert(model)
    except Exception as e:
        first = first_line(e)
        raise ExportError(f"openvino.convert_model cannot convert {model.config.describe()} ({first})") from None
    fp32 = OpenVinoModel.from_graph(graph, "fp32")
    check_parity(fp32, model, facts, path, "OpenVINO fp32")
    if precision == "int8":
        graph = quantize(graph, calibration)
    graph.set_rt_info(precision, RT_INFO)
    ov.save_model(graph, path, compress_to_fp16=False)  # fp16 weights would change the fp32 graph's logits
    write_side_files(facts, out)
    if precision != "fp32":
        candidate = OpenVinoModel(path)
        agreement = label_agreement(fp32, candidate, inputs)
        checked = f"images of {options.check_folder}" if options.check_folder else "generated test scenes"
        calibrated = "" if calibration is None else f", calibrated on {len(calibration)} " + \
            (f"images of {options.calibration_folder}" if options.calibration_folder else "generated training scenes")
        runs = "" if precision != "bf16" or bf16_supported(core) else \
            " (this CPU has no bf16: OpenVINO runs it in fp32 here)"
        print(f"{precision}{calibrated}{runs}: its label maps agree with fp32 on {100 * agreement:.2f}% of pixels "
              f"({checked})")
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} in {out}/")
    return path


# ---- the runner ---------------------------------------------------------------------------------------------

class OpenVinoModel(GraphModel):
    """model.xml run by OpenVINO's CPU plugin in the precision it was exported for: pixel_values (B, C, H, W)
    -> logits (B, K, H/4, W/4), compiled once per input shape (the last SHAPES_KEPT kept)."""
    runtime = "OpenVINO's CPU plugin"

    def __init__(self, path: str | Path, *, threads: int | None = None):
        ov = openvino()
        path = Path(path)
        if not path.is_file() or not path.with_suffix(".bin").is_file():
            raise CheckpointError(f"{path}: no such OpenVINO model (model.xml and model.bin, from export.py "
                                  f"--runtime openvino)")
        self.core = ov.Core()
        try:
            graph = self.core.read_model(path)
        except Exception as e:  # not an IR, truncated, weights that do not match
            raise CheckpointError(f"{path}: OpenVINO cannot read it ({str(e).strip().splitlines()[0]})") from None
        super().__init__(path)
        precision = graph.get_rt_info(RT_INFO).astype(str) if graph.has_rt_info(RT_INFO) else "fp32"
        if precision not in PRECISIONS:
            raise CheckpointError(f"{path}: runtime info segformer/precision {precision!r}, expected one of "
                                  f"{', '.join(PRECISIONS)}")
        self._setup(graph, precision, threads)

    @classmethod
    def from_graph(cls, graph, precision: str, threads: int | None = None) -> "OpenVinoModel":
        """A runner of an openvino.Model in memory (the writer's check), without side files."""
        model = cls.__new__(cls)
        model.core, model.path, model.id2label = openvino().Core(), None, {}
        model._setup(graph, precision, threads)
        return model

    def _setup(self, graph, precision: str, threads: int | None) -> None:
        self.graph, self.precision = graph, precision
        self.options = compile_options(precision, threads)
        self.compiled = OrderedDict()  # input shape -> compiled model

    def compiled_for(self, shape: tuple):
        """The graph compiled for one input shape (static shapes: faster than the dynamic graph)."""
        if shape not in self.compiled:
            graph = self.graph.clone()
            graph.reshape({graph.inputs[0]: list(shape)})
            self.compiled[shape] = self.core.compile_model(graph, "CPU", self.options)
            while len(self.compiled) > SHAPES_KEPT:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(shape)
        return self.compiled[shape]

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.detach().float().cpu().contiguous()
        compiled = self.compiled_for(tuple(x.shape))
        # the input read in place (it lives through the call); the output is OpenVINO's copy, ours to keep
        return torch.from_numpy(compiled(x.numpy(), share_inputs=True, share_outputs=False)[0])


def load(source: str | Path, *, trust_code: bool = False, threads: int | None = None):
    """(OpenVinoModel, what the files beside it say). No code is imported from an IR: `trust_code` has
    nothing to allow."""
    model = OpenVinoModel(source, threads=threads)
    return model, model.facts()
