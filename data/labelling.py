"""Annotations as labelling tools export them, drawn into label maps: COCO JSON (CVAT, Label Studio,
Roboflow and COCO itself), LabelMe JSON, and CVAT's "Segmentation mask 1.1" (data/folders.py finds them).

The rules, the same in training, evaluation and the dataset doctor:

* COCO (`pycocotools` draws every polygon and RLE, the format's own rasteriser): the classes are
  "background" (the pixels no annotation covers), then the categories in the order of their ids, given
  contiguous ids 1..K (said in the run's first line). With `"uncovered": "ignore"` in the manifest there
  is no background class: uncovered pixels are ignored and the categories count from 0. Crowd regions
  (`iscrowd: 1`) are ignored (`"crowd": "ignore"`, the default; drawn last, so no pixel of them trains)
  or labelled with their category (`"crowd": "label"`). Where annotations overlap, the smaller one wins:
  they are drawn largest first (an object lying on a table stays the object), equal areas in
  annotation-id order; the area is the annotation's `area`, or its mask's where it has none.
* LabelMe (one JSON per image: `shapes` of polygons, rectangles, circles; the image beside it, or in its
  `imageData`): the classes are "background" then the labels, in the order of `labels.txt` (labelme2voc's
  file: `__ignore__`, `_background_`, then one per line) or of the manifest's "classes", else sorted; the
  label `__ignore__` is ignored. Shapes are drawn in file order, later on top, as LabelMe shows them.
  Rectangles and circles become the polygons labelme2coco makes of them, so that a LabelMe folder and its
  COCO conversion give identical label maps; lines and points cover no pixel and are left out.
* CVAT "Segmentation mask 1.1": Pascal VOC's folders with colour masks and `labelmap.txt` (name:r,g,b per
  line), decoded exactly by those colours (data/folders.py).

Every problem names the file and the annotation: a polygon outside its image, an unknown category, an
image the JSON names but the folder lacks, a shape LabelMe does not define. A file's (or a LabelMe folder's)
structure is checked before anything is drawn, and every problem found is kept (`segformer.errors.refusal`):
training stops at the first, naming how many more there are; `python -m data doctor` lists them all.
"""

import base64
import contextlib
import io
import math
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from segformer.errors import DataError, refusal
from segformer.files import is_file, read_json, read_text
from segformer.images import decode, declared_pixel_limit, pixel_count_problem
from segformer.labels import named_twice

from .mapping import IGNORE_INDEX, LABEL_MAPS_HOLD

COCO_RULES = {"uncovered": ("background", "ignore"), "crowd": ("ignore", "label")}


class Drawn:
    """The label map of one image, drawn from vector annotations when read: `render()` -> PIL mode "L"
    (class ids, 255 ignored). Stands where a folder pair has its annotation file."""

    def __init__(self, name: str, draw):
        self.name, self.draw = name, draw

    def render(self) -> Image.Image:
        image = Image.fromarray(self.draw())
        image.filename = self.name  # errors found later name the source
        return image

    def __str__(self):
        return self.name


def _pycocotools():
    try:
        from pycocotools import mask as coco_mask
        from pycocotools.coco import COCO
    except ImportError:
        raise DataError("COCO and LabelMe annotations are drawn by pycocotools: pip install pycocotools "
                        "(or the project's [labelling] extra)") from None
    return COCO, coco_mask


def polygon_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """(H, W) bool: the union of polygons [x0, y0, x1, y1, ...], drawn as COCO draws them."""
    _, coco_mask = _pycocotools()
    rles = coco_mask.frPyObjects(polygons, height, width)
    return coco_mask.decode(coco_mask.merge(rles)).astype(bool)


# ---- COCO -------------------------------------------------------------------------------------------------

