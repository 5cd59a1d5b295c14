"""Export a SegFormer checkpoint for a runtime (segformer/runtimes/: ONNX Runtime by default; with --portable,
for any ONNX runtime), and check it.

    python export.py --checkpoint runs/synthetic/best --out exported/              # pixel_values -> logits
    python export.py --checkpoint nvidia/segformer-b0-finetuned-ade-512-512 --out exported/ --label-map
    python export.py --checkpoint runs/synthetic/best --out exported/ --int8       # also model.int8.onnx
    python export.py --checkpoint runs/synthetic/best --out exported/ --int8 static --calibration-images DIR
    python export.py --checkpoint runs/synthetic/best --out portable/ --portable   # standard ONNX operators only
    python export.py --checkpoint nvidia/segformer-b0-finetuned-ade-512-512 --out local/ --runtime eager
    python infer.py --checkpoint exported/model.onnx photo.jpg --out predictions/   # the same CLI, through ORT
    python export.py --checkpoint runs/synthetic/best --out ov/ --runtime openvino --precision bf16  # model.xml
    python export.py --checkpoint runs/synthetic/best --out ov8/ --runtime openvino --precision int8 \\
        --calibration-images DIR --check-images DIR                               # NNCF, its agreement printed
    python export.py --checkpoint runs/synthetic/best --out aoti/ --runtime aoti   # model.pt2 (AOTInductor)
    python export.py --checkpoint runs/synthetic/best --out et/ --runtime executorch  # model.pte (XNNPACK)

The graphs (batch, height and width are dynamic: one file serves every image size):
  default      pixel_values (B, 3, H, W) float32, normalised as the image processor does (a model of
               several bands: (B, C, H, W), normalised per band as its preprocessor_config.json says)
               -> logits (B, K, ceil(H/4), ceil(W/4))
  --label-map  image (B, 3, H, W) uint8 RGB -> label_map (B, H, W) int64: the processor's resize to
               size x size (bilinear, antialiased) and normalisation, the model, the upsampling of the
               logits to the image's own size and the argmax, all in the graph: a service needs no numpy.

--runtime openvino writes OpenVINO IR (model.xml + .bin) converted straight from PyTorch, run in the
--precision asked for: fp32 (forced: on a CPU with AMX OpenVINO would pick bf16), bf16, or int8 through
NNCF (segformer/runtimes/openvino.py says what stays in float, and why). --runtime aoti compiles an
AOTInductor package (minutes; native code, so infer.py and serve.py load it only with --trust-code), and
--runtime executorch lowers an ExecuTorch program for XNNPACK at the model's input size (phones; one input
size). Each is checked against eager after writing and run by infer.py and serve.py by its suffix.

--runtime eager writes the checkpoint itself (model.safetensors, config.json and the side files inference
reads), for a service that runs PyTorch from a local folder.

Attention is ONNX Runtime's fused MultiHeadAttention operator (com.microsoft domain, in every ONNX Runtime
build): one kernel where standard operators take a matrix product, a softmax and another matrix product
over stage 1's 16384 x 256 attention matrix, 4-7% faster for the whole model under ONNX Runtime.
`--portable` writes standard ONNX operators only (opset 20), for TensorRT, OpenVINO and other runtimes.

A checkpoint calibrated by `train.py --eval-only --calibrate` (calibration.json) has its temperature in the
logits graph: the classifier's weights divided by it, so the graph's logits are the calibrated ones (the
label map graph's argmax does not change).

Written beside the graph: preprocessor_config.json (input size, normalisation, label reduction),
id2label.json (class names), palette.json where the checkpoint has one. Checked after writing: ONNX
Runtime against our eager model at two input shapes. With --int8, model.int8.onnx and the agreement of its
label maps with fp32 ones on images (--check-images, or generated scenes), measured and printed:
  dynamic  onnxruntime's dynamic quantization: int8 weights, activations quantised on the fly at every
           call; no data needed, but slower than fp32 on a CPU (its integer convolution is slow)
  static   int8 weights and activations of every convolution and matrix product, the activations' ranges
           calibrated on --calibration-images (default: generated training scenes, right only for the
           built-in demo data); faster than fp32 where the CPU has int8 dot products (AVX512-VNNI, AMX)
"""

import argparse
import sys
from pathlib import Path

import torch

from segformer.cli import SIZE_RANGE, bounded, run_main
from segformer.errors import DataError
from segformer.images import is_image_file, read_image, to_tensor
from segformer.preprocess import normalize, resize_image
from segformer.runtimes import RUNTIMES, ExportOptions, load_for_inference
from segformer.runtimes.onnx import CALIBRATION_COUNT
from segformer.runtimes.openvino import CALIBRATION_COUNT as OV_CALIBRATION


