"""Our evaluation and training transforms vs the reference image processor, side by side, one worker.

    python benchmarks/bench_data.py                                       # generated 640x480 scenes
    python benchmarks/bench_data.py --folder ../shared/data/ade20k-samples --split validation

Both sides start from the same decoded PIL images and end with pixel_values + labels tensors:
  reference eval  = SegformerImageProcessor(do_reduce_labels=True)(image, annotation)
  reference train = the guide's ColorJitter(0.25, 0.25, 0.25, 0.1) on the PIL image, then the processor
  ours            = SegmentationDataset.__getitem__ (checks, label reduction, transform), then
                    normalize_batch (which train.py runs on the device)
Prints images/s and the ratio (ours / reference; > 1 means we are faster). Then, for GPU training, what
one worker core delivers for each recipe as train.py loads it (bytes, normalised on the device), the
bytes a sample crosses to the main process, and the workers it takes to feed a GPU training at
--gpu-images-per-second (gpu_check.py measures that rate). Then colour masks: the same
annotations saved as RGB PNGs in the ADE palette (150 colours, as a labelling tool exports them), loaded
by our evaluation pipeline through a palette lookup, against the index masks: what decoding colours costs."""

import argparse
import io
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, ".")
from data.dataset import SegmentationDataset  # noqa: E402
from data.mapping import ADE  # noqa: E402
from data.sources import open_source  # noqa: E402
from data.spec import LabelSpec  # noqa: E402
from data.transforms import build_transform, normalize_batch  # noqa: E402
from segformer.images import decode  # noqa: E402
from segformer.labels import ADE20K_CLASSES, ADE20K_PALETTE  # noqa: E402

ADE_SPEC = LabelSpec(class_names=ADE20K_CLASSES, reduce_labels=True, palette=ADE20K_PALETTE, size=512, mapping=ADE)


def model_input(sample: dict) -> dict:
    """A sample's bytes as the model's float input (on the CPU here), and its labels as int64."""
    return {"pixel_values": normalize_batch(sample["pixel_values"][None])[0], "labels": sample["labels"].long()}