class CocoFile:
    """One COCO JSON: its images, categories and annotations, read once (pycocotools' index)."""

    def __init__(self, path: Path, *, uncovered: str = "background", crowd: str = "ignore"):
        self.path, self.uncovered, self.crowd = path, uncovered, crowd

    @cached_property
    def coco(self):
        """pycocotools' index of the file, built once its structure is checked (coco_problems)."""
        COCO, _ = _pycocotools()
        content = read_json(self.path, error=DataError)
        problems = coco_problems(content, self.path, background=self.uncovered == "background")
        if problems:
            raise refusal(problems)
        coco = COCO()
        coco.dataset = content
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            coco.createIndex()
        return coco

    @cached_property
    def category_ids(self) -> list[int]:
        ids = sorted(self.coco.cats)
        if not ids:
            raise DataError(f"{self.path}: no \"categories\"")
        return ids

    def class_names(self) -> tuple[str, ...]:
        names = tuple(str(self.coco.cats[i].get("name", i)) for i in self.category_ids)
        return (("background",) if self.uncovered == "background" else ()) + names

    def class_of(self) -> dict[int, int]:
        """category id -> class id."""
        first = 1 if self.uncovered == "background" else 0
        return {category: first + i for i, category in enumerate(self.category_ids)}

    def pairs(self, images_dir: Path) -> tuple[list, list[str]]:
        """((image file, Drawn), ...) for every image of the file that `images_dir` holds, and the ones it lacks."""
        found, lonely = [], []
        for image_id in sorted(self.coco.imgs):
            entry = self.coco.imgs[image_id]
            path = images_dir / entry["file_name"]
            if not is_file(path) and is_file(images_dir / Path(entry["file_name"]).name):
                path = images_dir / Path(entry["file_name"]).name  # a tool's folder prefix on file_name
            if not is_file(path):
                lonely.append(f"{self.path}: image id {image_id}, {entry['file_name']}: not in {images_dir}")
                continue
            found.append((path, Drawn(f"{self.path} image id {image_id} ({entry['file_name']})",
                                      lambda image_id=image_id: self.draw(image_id))))
        return found, lonely

    def draw(self, image_id: int) -> np.ndarray:
        """(H, W) uint8 class ids of one image (see the module's rules)."""
        entry = self.coco.imgs[image_id]
        height, width = int(entry["height"]), int(entry["width"])
        label = np.full((height, width), 0 if self.uncovered == "background" else IGNORE_INDEX, np.uint8)
        class_of = self.class_of()
        annotations = self.coco.imgToAnns.get(image_id, [])
        ignored_crowd = self.crowd == "ignore"
        order = sorted(annotations, key=lambda a: (ignored_crowd and bool(a.get("iscrowd", 0)),  # ignored crowds last
                                                   -float(a.get("area") or self._area(a)), a["id"]))
        for annotation in order:
            where = f"{self.path} annotation id {annotation['id']} (image {entry['file_name']})"
            if annotation.get("category_id") not in class_of:
                raise DataError(f"{where}: category {annotation.get('category_id')!r} is not one of the file's "
                                f"categories {self.category_ids}")
            segmentation = annotation.get("segmentation")
            if isinstance(segmentation, list):
                for polygon in segmentation:
                    if problem := polygon_problem(polygon, height, width, where):
                        raise DataError(problem)
            elif isinstance(segmentation, dict):
                if list(segmentation.get("size", [])) != [height, width]:
                    raise DataError(f"{where}: an RLE of size {segmentation.get('size')}, the image is "
                                    f"{height}x{width}")
            else:
                raise DataError(f"{where}: no \"segmentation\" (polygons or RLE)")
            try:
                mask = self.coco.annToMask(annotation).astype(bool)
            except Exception as e:  # a malformed RLE string
                raise DataError(f"{where}: cannot draw its segmentation ({type(e).__name__}: {e})") from None
            crowd = bool(annotation.get("iscrowd", 0))
            label[mask] = IGNORE_INDEX if crowd and self.crowd == "ignore" else class_of[annotation["category_id"]]
        return label

    def _area(self, annotation) -> float:
        return float(self.coco.annToMask(annotation).sum())


