"""Where a trained model runs at inference, and loading it there from the library alone.

    import segformer
    model, facts = segformer.load_for_inference("runs/synthetic/best")      # or a hub id, or exported/model.onnx
    predictor = segformer.Predictor(model, **facts.predictor_options)      # input size, bands, temperature
    prediction = predictor(segformer.load_image("photo.jpg"))              # label_map, segments

The `Predictor` (segformer/inference.py) runs any `InferenceModel`: the eager `SegFormer`, or a graph an
export runtime wrote and runs. Each runtime is one module here holding both its writer (`write`: what
export.py calls) and its runner (`load`: what load_for_inference, infer.py and a service call), and one row
of RUNTIMES. Adding a runtime is: a module with `load` and `write`, and a row.
"""

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch

from ..bands import Bands
from ..metrics import NamedClasses, predicted_classes
from ..preprocess import DEFAULT_SIZE
from ..visual import class_colours


@runtime_checkable
class InferenceModel(Protocol):
    """What the Predictor runs: normalised pixel values (B, C, H, W) float -> logits (B, K, ceil(H/4), ceil(W/4)),
    with the classes it predicts; `eval()` and `to(device, memory_format)` as a module has them (a runtime that
    runs on one device only refuses another by a ValueError)."""
    id2label: dict[int, str]

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor: ...

    def eval(self) -> "InferenceModel": ...

    def to(self, device=None, memory_format=None) -> "InferenceModel": ...


@dataclass(frozen=True)
class Runtime:
    """A row of RUNTIMES."""
    name: str  # said in messages and the service's metadata
    module: str  # holds `load(source, *, trust_code, threads) -> (model, facts)` and `write(model, facts, out, options)`
    suffixes: tuple[str, ...] = ()  # the files it runs, by suffix; () for checkpoints
    extra: str | None = None  # the pyproject extra it needs (`pip install -e ".[onnx]"`)
    devices: tuple[str, ...] | None = None  # the devices it runs on; None: any torch device
    torch_module: bool = False  # an nn.Module: channels_last and torch.compile apply to it

    def code(self):
        return importlib.import_module(self.module)

    def device(self, asked: str | None) -> str | None:
        """The device to run on: the one asked for where any goes, else the runtime's own."""
        return asked if self.devices is None else self.devices[0]


RUNTIMES = {
    "eager": Runtime("PyTorch (eager)", "segformer.runtimes.eager", torch_module=True),
    "onnx": Runtime("ONNX Runtime", "segformer.runtimes.onnx", (".onnx",), extra="onnx", devices=("cpu",)),
    "openvino": Runtime("OpenVINO", "segformer.runtimes.openvino", (".xml",), extra="openvino", devices=("cpu",)),
    "aoti": Runtime("AOTInductor", "segformer.runtimes.aoti", (".pt2",), devices=("cpu",)),
    "executorch": Runtime("ExecuTorch (XNNPACK)", "segformer.runtimes.executorch", (".pte",), extra="executorch",
                          devices=("cpu",)),
}


@dataclass(frozen=True)
class ExportOptions:
    """What export.py asks of a runtime's writer (each writer refuses what it cannot do, naming the flag)."""
    label_map: bool = False  # uint8 image in, label map at its size out: pre- and post-processing in the graph
    portable: bool = False  # standard operators only, for any runtime of the format
    int8: str | None = None  # ONNX: "dynamic" or "static" quantization, with its agreement with fp32 measured
    precision: str | None = None  # OpenVINO: "fp32", "bf16" or "int8" (None: fp32)
    calibration_folder: str | None = None  # static int8: images whose activation ranges fix the scales
    check_folder: str | None = None  # int8: images for the agreement
    images: Callable | None = None  # (folder or None, size, *, count, split) -> normalised (3, size, size) inputs


def runtime_of(source: str | Path) -> str:
    """The runtime whose files `source` is (by its suffix); a checkpoint (folder, weights file, hub id): eager."""
    suffix = Path(str(source)).suffix.lower()
    return next((key for key, runtime in RUNTIMES.items() if suffix in runtime.suffixes), "eager")


@dataclass(frozen=True)
class ModelFacts(NamedClasses):
    """What a model loaded for inference says of itself: the classes it predicts and their colours, the input
    size, the label reduction it was trained with, its bands and its calibration."""
    source: str
    runtime: str  # a key of RUNTIMES
    class_names: tuple[str, ...]  # its classifier's classes
    palette: tuple  # one (r, g, b) per predicted class (the binary head: background and the label)
    size: int  # the size asked for, else its preprocessor_config.json's, else the image processor's 512
    reduce_labels: bool = True  # the ADE convention (0 ignored, k -> k-1) it was trained under: its files', else on
    bands: Bands | None = None  # full-precision images of several bands, normalised per band; None: 8-bit RGB
    temperature: float | None = None  # calibration.json: the Predictor divides the logits by it (None: 1, or in the graph)
    checkpoint: object = field(default=None, repr=False)  # segformer.checkpoint.CheckpointFacts (eager), else None

    @property
    def predictor_options(self) -> dict:
        """The Predictor's settings that the model fixes: size, bands, temperature."""
        return {"size": self.size, "bands": self.bands, "temperature": self.temperature}


def load_for_inference(source: str | Path, *, size: int | None = None, trust_code: bool = False,
                       runtime: str | None = None, threads: int | None = None):
    """(model, ModelFacts) of a checkpoint (a folder, a weights file or a hub id) or an exported model (by its
    suffix, through its runtime; `runtime` forces one). size: the input size (default: the model's
    preprocessor_config.json, else 512); trust_code: import code from outside this project that the checkpoint
    names as a part of its model; threads: a runtime's CPU threads. A problem is a UserError naming it."""
    key = runtime or runtime_of(source)
    if key not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {key!r}")
    model, said = RUNTIMES[key].code().load(source, trust_code=trust_code, threads=threads)
    names = tuple(said["class_names"])
    return model, ModelFacts(source=str(source), runtime=key, class_names=names,
                             palette=class_colours(predicted_classes(list(names)), said.get("palette")),
                             size=size or said.get("size") or DEFAULT_SIZE,
                             reduce_labels=said.get("reduce_labels") if said.get("reduce_labels") is not None else True,
                             bands=said.get("bands"), temperature=said.get("temperature"),
                             checkpoint=said.get("checkpoint"))


__all__ = ["ExportOptions", "InferenceModel", "ModelFacts", "RUNTIMES", "Runtime", "load_for_inference", "runtime_of"]
