"""Segment images with a SegFormer checkpoint: a mask, a coloured overlay and the segments of each.

    python infer.py --checkpoint runs/synthetic/best photo.jpg photos/ --out predictions/
    python infer.py --checkpoint nvidia/segformer-b0-finetuned-ade-512-512 room.jpg --mode slide --tta
    python infer.py --checkpoint exported/model.onnx photos/ --threads 2   # an export.py graph, through ONNX Runtime
    python infer.py --checkpoint runs/synthetic/best street.mp4 --smooth 0.6   # a video: an overlay video
    python infer.py --checkpoint runs/synthetic/best --camera 0 --max-frames 300  # a camera, where one exists
    python infer.py            # demo: the checkpoint `python train.py` wrote, on fresh synthetic scenes

For each image: <stem>_mask.png (class ids; mode L, or I;16 past 256 classes), <stem>_overlay.png
(the image blended with the class colours, and a legend of the classes present) and <stem>.json
(label, id, pixel count and fraction of each segment). Images of one folder that share a stem (x.png,
x.jpg) keep their extension in the output names (x_png_mask.png, x_jpg_mask.png). Every output is
written atomically; an image whose three outputs exist is kept unless --overwrite. An image that fails
(unreadable, out of memory, ...) is reported and the others go on; the exit status is then 1.

Videos (.mp4, .avi, .mov, .mkv, .webm, ...; read with PyAV) and cameras (--camera INDEX): <stem>_overlay.mp4
at the input's frame rate (the frames blended with the class colours), <stem>_video.json (frames, the frame
rate read and the frames per second reached, the label flicker) and, with --video-masks, each frame's mask
as <stem>_masks/<frame>.png. The label flicker is the mean fraction of pixels whose label changed since the
previous frame; --smooth DECAY averages the class probabilities over frames to reduce it
(segformer/video.py).

For labelling tools, to correct the predictions instead of drawing from nothing (pre-labelling):
  --format coco     predictions.coco.json: COCO instances, one annotation per class present in an image,
                    its region as a compressed RLE (exact), category id = class id + 1, file_name the image's
                    path under the input folder
  --format labelme  labelme/<stem>.json: LabelMe polygons, one per connected region, traced along the
                    pixel boundaries and simplified within --polygon-tolerance pixels, largest first
Both read back as data (train.py --data): a folder with predictions.coco.json as
annotations/instances_<split>.json, or the labelme/ folder, where the images lie beside the JSON files
it points to. The LabelMe files name the images where they are (imagePath relative to the file); where
that is outside the labelme/ folder, train.py reads them with --allow-outside-data (the data section of
the README: a dataset's files may name only files inside it).
"""

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from segformer.bands import NODATA_RULES, display_rgb, georeference, read_bands, to_band_tensor, write_geotiff
from segformer.cli import SIZE_RANGE, bounded, run_main
from segformer.device import check_device
from segformer.errors import ConfigError, UserError
from segformer.files import atomic_write, writable_folder
from segformer.images import is_image_file, load_image
from segformer.inference import Predictor
from segformer.runtimes import RUNTIMES, load_for_inference
from segformer.token_merging import enable_token_merging
from segformer.video import Frames, TemporalSmoothing, VideoWriter, is_video_file, label_flicker
from segformer.visual import blend, label_map_image, overlay

