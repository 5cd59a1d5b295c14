"""The ExecuTorch runtime: the model for phones and embedded devices. Traced by `torch.export` at one input
shape (1, C, size, size), lowered to ExecuTorch's edge dialect with every operator XNNPACK takes delegated to
XNNPACK (its CPU kernels for ARM and x86), and written as one `.pte` program that ExecuTorch's C++ runtime
(Android, iOS, Linux) runs with no Python and no PyTorch; here its Python bindings run it:

    python export.py --checkpoint runs/synthetic/best --out et/ --runtime executorch     # et/model.pte
    python infer.py --checkpoint et/model.pte photo.jpg

The shape is static (ExecuTorch plans every buffer ahead for its largest shape; a mobile app feeds one
size): the runner takes inputs of that height and width only (any batch, one image at a time), which the
Predictor's resize and sliding-window modes give; `--mode whole` at another size is refused, naming it. fp32.
A .pte holds operators of ExecuTorch's own kernel library, no code: loading one runs none.
"""

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, ExportError, first_line
from ..files import writable_folder
from .aoti import refuse_onnx_flags, trace
from .graph import (PARITY_TOLERANCE, GraphModel, bake_temperature, check_size, largest_difference,
                    native_stderr_quiet, write_side_files)


def quiet_imports() -> None:
    """torch's note on an enum of torchao (which executorch imports), once per process: not the user's."""
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def executorch_runtime():
    quiet_imports()
    try:
        with native_stderr_quiet():  # its CPU probe's notes on this machine's /sys files
            from executorch.runtime import Runtime
            return Runtime.get()
    except ImportError:
        raise ConfigError("the ExecuTorch runtime needs executorch: pip install -e \".[executorch]\"") from None


def lower(model: torch.nn.Module, size: int) -> bytes:
    """The .pte program of `model` at input (1, C, size, size), delegated to XNNPACK where it takes it."""
    quiet_imports()
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        raise ConfigError("--runtime executorch needs executorch: pip install -e \".[executorch]\"") from None
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    from .openvino import upsampling_by_interpolation
    with upsampling_by_interpolation(model):  # resamplings, which XNNPACK runs, not our matrix product
        program = trace(model, dynamic=False, example=torch.randn(1, model.config.in_channels, size, size))
    # Weights computed from parameters (Mix-FFN's 1x1 convolutions from its linear weights, the decoder's
    # folded level maps) become constants: XNNPACK delegates only convolutions of constant weights, and the
    # rest ran in ExecuTorch's portable kernels, 40x slower than the reference's whole model.
    program = constant_prop_pass(program)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        return to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def write(model: torch.nn.Module, facts, out: Path, options):
    """export.py's ExecuTorch export: model.pte (at the model's input size) with the side files, checked
    against eager. Returns the path of model.pte."""
    refuse_onnx_flags(options, "ExecuTorch")
    check_size(facts)
    bake_temperature(model, facts)
    path = writable_folder(out) / "model.pte"
    print(f"lowering {facts.source} ({model.config.describe()}, {model.config.num_labels} classes) to ExecuTorch "
          f"with XNNPACK at 1x{model.config.in_channels}x{facts.size}x{facts.size} ...")
    try:
        path.write_bytes(lower(model, facts.size))
    except ConfigError:
        raise
    except Exception as e:
        first = first_line(e)
        raise ExportError(f"ExecuTorch cannot lower {model.config.describe()} ({type(e).__name__}: {first})") \
            from None
    run = load_program(path)
    shape = (2, model.config.in_channels, facts.size, facts.size)
    worst = largest_difference(run, model, [shape])
    print(f"ExecuTorch (XNNPACK) vs eager, {'x'.join(map(str, shape))}: max |logits difference| {worst:.2e}")
    if worst > PARITY_TOLERANCE:
        raise ExportError(f"{path} does not reproduce the model (max difference {worst:.2e} > {PARITY_TOLERANCE})")
    write_side_files(facts, out)
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} in {out}/")
    return path


def load_program(path: Path):
    """A .pte's forward as a function of tensors (B, C, H, W) at its one height and width, a batch run one
    image at a time; another size is a ConfigError naming both."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such ExecuTorch program (model.pte, from export.py --runtime executorch)")
    runtime = executorch_runtime()
    try:
        with native_stderr_quiet():
            method = runtime.load_program(str(path)).load_method("forward")
        expected = tuple(method.metadata.input_tensor_meta(0).sizes())
    except Exception as e:  # not a program, from another ExecuTorch, an operator this build lacks
        first = first_line(e)
        raise CheckpointError(f"{path}: ExecuTorch cannot load it ({first})") from None

    def run(pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.detach().float().cpu().contiguous()
        if tuple(x.shape[1:]) != expected[1:]:
            raise ConfigError(f"{path} takes {'x'.join(map(str, expected[1:]))} inputs (exported at that size), "
                             f"got {'x'.join(map(str, x.shape[1:]))}: use --mode resize or sliding")
        return torch.cat([method.execute([image[None]])[0] for image in x])
    run.input_shape = expected[2:]
    return run


class ExecuTorchModel(GraphModel):
    """model.pte of export.py --runtime executorch: pixel_values (B, C, size, size) -> logits, on the CPU."""
    runtime = "ExecuTorch's XNNPACK CPU backend"

    def __init__(self, path: str | Path, *, threads: int | None = None):
        self.run = load_program(Path(path))
        super().__init__(path)
        height, width = self.run.input_shape
        self.input_side = height if height == width else None  # the Predictor runs it at that size only

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.run(pixel_values)


def load(source: str | Path, *, trust_code: bool = False, threads: int | None = None):
    """(ExecuTorchModel, what the files beside it say). No code is imported from a program."""
    model = ExecuTorchModel(source, threads=threads)
    return model, model.facts()
