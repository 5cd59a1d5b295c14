"""Activation checkpointing (`train.py --grad-checkpointing`): the memory a training step takes at a high
resolution, with and without, each step in a fresh process, the two in alternating order.

    python benchmarks/bench_checkpointing.py                      # B0, 1024x1024, batch 2, CPU
    python benchmarks/bench_checkpointing.py --variant b1 --size 1216 --device cuda

One step: forward in training mode, the training loss (the fused cross-entropy train.py uses), backward.
Memory: on the CPU, the growth of the process's resident peak (VmHWM) over the step; on CUDA, the peak of
allocated memory. Time: the step's seconds. Each row: the median of --runs runs, and the median ratio of
each pair (checkpointed / plain).
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
def peak_mb():  # the resident peak since exec
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
sys.path.insert(0, {root!r})
from segformer import SegFormer, segmentation_loss
torch.manual_seed(0)
torch.set_num_threads({threads})
device = torch.device({device!r})
model = SegFormer.from_variant({variant!r}, num_labels=150).to(device).train()
model.encoder.set_grad_checkpointing({checkpointing})
x = torch.randn({batch}, 3, {size}, {size}, device=device)
labels = torch.randint(0, 150, ({batch}, {size}, {size}), device=device)
if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
before, start = peak_mb(), time.perf_counter()
segmentation_loss(model(x), labels, memory_efficient=True).backward()
if device.type == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
memory = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_mb() - before
print(json.dumps({{"memory_mb": memory, "seconds": seconds}}))
"""


def step(args, checkpointing: bool) -> dict:
    code = CHILD.format(root=str(ROOT), threads=args.threads, device=args.device, variant=args.variant,
                        checkpointing=checkpointing, batch=args.batch, size=args.size)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the child failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="b0", help="b0..b5 (default b0)")
    p.add_argument("--size", type=int, default=1024, help="image height and width (default 1024)")
    p.add_argument("--batch", type=int, default=2, help="images per step (default 2)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on the CPU (default 2)")
    p.add_argument("--runs", type=int, default=2, help="pairs of steps, alternating which goes first (default 2)")
    args = p.parse_args()
    results = {False: [], True: []}
    for run in range(args.runs):
        for checkpointing in ((False, True) if run % 2 == 0 else (True, False)):
            results[checkpointing].append(step(args, checkpointing))
    print(f"{args.variant}, {args.size}x{args.size}, batch {args.batch}, {args.device}: one training step")
    for checkpointing, label in ((False, "plain"), (True, "--grad-checkpointing")):
        memory = [r["memory_mb"] for r in results[checkpointing]]
        seconds = [r["seconds"] for r in results[checkpointing]]
        print(f"  {label:22} memory {statistics.median(memory):8.0f} MB ({', '.join(f'{m:.0f}' for m in memory)})"
              f"   time {statistics.median(seconds):6.1f} s ({', '.join(f'{s:.1f}' for s in seconds)})")
    ratios = [(c["memory_mb"] / p["memory_mb"], c["seconds"] / p["seconds"]) for p, c in zip(*results.values())]
    print(f"  checkpointed / plain: memory {statistics.median(r[0] for r in ratios):.2f}x, time "
          f"{statistics.median(r[1] for r in ratios):.2f}x")


if __name__ == "__main__":
    main()
