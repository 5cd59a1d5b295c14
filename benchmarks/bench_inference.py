"""CPU inference, every path side by side on the same weights: what a deployer would pick instead of us
(transformers eager, ONNX Runtime on transformers' ONNX export) against our eager, channels-last,
torch.compile and ONNX Runtime paths: export.py's graph (attention as ONNX Runtime's fused operator), its
--portable twin (standard operators), and its int8 twins (static: calibrated on generated scenes; dynamic).

    python benchmarks/bench_inference.py                    # B0, 512x512, batch 1, 2 threads, 150 classes
    python benchmarks/bench_inference.py --compile --rounds 30

Calls are interleaved (one call of each path per round, in turn, the order reversed every other round),
so a machine whose speed drifts slows every path alike; the table shows medians and the ratios to
transformers eager and to ONNX Runtime on transformers' export (> 1: faster), and for each path the
median of its per-round ratios to ONNX Runtime on transformers' export (the steadiest figure on a noisy
machine). Every ONNX Runtime session has thread spinning off, so that no path inherits the busy-waiting
threads of the one before it. Every path is checked against our eager logits first.
"""

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from segformer import SegFormer  # noqa: E402
from segformer.runtimes.onnx import onnx_session  # noqa: E402


def export_transformers(model, x, path: Path) -> None:
    """transformers' model through the TorchScript-based exporter, as optimum and most deployers do."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), input_names=["pixel_values"], output_names=["logits"],
                          dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"}}, opset_version=17,
                          dynamo=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="b0", help="variant b0..b5, random weights (default b0)")
    parser.add_argument("--size", type=int, default=512, help="input height and width (default 512)")
    parser.add_argument("--num-labels", type=int, default=150, help="classes (default 150, ADE20K)")
    parser.add_argument("--threads", type=int, default=2, help="threads of torch and ONNX Runtime (default 2)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds, one call of each path per round")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile)")
    parser.add_argument("--no-int8", action="store_true", help="skip the two int8 paths (static and dynamic)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import SegformerForSemanticSegmentation

    from export import check_images
    from segformer.runtimes.onnx import export_onnx, quantize_int8
    torch.manual_seed(0)
    ours = SegFormer.from_variant(args.model, num_labels=args.num_labels).eval()
    tmp = Path(tempfile.mkdtemp())
    ours.save_pretrained(tmp / "model")
    reference = SegformerForSemanticSegmentation.from_pretrained(tmp / "model").eval()
    x = torch.randn(1, 3, args.size, args.size)
    print(f"{args.model} {args.size}x{args.size}, batch 1, {args.threads} threads, {args.num_labels} classes, "
          f"torch {torch.__version__}; exporting ...", flush=True)
    export_transformers(reference, x, tmp / "transformers.onnx")
    export_onnx(ours, tmp / "ours.onnx")
    export_onnx(ours, tmp / "ours.portable.onnx", portable=True)
    paths = {}
    with torch.no_grad():
        expected = ours(x)
        paths["transformers eager"] = lambda: reference(pixel_values=x).logits
        hf_session = onnx_session(tmp / "transformers.onnx", args.threads, spinning=False)
        feed = {"pixel_values": x.numpy()}
        paths["ORT, transformers' ONNX"] = lambda: torch.from_numpy(hf_session.run(None, feed)[0])
        paths["ours eager"] = lambda: ours(x)
        channels_last = SegFormer.from_variant(args.model, num_labels=args.num_labels).eval()
        channels_last.load_state_dict(ours.state_dict())
        channels_last = channels_last.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        paths["ours channels-last"] = lambda: channels_last(x_cl)
        if args.compile:  # Inductor with frozen weights: PyTorch's own recommendation for CPU inference
            import torch._inductor.config as inductor
            inductor.freezing = True
            compiled = torch.compile(channels_last)
            compiled(x_cl)
            paths["ours torch.compile"] = lambda: compiled(x_cl)
        graphs = {"ORT, our ONNX --portable": "ours.portable.onnx", "ORT, our ONNX": "ours.onnx"}
        if not args.no_int8:
            quantize_int8(tmp / "ours.onnx", tmp / "ours.static.onnx", check_images(None, args.size, 16, "train"))
            quantize_int8(tmp / "ours.onnx", tmp / "ours.dynamic.onnx")
            graphs.update({"ORT, our ONNX int8 static": "ours.static.onnx",
                           "ORT, our ONNX int8 dynamic": "ours.dynamic.onnx"})
        for name, file in graphs.items():
            session = onnx_session(tmp / file, args.threads, spinning=False)
            paths[name] = lambda session=session: torch.from_numpy(session.run(None, feed)[0])
        for name, run in paths.items():
            got = run()
            difference = (got - expected).abs().max().item()
            agreement = (got.argmax(1) == expected.argmax(1)).float().mean().item()
            print(f"  {name:26} max |logits - ours eager| {difference:.1e}, argmax agreement {agreement:.4f}")
        times = {name: [] for name in paths}
        for name, run in paths.items():  # warm up
            run(), run()
        for round_ in range(args.rounds):
            for name, run in list(paths.items())[::1 if round_ % 2 == 0 else -1]:
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
    base, ort_base = medians["transformers eager"], medians["ORT, transformers' ONNX"]
    print(f"\n{'path':30}{'median':>10}{'p10-p90':>16}{'vs transformers':>17}{'vs ORT(transformers)':>22}"
          f"{'paired':>9}")
    for name, ms in medians.items():
        p10, p90 = np.percentile(np.array(times[name]) * 1000, [10, 90])
        paired = statistics.median(a / b for a, b in zip(times["ORT, transformers' ONNX"], times[name]))
        print(f"{name:30}{ms:>7.1f} ms{p10:>8.1f}-{p90:<6.1f}{base / ms:>15.2f}x{ort_base / ms:>20.2f}x"
              f"{paired:>8.2f}x")


if __name__ == "__main__":
    main()