def polygon_problem(polygon, height: int, width: int, where: str) -> str | None:
    """What is wrong with a polygon [x0, y0, x1, y1, ...] of a height x width image (None: nothing): too few
    numbers, or a point outside the image (a pixel of slack at the edges, where tools put the border)."""
    if len(polygon) < 6 or len(polygon) % 2:
        return f"{where}: a polygon of {len(polygon)} numbers; expected x, y pairs, 3 at least"
    xs, ys = np.asarray(polygon[0::2], float), np.asarray(polygon[1::2], float)
    outside = (xs < -1) | (xs > width + 1) | (ys < -1) | (ys > height + 1)
    if outside.any():
        i = int(np.argmax(outside))
        return f"{where}: polygon point ({xs[i]:g}, {ys[i]:g}) is outside the {width}x{height} image"
    return None


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def coco_problems(content, path: Path, *, background: bool) -> list[str]:
    """Every problem of a COCO file's structure, each one line naming the entry: what pycocotools would take
    silently (an image id used twice: one image dropped and its annotations drawn on the other; more
    classes than the label maps hold) or fail on with a traceback (a missing size, an area that is text)."""
    if not isinstance(content, dict):
        return [f"{path}: expected a COCO JSON object, got {type(content).__name__}"]
    problems = []
    for key in ("images", "categories", "annotations"):
        if not isinstance(content.get(key, []), list):
            problems.append(f"{path}: \"{key}\" must be a list, got {type(content[key]).__name__}")
    if problems:
        return problems
    limit = declared_pixel_limit()
    images, categories, images_entries = {}, {}, {}
    for i, entry in enumerate(content.get("images", [])):
        where = f"{path}: images[{i}]"
        if not isinstance(entry, dict) or not is_id(entry.get("id")):
            problems.append(f"{where}: expected an object with an integer \"id\"")
            continue
        where = f"{path}: image id {entry['id']}"
        if entry["id"] in images:
            problems.append(f"{where}: the id is used by two images ({images[entry['id']]!r} and "
                            f"{entry.get('file_name')!r}); each image needs its own")
        images[entry["id"]] = entry.get("file_name")
        images_entries[entry["id"]] = entry
        if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
            problems.append(f"{where}: expected a \"file_name\" string")
        size = [entry.get(key) for key in ("height", "width")]
        if not all(is_id(v) and v > 0 for v in size):
            problems.append(f"{where}: \"height\" and \"width\" must be positive integers, got {size}")
        elif size[0] * size[1] > limit:
            problems.append(pixel_count_problem(size[1], size[0], where, limit, declared=True))
    for i, entry in enumerate(content.get("categories", [])):
        if not isinstance(entry, dict) or not is_id(entry.get("id")):
            problems.append(f"{path}: categories[{i}]: expected an object with an integer \"id\"")
            continue
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{path}: category id {entry['id']}: expected a non-empty \"name\"")
        elif name in categories.values():
            problems.append(f"{path}: category id {entry['id']}: the name {name!r} is another category's too")
        if entry["id"] in categories:
            problems.append(f"{path}: category id {entry['id']}: the id is used by two categories")
        categories[entry["id"]] = name
    classes = len(categories) + background
    if classes > IGNORE_INDEX:
        problems.append(f"{path}: {len(categories)} categories{' and the background' if background else ''} make "
                        f"{classes} classes; {LABEL_MAPS_HOLD}: merge categories, or drop some from the file")
    seen = set()
    for i, annotation in enumerate(content.get("annotations", [])):
        if not isinstance(annotation, dict) or not is_id(annotation.get("id")):
            problems.append(f"{path}: annotations[{i}]: expected an object with an integer \"id\"")
            continue
        where = f"{path}: annotation id {annotation['id']}"
        if annotation["id"] in seen:
            problems.append(f"{where}: the id is used by two annotations")
        seen.add(annotation["id"])
        if not is_id(annotation.get("image_id")) or annotation["image_id"] not in images:
            problems.append(f"{where}: image_id {annotation.get('image_id')!r} is not one of the file's images")
        if not is_id(annotation.get("category_id")) or annotation["category_id"] not in categories:
            problems.append(f"{where}: category_id {annotation.get('category_id')!r} is not one of the file's "
                            f"categories {sorted(categories)}")
        if "area" in annotation and not is_number(annotation["area"]):
            problems.append(f"{where}: \"area\" must be a number, got {annotation['area']!r}")
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, list):
            if not segmentation or not all(isinstance(p, list) and all(map(is_number, p)) for p in segmentation):
                problems.append(f"{where}: \"segmentation\" must be polygons, lists of numbers x0, y0, x1, y1, ...; "
                                f"got {str(segmentation)[:60]}")
        elif isinstance(segmentation, dict):
            counts, size = segmentation.get("counts"), segmentation.get("size")
            image = images_entries.get(annotation.get("image_id")) if is_id(annotation.get("image_id")) else None
            if not (isinstance(counts, str) or (isinstance(counts, list) and all(is_id(c) and c >= 0 for c in counts))):
                problems.append(f"{where}: an RLE \"segmentation\" needs \"counts\": a string or a list of counts "
                                f"of pixels, got {str(counts)[:40]}")
            elif not (isinstance(size, list) and len(size) == 2 and all(is_id(v) and v > 0 for v in size)):
                problems.append(f"{where}: an RLE \"segmentation\" needs \"size\": [height, width], got {size!r}")
            elif isinstance(image, dict) and size != [image.get("height"), image.get("width")]:
                problems.append(f"{where}: its RLE is {size[0]}x{size[1]} (height x width), but its image is "
                                f"{image.get('height')}x{image.get('width')}")
        else:
            problems.append(f"{where}: no \"segmentation\" (polygons or RLE)")
    return problems


