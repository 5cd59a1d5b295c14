"""Dataset folders in the layouts people have, recognised from the folder itself.

* ADEChallengeData2016: `images/{training,validation}/*.jpg` + `annotations/{training,validation}/*.png`
  (the 150 SceneParse classes, ADE convention); a flat `images/` + `annotations/` is one split.
* Cityscapes: `leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png` + `gtFine/<split>/<city>/
  *_gtFine_labelIds.png`, mapped to the 19 trainIds (every other labelId ignored); where only
  `*_gtFine_labelTrainIds.png` files exist, they are read as they are.
* Pascal VOC 2012: `JPEGImages/` + `SegmentationClass/` (palette PNGs: the index is the class, 255 the
  void border) + `ImageSets/Segmentation/{train,val,trainval}.txt`; 21 classes, background = 0.
  Found at the root, or below it in `VOC2012/` or `VOCdevkit/VOC2012/`.
* mmsegmentation's custom layout: `img_dir/{train,val}/` + `ann_dir/{train,val}/`; the stored values are
  class ids unless told otherwise, as mmseg's custom datasets default to (reduce_zero_label=False).
* labelling tools' exports (annotations drawn into label maps by data/labelling.py, which states the rules):
  COCO JSON as COCO and CVAT lay it out (`annotations/instances_<split>.json` + `images/[<split>/]` or
  `<split>2017/`; checked before the ADE layout, whose `annotations/` holds PNGs) and as Roboflow does
  (`<split>/_annotations.coco.json` beside the images); LabelMe folders (one JSON per image, in
  `<split>/` folders or flat); CVAT's "Segmentation mask 1.1" (VOC's folders, colour masks, `labelmap.txt`).
* anything else, with a manifest: `dataset.json` in the folder (its keys: `data/manifest.py`), which also
  refines a recognised layout (class names, palette, suffixes, label conventions).

Images and annotations of a folder pair by file stem. Where they do not pair as they are, a suffix that
every image stem (and every annotation stem) shares, starting with `_` or `-` (`_sat` / `_mask`,
`_leftImg8bit` / `_gtFine_labelIds`), is taken off first; a manifest can name the suffixes.
"""

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from segformer.bands import NODATA_RULES, Bands
from segformer.errors import DataError
from segformer.files import is_file, read_text
from segformer.images import IMAGE_SUFFIXES, is_image_file
from segformer.labels import (ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES, CITYSCAPES_LABEL_IDS,
                              CITYSCAPES_PALETTE, VOC_CLASSES, VOC_PALETTE)

from .manifest import read_manifest
from .mapping import ADE, IDENTITY, LabelMapping
from .labelling import (LABELME_IGNORE, CocoFile, coco_rules, is_labelme, labelme_classes, labelme_pairs,
                    read_labelmap)

# What a split is called in each layout: the name asked for -> the names a folder may use.
SPLIT_ALIASES = {"train": ("train", "training"), "training": ("training", "train"),
                 "validation": ("validation", "val", "valid"), "val": ("val", "validation", "valid"),
                 "test": ("test", "testing")}


@dataclass
class FolderLayout:
    name: str  # for the run's summary: "Cityscapes", "Pascal VOC 2012", ...
    splits: dict[str, Callable[[], tuple[list, list]]]  # split -> () -> (pairs, unpaired file names)
    class_names: tuple | None = None
    palette: tuple | None = None  # the class colours, for overlays
    mapping: LabelMapping = field(default_factory=lambda: IDENTITY)
    known: bool = True  # the layout fixes its label convention (else `mapping` is a guess, said)
    assumed: bool = True  # class_names are the layout's defaults, which an explicit --num-labels/--id2label wins over
    bands: "Bands | int | None" = None  # images at full precision with this many bands (int: statistics to compute)
    nodata: str = "ignore"  # the label of a pixel with no data in any band (segformer.bands.NODATA_RULES)

    def split(self, name: str, root: Path):
        """(pairs, unpaired, single) of the split asked for; a layout with one split serves every name."""
        if len(self.splits) == 1:
            only = next(iter(self.splits.values()))
            return (*only(), True)
        for candidate in SPLIT_ALIASES.get(name, (name,)):
            if candidate in self.splits:
                return (*self.splits[candidate](), False)
        raise DataError(f"{root}: no split {name!r}; the {self.name} has {sorted(self.splits)}")


