"""Every runtime a deployer would pick, ours against the reference (transformers' model, exported its own
way) on the same weights: one table to choose from.

    python benchmarks/bench_runtimes.py                                   # B0, random weights, 150 classes, 512
    python benchmarks/bench_runtimes.py --checkpoint runs/synthetic/best \\
        --images ../shared/data/ade20k-samples/images --sizes 512 1024 --aoti --executorch
    python benchmarks/bench_runtimes.py --checkpoint runs/synthetic/best --images DIR --int8-scopes

Rows are runtime x precision: eager fp32 and bf16 (autocast), torch.compile (--compile), ONNX Runtime fp32
and static int8, OpenVINO fp32, bf16 and int8 (NNCF), AOTInductor (--aoti) and ExecuTorch with XNNPACK
(--executorch). Each row builds our model's graph as export.py does (segformer/runtimes/) and the
reference's as a deployer would: transformers' model through the TorchScript ONNX exporter (as optimum and
most deployers do) for ONNX Runtime and OpenVINO's ONNX path, `openvino.convert_model` on the PyTorch
model, torch.export for AOTInductor and ExecuTorch, and the same quantizers and settings. Every graph runs
at a static shape where its runtime gains from one (OpenVINO compiles per shape: ours does so by itself).

Timing: one call of every path per round, the order reversed every other round, so a machine whose speed
drifts slows every path alike; the table gives each side's median and the median of the rounds' paired
ratios (reference / ours, > 1: we are faster). Agreement: the share of pixels whose class the row's graph
(ours) gives as our eager fp32 model does, on --images (default: generated test scenes) at the model's
input size. Memory: the peak resident memory of one call above what the process held before it (Linux:
/proc/self/clear_refs resets the peak), that is the runtime's working memory for the activations.
(Memory at the first size only, torch.compile's left out: its process holds the compiler's.)
--int8-scopes instead prints the int8 agreement of OpenVINO for several choices of what stays in float.
"""

import argparse
import contextlib
import gc
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from export import check_images  # noqa: E402
from segformer import SegFormer  # noqa: E402
from segformer.device import autocast  # noqa: E402
from segformer.runtimes import graph as graphs  # noqa: E402
from segformer.runtimes import load_for_inference  # noqa: E402


def rss_mb(field: str = "VmRSS") -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":")) / 1024


def call_memory(run, x) -> float:
    """The peak resident memory of a path's first two calls above the resident set before them (MB): in a
    fresh process (main's --memory-of), where no earlier path left memory for this one to reuse."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) back to the current resident set
    before = rss_mb()
    run(x), run(x)
    return rss_mb("VmHWM") - before


def memory_in_children(args, names, size: int, tmp: Path) -> dict:
    """{(row, side): MB}, each measured in a process of its own that builds that row only (the graphs
    written once in `tmp` are reused)."""
    import subprocess
    flags = [f for f in sys.argv[1:] if f not in ("--memory",)]
    out = {}
    for name in names:
        for side in ("ours", "reference"):
            done = subprocess.run([sys.executable, __file__, *flags, "--memory-of", name, side, str(size), str(tmp)],
                                  capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            out[name, side] = float(lines[-1]) if done.returncode == 0 and lines else float("nan")
    return out


class Reference(torch.nn.Module):
    """transformers' model as pixel_values -> logits, what its exports trace."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, SimpleNamespace(in_channels=model.config.num_channels)

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def export_reference_onnx(reference, path: Path) -> None:
    """transformers' model through the TorchScript-based exporter, as optimum and most deployers do."""
    x = torch.randn(1, 3, 128, 128)
    with quiet():
        torch.onnx.export(reference, (x,), str(path), input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"}}, opset_version=17,
                          dynamo=False)


def onnx_runner(path: Path, threads: int):
    from segformer.runtimes.onnx import OnnxModel, onnx_session
    return OnnxModel.run_session(onnx_session(path, threads, spinning=False))


