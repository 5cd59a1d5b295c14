"""How the values stored in an annotation become class ids, for every layout, in one place.

    stored value --(colour masks: position in `palette`)--> raw value --(table)--> class id or 255

The table is built once from, in this order: the ADE convention when `reduce_labels` is on (0 -> 255, k -> k-1,
else identity), `label_map` entries ({raw: class id or 255}, e.g. Cityscapes' labelIds -> trainIds),
`unmapped="ignore"` (every raw value not in label_map -> 255), then `ignore` values -> 255. 255 is always
ignored. One lookup per pixel applies it all.
"""

import functools
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image

from segformer.errors import DataError

IGNORE_INDEX = 255
# said wherever a data set has more classes than that (COCO, LabelMe, CVAT, dataset.json)
LABEL_MAPS_HOLD = f"the label maps hold {IGNORE_INDEX} (0..{IGNORE_INDEX - 1}; {IGNORE_INDEX} is the ignore index)"


@dataclass(frozen=True)
class LabelMapping:
    reduce_labels: bool = False  # the ADE convention: 0 is 'unlabelled' (ignored), k is class k - 1
    label_map: dict = field(default_factory=dict)  # raw value -> class id (or 255), before `ignore`
    unmapped: str = "keep"  # "keep": raw values not in label_map pass through (reduced); "ignore": -> 255
    ignore: tuple = ()  # raw values ignored (255 always is)
    palette: tuple | None = None  # colour masks: one (r, g, b) per raw value; None: index masks
    unknown_colours: str = "error"  # a colour not in the palette: "error" naming it, or "ignore"
    name: str = ""  # the convention's name, for the run's summary ("ADE convention", "Cityscapes labelIds", ...)

    def with_reduce_labels(self, reduce_labels: bool) -> "LabelMapping":
        return self if reduce_labels == self.reduce_labels else replace(self, reduce_labels=reduce_labels, name="")

    def table(self, size: int) -> np.ndarray:
        """raw value -> class id (255: ignored), for raw values 0..size-1."""
        raw = np.arange(size, dtype=np.int64)
        table = np.where(raw == 0, IGNORE_INDEX, raw - 1) if self.reduce_labels else raw.copy()
        if self.unmapped == "ignore":
            table[:] = IGNORE_INDEX
        for value, class_id in self.label_map.items():
            if value < size:
                table[value] = class_id
        for value in self.ignore:
            if value < size:
                table[value] = IGNORE_INDEX
        if size > IGNORE_INDEX:
            table[IGNORE_INDEX] = IGNORE_INDEX
        return table

    def apply(self, raw: torch.Tensor) -> torch.Tensor:
        """(H, W) raw values (uint8 for 8-bit maps, int64 for 16-bit ones) -> class ids, same dtype."""
        if self.is_identity:
            return raw
        size = 256 if raw.dtype == torch.uint8 else max(int(raw.max()) + 1, 256)
        table = self.table(size)
        keep_bytes = raw.dtype == torch.uint8 and table.max() <= 255  # masks move as bytes where they can
        return torch.from_numpy(table.astype(np.uint8 if keep_bytes else np.int64))[raw.long()]

    @property
    def is_identity(self) -> bool:
        return not (self.reduce_labels or self.label_map or self.unmapped == "ignore" or self.ignore)

    def decode_colours(self, annotation: Image.Image, name: str) -> torch.Tensor:
        """A colour mask -> (H, W) uint8 raw values: each colour's position in the palette, looked up in a
        table of all 2**24 colours (built once per palette). Exact: a colour not in the palette is an error
        naming the file, the colour and its pixel count (or 255 with unknown_colours="ignore")."""
        rgbx = np.asarray(annotation.convert("RGBX"))  # (H, W, 4) uint8: one 32-bit word per pixel
        codes = rgbx.view("<u4")[..., 0] & 0xFFFFFF  # r + g << 8 + b << 16
        raw = colour_table(self.palette)[codes]
        unknown = raw == IGNORE_INDEX
        if unknown.any() and self.unknown_colours != "ignore":
            values, counts = np.unique(codes[unknown], return_counts=True)
            shown = ", ".join(f"({c & 255}, {(c >> 8) & 255}, {c >> 16}): {n} pixels"
                              for c, n in sorted(zip(values.tolist(), counts.tolist()), key=lambda x: -x[1])[:3])
            raise DataError(f"{name}: {len(values)} colour(s) not in the palette: {shown}"
                            + (" ..." if len(values) > 3 else "")
                            + ' (add them to "palette", or set "unknown_colors": "ignore")')
        return torch.from_numpy(raw)

    def terms(self) -> dict:
        """Every term of the mapping, spelled out (no convention's name in their place), as plain values a
        checkpoint keeps: two mappings with the same terms give every pixel the same class."""
        return {"reduce_labels": self.reduce_labels, "label_map": sorted([int(k), int(v)] for k, v in self.label_map.items()),
                "unmapped": self.unmapped, "ignore": sorted(int(v) for v in self.ignore),
                "palette": [list(colour) for colour in self.palette] if self.palette is not None else None,
                "unknown_colours": self.unknown_colours}

    def describe(self) -> str:
        """One line for the run's summary: which raw values become which class ids."""
        parts = []
        if self.palette is not None:
            parts.append(f"colours -> their position in the {len(self.palette)}-colour palette")
        if self.name:
            parts.append(self.name)
        else:
            if self.reduce_labels:
                parts.append("0 -> ignored, k -> k-1 (ADE convention)")
            if self.label_map:
                shown = ", ".join(f"raw {k} -> {'ignored' if v == IGNORE_INDEX else v}"
                                  for k, v in list(self.label_map.items())[:6])
                parts.append(shown + (" ..." if len(self.label_map) > 6 else ""))
            if self.unmapped == "ignore":
                parts.append("other raw values -> ignored")
            if self.ignore:
                parts.append(", ".join(f"raw {v}" for v in self.ignore) + " -> ignored")
        if not parts:
            parts.append("values are class ids")
        return "; ".join(parts) + "; 255 ignored"


@functools.lru_cache(maxsize=4)
def colour_table(palette: tuple) -> np.ndarray:
    """(2**24,) uint8: colour code (r + g << 8 + b << 16) -> its position in the palette, 255 for the rest.
    16 MiB, and one lookup per pixel: several times faster than searching the palette."""
    if len(palette) > IGNORE_INDEX:
        raise DataError(f"a colour palette has at most {IGNORE_INDEX} colours (255 is the ignore value), "
                        f"got {len(palette)}")
    table = np.full(1 << 24, IGNORE_INDEX, dtype=np.uint8)
    for position, (r, g, b) in enumerate(palette):
        table[r | g << 8 | b << 16] = position
    return table


ADE = LabelMapping(reduce_labels=True, name="0 -> ignored, k -> k-1 (ADE convention)")
IDENTITY = LabelMapping()
