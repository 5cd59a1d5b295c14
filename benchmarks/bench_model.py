"""Ours vs transformers, side by side on the same weights: inference forward and one training step.

    python benchmarks/bench_model.py                    # B0, 512x512, fp32, CPU
    python benchmarks/bench_model.py --device cuda --amp bf16 --compile

Prints the median time of each and the ratio (reference / ours; > 1 means we are faster), and checks
that the two models still agree on the logits before timing anything."""

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, ".")
from segformer import SegFormer, segmentation_loss  # noqa: E402


def timed(fn, *, warmup: int, iters: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="b0")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--num-labels", type=int, default=150)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    from transformers import SegformerForSemanticSegmentation
    torch.manual_seed(0)
    ours = SegFormer.from_variant(args.model, num_labels=args.num_labels)
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        reference = SegformerForSemanticSegmentation.from_pretrained(tmp)
    ours.to(args.device)
    reference.to(args.device)
    dtype = {"off": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    autocast = (torch.autocast(args.device, dtype=dtype) if args.amp != "off" else nullcontext)

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

    xb = torch.randn(2, 3, args.size, args.size, device=args.device)
    labels = torch.randint(0, args.num_labels, (2, args.size, args.size), device=args.device)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-6)
    opt_reference = torch.optim.AdamW(reference.parameters(), lr=1e-6)

    def step_ours():
        with autocast():
            loss = segmentation_loss(run_ours(xb), labels)
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
    rows = [("forward, batch 1", forward_reference, forward_ours)]
    results = []
    for name, ref_fn, our_fn in rows:
        results.append((name, timed(ref_fn, warmup=args.warmup, iters=args.iters, device=args.device),
                        timed(our_fn, warmup=args.warmup, iters=args.iters, device=args.device)))
    ours.train(), reference.train()
    iters = max(3, args.iters // 2)
    results.append(("train step, batch 2", timed(step_reference, warmup=2, iters=iters, device=args.device),
                    timed(step_ours, warmup=2, iters=iters, device=args.device)))

    print(f"{'':22}{'transformers':>14}{'ours':>10}{'speed-up':>10}")
    for name, ref_ms, our_ms in results:
        print(f"{name:22}{ref_ms:>11.1f} ms{our_ms:>7.1f} ms{ref_ms / our_ms:>9.2f}x")


if __name__ == "__main__":
    main()
