"""The label spec: which classes, how stored values become class ids, the class colours and the input
size, decided in one place, `decide_labels`, from plain values. Training, `--eval-only`, the dataset
doctor, inference, the tour and export all call it, so they cannot disagree.

The classes are the first of:
  1. the checkpoint being resumed, evaluated or run (its classifier is the model);
  2. `--id2label FILE`;
  3. the data's own list (SceneParse150, the synthetic scenes, a manifest's "classes", and the defaults of
     a layout: ADE20K's 150, Cityscapes' 19, VOC's 21), or a `--pretrained` head's, where `--num-labels`,
     if given, has as many;
  4. `LABEL_<i>` for `--num-labels N`.
Whatever else names the classes must agree in number (and in names, unless one side has only LABEL_<i>
names), with two exceptions, each said in one line: an explicit choice (1.-2., or `--num-labels`) wins
over a layout's default names, which the folder's shape only suggests; and the data's names describe its
values under its own label convention only, so with the reduction switched they are dropped.

The label reduction (the ADE convention, 0 ignored and k -> k-1) is the flag's, else the checkpoint's,
else the data's own convention; data that does not state one gets its layout's usual guess (ADE's for
images/ + annotations/ folders and Hugging Face datasets, none for mmsegmentation's img_dir/ + ann_dir/, as
mmseg's custom datasets default to reduce_zero_label=False), said in one line.
"""

from dataclasses import dataclass

from segformer.bands import Bands  # noqa: F401 (the annotations' type)

from segformer.errors import ConfigError
from segformer.labels import default_name, is_default_names
from segformer.metrics import NamedClasses, predicted_classes
from segformer.preprocess import DEFAULT_SIZE
from segformer.visual import class_colours

from .mapping import ADE, IGNORE_INDEX, LabelMapping


@dataclass(frozen=True)
class SourceLabels:
    """What a data source says of its labels."""
    source: str  # as given: "synthetic", a folder, a hub id
    layout: str  # "ADEChallengeData2016 folder", "synthetic scenes", ...
    class_names: tuple | None = None
    palette: tuple | None = None  # one colour per class, where the data defines them
    mapping: LabelMapping = ADE  # stored values -> class ids (a guess where `known` is False)
    known: bool = False  # the source states its label convention
    assumed: bool = False  # class_names are a layout's defaults: an explicit choice wins over them
    native_size: int | None = None  # the size its images are made at (the synthetic scenes: 128)
    bands: "Bands | int | None" = None  # full-precision images of this many bands (int: statistics to compute)
    nodata: str = "ignore"  # with bands: the label of a pixel with no data in any band (its "uncovered")


@dataclass(frozen=True)
class LabelSpec(NamedClasses):
    """The run's labels, decided once: the model's classes, the mapping of the data's stored values to
    them (None where no data is read), a colour per predicted class, and the model's input size."""
    class_names: tuple[str, ...]
    reduce_labels: bool  # the ADE convention: 0 ignored, k -> k-1
    palette: tuple  # one (r, g, b) per predicted class (the binary head: background and the label)
    size: int
    mapping: LabelMapping | None = None
    convention_stated: bool = True  # False: the reduction is a guess, worth checking against the annotations
    bands: "Bands | int | None" = None  # images at full precision, normalised per band (None: 8-bit RGB)

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        """One line for the run's summary: the classes, and which stored values become which class ids."""
        line = f"{self.num_labels} classes ({show(self.class_names)})"
        return line + (f"; labels: {self.mapping.describe()}" if self.mapping is not None else "")


def show(names, count: int = 4) -> str:
    return ", ".join(n.strip() for n in list(names)[:count]) + (", ..." if len(names) > count else "")


def agree(names, other) -> bool:
    """Two class lists agree in number, and in names unless one has only LABEL_<i> names."""
    return len(names) == len(other) and ([n.strip() for n in names] == [n.strip() for n in other]
                                         or is_default_names(names) or is_default_names(other))


