"""Ours vs transformers, side by side on the same weights: inference forward and one training step.

    python benchmarks/bench_model.py                    # B0, 512x512, fp32, CPU
    python benchmarks/bench_model.py --device cuda --amp bf16 --compile --batch 8

Calls alternate (reference, ours, reference, ours, ...), so a machine whose speed drifts slows both
alike; prints the median of each and the ratio (reference / ours; > 1 means we are faster), and the
training step's peak memory (CUDA: max_memory_allocated; CPU: resident-set growth, each side in a
fresh process). Checks first that the two models agree on the logits (tests/test_parity.py checks the
training loss and every gradient)."""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, ".")
from segformer import SegFormer, segmentation_loss  # noqa: E402
from segformer.device import AMP_DTYPES, check_device  # noqa: E402
from segformer.errors import ConfigError  # noqa: E402
from segformer.device import autocast as amp_context  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(pairs: dict, *, warmup: int, iters: int, device: str) -> dict:
    """{name: (reference_fn, our_fn)} -> {name: (reference_ms, our_ms)}: medians of alternating calls."""
    results = {}
    for name, functions in pairs.items():
        for fn in functions * warmup:
            fn()
        times = ([], [])
        for _ in range(iters):
            for side, fn in enumerate(functions):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[side].append(time.perf_counter() - start)
        results[name] = tuple(statistics.median(t) * 1000 for t in times)
    return results


def alternating(paths: dict, x, rounds: int) -> dict:
    """{name: fn} -> {name: [seconds of fn(x)]}: each called once to warm up, then all of them once per round,
    the order reversed every other round, so that a machine whose speed drifts slows every path alike."""
    for fn in paths.values():
        fn(x)
    times = {name: [] for name in paths}
    for round_ in range(rounds):
        for name in (list(paths) if round_ % 2 == 0 else list(paths)[::-1]):
            start = time.perf_counter()
            paths[name](x)
            times[name].append(time.perf_counter() - start)
    return times


MEMORY_CHILD = r"""
import sys, tempfile, torch
def peak_mb():  # the resident peak since exec (ru_maxrss would include a large parent's, from before exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024

sys.path.insert(0, {root!r})
from segformer import SegFormer, segmentation_loss
torch.manual_seed(0)
torch.set_num_threads({threads})
model = SegFormer.from_variant({model!r}, num_labels={labels})
if {side!r} == "reference":
    from transformers import SegformerForSemanticSegmentation
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        model = SegformerForSemanticSegmentation.from_pretrained(tmp)
x = torch.randn({batch}, 3, {size}, {size})
labels = torch.randint(0, {labels}, ({batch}, {size}, {size}))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
def step():
    loss = (model(pixel_values=x, labels=labels).loss if {side!r} == "reference"
            else segmentation_loss(model(x), labels, memory_efficient=True))
    loss.backward(); optimizer.step(); optimizer.zero_grad(set_to_none=True)
before = peak_mb()  # model, data, no optimizer state yet
step(), step()
print(peak_mb() - before)
"""


def cpu_step_memory(args, side: str) -> float:
    import subprocess
    code = MEMORY_CHILD.format(root=str(Path(__file__).resolve().parents[1]), threads=torch.get_num_threads(),
                               model=args.model, labels=args.num_labels, side=side, batch=args.batch, size=args.size)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="b0", help="variant b0..b5, random weights (default b0)")
    parser.add_argument("--size", type=int, default=512, help="input height and width (default 512)")
    parser.add_argument("--num-labels", type=int, default=150, help="classes (default 150, ADE20K)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default="off", help="autocast dtype (default off)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--batch", type=int, default=2, help="training-step batch (the forward uses 1)")
    parser.add_argument("--iters", type=int, default=10, help="timed calls of each model, alternating")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    args = parser.parse_args()
    try:
        check_device(args.device)
    except ConfigError as e:
        parser.error(str(e))

    from transformers import SegformerForSemanticSegmentation
    torch.manual_seed(0)
    ours = SegFormer.from_variant(args.model, num_labels=args.num_labels)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        reference = SegformerForSemanticSegmentation.from_pretrained(tmp)
    ours.to(args.device)
    reference.to(args.device)
    def autocast():
        return amp_context(torch.device(args.device).type, args.amp)

    x = torch.randn(1, 3, args.size, args.size, device=args.device)
    with torch.no_grad():
        ours.eval(), reference.eval()
        diff = (ours(x) - reference(pixel_values=x).logits).abs().max().item()
    print(f"{args.model} {args.size}x{args.size} on {args.device}, amp={args.amp}, compile={args.compile}, "
          f"threads={torch.get_num_threads()}; max |logits difference| = {diff:.2e}")

    run_ours = torch.compile(ours) if args.compile else ours
    run_reference = torch.compile(reference) if args.compile else reference

    @torch.no_grad()
    def forward_ours():
        with autocast():
            run_ours(x)

    @torch.no_grad()
    def forward_reference():
        with autocast():
            run_reference(pixel_values=x)

    xb = torch.randn(args.batch, 3, args.size, args.size, device=args.device)
    labels = torch.randint(0, args.num_labels, (args.batch, args.size, args.size), device=args.device)
    # Fused AdamW on both sides: train.py's optimizer, and the Trainer's default (adamw_torch_fused)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-6, fused=True)
    opt_reference = torch.optim.AdamW(reference.parameters(), lr=1e-6, fused=True)

    def step_ours():
        with autocast():
            loss = segmentation_loss(run_ours(xb), labels, memory_efficient=True)  # as train.py computes it
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_reference():
        with autocast():
            loss = run_reference(pixel_values=xb, labels=labels).loss
        loss.backward()
        opt_reference.step()
        opt_reference.zero_grad(set_to_none=True)

    ours.eval(), reference.eval()
    results = interleaved({"forward, batch 1": (forward_reference, forward_ours)}, warmup=args.warmup,
                          iters=args.iters, device=args.device)
    ours.train(), reference.train()
    results.update(interleaved({f"train step, batch {args.batch}": (step_reference, step_ours)}, warmup=1,
                               iters=max(3, args.iters // 2), device=args.device))
    print(f"{'':22}{'transformers':>14}{'ours':>10}{'speed-up':>10}")
    for name, (ref_ms, our_ms) in results.items():
        print(f"{name:22}{ref_ms:>11.1f} ms{our_ms:>7.1f} ms{ref_ms / our_ms:>9.2f}x")
    if args.device.startswith("cuda"):
        peaks = []
        for step in (step_reference, step_ours):
            torch.cuda.reset_peak_memory_stats()
            step()
            peaks.append(torch.cuda.max_memory_allocated() / 2**20)
    elif not args.compile:
        peaks = [cpu_step_memory(args, side) for side in ("reference", "ours")]
    else:
        return
    print(f"{'train step peak memory':22}{peaks[0]:>11.0f} MB{peaks[1]:>7.0f} MB{peaks[0] / peaks[1]:>9.2f}x")


if __name__ == "__main__":
    main()
