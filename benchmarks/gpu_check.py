"""One command that runs every CUDA path end to end and fails loudly on any mismatch, then prints a table
of speed and peak memory against transformers.

    PYTHONPATH=. python benchmarks/gpu_check.py              # on a CUDA machine (under 8 minutes on one H100)
    PYTHONPATH=. python benchmarks/gpu_check.py --dry-run    # the same code on the CPU, tiny sizes (the suite)
    PYTHONPATH=. python benchmarks/gpu_check.py --part checks    # or --part runtimes: one half (two short calls)

Checks, each PASS or FAIL with its numbers:
  parity         our logits vs transformers' on the device (fp32, TF32 off), B0..B2
  amp            fp16 training steps with a GradScaler, and bf16 ones: finite losses that fall
  train.py       a short run with --amp bf16 --channels-last --compile, then --resume: the same weights
                 as a straight run
  torchrun       train.py under torchrun with one process (NCCL on CUDA, gloo on the CPU)
  predictor      Predictor on the device vs on the CPU: the same label map (where not a near-tie)
  export         export.py of the trained checkpoint: ONNX Runtime vs eager <= 1e-4
Then: forward and training-step time and peak memory, ours vs transformers, B0..B2 at 512, batch 8 and
16, bf16 autocast, alternating calls, medians. Last, the GPU column of the README's runtime table
(benchmarks/bench_runtimes.py is the CPU's): B0, batch 1, one image's latency at 512 and 1024 on eager
fp32, eager bf16, torch.compile (bf16) and, with --aoti, AOTInductor (a CUDA .pt2, fp32), ours against
transformers on the same runtime, with each row's label agreement with our eager fp32. (Measured on an H200
with torch 2.11+cu130: a CUDA package compiles, and aoti_load_package then segfaults in _load_aoti: a crash
that takes the whole report with it, so the row is asked for, not run by default.)

--dry-run runs all of it on the CPU with 64x64 images, B0 only, batch 2, bf16 in place of fp16 (which
needs CUDA) and torch.compile's "eager" backend (tracing without code generation, seconds not minutes). It
leaves out the export check and the AOTInductor row: exporting is CPU work on any machine, which
tests/test_export.py and tests/test_aoti.py already run. Everything it writes is removed when it ends.
"""

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = []


def check(name):
    """Run a check; record PASS with its summary, or FAIL with the error, and go on to the next."""
    def decorate(fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                summary = fn(*args, **kwargs)
                RESULTS.append((name, "PASS", summary, time.perf_counter() - start))
            except Exception as e:  # every failure is reported, none stops the others
                RESULTS.append((name, "FAIL", f"{type(e).__name__}: {e}", time.perf_counter() - start))
                traceback.print_exc()
        return run
    return decorate


def reference_of(model):
    from transformers import SegformerForSemanticSegmentation
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(io.StringIO()):
        model.save_pretrained(tmp)
        return SegformerForSemanticSegmentation.from_pretrained(tmp)


@check("parity")
def parity(device, variants, size):
    from segformer import SegFormer
    defaults = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    worst = {}
    try:
        for variant in variants:
            torch.manual_seed(0)
            ours = SegFormer.from_variant(variant, num_labels=150).eval()
            reference = reference_of(ours).eval().to(device)
            ours = ours.to(device)
            x = torch.randn(2, 3, size, size + 32, device=device)
            with torch.no_grad():
                worst[variant] = (ours(x) - reference(pixel_values=x).logits).abs().max().item()
            if worst[variant] > 1e-3:
                raise AssertionError(f"{variant}: max |logits difference| {worst[variant]:.2e} > 1e-3")
    finally:  # PyTorch's defaults again, for the rest
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = defaults
    return ", ".join(f"{v} {d:.1e}" for v, d in worst.items())


@check("amp")
def amp_steps(device, size, dtypes):
    from segformer import SegFormer, segmentation_loss
    from segformer.device import autocast
    summary = []
    for name in dtypes:
        torch.manual_seed(0)
        model = SegFormer.from_variant("b0", num_labels=7).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # as train.py builds it
        scaler = torch.amp.GradScaler(device.split(":")[0], enabled=name == "fp16")
        x = torch.randn(2, 3, size, size, device=device)
        labels = (torch.arange(size, device=device)[None, :, None] * 7 // size).expand(2, size, size).contiguous()
        losses = []
        for _ in range(8):
            with autocast(device.split(":")[0], name):
                loss = segmentation_loss(model(x), labels, memory_efficient=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        if not all(torch.isfinite(torch.tensor(losses))) or losses[-1] >= losses[0]:
            raise AssertionError(f"{name}: losses {[round(v, 3) for v in losses]} are not finite and falling")
        summary.append(f"{name} loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return "; ".join(summary)


def train_args(out, size, device, steps):
    return ["--train-split", "train[:16]", "--eval-split", "validation[:4]", "--size", str(size), "--batch-size", "2",
            "--max-steps", str(steps), "--warmup-steps", "1", "--eval-every", str(steps), "--save-every", "2",
            "--log-every", "1", "--device", device, "--out", str(out), "--no-plots"]  # plots: CPU-only work


@check("train.py")
def train_py(device, size, work, dry_run):
    import train
    from safetensors.torch import load_file
    flags = ["--amp", "bf16", "--channels-last", "--compile"]
    if dry_run:  # tracing without code generation, and one block per stage: the same paths in seconds
        compile_ = torch.compile
        torch.compile = lambda model, **kwargs: compile_(model, backend="eager")
        (work / "one_block.json").write_text('{"depths": [1, 1, 1, 1]}')
        flags += ["--model", str(work / "one_block.json")]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            train.execute(train_args(work / "straight", size, device, 4) + flags)
            train.execute(train_args(work / "split", size, device, 2) + flags)
            train.execute(["--resume", str(work / "split" / "checkpoint-2"), "--max-steps", "4"])
            if device != "cpu":  # the run-to-run noise of CUDA's atomic adds: a second straight run
                train.execute(train_args(work / "again", size, device, 4) + flags)
    finally:
        if dry_run:
            torch.compile = compile_
    straight, resumed = (load_file(work / run / "checkpoint-4" / "model.safetensors") for run in ("straight", "split"))
    resume_difference = max((straight[k].float() - resumed[k].float()).abs().max().item() for k in straight)
    if device == "cpu":
        if resume_difference:
            raise AssertionError(f"resumed weights differ from a straight run's by up to {resume_difference:.2e}")
        return "bf16 + channels-last + compile, 4 steps; resume from 2 gives identical weights"
    # on CUDA the backward of the bilinear upsampling (and Inductor's scatter-adds) accumulate with atomic adds,
    # so two straight runs differ too: a resume is exact when it differs from a straight run no more than that
    again = load_file(work / "again" / "checkpoint-4" / "model.safetensors")
    noise = max((straight[k].float() - again[k].float()).abs().max().item() for k in straight)
    if resume_difference > 10 * noise:
        raise AssertionError(f"resumed weights differ from a straight run's by up to {resume_difference:.2e}, "
                             f"two straight runs by {noise:.2e}")
    return (f"bf16 + channels-last + compile, 4 steps; resume from 2 vs straight {resume_difference:.1e}, "
            f"two straight runs {noise:.1e} (CUDA's atomic adds)")


@check("torchrun")
def torchrun(device, size, work):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(ROOT / "train.py"), *train_args(work / "torchrun", size, device, 2)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or "on 1 x" not in done.stdout:
        raise AssertionError(f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return f"{'NCCL' if device.startswith('cuda') else 'gloo'}, 1 process, checkpoint-2 written"


@check("predictor")
def predictor(device, work):
    from segformer import SegFormer
    from segformer.inference import Predictor
    model = SegFormer.from_pretrained(work / "straight" / "checkpoint-4")
    image = torch.randint(0, 256, (3, 211, 317), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    here = Predictor(model, size=64, device=device, tta=True)(image, probabilities=True)
    cpu = Predictor(SegFormer.from_pretrained(work / "straight" / "checkpoint-4"), size=64, device="cpu",
                    tta=True)(image, probabilities=True)
    top2 = cpu.probabilities.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-3
    agree = (here.label_map.cpu() == cpu.label_map)[clear].float().mean().item()
    if agree < 0.999:
        raise AssertionError(f"label maps agree on {100 * agree:.2f}% of clear pixels")
    return f"TTA on {device} vs CPU: {100 * agree:.2f}% of clear pixels agree"


@check("export")
def export_check(work):
    import export
    with contextlib.redirect_stdout(io.StringIO()) as log:
        status = export.main(["--checkpoint", str(work / "straight" / "checkpoint-4"), "--out", str(work / "onnx")])
    if status != 0:
        raise AssertionError(f"export.py exited {status}: {log.getvalue()[-300:]}")
    line = next(line for line in log.getvalue().splitlines() if "max |logits difference|" in line)
    return line.split(": ", 1)[1]


def measure(device, variant, batch, size, iters):
    """(forward ms, step ms, peak GiB), each a (transformers, ours) pair, for one variant and batch."""
    from bench_model import interleaved
    from segformer import SegFormer, segmentation_loss
    torch.manual_seed(0)
    ours = SegFormer.from_variant(variant, num_labels=150)
    reference = reference_of(ours).to(device)
    ours = ours.to(device).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size, device=device)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 150, (batch, size, size), device=device)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-6, fused=True) for m in (reference, ours)]
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16)

    def forward(is_reference):
        with torch.no_grad(), autocast:
            return reference(pixel_values=x) if is_reference else ours(x_cl)

    def step(is_reference):
        with autocast:
            loss = (reference(pixel_values=x, labels=labels).loss if is_reference
                    else segmentation_loss(ours(x_cl), labels, memory_efficient=True))
        loss.backward()
        optimizers[0 if is_reference else 1].step()
        optimizers[0 if is_reference else 1].zero_grad(set_to_none=True)

    reference.eval(), ours.eval()
    times = interleaved({"forward": (lambda: forward(True), lambda: forward(False))}, warmup=2, iters=iters,
                        device=device)
    reference.train(), ours.train()
    times.update(interleaved({"step": (lambda: step(True), lambda: step(False))}, warmup=2,
                             iters=max(2, iters // 2), device=device))
    memory = []
    for is_reference in (True, False):
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        step(is_reference)
        memory.append(torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan"))
    return times["forward"], times["step"], memory


def runtime_table(device, sizes, iters, dry_run, aoti_row=False):
    """{size: [(row, transformers ms, ours ms, agreement)]}: B0 at batch 1 on each runtime of the GPU, both
    models built the same way, alternating calls, medians; agreement: the share of pixels whose class the
    row gives as our eager fp32 does (random weights, 150 classes, on random images)."""
    from bench_model import interleaved
    from bench_runtimes import Reference
    from segformer import SegFormer
    from segformer.device import autocast
    from segformer.runtimes.aoti import trace
    torch.manual_seed(0)
    ours = SegFormer.from_variant("b0", num_labels=150).eval()
    reference = Reference(reference_of(ours)).eval().to(device)
    ours = ours.to(device)

    def eager(model, amp="off"):
        def run(x):
            with torch.no_grad(), autocast(device, amp):
                return model(x).float()
        return run

    def compiled(model):
        return eager(torch.compile(model, dynamic=False, backend="eager" if dry_run else "inductor"), "bf16")

    def aoti(model):
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = torch._inductor.aoti_compile_and_package(
                trace(model, example=torch.randn(2, 3, 256, 256, device=device)), package_path=f"{tmp}/model.pt2")
            runner = torch._inductor.aoti_load_package(path)
        return lambda x: runner(x)

    rows = {"eager fp32": (eager(reference), eager(ours)),
            "eager bf16 (autocast)": (eager(reference, "bf16"), eager(ours, "bf16")),
            "torch.compile bf16": (compiled(reference), compiled(ours))}
    if aoti_row and not dry_run:  # a CPU package is tests/test_aoti.py's
        try:
            rows["AOTInductor fp32 (.pt2)"] = (aoti(reference), aoti(ours))
        except Exception:  # the other rows still measured
            traceback.print_exc()
    table = {}
    for size in sizes:
        x = torch.randn(1, 3, size, size, device=device)
        times = interleaved({name: (lambda r=r: r(x), lambda o=o: o(x)) for name, (r, o) in rows.items()},
                            warmup=3, iters=iters, device=device)
        expected = rows["eager fp32"][1](x).argmax(1)
        table[size] = [(name, *times[name], (our(x).argmax(1) == expected).float().mean().item())
                       for name, (_, our) in rows.items()]
    return table


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the CPU, tiny sizes: every code path, in seconds")
    p.add_argument("--iters", type=int, default=10, help="timed calls per model in the speed tables")
    p.add_argument("--part", choices=["all", "checks", "runtimes"], default="all",
                   help="the checks and the training/forward table, the runtime table, or both (default)")
    p.add_argument("--aoti", action="store_true",
                   help="add an AOTInductor row (a CUDA .pt2); on torch 2.11+cu130 (H200) loading one segfaulted")
    args = p.parse_args()
    if args.dry_run:
        device, variants, batches, size, dtypes = "cpu", ["b0"], [2], 64, ["bf16"]
    elif torch.cuda.is_available():
        device, variants, batches, size, dtypes = "cuda", ["b0", "b1", "b2"], [8, 16], 512, ["fp16", "bf16"]
    else:
        sys.exit("no CUDA device here: run with --dry-run, or on a GPU machine")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    print(f"gpu_check on {name}, torch {torch.__version__}\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:  # checkpoints: 250 MB a run, not left behind
        os.chdir(ROOT)
        run_checks(args, device, variants, batches, size, dtypes, Path(work))


def run_checks(args, device, variants, batches, size, dtypes, work: Path):
    start = time.perf_counter()
    if args.part == "runtimes":
        print_runtime_table(args, device)
        return report(start)
    parity(device, variants, 64 if args.dry_run else 256)
    amp_steps(device, 64 if args.dry_run else 256, dtypes)
    train_py(device, 64 if args.dry_run else 128, work, args.dry_run)
    torchrun(device, 64 if args.dry_run else 128, work)
    predictor(device, work)
    if not args.dry_run:
        export_check(work)
    print(f"\n{'check':12}{'':6}{'seconds':>8}  result")
    for check_name, status, summary, seconds in RESULTS:
        print(f"{check_name:12}{status:6}{seconds:>8.1f}  {summary}")
    rows = [(variant, batch, *measure(device, variant, batch, size, 3 if args.dry_run else args.iters))
            for variant in variants for batch in batches]
    print(f"\n{'':10}{'forward (ms)':>26}{'train step (ms)':>28}{'peak memory (GiB)':>26}")
    print(f"{'':10}{'transformers':>13}{'ours':>7}{'':>6}{'transformers':>13}{'ours':>7}{'':>8}"
          f"{'transformers':>13}{'ours':>7}")
    for variant, batch, (ref_f, our_f), (ref_s, our_s), (ref_m, our_m) in rows:
        print(f"{variant} x{batch:<5}{ref_f:>13.1f}{our_f:>7.1f}{ref_f / our_f:>5.2f}x{ref_s:>13.1f}{our_s:>7.1f}"
              f"{ref_s / our_s:>7.2f}x{ref_m:>13.2f}{our_m:>7.2f}", flush=True)
    if args.part == "all":
        print_runtime_table(args, device)
    report(start)


def print_runtime_table(args, device):
    try:
        table = runtime_table(device, [64, 96] if args.dry_run else [512, 1024], 3 if args.dry_run else args.iters,
                              args.dry_run, args.aoti)
    except Exception as e:
        RESULTS.append(("runtimes", "FAIL", f"{type(e).__name__}: {e}", 0.0))
        traceback.print_exc()
        table = {}
    for table_size, rows_ in table.items():
        flags = ", PyTorch's default precision (fp32 matrix products, TF32 convolutions)" * device.startswith("cuda")
        print(f"\nB0, batch 1, {table_size}x{table_size} on {device}: latency (ms){flags}")
        print(f"{'':26}{'transformers':>13}{'ours':>8}{'ratio':>8}{'agreement':>11}")
        for row, ref_ms, our_ms, agree in rows_:
            print(f"{row:26}{ref_ms:>13.2f}{our_ms:>8.2f}{ref_ms / our_ms:>7.2f}x{100 * agree:>10.2f}%")


def report(start):
    """How many checks passed; exit non-zero naming those that failed."""
    print(f"\n{len([r for r in RESULTS if r[1] == 'PASS'])}/{len(RESULTS)} checks passed in "
          f"{time.perf_counter() - start:.0f} s")
    failed = [r[0] for r in RESULTS if r[1] == "FAIL"]
    if failed:
        sys.exit(f"FAILED: {', '.join(failed)}")


if __name__ == "__main__":
    main()
