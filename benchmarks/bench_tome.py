"""Token merging (segformer/token_merging.py) on a trained checkpoint, against the same weights without:
speed, label agreement and training memory at high resolution.

    python benchmarks/bench_tome.py --checkpoint runs/synthetic/best --images ../shared/data/ade20k-samples/images
    python benchmarks/bench_tome.py --sizes 512x512 1024x1024 1024x2048 --rounds 5 --onnx

Speed: B0 (or the checkpoint's variant), batch 1, --threads, eager (and with --onnx ONNX Runtime on a graph
exported at each size: token merging exports at a static size), stock and merged timed in alternating order
round after round; the table gives each side's median and the median of the per-round ratios. Agreement:
the share of pixels whose class the merged model gives as the stock one does, on --images (each resized to
the row's size) and on the synthetic validation scenes (at the row's size). Training memory: the peak
resident memory of one training step (batch 2, forward + backward) at each size, each side in a fresh
process.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_model import alternating  # noqa: E402
from export import check_images  # noqa: E402
from segformer import SegFormer  # noqa: E402
from segformer.runtimes.graph import label_agreement  # noqa: E402
from segformer.token_merging import set_token_merging  # noqa: E402

MEMORY_CHILD = r"""
import sys, torch
sys.path.insert(0, {root!r})
from segformer import SegFormer, segmentation_loss
torch.manual_seed(0)
torch.set_num_threads({threads})
model = SegFormer.from_pretrained({checkpoint!r}, attention={attention!r}).train() if {checkpoint!r} else \
    SegFormer.from_variant("b0", num_labels=7, attention={attention!r}).train()
x = torch.randn(2, 3, {height}, {width})
labels = torch.randint(0, model.config.num_labels, (2, {height}, {width}))
def peak_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
def rss_mb():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
before = rss_mb()
segmentation_loss(model(x), labels, memory_efficient=True).backward()
print(peak_mb() - before)
"""


def size_of(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    return int(height), int(width)


def onnx_runner(model, x, path: Path):
    """ONNX Runtime on `model` exported at x's size (token merging exports at a static size only)."""
    import onnxruntime as ort
    torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["pixel_values"], output_names=["logits"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"pixel_values": x.numpy()})[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a trained checkpoint (default: a random-weight B0)")
    p.add_argument("--images", help="a folder of photos for the agreement")
    p.add_argument("--sizes", nargs="+", default=["512x512", "1024x1024", "1024x2048"], help="HxW sizes")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per size")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    p.add_argument("--kv-ratio", type=float, default=0.6, help="share of keys/values merged in stages 1-2")
    p.add_argument("--q-ratio", type=float, default=0.8, help="share of queries merged in stages 3-4")
    p.add_argument("--onnx", action="store_true", help="also ONNX Runtime on graphs exported at each size")
    p.add_argument("--no-memory", action="store_true", help="leave out the training-memory column")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint:
        stock = SegFormer.from_pretrained(args.checkpoint).eval()
        tome = SegFormer.from_pretrained(args.checkpoint, attention="tome").eval()
    else:
        stock = SegFormer.from_variant("b0", num_labels=7).eval()
        tome = SegFormer.from_variant("b0", num_labels=7, attention="tome").eval()
        tome.load_state_dict(stock.state_dict())
    set_token_merging(tome, kv_ratio=args.kv_ratio, q_ratio=args.q_ratio)
    print(f"{stock.config.describe()}, batch 1, {args.threads} threads, merging {args.kv_ratio:.0%} of the keys "
          f"(stages 1-2) and {args.q_ratio:.0%} of the queries (stages 3-4)\n")
    print(f"{'size':>10}{'path':>8}{'stock ms':>10}{'merged ms':>11}{'speed-up':>10}{'agree photos':>14}"
          f"{'agree scenes':>14}{'train MB stock / merged':>26}")
    for text in args.sizes:
        height, width = size_of(text)
        x = torch.randn(1, 3, height, width)
        with torch.no_grad():
            paths = {"eager stock": stock, "eager merged": tome}
            if args.onnx:
                with tempfile.TemporaryDirectory() as tmp:
                    paths["onnx stock"] = onnx_runner(stock, x, Path(tmp) / "stock.onnx")
                    paths["onnx merged"] = onnx_runner(tome, x, Path(tmp) / "tome.onnx")
            times = alternating(paths, x, args.rounds)
        memory = "-"
        if not args.no_memory:
            used = [subprocess.run([sys.executable, "-c", MEMORY_CHILD.format(
                root=str(ROOT), threads=args.threads, checkpoint=args.checkpoint or "", attention=attention,
                height=height, width=width)], capture_output=True, text=True).stdout.strip() or "nan"
                for attention in ("efficient", "tome")]
            memory = f"{float(used[0]):.0f} / {float(used[1]):.0f}"
        with torch.no_grad():  # 8 of the photos, and 8 synthetic validation scenes, at this size
            agree_photos = label_agreement(stock, tome, check_images(args.images, (height, width))) \
                if args.images else float("nan")
            agree_scenes = label_agreement(stock, tome, check_images(None, (height, width), split="validation"))
        for path in ("eager", "onnx") if args.onnx else ("eager",):
            a, b = times[f"{path} stock"], times[f"{path} merged"]
            ratio = statistics.median(s / m for s, m in zip(a, b))
            print(f"{text:>10}{path:>8}{statistics.median(a) * 1000:>10.0f}{statistics.median(b) * 1000:>11.0f}"
                  f"{ratio:>9.2f}x{100 * agree_photos:>13.2f}%{100 * agree_scenes:>13.2f}%{memory:>26}", flush=True)


if __name__ == "__main__":
    main()
