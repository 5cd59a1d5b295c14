"""Peak memory (RSS) of inference on a large photo, every mode, each run in a fresh process.

    python benchmarks/bench_memory.py                       # 4000x3000, B0, 150 classes, every mode
    python benchmarks/bench_memory.py --size 2000 1500 --modes resize --tta
    python benchmarks/bench_memory.py --confidence          # with the top probability, margin and entropy maps

Each case runs `Predictor` on one image in a child process and reports the child's peak resident set
(VmHWM: the peak since the child started), the part reached before inference (imports, model, image),
and the time.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import numpy as np, torch
def peak_mb():  # the resident peak since exec (ru_maxrss would include a large parent's, from before exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
sys.path.insert(0, {root!r})
from segformer import SegFormer
from segformer.inference import Predictor
H, W, mode, tta, labels, memory, confidence = {H}, {W}, {mode!r}, {tta}, {labels}, {memory}, {confidence}
torch.manual_seed(0)
model = SegFormer.from_variant("b0", num_labels=labels)
image = torch.empty(3, H, W, dtype=torch.uint8)  # gradients and noise, built in place: 3 bytes a pixel
image[0] = (torch.arange(W) * 255 // W).to(torch.uint8)
image[1] = (torch.arange(H) * 255 // H).to(torch.uint8)[:, None]
image[2] = torch.randint(0, 256, (H, W), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
before = peak_mb()
start = time.perf_counter()
prediction = Predictor(model, mode=mode, tta=tta, device="cpu", memory_mb=memory)(image, confidence=confidence)
seconds = time.perf_counter() - start
label_map = prediction.label_map
np.save({out!r}, label_map.numpy().astype(np.int16))
print(json.dumps({{"peak_mb": peak_mb(), "before_mb": before, "seconds": seconds}}))
"""


def run_case(H, W, mode, tta, labels, memory, out, confidence=False):
    code = CHILD.format(root=str(ROOT), H=H, W=W, mode=mode, tta=tta, labels=labels, memory=memory, out=str(out),
                        confidence=confidence)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, nargs=2, default=[3000, 4000], metavar=("H", "W"),
                   help="photo height and width (default 3000 4000)")
    p.add_argument("--labels", type=int, default=150, help="classes (default 150)")
    p.add_argument("--modes", nargs="+", default=["resize", "aspect", "slide"], help="Predictor modes to run")
    p.add_argument("--tta", action="store_true", help="with test-time augmentation too (3 scales x flips)")
    p.add_argument("--memory-mb", type=int, default=512, help="Predictor(memory_mb=...)")
    p.add_argument("--confidence", action="store_true", help="also the confidence maps (top probability, margin, "
                                                              "entropy)")
    args = p.parse_args()
    H, W = args.size
    print(f"{W}x{H} image, B0, {args.labels} classes, Predictor(memory_mb={args.memory_mb}), one process each")
    print(f"{'mode':16}{'peak RSS':>12}{'of which before':>17}{'time':>9}")
    cases = [(mode, False) for mode in args.modes] + ([(mode, True) for mode in args.modes] if args.tta else [])
    for mode, tta in cases:
        out = Path(f"/tmp/bench_memory_{mode}_{tta}.npy")
        result = run_case(H, W, mode, tta, args.labels, args.memory_mb, out, args.confidence)
        name = mode + (" + TTA" if tta else "") + (" + conf." if args.confidence else "")
        if "error" in result:
            print(f"{name:16} failed: {result['error']}")
            continue
        print(f"{name:16}{result['peak_mb']:>9.0f} MB{result['before_mb']:>14.0f} MB{result['seconds']:>8.1f}s")


if __name__ == "__main__":
    main()
