"""Class names and colours: the ADE20K / SceneParse150, Cityscapes and Pascal VOC tables built in (the
guide downloads `ade20k-id2label.json` from the hub; we work offline), and a reader for any
`id2label.json`. Colours for other label sets: `segformer.visual.palette`."""

from pathlib import Path

from .errors import DataError, UserError
from .files import read_json

# The 150 classes by reduced id (0 = wall), exactly as the hub's `ade20k-id2label.json` lists them,
# including the trailing space of "bed ". Pixel value k of an ADE annotation is class k - 1; 0 is unlabelled.
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence",
    "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)

# One RGB colour per reduced id, the table of the ADE20K tools and model cards (ids 6 and 48 share a colour).
ADE20K_PALETTE = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)


# Cityscapes (cityscapesScripts' helpers/labels.py): the 19 training classes by trainId, their colours, and
# the labelId each comes from; every other labelId (unlabeled, ego vehicle, parking, guard rail, ...) is ignored.
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
                      "bicycle")
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153), (250, 170, 30),
    (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142),
    (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)  # of trainId 0..18

# Pascal VOC 2012: background and the 20 object classes; a SegmentationClass PNG's palette index is the class.
VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def voc_colour(index: int) -> tuple[int, int, int]:
    """The VOC development kit's colour map: the bits of the index spread over R, G, B, high bits first."""
    r = g = b = 0
    for shift in range(7, -1, -1):
        r |= (index & 1) << shift
        g |= ((index >> 1) & 1) << shift
        b |= ((index >> 2) & 1) << shift
        index >>= 3
    return r, g, b


VOC_PALETTE = tuple(voc_colour(i) for i in range(len(VOC_CLASSES)))
KNOWN_PALETTES = {ADE20K_CLASSES: ADE20K_PALETTE, CITYSCAPES_CLASSES: CITYSCAPES_PALETTE, VOC_CLASSES: VOC_PALETTE}


def default_name(class_id: int) -> str:
    """transformers' name for a class that has none."""
    return f"LABEL_{class_id}"


def is_default_names(names) -> bool:
    """Only LABEL_<i> names (a list, or an id -> name dict): the classes are unnamed."""
    items = names.items() if isinstance(names, dict) else enumerate(names)
    return all(name == default_name(i) for i, name in items)


def named_twice(names) -> list[str]:
    """The names given to more than one class, sorted: with any, label2id would keep one class of each."""
    names = list(names)
    return sorted({name for name in names if names.count(name) > 1})


def read_id2label(path: str | Path, *, error: type[UserError] = DataError) -> dict[int, str]:
    """Read an `id2label.json` ({"0": "wall", ...}): ids 0..N-1, each named, no name twice; anything else is
    an `error` naming the file."""
    path = Path(path)
    raw = read_json(path, error=error)
    if not isinstance(raw, dict) or not raw:
        raise error(f"{path}: expected a JSON object mapping ids to names ({{\"0\": \"wall\", ...}}), got "
                    f"{type(raw).__name__ if raw else 'nothing'}")
    try:
        id2label = {int(k): str(v) for k, v in raw.items()}
    except ValueError:
        raise error(f"{path}: keys must be integer ids, got {list(raw)[:5]}") from None
    if sorted(id2label) != list(range(len(id2label))):
        raise error(f"{path}: ids must be 0..{len(id2label) - 1} without gaps")
    bad = [(k, v) for k, v in raw.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise error(f"{path}: class {bad[0][0]} is named {bad[0][1]!r}; every class needs a name (a string)")
    if twice := named_twice(id2label.values()):
        raise error(f"{path}: the name {twice[0]!r} is given to classes "
                    f"{[i for i, n in sorted(id2label.items()) if n == twice[0]]}; a name is one class")
    return dict(sorted(id2label.items()))
