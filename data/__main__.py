"""The dataset doctor: what a data set holds, as train.py will read it, without changing anything.

    python -m data ADEChallengeData2016/
    python -m data my_photos/ --split train          # a folder with a dataset.json
    python -m data cityscapes/ --split val
    python -m data scene_parse_150 --split "train[:100]" --num-labels 150

Prints the layout recognised, the splits and their sizes, the label mapping in effect, and, reading every
annotation of the split(s) once: the image sizes, the pixels of each class (named), the annotations with
values outside the classes, unpaired files, colours outside the palette, and the class weights that
`train.py --class-weights auto` would use (median frequency balancing over the training split).
"""

import argparse
import sys
from pathlib import Path

from segformer.cli import run_main
from segformer.errors import DataError
from segformer.labels import read_id2label

from . import measure_bands
from .folders import detect_folder_layout
from .sources import open_source
from .spec import decide_labels
from .stats import collect, median_frequency_weights


def get_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a dataset folder, a save_to_disk dir, parquet files, a hub id, or 'synthetic'")
    p.add_argument("--split", action="append", help="split(s) to read (default: every split of a folder, else train)")
    p.add_argument("--dataset-config", help="a dataset.json to read instead of the folder's own")
    p.add_argument("--num-labels", type=int, help="number of classes, where the data does not name them")
    p.add_argument("--id2label", help="JSON file naming the classes ({\"0\": \"wall\", ...})")
    p.add_argument("--reduce-labels", action=argparse.BooleanOptionalAction,
                   help="the ADE convention (0 ignored, k -> k-1); default: the data's own")
    p.add_argument("--image-column", default="image")
    p.add_argument("--annotation-column", default="annotation")
    p.add_argument("--allow-outside-data", action="store_true",
                   help="read the files that the data's own files name outside the folder (default: list them "
                        "as problems, as train.py refuses them)")
    p.add_argument("--top", type=int, default=30, help="classes to list, most pixels first (default 30)")
    return p.parse_args(argv)


def folder_splits(source: str, dataset_config: str | None) -> dict[str, int] | None:
    """Every split of a dataset folder with its number of pairs (None for other sources)."""
    path = Path(source)
    if not path.is_dir():
        return None
    layout = detect_folder_layout(path, Path(dataset_config) if dataset_config else None)
    return {name: len(pairs()[0]) for name, pairs in layout.splits.items()} if layout else None


