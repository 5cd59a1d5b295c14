"""Parameters, counted FLOPs, latency and peak memory of B0..B5, next to the paper's Table 1, and of
variants with other parts beside them.

    python benchmarks/model_report.py                      # 512x512, batch 1, CPU, every variant
    python benchmarks/model_report.py --variants b0 b1 --size 1024
    python benchmarks/model_report.py --variants b0 --parts attention=linear attention=full decoder=mmseg

FLOPs are counted by torch.utils.flop_counter.FlopCounterMode (2 per multiply-add) on one forward, for
our model and for the textbook decoder (the reference's arithmetic: upsample 4D channels, then the
4D -> D fuse conv); the paper counts multiply-adds (mmcv's counter), so its figure compares with the
reference's count / 2. Latency is the median of eager forwards (channels-last), and the fraction of the
machine's peak is counted FLOPs / latency against (a) the nominal peak (cores x clock x FMA width, read
from lscpu) and (b) the rate of a large matrix product measured here. Peak memory is the growth of the
resident set during one forward, each variant in a fresh process. With --parts, the models of one variant
(SegFormer's and each with other parts) are timed in alternating order, round after round, and each row
also gives the median of its per-round latency ratio to SegFormer's.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_model import alternating  # noqa: E402
from segformer import SegFormer  # noqa: E402

# The paper's Table 1 (ADE20K): parameters (M) and GFLOPs (multiply-adds) at the size given.
PAPER = {"b0": (3.8, 8.4, 512), "b1": (13.7, 15.9, 512), "b2": (27.5, 62.4, 512), "b3": (47.3, 79.0, 512),
         "b4": (64.1, 95.7, 512), "b5": (84.7, 183.3, 640)}

MEMORY_CHILD = r"""
import sys, torch
def peak_mb():  # the resident peak since exec (ru_maxrss would include a large parent's, from before exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
sys.path.insert(0, {root!r})
from segformer import SegFormer
torch.set_num_threads({threads})
model = SegFormer.from_variant({variant!r}, num_labels={labels}, **{parts!r}).eval()
model = model.to(memory_format=torch.channels_last)
x = torch.randn(1, 3, {size}, {size}).contiguous(memory_format=torch.channels_last)
before = peak_mb()
with torch.no_grad():
    model(x)
print(peak_mb() - before)
"""


def count_flops(fn) -> float:
    """FLOPs of one call, attention included: the CPU's fused attention kernel has no FLOP formula in
    FlopCounterMode, so attention runs as its math decomposition (matrix products) while counting."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        fn()
    return counter.get_total_flops()


def nominal_peak(threads: int) -> tuple[float, str]:
    """cores x GHz x FLOPs per cycle (two FMA units: 64 with AVX-512, 32 with AVX2), from lscpu."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return float("nan"), "lscpu not available"
    flags = next((line for line in text.splitlines() if line.startswith("Flags:")), "")
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model name")), "")
    ghz = float(model.split("@")[1].strip().rstrip("GHz")) if "@" in model else float("nan")
    per_cycle = 64 if " avx512f" in flags else 32 if " avx2" in flags else 16
    return threads * ghz * per_cycle, f"{threads} cores x {ghz} GHz x {per_cycle} FLOP/cycle ({model})"


def gemm_rate(threads: int) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048 ** 3 / min(times) / 1e9


def parse_parts(text: str) -> dict:
    """'attention=linear,decoder=mmseg' -> {"attention": "linear", "decoder": "mmseg"}."""
    try:
        return dict(item.split("=", 1) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected part=name[,part=name], got {text!r}") from None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(PAPER), help="variants to report (default b0..b5)")
    p.add_argument("--parts", nargs="+", type=parse_parts, default=[],
                   help="also these models of each variant, e.g. attention=linear decoder=mmseg "
                        "attention=full,decoder=mmseg (segformer/parts.py names the parts)")
    p.add_argument("--size", type=int, default=512, help="input height and width (default 512)")
    p.add_argument("--labels", type=int, default=150, help="classes (default 150)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=5, help="timed forwards per model; the median is kept")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    peak, how = nominal_peak(args.threads)
    measured = gemm_rate(args.threads)
    print(f"{args.size}x{args.size}, batch 1, {args.labels} classes, {args.threads} threads, torch {torch.__version__}")
    print(f"nominal peak {peak:.0f} GFLOP/s ({how}); a 2048^3 matrix product reaches {measured:.0f} GFLOP/s\n")
    header = (f"{'':28}{'params':>9}{'paper':>7}{'GFLOPs':>9}{'textbook':>10}{'paper':>11}{'latency':>10}"
              f"{'vs':>7}{'of peak':>9}{'of GEMM':>9}{'memory':>9}")
    print(header + "\n" + f"{'':28}{'(M)':>9}{'(M)':>7}{'ours':>9}{'decoder':>10}{'GMACs':>11}{'(ms)':>10}"
          f"{'b_i':>7}{'':>9}{'':>9}{'(MB)':>9}")
    rows = []
    x = torch.randn(1, 3, args.size, args.size)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    for variant in args.variants:
        models = {}
        for parts in [{}] + args.parts:
            models[tuple(parts.items())] = SegFormer.from_variant(variant, num_labels=args.labels, **parts).eval()
        with torch.no_grad():  # timed in alternating order, round after round
            times = alternating({name: model.to(memory_format=torch.channels_last) for name, model in models.items()},
                                x_cl, args.repeats)
        stock = times[()]
        for name, model in models.items():
            parts = dict(name)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            ours = count_flops(lambda: model(x)) / 1e9
            paper_form = getattr(model.decoder, "forward_paper", None)
            textbook = count_flops(lambda: paper_form(model.encoder(x))) / 1e9 if paper_form else float("nan")
            latency = statistics.median(times[name]) * 1000
            ratio = statistics.median(t / s for t, s in zip(times[name], stock))
            code = MEMORY_CHILD.format(root=str(ROOT), threads=args.threads, variant=variant, labels=args.labels,
                                       size=args.size, parts=parts)
            memory = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout or "nan")
            paper_params, paper_gflops, paper_size = PAPER[variant] if not parts else (float("nan"), "-", args.size)
            rate = ours / (latency / 1000)
            label = variant + "".join(f" {part}={value}" for part, value in parts.items())
            print(f"{label:28}{params:>9.1f}{paper_params:>7.1f}{ours:>9.2f}{textbook:>10.2f}"
                  f"{f'{paper_gflops}' + ('' if paper_size == args.size else f'@{paper_size}'):>11}{latency:>10.0f}"
                  f"{ratio:>6.2f}x{100 * rate / peak:>8.0f}%{100 * rate / measured:>8.0f}%{memory:>9.0f}")
            rows.append(dict(variant=variant, parts=parts, params_m=params, gflops=ours, textbook_gflops=textbook,
                             latency_ms=latency, latency_vs_stock=ratio, peak_fraction=rate / peak,
                             gemm_fraction=rate / measured, memory_mb=memory))
    print("\n(textbook decoder / 2 = the paper's multiply-adds; ours adds the dense interpolation products; "
          "'vs b_i': the median per-round latency ratio to the variant with SegFormer's own parts)")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