def generated(n, height=480, width=640):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    out = []
    for i in range(n):
        image = np.stack([xx * 255 // width, yy * 255 // height, (xx * yy) % 256], -1)
        image = image + rng.integers(0, 30, (height, width, 3))
        label = (xx // 40 + yy // 40 * 3 + i) % 151
        out.append((Image.fromarray(image.clip(0, 255).astype(np.uint8)), Image.fromarray(label.astype(np.uint8)),
                    f"gen{i}"))
    return out


def rate(fn, items, repeats):
    fn(items[0])
    start = time.perf_counter()
    for _ in range(repeats):
        for item in items:
            fn(item)
    return repeats * len(items) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", help="an ADE-layout folder to read images from (default: generated images)")
    parser.add_argument("--split", default="validation", help="the split of --folder to read (default validation)")
    parser.add_argument("--n", type=int, default=16, help="number of generated images")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the images, timed together")
    parser.add_argument("--gpu-images-per-second", type=float, default=400.0,
                        help="the training rate to feed (default 400: B0 at 512 on one H100, roughly)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker, one thread: what a DataLoader worker gets

    from torchvision.transforms import ColorJitter
    from transformers import SegformerImageProcessor
    processor = SegformerImageProcessor(do_reduce_labels=True)
    jitter = ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.1)

    if args.folder:
        source = open_source(args.folder, args.split, train=False)
        items = [source[i] for i in range(len(source))]
    else:
        items = generated(args.n)
    print(f"{len(items)} images, e.g. {items[0][0].size[0]}x{items[0][0].size[1]}; torch threads = 1")

    ours_eval = SegmentationDataset(items, ADE_SPEC, build_transform(train=False), train=False)
    ours_train = SegmentationDataset(items, ADE_SPEC, build_transform(train=True), train=True)
    index = {id(item): i for i, item in enumerate(items)}
    rows = [
        ("evaluation", lambda it: processor(images=it[0], segmentation_maps=it[1], return_tensors="pt"),
         lambda it: model_input(ours_eval[index[id(it)]])),
        ("training (guide)", lambda it: processor(images=jitter(it[0]), segmentation_maps=it[1], return_tensors="pt"),
         lambda it: model_input(ours_train[index[id(it)]])),
    ]
    print(f"{'':18}{'reference':>14}{'ours':>14}{'ratio':>8}")
    for name, reference, ours in rows:
        ref_rate, our_rate = rate(reference, items, args.repeats), rate(ours, items, args.repeats)
        print(f"{name:18}{ref_rate:>9.1f} img/s{our_rate:>9.1f} img/s{our_rate / ref_rate:>7.2f}x")
    workers_for_gpu(items, args.repeats, args.gpu_images_per_second)
    colour_masks(items, args.repeats)


class EncodedItems:
    """What a folder source does: decode a JPEG photo and a PNG annotation, and name the sample."""

    def __init__(self, items, annotations=None):
        self.open = decode
        self.photos = [as_jpeg(image) for image, _, _ in items]
        self.annotations = annotations or [as_png(annotation) for _, annotation, _ in items]

    def __len__(self):
        return len(self.photos)

    def __getitem__(self, i):
        return self.open(self.photos[i], "photo"), self.open(self.annotations[i], "annotation"), f"sample {i}"


def workers_for_gpu(items, repeats, gpu_rate):
    """Per-core rate of each recipe's samples from files, as train.py loads them (bytes), their size, and
    the workers needed."""
    import math
    files = EncodedItems(items)
    print(f"\nfeeding a GPU at {gpu_rate:.0f} images/s (one worker = one core; from JPEG/PNG files to uint8 "
          f"samples):")
    print(f"{'':18}{'per core':>12}{'bytes/sample':>16}{'as float':>12}{'workers':>9}")
    for name, train, recipe in (("evaluation", False, "guide"), ("training (guide)", True, "guide"),
                                ("training (paper)", True, "paper")):
        dataset = SegmentationDataset(files, ADE_SPEC, build_transform(train=train, recipe=recipe), train=train)
        sample_rate = rate(lambda i: dataset[i], list(range(len(files))), repeats)
        sample = dataset[0]
        size = sum(t.numel() * t.element_size() for t in sample.values())
        as_float = sample["pixel_values"].numel() * 4 + sample["labels"].numel() * 8
        print(f"{name:18}{sample_rate:>7.1f} img/s{size / 2**20:>13.2f} MB{as_float / 2**20:>9.2f} MB"
              f"{math.ceil(gpu_rate / sample_rate):>9}")


def as_png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def colour_masks(items, repeats):
    """From files to tensors (JPEG photo + PNG annotation -> evaluation sample), with index masks and with
    the same masks as colour PNGs; and the colour lookup on its own."""
    from dataclasses import replace

    from data.mapping import LabelMapping
    palette = ((0, 0, 0),) + tuple(ADE20K_PALETTE)  # raw 0 (unlabelled) is black, raw k the colour of class k-1
    unique = [palette[i] if palette.index(palette[i]) == i else (i, 1, 2) for i in range(len(palette))]  # 6 == 48
    colours = np.asarray(unique, np.uint8)
    index_png = [as_png(annotation) for _, annotation, _ in items]
    colour_png = [as_png(Image.fromarray(colours[np.asarray(annotation)])) for _, annotation, _ in items]
    rgb = LabelMapping(reduce_labels=True, palette=tuple(map(tuple, unique)))
    transform = build_transform(train=False)
    by_index = SegmentationDataset(EncodedItems(items, index_png), ADE_SPEC, transform, train=False)
    by_colour = SegmentationDataset(EncodedItems(items, colour_png), replace(ADE_SPEC, mapping=rgb), transform,
                                    train=False)
    assert all(torch.equal(by_index[i]["labels"], by_colour[i]["labels"]) for i in range(len(items)))
    decoded_colours = [decode(c, "x") for c in colour_png]
    times = {}
    for name, fn in [("sample, index masks", lambda i: by_index[i]), ("sample, colour masks", lambda i: by_colour[i]),
                     ("decode index PNG", lambda i: decode(index_png[i], "x")),
                     ("decode colour PNG", lambda i: decode(colour_png[i], "x")),
                     ("colour lookup", lambda i: rgb.decode_colours(decoded_colours[i], "x"))]:
        start = time.perf_counter()
        for _ in range(repeats):
            for i in range(len(items)):
                fn(i)
        times[name] = (time.perf_counter() - start) / (repeats * len(items)) * 1000
    print("\ncolour masks, from files to an evaluation sample (ms per sample):")
    for name, ms in times.items():
        print(f"  {name:22}{ms:>8.2f} ms")
    print(f"  colour masks cost {times['sample, colour masks'] / times['sample, index masks']:.2f}x index masks; "
          f"the lookup is {100 * times['colour lookup'] / times['sample, colour masks']:.0f}% of a sample")


def as_jpeg(image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


if __name__ == "__main__":
    main()
