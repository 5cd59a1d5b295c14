"""An exported graph (export.py) run by ONNX Runtime where a `SegFormer` would run at inference:

    from segformer.onnx import OnnxModel
    predictor = Predictor(OnnxModel("exported/model.onnx"), size=512)   # every mode and TTA, as with the model

It reads the class names (`id2label.json`), the input size and the class colours written beside the
graph (`OnnxModel.facts`, what a label spec reads, as of a checkpoint). onnxruntime is an optional
dependency (`pip install onnxruntime`), imported here only.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .bands import Bands  # noqa: F401 (the annotation's type)
from .checkpoint import read_side_files
from .errors import CheckpointError


@dataclass(frozen=True)
class ExportFacts:
    """What an export folder says of its graph, as `checkpoint.CheckpointFacts` says it of a checkpoint."""
    source: str
    class_names: tuple[str, ...]
    size: int | None
    reduce_labels: bool | None
    palette: tuple | None
    training_args: Path | None = None
    bands: "Bands | None" = None  # full-precision images of several bands (preprocessor_config.json)
    temperature: float | None = None  # (the export divides the logits by it in the graph: not applied again)
    conflict = None  # the graph's outputs are its classes


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
        self.facts = ExportFacts(source=str(path), class_names=tuple(self.id2label.values()),
                                 **read_side_files(path.parent))

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(None, {"pixel_values": pixel_values.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(logits)

    def eval(self) -> "OnnxModel":
        return self

    def to(self, device=None, memory_format=None) -> "OnnxModel":
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError("OnnxModel runs on the CPU (ONNX Runtime's CPU provider)")  # a caller's mistake
        return self