def coco_rules(manifest: dict, path: Path) -> dict:
    """The manifest's "uncovered" and "crowd" choices, checked."""
    rules = {}
    for key, allowed in COCO_RULES.items():
        value = manifest.get(key, allowed[0])
        if value not in allowed:
            raise DataError(f"{path}: key {key!r} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        rules[key] = value
    return rules


# ---- LabelMe ----------------------------------------------------------------------------------------------

LABELME_IGNORE, LABELME_AREA_SHAPES, LABELME_NO_AREA = "__ignore__", ("polygon", "rectangle", "circle"), \
    ("line", "linestrip", "point", "points")


def is_labelme(path: Path) -> bool:
    try:
        content = read_json(path, error=DataError)
    except DataError:
        return False
    return isinstance(content, dict) and "shapes" in content and ("imagePath" in content or "imageData" in content)


def labelme_problems(content, path: Path) -> list[str]:
    """Every problem of a LabelMe file's structure, each one line naming the shape: the image's path and data
    strings (or null), its declared size positive integers within the pixel limit (checked before a label map of
    that size is allocated: a 300-byte file claimed 40 GB), every shape an object with a string label, a shape
    type LabelMe defines, points that are [x, y] numbers, as many as the type needs, inside the image."""
    if not isinstance(content, dict) or not isinstance(content.get("shapes"), list):
        return [f"{path}: not a LabelMe JSON file (no \"shapes\" list)"]
    problems = []
    for key in ("imagePath", "imageData"):
        if content.get(key) is not None and not isinstance(content[key], str):
            problems.append(f"{path}: \"{key}\" must be a string (or null), got {type(content[key]).__name__}")
    height, width = content.get("imageHeight"), content.get("imageWidth")
    sized = is_id(height) and is_id(width) and height > 0 and width > 0
    if not sized:
        problems.append(f"{path}: \"imageHeight\" and \"imageWidth\" must be positive integers, got {[height, width]}")
    elif width * height > (limit := declared_pixel_limit()):
        problems.append(pixel_count_problem(width, height, str(path), limit, declared=True))
        sized = False
    for number, shape in enumerate(content["shapes"]):
        where = f"{path} shape {number}"
        if not isinstance(shape, dict):
            problems.append(f"{where}: expected an object, got {type(shape).__name__}")
        elif not isinstance(shape.get("label"), str) or not shape["label"].strip():
            problems.append(f"{where}: \"label\" must be a class name (a non-empty string), got "
                            f"{shape.get('label')!r:.40}")
        elif shape.get("shape_type") is not None and not isinstance(shape["shape_type"], str):  # null: a polygon
            problems.append(f"{where}: \"shape_type\" must be a string, got {shape['shape_type']!r:.40}")
        else:
            where = f"{where} ({shape['label']!r})"
            try:
                polygon = shape_polygon(shape, where)
            except DataError as e:
                problems.append(str(e))
                continue
            if polygon is not None and sized and (problem := polygon_problem(polygon, height, width, where)):
                problems.append(problem)
    return problems


def read_labelme(path: Path) -> dict:
    """A LabelMe file, its structure checked (`labelme_problems`); every problem of it in one DataError."""
    content = read_json(path, error=DataError)
    if problems := labelme_problems(content, path):
        raise refusal(problems)
    return content


def read_labelme_files(files: list[Path], class_names: tuple[str, ...] | None = None) -> dict[Path, dict]:
    """Every LabelMe file of a folder, read and checked, with its labels against `class_names` where given:
    one DataError holding the problems of every file, so that the doctor lists them all at once."""
    contents, problems = {}, []
    for path in files:
        try:
            contents[path] = content = read_labelme(path)
        except DataError as e:
            problems.extend(getattr(e, "problems", None) or [str(e)])
            continue
        for number, shape in enumerate(content["shapes"]):
            name = shape["label"]
            if class_names is not None and name != LABELME_IGNORE and name not in class_names and covers_pixels(shape):
                problems.append(f"{path} shape {number} ({name!r}): label {name!r} is not a class "
                                f"({', '.join(class_names)}); add it to labels.txt or the manifest's \"classes\"")
    if problems:
        raise refusal(problems)
    return contents


def labelme_labels(files: list[Path]) -> list[str]:
    """Every label the files use, sorted (the ignore label left out)."""
    labels = {shape["label"] for content in read_labelme_files(files).values() for shape in content["shapes"]
              if covers_pixels(shape)}
    return sorted(labels - {LABELME_IGNORE})


def labelme_classes(folder: Path, files: list[Path], manifest_classes) -> tuple[str, ...]:
    """The class names: the manifest's, labels.txt's (labelme2voc's: __ignore__, _background_, ...), or
    "background" and the labels found, sorted."""
    if manifest_classes:
        return tuple(manifest_classes)  # (checked by read_manifest)
    labels_file = folder / "labels.txt"
    if labels_file.is_file():
        text = read_text(labels_file, error=DataError, expected="class names, one per line")
        names = [line.strip() for line in text.splitlines() if line.strip()]
        names = tuple("background" if n == "_background_" else n for n in names if n != LABELME_IGNORE)
        if not names:
            raise DataError(f"{labels_file}: no class names")
        if twice := named_twice(names):
            raise DataError(f"{labels_file}: the class {twice[0]!r} is named twice (_background_ is background)")
        origin = labels_file
    else:
        names, origin = ("background", *labelme_labels(files)), folder
    if len(names) > IGNORE_INDEX:
        raise DataError(f"{origin}: {len(names)} classes; {LABEL_MAPS_HOLD}: merge labels")
    return names


def labelme_pairs(files: list[Path], class_names: tuple[str, ...]) -> tuple[list, list[str]]:
    """((image, Drawn), ...) for LabelMe files whose image is beside them or inside them, and the rest."""
    found, lonely = [], []
    for path, content in read_labelme_files(files, class_names).items():
        image = path.parent / content["imagePath"] if content.get("imagePath") else None
        if image is not None and is_file(image):
            source = image
        elif content.get("imageData"):
            source = EmbeddedImage(path)
        else:
            lonely.append(f"{path}: its image {content.get('imagePath')!r} is not beside it, and it holds no imageData")
            continue
        found.append((source, Drawn(str(path), lambda path=path: draw_labelme(path, class_names))))
    return found, lonely


class EmbeddedImage:
    """The image inside a LabelMe file (its base64 `imageData`), read like an image file."""

    def __init__(self, path: Path):
        self.path = path

    def read_bytes(self) -> bytes:
        try:
            return base64.b64decode(read_labelme(self.path)["imageData"], validate=True)
        except (ValueError, TypeError) as e:
            raise DataError(f"{self.path}: its imageData is not base64 ({e})") from None

    def __str__(self):
        return f"{self.path} (imageData)"


def shape_type(shape: dict) -> str:
    return shape.get("shape_type") or "polygon"  # null or missing: LabelMe's default


def covers_pixels(shape: dict) -> bool:
    """A shape with an area (lines and points cover no pixel)."""
    return shape_type(shape) not in LABELME_NO_AREA


def shape_polygon(shape: dict, where: str) -> list[float] | None:
    """A LabelMe shape as one polygon [x0, y0, ...] (labelme2coco's conversion), None for shapes with no area."""
    kind = shape_type(shape)
    points = shape.get("points") or []
    if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 2 and all(map(is_number, p))
                                               for p in points):
        raise DataError(f"{where}: \"points\" must be [x, y] pairs of numbers, got {str(points)[:60]}")
    if kind in LABELME_NO_AREA:
        return None
    if kind not in LABELME_AREA_SHAPES:
        raise DataError(f"{where}: shape type {kind!r}; expected one of {', '.join(LABELME_AREA_SHAPES)} "
                        f"(or {', '.join(LABELME_NO_AREA)}, which cover no pixel)")
    if kind == "rectangle":
        if len(points) != 2:
            raise DataError(f"{where}: a rectangle needs 2 points, got {len(points)}")
        (x1, y1), (x2, y2) = points
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        return [x1, y1, x2, y1, x2, y2, x1, y2]
    if kind == "circle":
        if len(points) != 2:
            raise DataError(f"{where}: a circle needs its centre and a point on it, got {len(points)} points")
        (cx, cy), (px, py) = points
        r = math.hypot(px - cx, py - cy)
        n = max(int(math.pi / math.acos(1 - 1 / r)), 12) if r > 1 else 12
        angles = [2 * math.pi * i / n for i in range(n)]
        return [v for a in angles for v in (cx + r * math.sin(a), cy + r * math.cos(a))]
    if len(points) < 3:
        raise DataError(f"{where}: a polygon of {len(points)} points; 3 at least")
    return [float(v) for point in points for v in point]