class Rows:
    """name -> (ours, reference): functions of a (1, 3, S, S) input, built lazily by `add`."""

    def __init__(self, args, ours, reference, calibration, tmp: Path):
        self.args, self.ours, self.reference, self.calibration, self.tmp = args, ours, reference, calibration, tmp
        self.rows, self.notes, self.names = {}, {}, []

    def add(self, name, build):
        self.names.append(name)  # every row this run could have, for --only's check
        if self.args.only and name not in (self.args.only, "eager fp32"):
            return
        print(f"  building {name} ...", flush=True)
        started = time.perf_counter()
        try:
            self.rows[name] = build()
        except Exception as e:  # a runtime that cannot take one of the two models: said in the table
            first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            self.notes[name] = f"{type(e).__name__}: {first}"
            print(f"    failed: {self.notes[name]}")
        print(f"    {time.perf_counter() - started:.0f} s", flush=True)


def openvino_rows(rows: Rows, size: int):
    import openvino as ov

    from segformer.runtimes.onnx import export_onnx
    from segformer.runtimes.openvino import OpenVinoModel, convert, quantize, upsampling_by_interpolation
    args, ours, reference = rows.args, rows.ours, rows.reference
    with torch.no_grad(), quiet():
        ref_graph = ov.convert_model(Reference(reference).eval(), example_input=torch.randn(2, 3, 96, 128),
                                     input=[ov.PartialShape([-1, 3, -1, -1])])
    our_graph = convert(ours)
    for precision in ("fp32", "bf16"):
        rows.add(f"OpenVINO {precision}", lambda p=precision: (OpenVinoModel.from_graph(our_graph, p, args.threads),
                                                               OpenVinoModel.from_graph(ref_graph, p, args.threads)))
    if not (rows.tmp / "ours.openvino.onnx").exists():  # the graph convert() traces, through ONNX
        with upsampling_by_interpolation(ours):
            export_onnx(ours, rows.tmp / "ours.openvino.onnx", portable=True)
    rows.add("OpenVINO bf16, from the ONNX graphs", lambda: (
        OpenVinoModel.from_graph(ov.convert_model(str(rows.tmp / "ours.openvino.onnx")), "bf16", args.threads),
        OpenVinoModel.from_graph(ov.convert_model(str(rows.tmp / "reference.onnx")), "bf16", args.threads)))
    if not args.no_int8:
        # calibrated at the timed size: NNCF gives transformers' token-major graph per-token scales (of the
        # calibration's token count), so its int8 graph runs at the calibration's size only; ours has
        # per-channel scales and runs at any size (its agreement is measured at the model's own)
        calibration = [F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
                       for x in rows.calibration[:16]]
        rows.add("OpenVINO int8 (NNCF)", lambda: (
            OpenVinoModel.from_graph(quantize(our_graph, calibration), "int8", args.threads),
            OpenVinoModel.from_graph(quantize(ref_graph, calibration), "int8", args.threads)))


def aoti_rows(rows: Rows):
    from segformer.runtimes.aoti import load_package, trace
    out = {}
    for side, model in (("ours", rows.ours), ("reference", Reference(rows.reference).eval())):
        path = rows.tmp / f"{side}.pt2"
        if not path.exists():
            with quiet():
                torch._inductor.aoti_compile_and_package(trace(model), package_path=str(path))
        out[side] = load_package(path)
    return out["ours"], out["reference"]


def executorch_rows(rows: Rows, size: int):
    from segformer.runtimes.executorch import load_program, lower
    out = {}
    for side, model in (("ours", rows.ours), ("reference", Reference(rows.reference).eval())):
        path = rows.tmp / f"{side}.{size}.pte"
        if not path.exists():
            path.write_bytes(lower(model, size))
        out[side] = load_program(path)
    return out["ours"], out["reference"]


