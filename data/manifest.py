"""`dataset.json`, the manifest of a data folder: its keys and what each may hold, checked key by key
(`read_manifest`). What the manifest's splits and labels make of a folder: `data/folders.py`."""

import math
from pathlib import Path

from segformer.errors import DataError, refusal
from segformer.files import exists, read_json_object
from segformer.labels import named_twice

from .mapping import IGNORE_INDEX, LABEL_MAPS_HOLD

MANIFEST_KEYS = {
    "classes": "list of class names; class id = position",
    "splits": 'object: split name -> {"images": dir, "annotations": dir}, {"list": file}, {"images": dir, '
              '"coco": file} or {"labelme": dir}',
    "image_suffix": "ending taken off image stems before pairing",
    "annotation_suffix": "ending taken off annotation stems before pairing",
    "annotation_format": '"index" (pixel value = raw label) or "rgb" (colour masks, decoded with "palette")',
    "palette": "[[r, g, b], ...], one per class (also used for overlays)",
    "reduce_labels": "bool: the ADE convention (0 ignored, k -> k-1)",
    "ignore_index": "int or list of raw values to ignore (in addition to 255)",
    "label_map": '{"<raw value>": class id or 255}, applied to raw values',
    "unknown_colors": '"error" (default) or "ignore": a colour of an rgb mask not in the palette',
    "name": "the data set's name (model cards)",
    "bands": "int: the images' band count, read at full precision (16-bit, multi-band, TIFF); see segformer/bands.py",
    "mean": "[one per band]: the bands' mean in stored units (the dataset doctor computes it)",
    "std": "[one per band]: the bands' standard deviation in stored units",
    "uncovered": 'COCO: pixels no annotation covers are "background" (class 0, the default) or "ignore"; with '
                 '"bands": pixels with no data in any band are "ignore" (255, the default) or "background"',
    "crowd": 'COCO: crowd regions are "ignore"d (the default) or "label"led with their category',
}


def read_manifest(path: Path) -> dict:
    """A `dataset.json`, checked key by key; everything it gets wrong is named with the file and key, every
    problem in one DataError (the dataset doctor lists them all)."""
    manifest = read_json_object(path, error=DataError)  # unreadable, not JSON, not an object: named
    problems = []

    def fail(key, message):
        problems.append(f"{path}: key {key!r} {message}")
    for key in manifest:
        if key not in MANIFEST_KEYS:
            fail(key, f"is not a manifest key; expected some of {', '.join(MANIFEST_KEYS)}")
    classes = manifest.get("classes")
    if classes is not None and not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        fail("classes", "must be a non-empty list of class names")
        classes = None
    if classes is not None:
        empty = [i for i, name in enumerate(classes) if not name.strip()]
        if empty:
            fail("classes", f"class {empty[0]} has an empty name; every class needs one")
        twice = named_twice(classes)
        if twice:
            fail("classes", f"names {twice[0]!r} twice (classes {[i for i, n in enumerate(classes) if n == twice[0]]}): "
                            f"a name is one class")
        if len(classes) > IGNORE_INDEX:
            fail("classes", f"has {len(classes)} classes; {LABEL_MAPS_HOLD}")
    if manifest.get("annotation_format", "index") not in ("index", "rgb"):
        fail("annotation_format", f"must be \"index\" or \"rgb\", got {manifest['annotation_format']!r}")
    palette = manifest.get("palette")
    if palette is not None:
        if not (isinstance(palette, list) and all(isinstance(c, list) and len(c) == 3 and all(
                isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in c) for c in palette)):
            fail("palette", "must be a list of [r, g, b] triples of integers 0..255")
        else:
            if classes is not None and len(palette) != len(classes):
                fail("palette", f"has {len(palette)} colours for {len(classes)} classes")
            if len({tuple(c) for c in palette}) < len(palette):
                fail("palette", "gives two classes the same colour")
            if len(palette) > IGNORE_INDEX:
                fail("palette", f"has {len(palette)} colours; colour masks hold at most {IGNORE_INDEX} classes")
    if manifest.get("annotation_format") == "rgb" and palette is None:
        fail("annotation_format", 'is "rgb": colour masks need a "palette"')
    for key in ("reduce_labels",):
        if key in manifest and not isinstance(manifest[key], bool):
            fail(key, f"must be true or false, got {manifest[key]!r}")
    for key in ("image_suffix", "annotation_suffix", "name"):
        if key in manifest and not isinstance(manifest[key], str):
            fail(key, f"must be a string, got {manifest[key]!r}")
    if manifest.get("unknown_colors", "error") not in ("error", "ignore"):
        fail("unknown_colors", f"must be \"error\" or \"ignore\", got {manifest['unknown_colors']!r}")
    ignore = manifest.get("ignore_index", [])
    ignore = [ignore] if isinstance(ignore, int) and not isinstance(ignore, bool) else ignore
    if not (isinstance(ignore, list)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ignore)):
        fail("ignore_index", f"must be a raw value or a list of them, got {manifest['ignore_index']!r}")
    manifest["ignore_index"] = ignore
    label_map = manifest.get("label_map", {})
    checked = {}
    if not isinstance(label_map, dict):
        fail("label_map", "must be an object {\"<raw value>\": class id or 255}")
        label_map = {}
    for raw, class_id in label_map.items():
        if not str(raw).isdigit() or not isinstance(class_id, int) or isinstance(class_id, bool) or not (
                0 <= class_id < len(classes or [0] * 65536) or class_id == IGNORE_INDEX):
            fail("label_map", f"entry {raw!r}: {class_id!r} must map a raw value to a class id"
                              + (f" 0..{len(classes) - 1}" if classes else "") + " or 255")
            continue
        checked[int(raw)] = class_id
    manifest["label_map"] = checked
    bands = manifest.get("bands")
    if bands is not None and (not isinstance(bands, int) or isinstance(bands, bool) or not 1 <= bands <= 64):
        fail("bands", f"must be the images' band count, 1..64, got {bands!r}")
    for key in ("mean", "std"):
        values = manifest.get(key)
        if values is None:
            continue
        if bands is None:
            fail(key, 'goes with "bands" (the images\' band count)')
        elif not (isinstance(values, list) and len(values) == bands and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
            fail(key, f"must be a list of {bands} numbers, one per band, got {values!r}")
        elif key == "std" and any(v <= 0 for v in values):
            fail(key, f"must be positive, got {values!r}")
    if ("mean" in manifest) != ("std" in manifest):
        fail("mean" if "mean" not in manifest else "std", 'is needed with "std" / "mean": give both, or neither '
             "(the run computes them from the training images)")
    splits = manifest.get("splits", {})
    if not isinstance(splits, dict) or not all(isinstance(v, dict) for v in splits.values()):
        fail("splits", 'must be an object: split name -> {"images": dir, "annotations": dir} or {"list": file}')
        splits = {}
    for name, spec in splits.items():
        if set(spec) not in ({"images", "annotations"}, {"list"}, {"images", "coco"}, {"labelme"}):
            fail(f"splits.{name}", f'must hold "images" and "annotations", "list", "images" and "coco" (a COCO '
                                   f'JSON), or "labelme" (a folder of LabelMe files); got {sorted(spec)}')
            continue
        for key, relative in spec.items():
            if not isinstance(relative, str) or not relative:
                fail(f"splits.{name}.{key}", f"must be a path relative to {Path(path).parent}, got {relative!r}")
            elif not exists(Path(path).parent / relative):
                fail(f"splits.{name}.{key}", f"names {relative!r}, which does not exist in {Path(path).parent}")
    if problems:
        raise refusal(problems)
    return manifest