DEMO_CHECKPOINT = Path("runs/synthetic/best")
DEMO_OUT = Path("runs/synthetic/predictions")


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="image files or folders (walked recursively)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="checkpoint directory, weights file or hub id, or a model export.py "
                                             "wrote (model.onnx, model.xml (OpenVINO), model.pt2 (AOTInductor, with "
                                             "--trust-code), model.pte (ExecuTorch): run by its runtime, "
                                             "segformer/runtimes/; its side "
                                             "files give the input size and class names)")
    source.add_argument("--onnx", help="an ONNX graph written by export.py, run by ONNX Runtime (as --checkpoint "
                                       "FILE.onnx)")
    p.add_argument("--out", help="output folder (default: predictions/, or the demo's)")
    p.add_argument("--mode", choices=["resize", "aspect", "slide"], default="resize",
                   help="resize: the processor's size x size squash (the guide); aspect: short side = size; "
                        "slide: windows over the full-resolution image")
    p.add_argument("--size", type=bounded(int, *SIZE_RANGE),
                   help=f"model input size, {SIZE_RANGE[0]}..{SIZE_RANGE[1]} (default: the checkpoint's "
                        f"preprocessor_config.json, else 512)")
    p.add_argument("--window", type=bounded(int, *SIZE_RANGE), default=512,
                   help=f"sliding window size, {SIZE_RANGE[0]}..{SIZE_RANGE[1]}")
    p.add_argument("--stride", type=bounded(int, 1, SIZE_RANGE[1]), default=341,
                   help="sliding window stride, 1..window")
    p.add_argument("--tta", action="store_true", help="average over horizontal flips and scales")
    p.add_argument("--scales", type=bounded(float, 0.1, 8.0), nargs="+", default=[0.75, 1.0, 1.25],
                   help="TTA scales, each 0.1..8")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="autocast dtype")
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--threads", type=bounded(int, 1, 1024), help="CPU threads (default: PyTorch's / ORT's own)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format (faster on CPUs)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slow to start)")
    p.add_argument("--token-merging", type=bounded(float, 0.0, 0.99), nargs=2, metavar=("KV", "Q"),
                   help="SegFormer++'s token merging on a PyTorch checkpoint, without retraining: the share of keys "
                        "merged in stages 1-2 and of queries in stages 3-4 (its preset: 0.6 0.8); faster at high "
                        "resolution, labels a little different")
    p.add_argument("--memory-mb", type=bounded(int, 64, 1 << 20), default=512,
                   help="memory for full-size logits and slide windows: large photos are done a few classes "
                        "at a time within it (default 512)")
    p.add_argument("--alpha", type=bounded(float, 0.0, 1.0), default=0.5,
                   help="overlay opacity of the class colours, 0..1")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--confidence", action="store_true",
                   help="also write <stem>_confidence.png, _margin.png and _entropy.png (each pixel's top "
                        "probability, its margin over the second, the entropy / log K; x 255) and give each "
                        "segment a score (its mean top probability); computed a chunk of classes at a time")
    p.add_argument("--format", nargs="+", choices=["coco", "labelme"], default=[],
                   help="also write the predictions for labelling tools: COCO RLE, LabelMe polygons")
    p.add_argument("--polygon-tolerance", type=bounded(float, 0.0, 100.0), default=0.5,
                   help="--format labelme: the polygons' largest distance from the pixel boundary, in pixels "
                        "(0: every boundary corner, exact)")
    p.add_argument("--camera", type=bounded(int, 0, 63),
                   help="segment a camera's frames (its index: /dev/video<N> on Linux) into <out>/camera<N>_*")
    p.add_argument("--smooth", type=bounded(float, 0.0, 0.99), default=0.0,
                   help="videos: the moving average's decay of the class probabilities over frames, 0..0.99 "
                        "(0: each frame alone; 0.6: about 2.5 frames of memory); resize and aspect modes")
    p.add_argument("--video-masks", action="store_true", help="videos: also write each frame's mask")
    p.add_argument("--max-frames", type=bounded(int, 1, 10**9), help="videos and cameras: stop after this many frames")
    p.add_argument("--trust-code", action="store_true",
                   help="import the code from outside this project that the checkpoint names as a part of its model")
    args = p.parse_args(argv)
    if args.smooth and args.mode == "slide":
        p.error("argument --smooth: needs one forward pass per frame: --mode resize or aspect")
    if args.mode == "slide" and args.stride > args.window:
        p.error(f"argument --stride: must be at most --window ({args.window}), got {args.stride}")
    return args