def build(args, ours, reference, calibration, tmp: Path, size: int) -> Rows:
    from segformer.runtimes.onnx import export_onnx, quantize_int8
    rows = Rows(args, ours, reference, calibration, tmp)

    def eager(model, amp="off"):
        def run(x):
            with torch.no_grad(), autocast("cpu", amp):
                return model(x).float()
        return run

    ref = Reference(reference).eval()
    rows.add("eager fp32", lambda: (eager(ours), eager(ref)))
    rows.add("eager bf16 (autocast)", lambda: (eager(ours, "bf16"), eager(ref, "bf16")))
    if args.compile:
        import torch._inductor.config as inductor
        inductor.freezing = True  # PyTorch's own recommendation for CPU inference
        rows.add("torch.compile (Inductor, frozen)", lambda: (eager(torch.compile(ours)), eager(torch.compile(ref))))
    if not (tmp / "ours.onnx").exists():
        export_onnx(ours, tmp / "ours.onnx")
        export_onnx(ours, tmp / "ours.portable.onnx", portable=True)
        export_reference_onnx(ref, tmp / "reference.onnx")
        if not args.no_int8:
            for side in ("ours", "reference"):
                quantize_int8(tmp / f"{side}.onnx", tmp / f"{side}.int8.onnx", calibration)
    rows.add("ONNX Runtime fp32", lambda: (onnx_runner(tmp / "ours.onnx", args.threads),
                                           onnx_runner(tmp / "reference.onnx", args.threads)))
    if not args.no_int8:
        rows.add("ONNX Runtime int8 (static)", lambda: (onnx_runner(tmp / "ours.int8.onnx", args.threads),
                                                        onnx_runner(tmp / "reference.int8.onnx", args.threads)))
    openvino_rows(rows, size)
    if args.aoti:
        rows.add("AOTInductor (.pt2)", lambda: args.cache.setdefault("aoti", aoti_rows(rows)))
    if args.executorch:
        rows.add("ExecuTorch XNNPACK (.pte)", lambda: executorch_rows(rows, size))
    return rows


def agreement(rows: Rows, images: list[torch.Tensor], size_of_images: int, size: int) -> dict:
    """Each row's agreement of ours with our eager fp32 on the images (a static graph of another size: its
    program at the images' size is built for this, once)."""
    expected = rows.rows["eager fp32"][0]
    out = {}
    for name, (run, _) in rows.rows.items():
        if name.startswith("ExecuTorch") and size != size_of_images:
            from segformer.runtimes.executorch import load_program, lower
            path = rows.tmp / f"ours.{size_of_images}.pte"
            if not path.exists():
                path.write_bytes(lower(rows.ours, size_of_images))
            run = load_program(path)
        try:
            out[name] = graphs.label_agreement(expected, run, images)
        except Exception:  # torch.compile with frozen weights does not recompile for another size
            out[name] = float("nan")
    return out


def shown(agreement: float) -> str:
    """An agreement for the table; '-' where the path could not run at the images' size."""
    return "-" if math.isnan(agreement) else f"{100 * agreement:.2f}%"


def time_rows(rows: Rows, x: torch.Tensor, rounds: int) -> dict:
    paths = [(name, side, fn) for name, pair in rows.rows.items() for side, fn in zip(("ours", "reference"), pair)]
    for _, _, fn in paths:  # warm up: compilation per shape, caches
        fn(x), fn(x)
    times = {(name, side): [] for name, side, _ in paths}
    for round_ in range(rounds):
        for name, side, fn in paths[::1 if round_ % 2 == 0 else -1]:
            start = time.perf_counter()
            fn(x)
            times[name, side].append(time.perf_counter() - start)
    return times