def subfolders(folder: Path) -> list[str]:
    """Split folders: visible directories not named like images."""
    return sorted(p.name for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.suffix.lower() not in IMAGE_SUFFIXES)


def _strip(stem: str, suffix: str) -> str:
    return stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem


def _shared_suffix(stems: list[str]) -> str:
    """The longest ending that all stems share and that starts with '_' or '-' ('' if none)."""
    if not stems:
        return ""
    common = os.path.commonprefix([s[::-1] for s in stems])[::-1]
    cut = max(common.rfind("_"), common.rfind("-"))
    suffix = common[cut:] if cut >= 0 else ""
    return suffix if all(len(s) > len(suffix) for s in stems) else ""


def pair_by_stem(images_dir: Path, annotations_dir: Path, *, image_suffix: str | None = None,
                 annotation_suffix: str | None = None) -> tuple[list, list]:
    """(image, annotation) path pairs matched by stem, ordered by it, and the files that found no partner."""
    for folder, key in ((images_dir, "images"), (annotations_dir, "annotations")):
        if not folder.is_dir():
            raise DataError(f"{folder}: the {key} folder does not exist")
    images = sorted(p for p in images_dir.iterdir() if is_image_file(p))
    annotations = sorted(p for p in annotations_dir.iterdir() if is_image_file(p))

    def match(image_suffix, annotation_suffix):
        by_image = {_strip(p.stem, image_suffix): p for p in images}
        by_annotation = {_strip(p.stem, annotation_suffix): p for p in annotations}
        lonely = sorted(set(by_image) ^ set(by_annotation))
        return [(by_image[s], by_annotation[s]) for s in sorted(by_image) if s in by_annotation], \
            [str(by_image.get(s) or by_annotation.get(s)) for s in lonely]

    if image_suffix is not None or annotation_suffix is not None:
        return match(image_suffix or "", annotation_suffix or "")
    pairs, unpaired = match("", "")
    if unpaired:  # not as they are: try the endings every image and every annotation stem share
        guess = match(_shared_suffix([p.stem for p in images]), _shared_suffix([p.stem for p in annotations]))
        if len(guess[1]) < len(unpaired):
            return guess
    return pairs, unpaired


def folder_pairs(images_dir: Path, annotations_dir: Path, **suffixes):
    """A split of a layout: images and annotations paired by stem when the split is read."""
    return lambda: pair_by_stem(images_dir, annotations_dir, **suffixes)


# ---- the layouts -----------------------------------------------------------------------------------------

def ade_layout(root: Path, suffixes: dict) -> FolderLayout:
    images, annotations = root / "images", root / "annotations"
    splits = subfolders(images)
    if not splits:  # flat: one split, convention unknown
        return FolderLayout("images/ + annotations/ folder", {"all": folder_pairs(images, annotations, **suffixes)},
                      mapping=ADE, known=False)
    return FolderLayout("ADEChallengeData2016 folder",
                  {s: folder_pairs(images / s, annotations / s, **suffixes) for s in splits},
                  class_names=ADE20K_CLASSES, palette=ADE20K_PALETTE, mapping=ADE)


def cityscapes_layout(root: Path, suffixes: dict) -> FolderLayout:
    images, labels = root / "leftImg8bit", root / "gtFine"
    train_ids = not any(labels.glob("*/*/*_gtFine_labelIds.png")) and any(labels.glob("*/*/*_gtFine_labelTrainIds.png"))
    ending = "_gtFine_labelTrainIds.png" if train_ids else "_gtFine_labelIds.png"

    def pairs_of(split):
        def pairs():
            found, lonely = [], []
            for image in sorted((images / split).glob("*/*_leftImg8bit.png")):
                base = image.name[: -len("_leftImg8bit.png")]
                annotation = labels / split / image.parent.name / f"{base}{ending}"
                (found.append((image, annotation)) if annotation.is_file() else lonely.append(str(image)))
            return found, lonely
        return pairs
    mapping = IDENTITY if train_ids else LabelMapping(
        label_map={label_id: train_id for train_id, label_id in enumerate(CITYSCAPES_LABEL_IDS)}, unmapped="ignore",
        name="Cityscapes labelIds -> the 19 trainIds, every other labelId ignored")
    return FolderLayout("Cityscapes folder" + (" (labelTrainIds)" if train_ids else ""),
                  {s: pairs_of(s) for s in subfolders(images)}, class_names=CITYSCAPES_CLASSES,
                  palette=CITYSCAPES_PALETTE, mapping=mapping)