def draw_labelme(path: Path, class_names: tuple[str, ...]) -> np.ndarray:
    content = read_labelme(path)  # checked again: the file may have changed since the folder was listed
    height, width = content["imageHeight"], content["imageWidth"]
    ids = {name: i for i, name in enumerate(class_names)}
    label = np.full((height, width), ids.get("background", IGNORE_INDEX), np.uint8)
    for number, shape in enumerate(content["shapes"]):
        name = shape["label"]
        where = f"{path} shape {number} ({name!r})"
        polygon = shape_polygon(shape, where)
        if polygon is None:
            continue
        if name != LABELME_IGNORE and name not in ids:
            raise DataError(f"{where}: label {name!r} is not a class ({', '.join(class_names)}); add it to "
                            f"labels.txt or the manifest's \"classes\"")
        label[polygon_mask([polygon], height, width)] = IGNORE_INDEX if name == LABELME_IGNORE else ids[name]
    return label


# ---- CVAT's Segmentation mask 1.1 -------------------------------------------------------------------------

def read_labelmap(path: Path) -> tuple[tuple[str, ...], tuple[tuple[int, int, int], ...]]:
    """CVAT's / Datumaro's labelmap.txt: `name:r,g,b:parts:actions` per line -> (names, colours); every problem
    of the file (a line that is not one, a name or colour used twice, more labels than the label maps hold) in
    one DataError."""
    names, colours, problems = [], [], []
    text = read_text(path, error=DataError, expected="CVAT's labelmap.txt")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(":")
        try:
            colour = tuple(int(v) for v in fields[1].split(","))
            assert len(colour) == 3 and all(0 <= v <= 255 for v in colour)
        except (IndexError, ValueError, AssertionError):
            problems.append(f"{path} line {number}: expected 'name:r,g,b::', got {line.strip()[:60]!r}")
            continue
        if fields[0] in names:
            problems.append(f"{path} line {number}: the label {fields[0]!r} is named twice")
        if colour in colours:
            problems.append(f"{path} line {number}: {fields[0]!r} has the colour {colour} of "
                            f"{names[colours.index(colour)]!r}; each label needs its own")
        names.append(fields[0])
        colours.append(colour)
    if not names and not problems:
        problems.append(f"{path}: no labels")
    if len(names) > IGNORE_INDEX:
        problems.append(f"{path}: {len(names)} labels; {LABEL_MAPS_HOLD}: merge labels in CVAT, or export fewer")
    if problems:
        raise refusal(problems)
    return tuple(names), tuple(colours)