def find_images(inputs: list[str]) -> list[tuple[Path, Path]]:
    """(file, output path without suffix) pairs, videos included. A folder's images keep their relative folders; hidden
    files (macOS ._* included) are not images; images that share a stem in one folder keep their
    extension in the output name."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            for path in sorted(p for p in item.rglob("*") if is_image_file(p) or is_video_file(p)):
                found.append((path, path.parent.relative_to(item)))
        else:
            found.append((item, Path()))  # missing or unreadable files are reported when read
    shared = Counter((folder, path.stem) for path, folder in found)
    return [(path, folder / (f"{path.stem}_{path.suffix[1:].lower()}" if shared[folder, path.stem] > 1
                             else path.stem)) for path, folder in found]


def demo_inputs(folder: Path, count: int = 4) -> list[str]:
    """Fresh synthetic scenes (a split the model never trained on), written as PNG files."""
    from data.synthetic import SyntheticScenes
    folder.mkdir(parents=True, exist_ok=True)
    scenes = SyntheticScenes("test", length=count)
    paths = []
    for i in range(count):
        image, _, name = scenes[i]
        image.save(folder / f"{name}.png")
        paths.append(str(folder / f"{name}.png"))
    return paths


def save_outputs(path: Path, image, prediction, stem: Path, *, colours, names, alpha) -> None:
    """The mask, overlay and segments of one image (and the confidence map where it was computed), each
    written atomically (complete or absent)."""
    label_map = prediction.label_map.cpu().numpy()
    mask = label_map_image(label_map, len(names))
    ignored = NODATA_RULES["ignore"]  # 255: no-data pixels a band model's data ignores
    if (label_map == ignored).any() and len(names) <= ignored:
        names = {**names, ignored: "no data"}  # unlabelled: black, named so in the legend and segments
        colours = [*colours, *[(0, 0, 0)] * (ignored + 1 - len(colours))]
    total = label_map.size
    top = prediction.confidence["max"].cpu().numpy() if prediction.confidence is not None else None
    segments = [{"id": int(c), "label": names[int(c)], "pixels": int(n), "fraction": round(int(n) / total, 6),
                 **({"score": round(float(top[label_map == c].mean()), 6)} if top is not None else {})}
                for c, n in zip(*np.unique(label_map, return_counts=True))]
    if top is not None:  # 0..255 greys: the top probability, its margin, the entropy over its maximum log K
        confidence = prediction.confidence
        scaled = {"_confidence.png": top, "_margin.png": confidence["margin"].cpu().numpy(),
                  "_entropy.png": confidence["entropy"].cpu().numpy() / math.log(max(len(names), 2))}
        for suffix, values in scaled.items():
            picture = Image.fromarray((values.clip(0, 1) * 255).round().astype(np.uint8))
            atomic_write(output_path(stem, suffix), lambda tmp, p=picture: p.save(tmp, format="PNG"))
    record = {"image": str(path), "size": [image.width, image.height], "segments": segments}
    atomic_write(output_path(stem, "_mask.png"), lambda tmp: mask.save(tmp, format="PNG"))
    atomic_write(output_path(stem, "_overlay.png"),
                 lambda tmp: overlay(image, label_map, colours, names, alpha).save(tmp, format="PNG"))
    atomic_write(output_path(stem, ".json"), lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2) + "\n"))


def write_formats(formats: list[str], files: list[tuple[Path, Path]], out: Path, names: dict, *,
                  tolerance: float) -> None:
    """The predictions of every image, read back from its _mask.png, in labelling tools' formats."""
    from data.labelling import coco_annotations, coco_categories, labelme_document
    class_names = [names[i] for i in sorted(names)]
    images, annotations = [], []
    for image_id, (path, relative) in enumerate(files, 1):
        stem = out / relative
        label_map = np.asarray(Image.open(output_path(stem, "_mask.png")))
        if "coco" in formats:
            images.append({"id": image_id, "file_name": str(relative.parent / path.name),
                           "height": label_map.shape[0], "width": label_map.shape[1]})
            annotations += coco_annotations(label_map, image_id, first_id=len(annotations) + 1)
        if "labelme" in formats:  # labels.txt (labelme2voc's) keeps the class ids
            write_labels_file(out / "labelme" / "labels.txt", class_names)
            target = output_path(out / "labelme" / relative, ".json")
            target.parent.mkdir(parents=True, exist_ok=True)
            document = labelme_document(label_map, os.path.relpath(path.resolve(), target.parent.resolve()),
                                        class_names, tolerance=tolerance)
            atomic_write(target, lambda tmp, d=document: Path(tmp).write_text(json.dumps(d, indent=1)))
    if "coco" in formats:
        document = {"info": {"description": "SegFormer predictions"}, "images": images, "annotations": annotations,
                    "categories": coco_categories(class_names)}
        atomic_write(out / "predictions.coco.json", lambda tmp: Path(tmp).write_text(json.dumps(document)))
    print(f"labelling formats ({', '.join(formats)}): " + ", ".join(
        str(p) for p, f in ((out / "predictions.coco.json", "coco"), (out / "labelme", "labelme")) if f in formats))


def write_labels_file(path: Path, class_names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(["__ignore__", *class_names]) + "\n"))


