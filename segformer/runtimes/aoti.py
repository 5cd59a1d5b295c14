"""The AOTInductor runtime: PyTorch's own package for deployment without Python. The model is traced by
`torch.export` (batch, height and width dynamic), compiled ahead of time by Inductor into a shared library
of C++ kernels with its weights, and packaged as one `.pt2` file; `torch._inductor.aoti_load_package` runs it
from Python, and the same file runs from C++ (`torch::inductor::AOTIModelPackageLoader`) with libtorch
alone:

    python export.py --checkpoint runs/synthetic/best --out aoti/ --runtime aoti      # aoti/model.pt2
    python infer.py --checkpoint aoti/model.pt2 --trust-code photo.jpg

A package is native code: infer.py and serve.py load one only with --trust-code (as they import code a
checkpoint names). Compiled for the CPU it is exported on (its instruction set: a package built with
AVX-512 needs a CPU with it), in fp32. Compiling takes a few minutes for B0 on two cores (a C++ compiler is needed: gcc or clang).
"""

import contextlib
import io
import logging
import warnings
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError, ExportError, first_line
from ..files import writable_folder
from .graph import GraphModel, bake_temperature, check_parity, check_size, dynamic_shapes, example_input, \
    write_side_files


def refuse_onnx_flags(options, runtime: str) -> None:
    """A writer of the logits graph in fp32 refuses the flags of the ONNX export and of OpenVINO's precisions."""
    for flag, asked in (("--label-map", options.label_map), ("--portable", options.portable),
                        ("--int8", options.int8), ("--calibration-images", options.calibration_folder),
                        ("--precision", options.precision not in (None, "fp32"))):
        if asked:
            raise ConfigError(f"{flag} is not {runtime}'s: it writes the fp32 logits graph")


def trace(model: torch.nn.Module, *, dynamic: bool = True, example: torch.Tensor | None = None):
    """torch.export's ExportedProgram of `model` in eval mode: pixel_values -> logits (batch, height and
    width dynamic, or the example's shape)."""
    example = example_input(model) if example is None else example
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return torch.export.export(model.eval(), (example,),
                                   dynamic_shapes=dynamic_shapes("pixel_values") if dynamic else None)


def write(model: torch.nn.Module, facts, out: Path, options):
    """export.py's AOTInductor export: model.pt2 with the side files, checked against eager at two shapes.
    Returns the path of model.pt2."""
    refuse_onnx_flags(options, "AOTInductor")
    check_size(facts)
    bake_temperature(model, facts)
    path = writable_folder(out) / "model.pt2"
    print(f"compiling {facts.source} ({model.config.describe()}, {model.config.num_labels} classes) with "
          f"AOTInductor (minutes) ...")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime": none needed
    try:
        program = trace(model)
        # compile_threads=1: Inductor compiles in this process, with no pool of compile workers left behind in
        # a service's or a test worker's process (measured: no slower on two cores)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                torch._inductor.config.patch(compile_threads=1):
            warnings.simplefilter("ignore")
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as e:
        first = first_line(e)
        raise ExportError(f"AOTInductor cannot compile {model.config.describe()} ({type(e).__name__}: {first})") \
            from None
    check_parity(load_package(path), model, facts, path, "AOTInductor")
    write_side_files(facts, out)
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} in {out}/")
    return path


def load_package(path: Path):
    """The compiled model of a .pt2 as a function of tensors; a file that is not one is a CheckpointError."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such AOTInductor package (model.pt2, from export.py --runtime aoti)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner = torch._inductor.aoti_load_package(str(path))
    except Exception as e:  # not a package, built for another CPU or PyTorch
        first = first_line(e)
        raise CheckpointError(f"{path}: AOTInductor cannot load it ({first})") from None

    def run(pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return runner(pixel_values.detach().float().cpu().contiguous())
    return run


class AotiModel(GraphModel):
    """model.pt2 of export.py --runtime aoti: pixel_values (B, C, H, W) -> logits (B, K, H/4, W/4), any batch
    and size, on the CPU."""
    runtime = "the CPU it was compiled for"

    def __init__(self, path: str | Path, *, threads: int | None = None):
        self.run = load_package(Path(path))
        super().__init__(path)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.run(pixel_values)


def load(source: str | Path, *, trust_code: bool = False, threads: int | None = None):
    """(AotiModel, what the files beside it say). A package is a compiled shared library: loading it runs
    its native code, so it is loaded only with `trust_code` (--trust-code), as code named by a checkpoint is.
    `threads` are torch's own (torch.set_num_threads)."""
    if not trust_code:
        raise CheckpointError(f"{source}: an AOTInductor package is compiled code that runs when it is loaded; "
                              f"load one you built or trust with --trust-code")
    model = AotiModel(source, threads=threads)
    return model, model.facts()