def int8_scopes(args, ours, images, calibration) -> None:
    """OpenVINO int8's agreement with fp32 for several choices of the layers kept in float."""
    from segformer.runtimes import openvino as runtime
    graph = runtime.convert(ours)
    fp32 = runtime.OpenVinoModel.from_graph(graph, "fp32", args.threads)
    choices = {"every convolution and matrix product int8": [],
               "classifier": [".*classifier.*"],
               "classifier, attention's q and k": [".*classifier.*", ".*attn\\.q/.*", ".*attn\\.k/.*"],
               "classifier, spatial reductions": [".*classifier.*", ".*attn\\.sr.*"],
               "classifier, stage 1 (all of it)": [".*classifier.*", ".*stages\\.0\\..*"],
               "classifier, spatial reductions, stage 1's patch embedding":
                   [".*classifier.*", ".*attn\\.sr.*", ".*stages\\.0\\.patch_embed.*"],
               "KEPT_IN_FLOAT: classifier, spatial reductions, stages 1-2's patch embeddings": runtime.KEPT_IN_FLOAT}
    print(f"\n{'kept in float':76}{'agreement with fp32':>20}")
    for name, patterns in choices.items():
        quantized = runtime.quantize(graph, calibration, kept_in_float=patterns)
        candidate = runtime.OpenVinoModel.from_graph(quantized, "int8", args.threads)
        print(f"{name:76}{100 * graphs.label_agreement(fp32, candidate, images):>19.2f}%", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a checkpoint to load (default: a random-weight --model)")
    parser.add_argument("--model", default="b0", help="variant b0..b5 with random weights (default b0)")
    parser.add_argument("--num-labels", type=int, default=150, help="its classes (default 150, ADE20K)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512], help="input sides timed (default 512)")
    parser.add_argument("--images", help="images for the agreement (default: generated test scenes)")
    parser.add_argument("--calibration-images", help="images the int8 rows are calibrated on (default: generated "
                                                     "training scenes)")
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime (default 2)")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds, one call of every path each")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (minutes to compile)")
    parser.add_argument("--aoti", action="store_true", help="also AOTInductor (minutes to compile, each side)")
    parser.add_argument("--executorch", action="store_true", help="also ExecuTorch (a minute or two per size)")
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 rows")
    parser.add_argument("--only", metavar="ROW", help="only this row (and eager fp32, the reference of the "
                                                      "agreement), by its name in the table")
    parser.add_argument("--work", help="a folder for the exported graphs, reused when run again (default: a new "
                                       "temporary one)")
    parser.add_argument("--memory", action="store_true",
                        help="also each path's working memory, each measured in a fresh process (minutes)")
    parser.add_argument("--memory-of", nargs=4, metavar=("ROW", "SIDE", "SIZE", "TMP"), help=argparse.SUPPRESS)
    parser.add_argument("--int8-scopes", action="store_true",
                        help="only OpenVINO int8's agreement for several choices of what stays in float")
    args = parser.parse_args()
    args.cache = {}
    args.only = args.memory_of[0] if args.memory_of else args.only
    torch.set_num_threads(args.threads)
    from transformers import SegformerForSemanticSegmentation
    torch.manual_seed(0)
    if args.checkpoint:
        ours, facts = load_for_inference(args.checkpoint, runtime="eager")
        model_size, what = facts.size, args.checkpoint
    else:
        ours, model_size = SegFormer.from_variant(args.model, num_labels=args.num_labels).eval(), 512
        what = f"random-weight {args.model}, {args.num_labels} classes"
    tmp = Path(args.memory_of[3] if args.memory_of else args.work or tempfile.mkdtemp())
    tmp.mkdir(parents=True, exist_ok=True)
    ours.save_pretrained(tmp / "model")
    with quiet():
        reference = SegformerForSemanticSegmentation.from_pretrained(tmp / "model").eval()
    images = check_images(args.images, model_size, count=16)
    # int8 is calibrated on other images than the agreement is measured on: --calibration-images, else
    # generated training scenes (export.py's default)
    calibration = check_images(args.calibration_images, model_size, count=32, split="train")
    print(f"{what}; {args.threads} threads; torch {torch.__version__}; agreement on "
          f"{len(images)} {'images of ' + args.images if args.images else 'generated test scenes'} at "
          f"{model_size}x{model_size}", flush=True)
    if args.int8_scopes:
        return int8_scopes(args, ours, images, calibration)
    if args.memory_of:  # a child of memory_in_children: one row, one side
        name, side, size, _ = args.memory_of
        rows = build(args, ours, reference, calibration, tmp, int(size))
        run = rows.rows[name][("ours", "reference").index(side)]
        print(call_memory(run, torch.randn(1, 3, int(size), int(size))))
        return
    for size in args.sizes:
        print(f"\n{size}x{size}, batch 1:", flush=True)
        rows = build(args, ours, reference, calibration, tmp, size)
        if args.only and args.only not in rows.names:  # a misspelt row ran nothing but eager, without a word
            raise SystemExit(f"error: --only {args.only!r}: no such row in this run; its rows are "
                             + ", ".join(repr(n) for n in rows.names) + " (--compile, --aoti, --executorch add theirs)")
        x = torch.randn(1, 3, size, size)
        expected = rows.rows["eager fp32"][0](x)
        for name, (run, ref_run) in rows.rows.items():  # every fp32 path against our eager first
            ours_diff = (run(x) - expected).abs().max().item()
            ref_diff = (ref_run(x) - expected).abs().max().item()
            print(f"  {name:38} max |logits - our eager fp32|: ours {ours_diff:.1e}, reference {ref_diff:.1e}")
        agree = agreement(rows, images, model_size, size)
        times = time_rows(rows, x, args.rounds)
        measured = [name for name in rows.rows if not name.startswith("torch.compile")]  # not the compiler's
        memory = memory_in_children(args, measured, size, tmp) if args.memory and size == args.sizes[0] else {}
        print(f"\n| {size}x{size}, batch 1, {args.threads} threads | ours | reference | paired ratio | "
              f"agreement with fp32 | call memory, ours / reference |")
        print("|---|---|---|---|---|---|")
        for name in rows.rows:
            mine, theirs = times[name, "ours"], times[name, "reference"]
            ratio = statistics.median(b / a for a, b in zip(mine, theirs))
            used = ((f"{memory[name, 'ours']:.0f} / {memory[name, 'reference']:.0f} MB"
                     if (name, "ours") in memory and (name, "reference") in memory else "-"))  # (--memory, first size)
            print(f"| {name} | {statistics.median(mine) * 1000:.1f} ms | {statistics.median(theirs) * 1000:.1f} ms "
                  f"| {ratio:.2f}x | {shown(agree[name])} | {used} |")
        for name, note in rows.notes.items():
            print(f"| {name} | failed: {note} | | | | |")
        best = min(rows.rows, key=lambda n: statistics.median(times[n, "ours"]))
        best_ref = min(rows.rows, key=lambda n: statistics.median(times[n, "reference"]))
        ours_ms = np.median(times[best, "ours"]) * 1000
        ref_ms = np.median(times[best_ref, "reference"]) * 1000
        print(f"\nours fastest: {best} {ours_ms:.1f} ms; the reference's fastest: {best_ref} {ref_ms:.1f} ms; "
              f"{ref_ms / ours_ms:.2f}x")
        if "ONNX Runtime fp32" in rows.rows:
            fp32_best = min((n for n in rows.rows if "fp32" in n or n.startswith(("AOT", "ExecuTorch"))),
                            key=lambda n: statistics.median(times[n, "ours"]))
            ort_ref = statistics.median(times["ONNX Runtime fp32", "reference"]) * 1000
            print(f"ours fastest fp32: {fp32_best} {statistics.median(times[fp32_best, 'ours']) * 1000:.1f} ms; "
                  f"{ort_ref / (statistics.median(times[fp32_best, 'ours']) * 1000):.2f}x ONNX Runtime on the "
                  f"reference's export")


if __name__ == "__main__":
    main()