def voc_layout(root: Path, suffixes: dict) -> FolderLayout:
    lists = root / "ImageSets" / "Segmentation"
    if not lists.is_dir():
        raise DataError(f"{root}: a Pascal VOC folder without ImageSets/Segmentation/ (its split lists)")

    def pairs_of(list_file):
        def pairs():
            found, lonely = [], []
            for line in read_text(list_file, error=DataError, expected="a list of file stems").split():
                image, annotation = root / "JPEGImages" / f"{line}.jpg", root / "SegmentationClass" / f"{line}.png"
                missing = [str(p) for p in (image, annotation) if not is_file(p)]
                (lonely.extend(missing) if missing else found.append((image, annotation)))
            return found, lonely
        return pairs
    return FolderLayout("Pascal VOC 2012 folder", {p.stem: pairs_of(p) for p in sorted(lists.glob("*.txt"))},
                  class_names=VOC_CLASSES, palette=VOC_PALETTE,
                  mapping=replace(IDENTITY, name="palette index = class (0 = background); 255 (void border) ignored"))


MMSEG_DEFAULT = replace(IDENTITY, name="values are class ids (mmsegmentation's default for custom data, "
                                        "reduce_zero_label=False)")


def mmseg_layout(root: Path, suffixes: dict) -> FolderLayout:
    images, annotations = root / "img_dir", root / "ann_dir"
    splits = subfolders(images)
    if not splits:
        return FolderLayout("img_dir/ + ann_dir/ folder", {"all": folder_pairs(images, annotations, **suffixes)},
                      mapping=MMSEG_DEFAULT, known=False)
    return FolderLayout("mmsegmentation img_dir/ + ann_dir/ folder",
                  {s: folder_pairs(images / s, annotations / s, **suffixes) for s in splits},
                  mapping=MMSEG_DEFAULT, known=False)


def cvat_mask_layout(root: Path, suffixes: dict) -> FolderLayout:
    """CVAT's "Segmentation mask 1.1" export: VOC's folders (images by any extension, if exported with
    them) with colour masks in SegmentationClass/ and their colours in labelmap.txt."""
    names, colours = read_labelmap(root / "labelmap.txt")
    lists = root / "ImageSets" / "Segmentation"
    images = {p.stem: p for p in sorted((root / "JPEGImages").iterdir()) if is_image_file(p)} \
        if (root / "JPEGImages").is_dir() else {}

    def pairs_of(list_file):
        def pairs():
            found, lonely = [], []
            for stem in read_text(list_file, error=DataError, expected="a list of file stems").split():
                image, annotation = images.get(stem), root / "SegmentationClass" / f"{stem}.png"
                if image is None or not is_file(annotation):
                    lonely.append(str(annotation if image else root / "JPEGImages" / f"{stem}.*"))
                else:
                    found.append((image, annotation))
            return found, lonely
        return pairs
    if not lists.is_dir():
        raise DataError(f"{root}: a CVAT mask export without ImageSets/Segmentation/ (its split lists)")
    mapping = LabelMapping(palette=colours, name=f"colours of {root / 'labelmap.txt'} -> classes")
    return FolderLayout("CVAT Segmentation mask 1.1 export", {p.stem: pairs_of(p) for p in sorted(lists.glob("*.txt"))},
                  class_names=names, palette=colours, mapping=mapping, assumed=False)


COCO_NAMES = ("instances_", "stuff_", "panoptic_")