def output_path(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


def segment_one(path: Path, stem: Path, predictor, *, colours, names, alpha, confidence: bool = False) -> str | None:
    """Segment one image and write its outputs; what went wrong, in one line naming the file, or None.
    A model of several bands reads the file at full precision and draws its overlay on the first three,
    stretched; a GeoTIFF's mask is also written as <stem>_mask.tif with its georeferencing (rasterio)."""
    try:
        pixels = load_image(path) if predictor.bands is None else read_bands(path)
        nodata = None  # pixels with no finite value in any band (a raster's no-data)
        if predictor.bands is not None:
            to_band_tensor(pixels, str(path), predictor.bands.count)  # the band count, checked
            if np.issubdtype(pixels.dtype, np.floating) and (nodata := (~np.isfinite(pixels)).all(-1)).any():
                print(f"{path}: {int(nodata.sum())} pixels have no finite value in any band (no data); labelled "
                      f"{predictor.bands.nodata_label} in the mask ({predictor.bands.nodata}, as the checkpoint's "
                      f"data says: \"uncovered\" in its dataset.json)")
    except UserError as e:  # unreadable, not an image, missing
        return named(path, e)
    try:
        prediction = predictor(pixels, confidence=confidence)
        if nodata is not None and nodata.any():  # the model saw the bands' means there: its guess is not written
            prediction.label_map[torch.from_numpy(nodata).to(prediction.label_map.device)] = \
                predictor.bands.nodata_label
        image = pixels if predictor.bands is None else display_rgb(pixels)
        save_outputs(path, image, prediction, stem, colours=colours, names=names, alpha=alpha)
        where = georeference(path) if path.suffix.lower() in (".tif", ".tiff") else None
        if where is not None:  # a GeoTIFF: the mask where the image lies, for GIS tools
            label_map = prediction.label_map.cpu().numpy()
            atomic_write(output_path(stem, "_mask.tif"), lambda tmp: write_geotiff(label_map, Path(tmp), where))
    except UserError as e:  # the model's logits not finite (NonFiniteLogits)
        return named(path, e)
    except Exception as e:  # out of memory (a RuntimeError), an unwritable output, ...
        return f"{path}: {type(e).__name__}: {one_line(e)}"
    return None


VIDEO_OUTPUTS = ("_overlay.mp4", "_video.json")


def segment_video(source, stem: Path, predictor, *, colours, names, alpha, masks: bool,
                  max_frames: int | None) -> str | None:
    """Segment a video file's (or a camera's) frames into an overlay video at its frame rate, each frame's
    mask where asked, and a summary; what went wrong, in one line naming the file, or None."""
    smoothing = predictor.model if isinstance(predictor.model, TemporalSmoothing) else None
    try:
        with Frames(source) as frames:
            if smoothing is not None:
                smoothing.reset()
            rate, frame_count = frames.rate, frames.count
            total = min(filter(None, (frame_count, max_frames)), default=None)  # for the progress bar
            written, previous, flicker, start = 0, None, [], time.perf_counter()

            def write_video(tmp):
                nonlocal written, previous
                writer = VideoWriter(tmp, rate)
                for index, frame in enumerate(tqdm(frames, total=total, desc=frames.name, unit="frame",
                                                   leave=False)):
                    if max_frames is not None and index >= max_frames:
                        break
                    label_map = predictor(frame).label_map
                    change = label_flicker(previous, label_map)
                    if change is not None:
                        flicker.append(change)
                    previous = label_map
                    array = label_map.cpu().numpy()
                    writer.write(blend(np.asarray(frame), array, colours, alpha))
                    if masks:
                        mask = label_map_image(array, len(names))
                        atomic_write(output_path(stem, "_masks") / f"{index:06d}.png",
                                     lambda tmp, m=mask: m.save(tmp, format="PNG"))
                    written += 1
                writer.close()

            atomic_write(output_path(stem, "_overlay.mp4"), write_video)
        seconds = time.perf_counter() - start
    except UserError as e:  # unreadable, not a video, or the model's logits not finite on a frame
        return named(source, e)
    except Exception as e:  # out of memory, an unwritable output, ...
        return f"{source}: {type(e).__name__}: {one_line(e)}"
    if not written:
        return f"{source}: no frames"
    summary = {"video": str(source), "frames": written, "frame_rate": float(rate),
               "frames_per_second_reached": round(written / seconds, 3),
               "label_flicker": round(float(np.mean(flicker)), 6) if flicker else None,
               "smooth": smoothing.decay if smoothing is not None else 0.0}
    atomic_write(output_path(stem, "_video.json"), lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    tqdm.write(f"{source}: {written} frames ({float(rate):g} frames/s) segmented at "
               f"{summary['frames_per_second_reached']:.1f} frames/s; label flicker "
               + (f"{100 * summary['label_flicker']:.2f}% of pixels a frame" if flicker else "- (one frame)")
               + (f" (smoothed, decay {smoothing.decay:g})" if smoothing is not None else ""))
    return None


def one_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


def named(source, error: Exception) -> str:
    """A UserError's line naming the input: as it is where it names it already, else after its name."""
    line = one_line(error)
    return line if str(source) in line else f"{source}: {line}"


def main(args) -> int:
    demo = not args.checkpoint and not args.inputs
    if demo:
        if not (DEMO_CHECKPOINT / "model.safetensors").is_file():
            print(f"error: no --checkpoint given and no {DEMO_CHECKPOINT}: run `python train.py` first, or pass "
                  f"--checkpoint <dir|file|hub id> and images", file=sys.stderr)
            return 2
        args.checkpoint = str(DEMO_CHECKPOINT)
        args.out = args.out or str(DEMO_OUT)
        args.inputs = demo_inputs(Path(args.out) / "inputs")
    source = args.checkpoint or args.onnx
    if source and args.camera is not None:
        args.inputs = args.inputs or []
    elif not source or not args.inputs:
        print("error: give --checkpoint (or --onnx) and at least one image, video or folder, or --camera "
              "(or none of them, for the demo)", file=sys.stderr)
        return 2
    return run_main(lambda: segment(args, source, demo=demo))


def segment(args, source: str, *, demo: bool) -> int:
    """Load the model (from the library: segformer.runtimes.load_for_inference), then segment every image."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device:
        check_device(args.device)
    model, facts = load_for_inference(source, size=args.size, trust_code=args.trust_code, threads=args.threads,
                                      runtime="onnx" if args.onnx else None)
    runtime = RUNTIMES[facts.runtime]  # where it runs; channels-last and compile are PyTorch's own
    if args.token_merging:
        if not runtime.torch_module or not enable_token_merging(model, kv_ratio=args.token_merging[0],
                                                                q_ratio=args.token_merging[1]):
            raise ConfigError(f"--token-merging: {source} is not a PyTorch checkpoint with SegFormer's attention "
                              f"(efficient); it merges that attention's tokens")
    options = dict(**facts.predictor_options, mode=args.mode, window=args.window, stride=args.stride, tta=args.tta,
                   scales=args.scales, device=runtime.device(args.device), amp=args.amp,
                   channels_last=args.channels_last and runtime.torch_module, memory_mb=args.memory_mb)
    predictor = Predictor(model, **options, compile=args.compile and runtime.torch_module)
    video_predictor = Predictor(TemporalSmoothing(model, args.smooth), **options) if args.smooth else predictor
    names, colours = dict(enumerate(facts.predicted_classes)), facts.palette
    out = writable_folder(args.out or "predictions")

    files = find_images(args.inputs)
    cameras = [(args.camera, Path(f"camera{args.camera}"))] if args.camera is not None else []
    failed, kept, written = [], [], 0
    for path, relative in tqdm(files + cameras, desc="segmenting", unit="file", disable=len(files + cameras) < 2):
        stem = out / relative
        video = isinstance(path, int) or is_video_file(path)
        outputs = VIDEO_OUTPUTS if video else ("_mask.png", "_overlay.png", ".json")
        if not args.overwrite and not isinstance(path, int) and all(output_path(stem, s).exists() for s in outputs):
            kept.append(path)
            continue
        if video:
            problem = segment_video(path, stem, video_predictor, colours=colours, names=names, alpha=args.alpha,
                                    masks=args.video_masks, max_frames=args.max_frames)
        else:
            problem = segment_one(path, stem, predictor, colours=colours, names=names, alpha=args.alpha,
                                  confidence=args.confidence)
        if problem:  # reported, and the other images go on
            failed.append(problem)
            tqdm.write(f"error: {problem}", file=sys.stderr)
        else:
            written += 1

    if args.format and not failed:
        write_formats(args.format, [(p, r) for p, r in files if not is_video_file(p)], out, names,
                      tolerance=args.polygon_tolerance)
    print(f"{written} file(s) segmented into {out}/", end="")
    print(f"; {len(kept)} skipped because their outputs exist (--overwrite to replace)" if kept else "", end="")
    print(f"; {len(failed)} failed:" if failed else "")
    for problem in failed:
        print(f"  {problem}")
    if demo and written:
        print(f"look at {out}/*_overlay.png")
    return 1 if failed else 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main(get_args()))