def check_images(folder: str | None, size: int | tuple[int, int], count: int = 8,
                 split: str = "test") -> list[torch.Tensor]:
    """Normalised (3, size, size) (or (3, H, W) for a (H, W) size) inputs: the first `count` images of a folder,
    or generated scenes of `split`. A folder without images is a DataError naming it."""
    if folder:
        files = sorted(p for p in Path(folder).rglob("*") if is_image_file(p))[:count]
        if not files:
            raise DataError(f"{folder}: no images in it")
        images = [read_image(p) for p in files]
    else:
        from data.synthetic import SyntheticScenes
        scenes = SyntheticScenes(split, length=count)
        images = [to_tensor(scenes[i][0]) for i in range(count)]
    return [normalize(resize_image(image, size if isinstance(size, tuple) else (size, size))) for image in images]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, weights file or hub id")
    p.add_argument("--out", required=True, help="output folder (model.onnx, or the runtime's files, and side files)")
    p.add_argument("--runtime", choices=list(RUNTIMES), default="onnx",
                   help="what to write: " + "; ".join(f"{key}: {runtime.name}" for key, runtime in RUNTIMES.items())
                        + " (default: onnx)")
    p.add_argument("--label-map", action="store_true",
                   help="uint8 image in, label map at the image's size out (preprocessing and argmax in the graph)")
    p.add_argument("--size", type=bounded(int, *SIZE_RANGE),
                   help=f"the model input size, {SIZE_RANGE[0]}..{SIZE_RANGE[1]}: --label-map's, the check's, the "
                        f"side files' (default: the checkpoint's preprocessor_config.json, else 512)")
    p.add_argument("--portable", action="store_true",
                   help="standard ONNX operators only, for runtimes other than ONNX Runtime (default: attention as "
                        "ONNX Runtime's fused MultiHeadAttention, 4-7%% faster there)")
    p.add_argument("--int8", nargs="?", const="dynamic", choices=["dynamic", "static"],
                   help="also write model.int8.onnx and report its mask agreement with fp32: dynamic (the default; "
                        "no data) or static (calibrated; the fast one)")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"],
                   help="--runtime openvino: how the CPU runs it: fp32 (the default, forced where the CPU would "
                        "pick bf16), bf16 (where the CPU has it), int8 (NNCF, calibrated on --calibration-images)")
    p.add_argument("--calibration-images", metavar="DIR",
                   help=f"--int8 static (--precision int8): the first {CALIBRATION_COUNT} ({OV_CALIBRATION}) images "
                        "of this folder (recursively) set the activation ranges; use images like the ones the model will see (default: generated "
                        "training scenes, right only for the built-in demo data)")
    p.add_argument("--check-images", metavar="DIR",
                   help="a folder of images for int8's and bf16's label agreement with fp32 (default: generated test "
                        "scenes)")
    p.add_argument("--trust-code", action="store_true",
                   help="import the code from outside this project that the checkpoint names as a part of its model")
    return p.parse_args(argv)


def export_checkpoint(checkpoint: str, out: Path, *, runtime: str = "onnx", label_map: bool = False,
                      size: int | None = None, portable: bool = False, int8: str | None = None,
                      precision: str | None = None, calibration_folder: str | None = None, check_folder: str | None = None,
                      trust_code: bool = False):
    """Everything main does: the checkpoint loaded for inference, then written by `runtime`'s writer (a row of
    segformer.runtimes.RUNTIMES); returns what the writer returns (ONNX: the ONNXProgram). A problem is a
    UserError naming it."""
    model, facts = load_for_inference(checkpoint, size=size, trust_code=trust_code, runtime="eager")
    options = ExportOptions(label_map=label_map, portable=portable, int8=int8, precision=precision,
                            calibration_folder=calibration_folder,
                            check_folder=check_folder, images=check_images)
    return RUNTIMES[runtime].code().write(model, facts, out, options)


def main(argv=None) -> int:
    args = get_args(argv)
    return run_main(lambda: export_checkpoint(
        args.checkpoint, Path(args.out), runtime=args.runtime, label_map=args.label_map, size=args.size,
        portable=args.portable, int8=args.int8, precision=args.precision, calibration_folder=args.calibration_images,
        check_folder=args.check_images, trust_code=args.trust_code))


if __name__ == "__main__":
    sys.exit(main())