def coco_annotation_files(root: Path) -> dict[str, Path]:
    """COCO's and CVAT's layout: annotations/instances_<split>.json -> {split: file} (split names without
    a year: train2017 -> train)."""
    folder = root / "annotations"
    if not folder.is_dir():
        return {}
    files = {}
    for path in sorted(folder.glob("*.json")):
        prefix = next((p for p in COCO_NAMES if path.stem.startswith(p)), None)
        if prefix in ("instances_", "stuff_"):
            split = path.stem[len(prefix):].rstrip("0123456789") or path.stem[len(prefix):]
            files.setdefault(split, path)  # instances_ before stuff_ where both exist
    return files


def coco_layout(root: Path, manifest: dict, manifest_path: Path | None, files: dict[str, Path],
                images_of) -> FolderLayout:
    rules = coco_rules(manifest, manifest_path or root)
    cocos = {split: CocoFile(path, **rules) for split, path in files.items()}
    names = {coco.class_names() for coco in cocos.values()}
    if len(names) > 1:
        raise DataError(f"{root}: the splits' COCO files have different categories: "
                        + "; ".join(f"{s}: {', '.join(c.class_names())}" for s, c in cocos.items()))
    first = next(iter(cocos.values()))
    ids = [f"{category}->{class_id}" for category, class_id in first.class_of().items()]
    shown = ", ".join(ids[:8]) + (f", ... ({len(ids)} categories)" if len(ids) > 8 else "")
    uncovered = "0 background" if rules["uncovered"] == "background" else "uncovered pixels ignored"
    mapping = replace(IDENTITY, name=f"COCO category id -> class id {shown}; {uncovered}; crowd regions "
                                     f"{'ignored' if rules['crowd'] == 'ignore' else 'labelled'}")
    return FolderLayout("COCO annotations", {s: (lambda c=c, s=s: c.pairs(images_of(s))) for s, c in cocos.items()},
                  class_names=names.pop(), mapping=mapping, assumed=False)


def coco_images_folder(root: Path, split: str, annotation_file: Path) -> Path:
    """Where COCO's images of a split lie: images/<split>/, images/, or <split><year>/ beside annotations/."""
    year = annotation_file.stem.split("_", 1)[1]
    for candidate in (root / "images" / year, root / "images" / split, root / year, root / split, root / "images"):
        if candidate.is_dir():
            return candidate
    return root / "images"


def roboflow_files(root: Path) -> dict[str, Path]:
    """Roboflow's COCO export: <split>/_annotations.coco.json beside the split's images."""
    return {p.parent.name: p for p in sorted(root.glob("*/_annotations.coco.json"))}


def labelme_files(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.glob("*.json")) if p.name != "dataset.json"]
    return files if files and is_labelme(files[0]) else []


def labelme_layout(root: Path, manifest: dict) -> FolderLayout | None:
    """LabelMe folders: one JSON per image, in <split>/ folders (train, val, ...) or anywhere below the
    root (one split)."""
    split_names = {name for names in SPLIT_ALIASES.values() for name in names}
    splits = {name: labelme_files(root / name) for name in subfolders(root) if name in split_names}
    splits = {name: files for name, files in splits.items() if files}
    if not splits:
        folders = sorted({p.parent for p in root.rglob("*.json") if not p.name.startswith(".")})
        files = [f for folder in folders for f in labelme_files(folder)]
        if not files:
            return None
        splits = {"all": files}
    classes = labelme_classes(root, [f for files in splits.values() for f in files], manifest.get("classes"))
    order = "the manifest" if manifest.get("classes") else "labels.txt" if (root / "labels.txt").is_file() else \
        "background, then the labels sorted"
    mapping = replace(IDENTITY, name=f"LabelMe labels -> classes ({order}; {LABELME_IGNORE} ignored)")
    return FolderLayout("LabelMe folder", {name: (lambda f=files: labelme_pairs(f, classes))
                                     for name, files in splits.items()},
                  class_names=classes, mapping=mapping, assumed=False)


def find_voc_root(root: Path) -> Path | None:
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "SegmentationClass").is_dir():
            return candidate
    return None


@dataclass(frozen=True)
class Found:
    """What detection knows of a folder: its root, its manifest (empty where none) and the manifest's suffixes."""
    root: Path
    manifest: dict
    manifest_path: Path | None
    suffixes: dict


