"""What every exported graph shares, whichever runtime runs it (ONNX Runtime, OpenVINO, AOTInductor,
ExecuTorch): the files written beside it, the calibration's temperature baked into its classifier, the
checks after writing (the logits against eager at two shapes; a lower precision's label maps against fp32),
and the runner's face towards the Predictor (`GraphModel`: the class names, CPU only).

A graph takes normalised pixel values (B, C, H, W) float32 and returns logits (B, K, ceil(H/4), ceil(W/4)),
as `SegFormer.forward` does; what the preprocessing is (input size, normalisation, bands) and what the
classes are, the side files say: preprocessor_config.json, id2label.json, palette.json.
"""

import contextlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint import read_side_files, write_preprocessor_config
from ..errors import CheckpointError, ConfigError, ExportError, first_line
from ..files import write_json
from ..labels import read_id2label

MIN_SIDE = 32  # the first stage's 8x8 key/value reduction needs a map of at least 8 = 32 / 4
# A traced graph serves every size; tracing assumes every stage's reduced key/value map is at least 2 x 2
# (a size of 1 broadcasts differently), which holds from 61 pixels up. Stating it lets torch.export trace
# once instead of failing and retrying (half the export time); the graphs still run 32 x 32 exactly.
TRACE_MIN_SIDE = 61
PARITY_TOLERANCE = 1e-4  # max |graph - eager| over the logits, fp32


def dynamic_shapes(name: str):
    """torch.export's dynamic batch, height and width for the input `name`."""
    batch = torch.export.Dim("batch", max=1024)
    height = torch.export.Dim("height", min=TRACE_MIN_SIDE, max=16384)
    width = torch.export.Dim("width", min=TRACE_MIN_SIDE, max=16384)
    return {name: {0: batch, 2: height, 3: width}}


def example_input(model) -> torch.Tensor:
    """What a graph is traced on: a batch of 2 (a batch of 1 would be specialised), a non-square size."""
    return torch.randn(2, model.config.in_channels, 96, 128)


def bake_temperature(model, facts) -> None:
    """calibration.json's temperature into the classifier (weights and bias divided by it), so that the
    graph's logits are the calibrated ones; nothing without a calibration."""
    if not facts.temperature:
        return
    classifier = getattr(model.decoder, "classifier", None)
    if not isinstance(classifier, torch.nn.Conv2d):
        raise ExportError(f"{facts.source}: its decoder {model.config.decoder} has no `classifier` convolution to "
                          f"divide by the temperature of calibration.json; move that file aside to export")
    with torch.no_grad():
        classifier.weight /= facts.temperature
        if classifier.bias is not None:
            classifier.bias /= facts.temperature
    print(f"the logits are divided by the temperature {facts.temperature:.4g} of calibration.json (in the graph)")


def check_size(facts) -> None:
    if facts.size < MIN_SIDE:
        raise ConfigError(f"--size {facts.size}: at least {MIN_SIDE}")


def largest_difference(run: Callable, model, shapes) -> float:
    """The largest |run(x) - model(x)| over random inputs of the given shapes; a graph that returns another
    shape is a RuntimeError saying so."""
    worst, generator = 0.0, torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = model(x)
        got = run(x)
        if got.shape != expected.shape:
            raise RuntimeError(f"logits of shape {tuple(got.shape)} for {shape}, expected {tuple(expected.shape)}")
        worst = max(worst, (got - expected).abs().max().item())
    return worst


def check_parity(run: Callable, model, facts, path: Path, runtime: str) -> float:
    """The written graph (`run`: pixel values -> logits) against the eager model at the model's size and at
    a batch of 2 of another shape: printed, and an ExportError beyond PARITY_TOLERANCE or where it does not
    run at every size. Returns the largest difference."""
    bands, size = model.config.in_channels, facts.size
    try:
        worst = largest_difference(run, model, [(1, bands, size, size), (2, bands, 320, 480)])
    except Exception as e:  # a graph that runs at the traced size only, an operator the runtime lacks
        first = first_line(e)
        raise ExportError(f"{path}: {runtime} cannot run the graph of {model.config.describe()} at every size "
                          f"({first})") from None
    print(f"{runtime} vs eager, 1x{bands}x{size}x{size} and 2x{bands}x320x480: max |logits difference| {worst:.2e}")
    if worst > PARITY_TOLERANCE:
        raise ExportError(f"{path} does not reproduce the model (max difference {worst:.2e} > {PARITY_TOLERANCE})")
    return worst


def label_agreement(reference: Callable, candidate: Callable, inputs: list[torch.Tensor]) -> float:
    """The fraction of pixels whose class the two runs (pixel values -> logits) agree on, over (C, H, W)
    inputs, at the logits' size."""
    same = total = 0
    for x in inputs:
        ours, theirs = (run(x[None]).argmax(1) for run in (reference, candidate))
        same, total = same + int((ours == theirs).sum()), total + ours.numel()
    return same / total


@contextlib.contextmanager
def native_stderr_quiet():
    """Native code's own notes to the process's stderr (file descriptor 2) held back; errors still come as
    exceptions. Python's sys.stderr is untouched."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def write_side_files(facts, out: Path) -> None:
    """What a service needs beside the graph: the preprocessing, the class names, the colours."""
    write_preprocessor_config(out, size=facts.size, reduce_labels=facts.reduce_labels, bands=facts.bands)
    write_json({str(i): name for i, name in facts.id2label.items()}, out / "id2label.json")
    write_json([list(c) for c in facts.palette], out / "palette.json")


class GraphModel:
    """The Predictor's view of an exported graph, run on the CPU: `id2label` and the side files from beside
    the file at `path` (subclasses add `__call__`: pixel values -> logits)."""
    runtime = "this runtime"  # said when asked for another device

    def __init__(self, path: str | Path):
        path = Path(path)
        names = path.parent / "id2label.json"
        if not names.is_file():
            raise CheckpointError(f"{names}: the class names export.py writes beside the graph are missing")
        self.id2label, self.path = read_id2label(names, error=CheckpointError), path
        self.side_files = read_side_files(path.parent)  # input size, normalisation, colours

    def eval(self) -> "GraphModel":
        return self

    def to(self, device=None, memory_format=None) -> "GraphModel":
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"{type(self).__name__} runs on the CPU ({self.runtime})")  # a caller's mistake
        return self

    def facts(self) -> dict:
        """What load_for_inference reads: the side files and the class names. The temperature is in the graph
        already: not applied again."""
        return {**self.side_files, "class_names": tuple(self.id2label.values()), "temperature": None}