def open_annotation(annotation) -> Image.Image:
    """A pair's annotation: drawn from vector annotations, or decoded from its file."""
    return annotation.render() if isinstance(annotation, Drawn) else decode(annotation)


# ---- predictions out, for pre-labelling ---------------------------------------------------------------------

def coco_categories(class_names) -> list[dict]:
    """Every class as a COCO category, id = class id + 1 (COCO counts from 1)."""
    return [{"id": i + 1, "name": name, "supercategory": ""} for i, name in enumerate(class_names)]


def coco_annotations(label_map: np.ndarray, image_id: int, first_id: int) -> list[dict]:
    """One annotation per class present: its whole region as a compressed RLE (exact), with area and box."""
    _, coco_mask = _pycocotools()
    annotations = []
    for class_id in np.unique(label_map):
        if class_id == IGNORE_INDEX:
            continue
        rle = coco_mask.encode(np.asfortranarray(label_map == class_id, dtype=np.uint8))
        annotations.append({"id": first_id + len(annotations), "image_id": image_id,
                            "category_id": int(class_id) + 1, "iscrowd": 0,
                            "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
                            "area": float(coco_mask.area(rle)), "bbox": [float(v) for v in coco_mask.toBbox(rle)]})
    return annotations


def labelme_document(label_map: np.ndarray, image_path: str, class_names, *, tolerance: float = 0.0) -> dict:
    """A LabelMe file of a label map: each connected region's outline as a polygon (scikit-image's marching
    squares, simplified by Douglas-Peucker within `tolerance` pixels), the largest outline first, so that a
    region inside another one's outline, drawn later, stays itself when LabelMe (or data/labelling.py) paints
    them in order: the holes of a region are the regions drawn over it."""
    try:
        from skimage.measure import approximate_polygon, find_contours, label as components
    except ImportError:
        raise DataError("LabelMe polygons are traced by scikit-image: pip install scikit-image (or the project's "
                        "[labelling] extra)") from None
    height, width = label_map.shape
    shapes = []
    for class_id in np.unique(label_map):
        if class_id == IGNORE_INDEX:
            continue
        regions = components(label_map == class_id, connectivity=1)
        for region in range(1, regions.max() + 1):
            mask = np.pad(regions == region, 1)  # closed outlines along the image's border too
            outline = max(find_contours(mask.astype(np.float32), 0.5), key=len) - 1  # (N, 2) rows, cols
            outline = approximate_polygon(outline, tolerance) if tolerance else outline
            points = np.clip(outline[:, ::-1] + 0.5, 0, [width, height])  # pixel centres -> LabelMe's x, y
            if len(points) >= 4:  # a closed outline repeats its first point
                x, y = points[:, 0], points[:, 1]
                area = abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2  # inside the outline
                shapes.append((area, {"label": class_names[int(class_id)],
                                                 "points": points[:-1].round(2).tolist(),
                                                 "group_id": None, "shape_type": "polygon", "flags": {}}))
    shapes.sort(key=lambda item: -item[0])
    return {"version": "5.4.1", "flags": {}, "shapes": [shape for _, shape in shapes], "imagePath": image_path,
            "imageData": None, "imageHeight": height, "imageWidth": width}