@dataclass(frozen=True)
class FolderLayoutRule:
    """A row of FOLDER_LAYOUTS: `find` says whether a folder is in the layout (what it found, or None) and
    `build` makes the FolderLayout of it."""
    name: str
    find: Callable[[Found], object]
    build: Callable[[Found, object], FolderLayout]


def has_folders(*names):
    """A row's `find`: the root, where it has all these folders."""
    return lambda f: f.root if all((f.root / name).is_dir() for name in names) else None


def _cvat_root(f: Found) -> Path | None:
    voc_root = find_voc_root(f.root)
    return voc_root if voc_root and (voc_root / "labelmap.txt").is_file() else None


# Detection tries the rows in this order and takes the first that finds its layout. The order matters where
# layouts share folders: CVAT's masks are VOC's folders plus labelmap.txt; COCO's annotations/instances_*.json
# comes before ADE20K, whose annotations/ holds PNGs; LabelMe's JSON files anywhere below the root, last.
# A layout is one row here + its function above.
FOLDER_LAYOUTS = [
    FolderLayoutRule("dataset.json splits", lambda f: f.manifest.get("splits") or None,
                     lambda f, _: manifest_layout(f.manifest, f.manifest_path.parent, f.suffixes, f.manifest_path)),
    FolderLayoutRule("Cityscapes", has_folders("leftImg8bit", "gtFine"), lambda f, _: cityscapes_layout(f.root, f.suffixes)),
    FolderLayoutRule("CVAT segmentation mask 1.1", _cvat_root, lambda f, root: cvat_mask_layout(root, f.suffixes)),
    FolderLayoutRule("Pascal VOC 2012", lambda f: find_voc_root(f.root), lambda f, root: voc_layout(root, f.suffixes)),
    FolderLayoutRule("mmsegmentation", has_folders("img_dir", "ann_dir"), lambda f, _: mmseg_layout(f.root, f.suffixes)),
    FolderLayoutRule("COCO JSON", lambda f: coco_annotation_files(f.root) or None,
                     lambda f, files: coco_layout(f.root, f.manifest, f.manifest_path, files,
                                                  lambda split: coco_images_folder(f.root, split, files[split]))),
    FolderLayoutRule("ADE20K", has_folders("images", "annotations"), lambda f, _: ade_layout(f.root, f.suffixes)),
    FolderLayoutRule("COCO JSON (Roboflow)", lambda f: roboflow_files(f.root) or None,
                     lambda f, files: coco_layout(f.root, f.manifest, f.manifest_path, files,
                                                  lambda split: f.root / split)),
    FolderLayoutRule("LabelMe", lambda f: labelme_layout(f.root, f.manifest), lambda f, layout: layout),
]


def detect_folder_layout(root: Path, manifest_path: Path | None = None) -> FolderLayout | None:
    """The layout of a folder (None: not a dataset folder): the first row of FOLDER_LAYOUTS that finds it,
    refined by the folder's manifest where it has one."""
    manifest_path = manifest_path or (root / "dataset.json" if (root / "dataset.json").is_file() else None)
    manifest = read_manifest(manifest_path) if manifest_path else {}
    found = Found(root, manifest, manifest_path,
                  {k: manifest[k] for k in ("image_suffix", "annotation_suffix") if k in manifest})
    for rule in FOLDER_LAYOUTS:
        if (what := rule.find(found)) is not None:
            layout = rule.build(found, what)
            return refine(layout, manifest, manifest_path) if manifest else layout
    if manifest:
        raise DataError(f"{manifest_path}: no \"splits\", and {root} is in no layout known here ("
                        f"{', '.join(rule.name for rule in FOLDER_LAYOUTS[1:])}) to take them from")
    return None


# ---- the layouts a manifest names or refines ------------------------------------------------------------