def decide_labels(*, data: SourceLabels | None = None, checkpoint=None, pretrained=None,
                  id2label: dict[int, str] | None = None, id2label_origin: str = "--id2label",
                  num_labels: int | None = None, reduce_labels: bool | None = None,
                  size: int | None = None) -> tuple[LabelSpec, list[str]]:
    """(the spec, the lines to say) from what the data says (`data`), the checkpoint whose classifier is
    the model (`checkpoint`: resumed, evaluated, run or exported; a `segformer.checkpoint.CheckpointFacts`),
    the weights a run starts from (`pretrained`, facts too), and what the user asked for (`id2label` with the
    flag or file it came from, `num_labels`, `reduce_labels`, `size`; None: not asked). A refusal is a
    ConfigError that says what to do."""
    lines = []
    if checkpoint is not None:
        checkpoint.segmentation_classes()  # an encoder only, or a config.json at odds with its weights: refused

    # The reduction: the flag's, else the checkpoint's, else the data's (stated, or its layout's guess).
    stated = reduce_labels is not None or data is None or data.known
    if reduce_labels is None and checkpoint is not None and checkpoint.reduce_labels is not None:
        reduce_labels = checkpoint.reduce_labels
    from_data = reduce_labels is None
    if from_data:
        reduce_labels = data.mapping.reduce_labels if data is not None else True
    data_names = data.class_names if data is not None else None
    if data_names and data.known and reduce_labels != data.mapping.reduce_labels:
        lines.append(f"classes: the data's {len(data_names)} names ({show(data_names)}) describe its values "
                     f"{'after' if data.mapping.reduce_labels else 'without'} the ADE reduction, which is "
                     f"{'on' if reduce_labels else 'off'} here: they do not apply")
        data_names = None

    # The classes: an explicit choice (the checkpoint's, --id2label), else the data's, a pretrained head's, or
    # --num-labels; `kind` says which.
    if checkpoint is not None:
        names, kind, origin = tuple(checkpoint.class_names), "checkpoint", f"the checkpoint {checkpoint.source}"
    elif id2label:
        names, kind, origin = tuple(id2label[i] for i in range(len(id2label))), "id2label", id2label_origin
    elif data_names and num_labels in (None, len(data_names)):
        names, kind, origin = tuple(data_names), "data", f"the data {data.source}"
    elif pretrained is not None and pretrained.class_names and num_labels in (None, len(pretrained.class_names)):
        names, kind, origin = pretrained.class_names, "pretrained", f"--pretrained {pretrained.source}"
    elif num_labels is not None:
        names, kind, origin = tuple(map(default_name, range(num_labels))), "num_labels", f"--num-labels {num_labels}"
    else:
        raise ConfigError(f"{data.source if data else 'the data'}: the data does not name its classes; give "
                          f"--num-labels N or --id2label FILE")
    if len(names) > IGNORE_INDEX:  # 16-bit label maps hold more, but class 255 would be the ignore index
        raise ConfigError(f"{origin}: {len(names)} classes; training and evaluation count classes 0..{IGNORE_INDEX - 1}"
                          f", {IGNORE_INDEX} being the ignore index: class {IGNORE_INDEX} ({names[IGNORE_INDEX]!r}) "
                          f"would never be trained or scored. Merge classes into {IGNORE_INDEX} or fewer")
    if num_labels is not None and num_labels != len(names):
        raise ConfigError(f"--num-labels {num_labels}, but {origin} has {len(names)} classes ({show(names)}): drop "
                          f"--num-labels, or give a list of {num_labels} names")
    if data_names and kind != "data" and not agree(names, data_names):
        if not data.assumed and kind == "num_labels":
            raise ConfigError(f"--num-labels {num_labels}, but the data {data.source} has {len(data_names)} classes "
                              f"({show(data_names)}): " + DISAGREEMENT_ADVICE[kind]
                              + (REDUCTION_ADVICE if reduce_labels else ""))
        if not data.assumed:
            raise ConfigError(f"{origin} has {len(names)} classes ({show(names)}) but the data {data.source} has "
                              f"{len(data_names)} ({show(data_names)}): " + DISAGREEMENT_ADVICE[kind]
                              + (REDUCTION_ADVICE if reduce_labels and kind != "checkpoint" else ""))
        lines.append(f"classes: {origin} ({len(names)}: {show(names)}) wins over the {len(data_names)} classes the "
                     f"{data.layout} has by default" + ("; name them with --id2label FILE"
                                                        if is_default_names(names) else ""))
        stated = stated and not from_data  # the layout's convention came with its default classes: a guess now
    if not stated and from_data:
        lines.append(f"labels: the data does not state its convention; assumed: {data.mapping.describe()}. "
                     + ("Pass --no-reduce-labels if 0 is one of your classes" if reduce_labels else
                        "Pass --reduce-labels if 0 means 'unlabelled' and class k is stored as k+1"))

    # The colours: the data's, the checkpoint's, a pretrained head's, or the known or generated ones: what fits.
    predicted = predicted_classes(list(names))
    colours = class_colours(predicted, data.palette if data is not None else None,
                            checkpoint.palette if checkpoint else None,
                            pretrained.palette if kind == "pretrained" else None)

    # The input size: asked for, else the checkpoint's (the size its model was trained at, or the image
    # processor's where its files do not say, as inference uses), else the data's own, else the processor's.
    if checkpoint is not None:
        size = size or checkpoint.size or DEFAULT_SIZE
    size = size or (data.native_size if data is not None else None) or DEFAULT_SIZE
    mapping = data.mapping.with_reduce_labels(reduce_labels) if data is not None else None
    return LabelSpec(class_names=names, reduce_labels=reduce_labels, palette=colours, size=size, mapping=mapping,
                     convention_stated=stated or not from_data, bands=decide_bands(data, checkpoint)), lines


def decide_bands(data: SourceLabels | None, checkpoint) -> "Bands | int | None":
    """The images' bands: a checkpoint's statistics (what its model was trained on), else the data's
    (a count alone: to be computed from the training images); None: 8-bit RGB. They must agree in number."""
    trained = checkpoint.bands if checkpoint is not None else None
    given = data.bands if data is not None else None
    if checkpoint is not None and data is not None and (trained is None) != (given is None):
        raise ConfigError(f"the checkpoint {checkpoint.source} reads "
                          + (f"{trained.count}-band images at full precision" if trained else "8-bit RGB images")
                          + f", the data {data.source} holds " + ("8-bit RGB images" if given is None else
                                                                  f"{count(given)}-band images (\"bands\")"))
    if trained is not None and given is not None and trained.count != count(given):
        raise ConfigError(f"the checkpoint {checkpoint.source} reads {trained.count}-band images, the data "
                          f"{data.source} has {count(given)} bands")
    return trained if trained is not None else given


def count(bands) -> int:
    return bands if isinstance(bands, int) else bands.count


DISAGREEMENT_ADVICE = {
    "checkpoint": "evaluate it on data with its classes, under the label convention it was trained with "
                  "(--reduce-labels / --no-reduce-labels)",
    "id2label": "drop --id2label to use the data's classes, or change the data's class list",
    "num_labels": "drop --num-labels to use the data's classes, or change the data's class list",
    "pretrained": "",  # not reached: a pretrained head's names are taken only where the data names none
}
REDUCTION_ADVICE = " (with --no-reduce-labels the stored values are the classes, and the data's names do not apply)"