def report(args, split: str) -> dict:
    samples = open_source(args.source, split, train=True, test_size=0, strict=False, dataset_config=args.dataset_config,
                          image_column=args.image_column, annotation_column=args.annotation_column,
                          allow_outside=args.allow_outside_data)
    spec, notes = decide_labels(data=samples.labels, num_labels=args.num_labels, reduce_labels=args.reduce_labels,
                                id2label=read_id2label(args.id2label) if args.id2label else None,
                                id2label_origin=f"--id2label {args.id2label}")
    print(f"\n== split {split}: {len(samples)} samples; {spec.describe()}")
    for note in notes:
        print(f"   ({note})")
    for name in samples.unpaired[:10]:
        print(f"   unpaired: {name}")
    if len(samples.unpaired) > 10:
        print(f"   ... {len(samples.unpaired) - 10} more unpaired files")
    for name in samples.outside[:10]:
        print(f"   outside the folder (left out; --allow-outside-data reads it): {name}")
    if len(samples.outside) > 10:
        print(f"   ... {len(samples.outside) - 10} more files outside the folder")
    stats = collect(samples, spec.mapping, spec.num_labels, description=f"reading {split}")
    sizes = stats.sizes.most_common(5)
    print("   image sizes: " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in sizes)
          + (f", ... {len(stats.sizes) - 5} more sizes" if len(stats.sizes) > 5 else ""))
    bands = samples.labels.bands
    if bands is not None and len(samples):  # full-precision bands: their statistics, for dataset.json
        count = bands if isinstance(bands, int) else bands.count
        measured = measure_bands(samples, count, limit=256)
        print(f"   bands: {count} (stored as {samples[0][0].dtype}); measured over {min(len(samples), 256)} images: "
              f"\"mean\": {[round(m, 4) for m in measured.mean]}, \"std\": {[round(s, 4) for s in measured.std]}"
              + ("" if isinstance(bands, int) else f" (dataset.json says {list(bands.mean)}, {list(bands.std)})"))
    labelled = int(stats.pixels.sum())
    total = labelled + stats.ignored
    print(f"   pixels: {labelled:,} labelled, {stats.ignored:,} ignored ({100 * stats.ignored / max(total, 1):.1f}%)")
    classes = spec.predicted_classes
    order = sorted(range(len(classes)), key=lambda c: -stats.pixels[c])
    print(f"   {'class':<28}{'pixels':>8}{'images':>8}")
    for c in order[:args.top]:
        share = 100 * stats.pixels[c] / max(labelled, 1)
        print(f"   {classes[c].strip()[:27]:<28}{share:>7.2f}%{stats.images_with[c]:>8}")
    absent = [classes[c].strip() for c in range(len(classes)) if stats.pixels[c] == 0]
    if len(order) > args.top:
        print(f"   ... {len(order) - args.top} more classes")
    if absent:
        print(f"   never present ({len(absent)}): " + ", ".join(absent[:12]) + (" ..." if len(absent) > 12 else ""))
    for name, values in stats.outside[:10]:
        print(f"   values outside the classes 0..{len(classes) - 1}: {name}: {values[:10]}")
    if len(stats.outside) > 10:
        print(f"   ... {len(stats.outside) - 10} more annotations with values outside the classes")
    for name, reason in stats.unreadable[:10]:
        print(f"   unreadable, of the wrong size, or of unknown colours: {reason}")
    if len(stats.unreadable) > 10:
        print(f"   ... {len(stats.unreadable) - 10} more annotations that cannot be read as labels")
    return {"samples": samples, "stats": stats, "classes": classes, "num_labels": spec.num_labels}


def main(argv=None) -> int:
    args = get_args(argv)
    return run_main(lambda: doctor(args))


def doctor(args) -> int:
    """What the data holds, split by split; 1 where it found problems. A file whose structure is wrong in
    several places (a labelling tool's export) has each of them listed."""
    try:
        return examine(args)
    except DataError as e:
        if not getattr(e, "problems", None):
            raise
        for problem in e.problems:
            print(f"   {problem}")
        print(f"\n{len(e.problems)} problem(s) found")
        return 1


def examine(args) -> int:
    splits = folder_splits(args.source, args.dataset_config)
    layout = open_source(args.source, (args.split or ["train"])[0], train=True, test_size=0, strict=False,
                         dataset_config=args.dataset_config, image_column=args.image_column,
                         annotation_column=args.annotation_column).layout
    print(f"{args.source}: {layout}")
    if splits:
        print("splits: " + ", ".join(f"{name} {count}" for name, count in splits.items()))
    chosen = args.split or (list(splits) if splits else ["train"])
    reports = {split: report(args, split) for split in chosen}
    train = next((r for s, r in reports.items() if s in ("train", "training", "all")), next(iter(reports.values())))
    if train["stats"].pixels.any() and train["num_labels"] > 1:  # the binary head takes no class weights
        weights = median_frequency_weights(train["stats"])
        print("\n--class-weights auto (median frequency balancing over this split): "
              + ", ".join(f"{c.strip()} {w:.3g}" for c, w in list(zip(train["classes"], weights))[:args.top])
              + (" ..." if len(weights) > args.top else ""))
    problems = sum(len(r["stats"].outside) + len(r["stats"].unreadable) + len(r["samples"].unpaired)
                   + len(r["samples"].outside) for r in reports.values())
    print(f"\n{problems} problem(s) found" if problems else "\nno problems found")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