def _list_pairs(list_file: Path, base: Path):
    """`image annotation` per line (paths relative to the manifest; a tab separates paths with spaces)."""
    def pairs():
        found, lonely = [], []
        text = read_text(list_file, error=DataError, expected="a list of 'image annotation' lines")
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            if len(fields) != 2:
                raise DataError(f"{list_file} line {number}: expected 'image annotation', got {line.strip()!r}")
            image, annotation = (base / f.strip() for f in fields)
            missing = [str(p) for p in (image, annotation) if not is_file(p)]
            (lonely.extend(missing) if missing else found.append((image, annotation)))
        return found, lonely
    return pairs


def manifest_layout(manifest: dict, base: Path, suffixes: dict, path: Path) -> FolderLayout:
    """The splits a manifest names: folder pairs, lists, COCO files with their images, LabelMe folders (one
    kind of labelling tool's files per manifest; their classes are the files', as in data/labelling.py)."""
    specs = manifest["splits"]
    kinds = {kind for spec in specs.values() for kind in ("coco", "labelme") if kind in spec}
    if len(kinds) > 1 or (kinds and any(not set(spec) & kinds for spec in specs.values())):
        raise DataError(f"{path}: key 'splits' mixes kinds of annotations; give every split the same kind")
    if kinds == {"coco"}:
        files = {name: base / spec["coco"] for name, spec in specs.items()}
        layout = coco_layout(base, manifest, path, files, lambda split: base / specs[split]["images"])
        return replace(layout, name=f"COCO annotations named by {path.name}")
    if kinds == {"labelme"}:
        files = {name: labelme_files(base / spec["labelme"]) for name, spec in specs.items()}
        classes = labelme_classes(base, [f for split in files.values() for f in split], manifest.get("classes"))
        mapping = replace(IDENTITY, name=f"LabelMe labels -> classes ({LABELME_IGNORE} ignored)")
        return FolderLayout(f"LabelMe folders named by {path.name}",
                      {name: (lambda f=split: labelme_pairs(f, classes)) for name, split in files.items()},
                      class_names=classes, mapping=mapping, assumed=False)
    splits = {}
    for name, spec in specs.items():
        if "list" in spec:
            splits[name] = _list_pairs(base / spec["list"], base)
        else:
            splits[name] = folder_pairs(base / spec["images"], base / spec["annotations"], **suffixes)
    return FolderLayout("dataset.json", splits, mapping=IDENTITY)


def refine(layout: FolderLayout, manifest: dict, path: Path) -> FolderLayout:
    """What a manifest says of the labels, on top of what the layout knows."""
    classes = manifest.get("classes")
    if classes is None and layout.class_names is None:
        raise DataError(f"{path}: key 'classes' is needed: the {layout.name} does not name its classes")
    palette = tuple(map(tuple, manifest["palette"])) if "palette" in manifest else None
    mapping = layout.mapping
    if any(k in manifest for k in ("reduce_labels", "ignore_index", "label_map", "annotation_format")) or palette:
        mapping = LabelMapping(
            reduce_labels=manifest.get("reduce_labels", mapping.reduce_labels),
            label_map=manifest["label_map"] or dict(mapping.label_map), ignore=tuple(manifest["ignore_index"]),
            unmapped=mapping.unmapped if not manifest["label_map"] else "keep",
            palette=palette if manifest.get("annotation_format") == "rgb" else None,
            unknown_colours=manifest.get("unknown_colors", "error"))
    name = f"{layout.name} described by {path.name}" if "splits" not in manifest else f"{path}"
    bands = manifest.get("bands")
    nodata = manifest.get("uncovered", "ignore") if bands is not None else "ignore"  # no-data pixels' label
    if nodata not in NODATA_RULES:
        raise DataError(f"{path}: \"uncovered\" (what a pixel with no data in any band is) must be "
                        f"{' or '.join(map(repr, NODATA_RULES))}, got {nodata!r}")
    if bands is not None and "mean" in manifest:
        bands = Bands(bands, tuple(map(float, manifest["mean"])), tuple(map(float, manifest["std"])), nodata=nodata)
    return replace(layout, name=name, bands=bands, nodata=nodata, class_names=tuple(classes) if classes else layout.class_names,
                   palette=palette or layout.palette, mapping=mapping, assumed=layout.assumed and not classes,
                   known=layout.known or "reduce_labels" in manifest or "splits" in manifest)
