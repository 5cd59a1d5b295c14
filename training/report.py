"""What a run leaves to look at, refreshed at every evaluation, in its output folder:

    curves.png                         loss and learning rate, mean IoU and accuracies, against step
    evaluations/step-<N>/confusion.npy the confusion matrix (rows: labels, columns: predictions), counts
    evaluations/step-<N>/confusion.csv the same with class names
    evaluations/step-<N>/per_class.csv IoU, accuracy, labelled / predicted / correct pixels per class
    evaluations/step-<N>/confusion.png row-normalised heatmap (past 30 classes: the most confused pairs)
    per_class_iou.png                  at the end: per-class IoU, sorted, named

Plots need matplotlib (an optional dependency: without it, one line says so and the numbers are still
written). Several runs side by side, e.g. to compare two:

    python -m training.report runs/a runs/b --out comparison.png
"""

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

from segformer.files import atomic_write
from segformer.errors import CheckpointError, UserError
from segformer.visual import blend, pyplot, save_figure

from .hub import CARD_METRICS, eval_results

HEATMAP_CLASSES = 30  # beyond this, a heatmap is unreadable: the most confused pairs instead


def class_table(metrics: dict, class_names: list[str]) -> str:
    """Per-class IoU and accuracy (%) of the classes seen in the labels or the predictions."""
    rows = [f"{'class':<24}{'IoU':>8}{'acc':>8}"]
    absent = 0
    for name, iou, acc in zip(class_names, metrics["per_category_iou"], metrics["per_category_accuracy"]):
        if math.isnan(iou):
            absent += 1
            continue
        rows.append(f"{name.strip()[:23]:<24}{_pct(iou):>8}{_pct(acc):>8}")
    if absent:
        rows.append(f"({absent} classes neither labelled nor predicted: not shown, not in the means)")
    rows.append(f"{'mean':<24}{_pct(metrics['mean_iou']):>8}{_pct(metrics['mean_accuracy']):>8}")
    rows.append(f"overall accuracy {_pct(metrics['overall_accuracy'])}")
    return "\n".join(rows)


def _pct(x) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def jsonable(metrics: dict) -> dict:
    """NaN -> null, arrays -> lists: strict JSON."""
    def clean(x):
        if isinstance(x, (np.ndarray, list, tuple)):
            return [clean(v) for v in x]
        x = float(x)
        return None if math.isnan(x) else x
    return {k: clean(v) if not isinstance(v, (int, str)) else v for k, v in metrics.items()}


def read_log(path: Path) -> tuple[list[dict], bool]:
    """The records of a run's metrics.jsonl, and whether its last line was torn (a write cut short by a kill,
    a power loss or a full disk: dropped). A bad line elsewhere is a CheckpointError naming the file and line."""
    try:
        lines = Path(path).read_text().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the run's log ({e})") from None
    records, torn = [], False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError(f"a {type(record).__name__}, not a record")
        except ValueError as e:
            if any(later.strip() for later in lines[number:]):  # not the last record: the log is damaged
                raise CheckpointError(f"{path} line {number}: not a JSON record ({e})") from None
            torn = True  # the last record, cut short
            continue
        records.append(record)
    return records, torn


def write_record(log, record: dict) -> None:
    """One line of metrics.jsonl, flushed (a checkpoint also fsyncs it: training.loop.loop_state)."""
    log.write(json.dumps(record) + "\n")
    log.flush()


def open_log(out: Path, *, resumed_at: int | None):
    """metrics.jsonl, for appending. A new run starts a new log. A resumed run keeps the records up to the
    step it resumes from (no step is ever reported twice) and drops a torn last record, saying so."""
    path = out / "metrics.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    if resumed_at is None or not path.is_file():
        return open(path, "w")
    records, torn = read_log(path)
    if torn:
        print(f"{path}: its last record was cut short (a kill or a full disk while it was written): dropped")
    kept = [record for record in records if record.get("step", 0) <= resumed_at]
    if torn or len(kept) < len(records):
        atomic_write(path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))
    return open(path, "a")


def write_evaluation(directory: Path, matrix: np.ndarray, class_names: list[str], metrics: dict, *,
                     draw: bool = True) -> None:
    """The confusion matrix (.npy, .csv), the per-class table (.csv) and (draw) the heatmap of one evaluation."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [spreadsheet_safe(name.strip()) for name in class_names]

    def write_npy(tmp):
        with open(tmp, "wb") as f:
            np.save(f, matrix)
    atomic_write(directory / "confusion.npy", write_npy)

    def write_csv(name, rows):
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(rows)
        atomic_write(directory / name, write)
    write_csv("confusion.csv", [["label \\ prediction", *names]]
              + [[names[i], *map(int, row)] for i, row in enumerate(matrix)])
    labelled, predicted, correct = matrix.sum(1), matrix.sum(0), np.diag(matrix)
    write_csv("per_class.csv", [["class", "iou", "accuracy", "labelled_pixels", "predicted_pixels", "correct_pixels"]]
              + [[names[i], _number(metrics["per_category_iou"][i]), _number(metrics["per_category_accuracy"][i]),
                  int(labelled[i]), int(predicted[i]), int(correct[i])] for i in range(len(names))])
    plt = pyplot() if draw else None
    if plt is not None:
        draw_confusion(plt, matrix, names, directory / "confusion.png")


def spreadsheet_safe(text: str) -> str:
    """A cell a spreadsheet shows as text: one that starts like a formula (=, +, -, @, a tab or a carriage
    return) gets a leading apostrophe, as OWASP's advice on CSV injection and spreadsheet-safe writers do."""
    return "'" + text if text.startswith(("=", "+", "-", "@", "\t", "\r")) else text


def _number(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.6f}"


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each label's row as fractions of its pixels (rows of unlabelled classes stay 0)."""
    totals = matrix.sum(1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=np.float64), where=totals > 0)


def most_confused(matrix: np.ndarray, names: list[str], count: int = 20) -> list[tuple[str, str, float]]:
    """(label, predicted as, share of the label's pixels), the largest off-diagonal shares first."""
    shares = row_normalised(matrix)
    np.fill_diagonal(shares, 0)
    order = np.argsort(shares, axis=None)[::-1][:count]
    return [(names[i], names[j], float(shares[i, j])) for i, j in zip(*np.unravel_index(order, shares.shape))
            if shares[i, j] > 0]


def draw_confusion(plt, matrix: np.ndarray, names: list[str], path: Path) -> None:
    present = matrix.sum(1) + matrix.sum(0) > 0
    if present.sum() <= HEATMAP_CLASSES:
        keep = np.flatnonzero(present)
        shares = row_normalised(matrix)[np.ix_(keep, keep)]
        size = max(4.0, 0.35 * len(keep) + 2)
        figure, axis = plt.subplots(figsize=(size + 1, size))
        image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        axis.set_xticks(range(len(keep)), [names[i] for i in keep], rotation=90)
        axis.set_yticks(range(len(keep)), [names[i] for i in keep])
        axis.set_xlabel("predicted")
        axis.set_ylabel("labelled")
        for (r, c), value in np.ndenumerate(shares):
            if value >= 0.01:
                axis.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if value > 0.5 else "black")
        figure.colorbar(image, ax=axis, fraction=0.046, label="share of the label's pixels")
        axis.set_title("confusion (rows sum to 1)")
    else:
        pairs = most_confused(matrix, names)
        figure, axis = plt.subplots(figsize=(8, 0.3 * len(pairs) + 1.5))
        axis.barh(range(len(pairs)), [share for _, _, share in pairs], color="tab:red")
        axis.set_yticks(range(len(pairs)), [f"{label} -> {predicted}" for label, predicted, _ in pairs])
        axis.invert_yaxis()
        axis.set_xlabel("share of the label's pixels predicted as the other class")
        axis.set_title(f"the {len(pairs)} most confused pairs of {int(present.sum())} classes")
    save_figure(plt, figure, path)


SEGMENTATION_METRICS = ("mean_iou", "mean_accuracy", "overall_accuracy")
CLASSIFICATION_METRICS = ("top1", "top5")  # pretrain.py's


def draw_curves(runs: list[tuple[str, list[dict]]], path: Path, metrics=SEGMENTATION_METRICS) -> bool:
    """Loss and learning rate; the evaluations' `metrics` (mean IoU and accuracies; pretrain.py's top-1 and
    top-5); against step: one line per run."""
    plt = pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name, records in runs:
        train = [r for r in records if metrics[0] not in r and "loss" in r and "lr" in r]
        evaluations = [r for r in records if metrics[0] in r]
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
        axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], label=name)
        for key, style in zip(metrics, ("-o", "--", ":")):
            axes[2].plot([r["step"] for r in evaluations], [r[key] for r in evaluations], style,
                         label=f"{name}: {key.replace('_', ' ')}" if len(runs) > 1 else key.replace("_", " "))
    for axis, title in zip(axes, ("training loss", "learning rate (encoder)", "validation")):
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    save_figure(plt, figure, path)
    return True


def draw_per_class(metrics: dict, class_names: list[str], path: Path) -> bool:
    """Per-class IoU, sorted, named (the classes neither labelled nor predicted are left out)."""
    plt = pyplot()
    if plt is None:
        return False
    pairs = sorted(((float(v), name.strip()) for v, name in zip(metrics["per_category_iou"], class_names)
                    if v is not None and not math.isnan(float(v))), reverse=True)
    figure, axis = plt.subplots(figsize=(8, 0.25 * len(pairs) + 1.5))
    axis.barh(range(len(pairs)), [v for v, _ in pairs], color="tab:blue")
    axis.set_yticks(range(len(pairs)), [name for _, name in pairs], fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.axvline(metrics["mean_iou"], color="black", linestyle="--", label=f"mean {metrics['mean_iou']:.3f}")
    axis.set_xlabel("IoU")
    axis.legend()
    save_figure(plt, figure, path)
    return True


class TensorBoard:
    """--report-to tensorboard: scalars of training and evaluation, and a few validation images with their
    predicted classes drawn over them, in <out>/tensorboard (tensorboard --logdir <out>)."""

    def __init__(self, out: Path, palette: list[tuple[int, int, int]]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("--report-to tensorboard needs the tensorboard package: "
                              "pip install tensorboard") from None
        self.writer, self.palette = SummaryWriter(str(Path(out) / "tensorboard")), palette

    def scalars(self, step: int, record: dict, prefix: str) -> None:
        for key in ("loss", "lr", "images_per_s", "mean_iou", "mean_accuracy", "overall_accuracy"):
            if isinstance(record.get(key), (int, float)):
                self.writer.add_scalar(f"{prefix}/{key}", record[key], step)
        self.writer.flush()

    def predictions(self, step: int, images, predictions) -> None:
        """uint8 (N, 3, H, W) images and (N, H, W) class ids -> the classes' colours over the images."""
        images = np.asarray(images)
        blended = blend(images.transpose(0, 2, 3, 1), np.asarray(predictions), self.palette).transpose(0, 3, 1, 2)
        self.writer.add_images("validation/predictions", np.concatenate([images, blended], axis=3), step,
                               dataformats="NCHW")  # each image beside its prediction
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (each with its metrics.jsonl)")
    p.add_argument("--out", help="the figure (default: comparison.png, or the run's curves.png for one run)")
    args = p.parse_args(argv)
    runs = []
    for folder in map(Path, args.runs):
        log = folder / "metrics.jsonl"
        if not log.is_file():
            print(f"error: {log}: no such file (is {folder} a run folder?)", file=sys.stderr)
            return 2
        try:
            runs.append((folder.name, read_log(log)[0]))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code
    out = Path(args.out) if args.out else (Path(args.runs[0]) / "curves.png" if len(runs) == 1
                                           else Path("comparison.png"))
    classification = any("top1" in record for _, records in runs for record in records)
    if not draw_curves(runs, out, CLASSIFICATION_METRICS if classification else SEGMENTATION_METRICS):
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# ---- the evaluation report (train.py --eval-only --report DIR) ---------------------------------------------

REPORT_SCALARS = ("mean_iou", "mean_accuracy", "overall_accuracy", "frequency_weighted_iou", "mean_precision",
                  "mean_recall", "mean_f1", "mean_boundary_iou")
PER_CLASS = ("iou", "accuracy", "precision", "recall", "f1", "boundary_iou")


def write_report(directory: Path, metrics: dict, matrix: np.ndarray, report, class_names: list[str], *,
                 sample_names, colours, about: dict, card: str | None = None) -> dict:
    """report.json (everything), per_class.csv, per_image.csv, confusion.{npy,csv,png}, worst.png (the
    report's worst images: image | truth | prediction | errors), reliability.png (calibration),
    robustness.png (where corruptions were evaluated) and README.md (`card`, the checkpoint's model card,
    with these results: `report_card`). `sample_names(index)` names an image; `about` says what was
    evaluated. Returns report.json's content."""
    directory.mkdir(parents=True, exist_ok=True)
    write_evaluation(directory, matrix, class_names, metrics)  # the confusion matrix; per_class.csv, rewritten below
    names = [spreadsheet_safe(name.strip()) for name in class_names]
    labelled = matrix.sum(1)
    per_class = [{"class": class_names[i].strip(), "labelled_pixels": int(labelled[i]),
                  **{key: _json_number(metrics[f"per_category_{key}"][i]) for key in PER_CLASS}}
                 for i in range(len(class_names))]
    per_image = [{"image": sample_names(row["index"]), "labelled_pixels": row["pixels"],
                  "accuracy": _json_number(row["accuracy"]), "mean_iou": _json_number(row["mean_iou"]),
                  "iou": [_json_number(v) for v in row["iou"]]} for row in report.rows]
    worst = report.worst_images()
    content = {**about, "images": len(report.rows),
               "metrics": {key: _json_number(metrics[key]) for key in REPORT_SCALARS},
               "per_image_mean_iou": _json_number(report.per_image_mean_iou()),
               "boundary_width": f"{report.boundary.ratio:g} of each image's diagonal",
               "per_class": per_class, "per_image": per_image,
               "worst_images": [sample_names(index) for index, *_ in worst],  # their IoU: per_image
               "calibration": {when: {key: [_json_number(v) for v in value] if isinstance(value, list)
                                      else _json_number(value) for key, value in values.items()}
                               for when, values in metrics.get("calibration", {}).items()},
               **({"robustness": metrics["robustness"]} if "robustness" in metrics else {})}
    atomic_write(directory / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(content, indent=1)))

    def write_csv(name, rows):
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(rows)
        atomic_write(directory / name, write)
    write_csv("per_class.csv", [["class", *PER_CLASS, "labelled_pixels"]]
              + [[names[i], *(_number(metrics[f"per_category_{key}"][i]) for key in PER_CLASS), int(labelled[i])]
                 for i in range(len(names))])
    write_csv("per_image.csv", [["image", "labelled_pixels", "accuracy", "mean_iou", *(f"iou {n}" for n in names)]]
              + [[spreadsheet_safe(row["image"]), row["labelled_pixels"], _number(row["accuracy"]),
                  _number(row["mean_iou"]), *map(_number, row["iou"])] for row in per_image])
    draw_worst(worst, colours, sample_names, directory / "worst.png")
    draw_reliability(content["calibration"], directory / "reliability.png")
    if "robustness" in metrics:
        draw_robustness(metrics["robustness"], directory / "robustness.png")
    atomic_write(directory / "README.md", lambda tmp: Path(tmp).write_text(report_card(content, card)))
    return content


def draw_reliability(calibration: dict, path: Path) -> bool:
    """The reliability diagram: each confidence bin's accuracy against its mean confidence (the diagonal:
    calibrated), before and after temperature scaling, and how many pixels each bin holds."""
    plt = pyplot()
    if plt is None or not calibration:
        return False
    figure, (axis, counts) = plt.subplots(1, 2, figsize=(10, 4.5))
    for when, style in (("before", "o-"), ("after", "s--")):
        if when not in calibration:
            continue
        c = calibration[when]
        shown = [(x, y) for x, y in zip(c["bin_confidence"], c["bin_accuracy"]) if x is not None and y is not None]
        label = f"{when}: T = {c['temperature']:.3g}, ECE {c['ece']:.4f}"
        axis.plot([x for x, _ in shown], [y for _, y in shown], style, label=label)
        counts.bar(np.arange(15) + (0.2 if when == "after" else -0.2), c["bin_pixels"], width=0.4, label=when)
    axis.plot([0, 1], [0, 1], ":", color="grey", label="calibrated")
    axis.set(xlabel="confidence (top probability)", ylabel="accuracy", title="reliability (15 bins)", xlim=(0, 1),
             ylim=(0, 1))
    counts.set(xlabel="bin", ylabel="pixels", title="pixels per confidence bin", yscale="log")
    for a in (axis, counts):
        a.legend(fontsize=8)
    save_figure(plt, figure, path)
    return True


def robustness_table(robustness: dict) -> str:
    """Mean IoU (%) per corruption and severity, their mean, and the summary line."""
    rows = [f"{'corruption':<20}" + "".join(f"{s:>7}" for s in range(1, 6)) + f"{'mean':>8}"]
    for name, values in robustness["miou"].items():
        rows.append(f"{name:<20}" + "".join(f"{100 * v:>7.1f}" for v in values) + f"{100 * sum(values) / 5:>8.1f}")
    rows.append(f"clean mIoU {100 * robustness['clean_miou']:.1f}; mean corruption mIoU "
                f"{100 * robustness['mean_corruption_miou']:.1f}; relative robustness "
                f"{robustness['relative_robustness']:.3f}")
    return "\n".join(rows)


def draw_robustness(robustness: dict, path: Path) -> bool:
    """The heat map of mean IoU per corruption (rows) and severity (columns)."""
    plt = pyplot()
    if plt is None:
        return False
    names = list(robustness["miou"])
    values = np.array([robustness["miou"][n] for n in names])
    figure, axis = plt.subplots(figsize=(7, 0.45 * len(names) + 1.5))
    shown = axis.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        axis.text(j, i, f"{100 * v:.1f}", ha="center", va="center", fontsize=8, color="white" if v < 0.6 else "black")
    axis.set(xticks=range(5), xticklabels=range(1, 6), yticks=range(len(names)), yticklabels=names,
             xlabel="severity", title=f"mean IoU under corruption (clean {100 * robustness['clean_miou']:.1f})")
    figure.colorbar(shown, ax=axis)
    save_figure(plt, figure, path)
    return True


def _json_number(x):
    return None if x is None or math.isnan(float(x)) else round(float(x), 6)


def draw_worst(worst, colours, sample_names, path: Path) -> bool:
    """One row per image, worst first: the image, its labels, the prediction, and the errors (red: wrong,
    grey: ignored)."""
    plt = pyplot()
    if plt is None or not worst:
        return False
    palette = np.asarray(list(colours) + [(0, 0, 0)] * 256, dtype=np.uint8)[:256]
    palette[255] = (128, 128, 128)
    figure, axes = plt.subplots(len(worst), 4, figsize=(12, 3 * len(worst)), squeeze=False)
    for row, (index, miou, image, labels, prediction) in zip(axes, worst):
        picture = image.permute(1, 2, 0).numpy()
        labels, prediction = labels.numpy(), prediction.numpy()
        errors = np.zeros((*labels.shape, 3), np.uint8)
        errors[(labels != prediction) & (labels != 255)] = (220, 30, 30)
        errors[labels == 255] = (128, 128, 128)
        ignored = labels == 255
        for axis, shown, title in zip(row, (picture, blend(picture, np.where(ignored, 255, labels), palette),
                                            blend(picture, prediction, palette), errors),
                                      (f"{sample_names(index)[-40:]}: mean IoU {miou:.3f}", "labels",
                                       "prediction", "errors (red), ignored (grey)")):
            axis.imshow(shown)
            axis.set_title(title, fontsize=8)
            axis.axis("off")
    save_figure(plt, figure, path)
    return True


SECTION_BEGIN, SECTION_END = "<!-- evaluation report: begin -->", "<!-- evaluation report: end -->"


def report_card(content: dict, card: str | None = None) -> str:
    """The report as a model card: the checkpoint's own card (`card`, its README.md) with the report's
    headline metrics in its model-index (the results the hub shows; an earlier entry for the same data, split
    and metric replaced) and the report as a section before its training settings (an earlier report's
    section replaced). Without a card, the section alone."""
    section = "\n".join([SECTION_BEGIN, report_section(content), SECTION_END])
    if not card:
        return section + "\n"
    from huggingface_hub import ModelCard
    model_card = ModelCard(card, ignore_metadata_errors=True)
    data, split = str(content.get("data")), content.get("split")
    kept = [r for r in model_card.data.eval_results or []
            if (r.dataset_name, r.dataset_split, r.metric_type) not in {(data, split, key) for key, _ in CARD_METRICS}]
    model_card.data.eval_results = kept + eval_results(data, split, content["metrics"])
    model_card.data.model_name = model_card.data.model_name or Path(str(content.get("checkpoint"))).name
    text = model_card.text
    if SECTION_BEGIN in text and SECTION_END in text:  # a card that already holds a report: that one replaced
        text = text[:text.index(SECTION_BEGIN)] + section + text[text.index(SECTION_END) + len(SECTION_END):]
    elif "\n## Training settings" in text:
        where = text.index("\n## Training settings") + 1
        text = text[:where] + section + "\n\n" + text[where:]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    model_card.text = text
    return str(model_card)


def report_section(content: dict) -> str:
    """The report as a model card's results section (markdown)."""
    m = content["metrics"]
    lines = [f"## Evaluation: {content.get('data')} {content.get('split')} ({content['images']} images)", "",
             f"`{content.get('checkpoint')}`, {content.get('eval_mode')} evaluation at {content.get('size')}.", "",
             "| mean IoU | per-image mean IoU | FW IoU | mean F1 | mean precision | mean recall | mean Boundary IoU "
             "| overall accuracy |", "|---|---|---|---|---|---|---|---|",
             "| " + " | ".join(_fmt4(v) for v in (m["mean_iou"], content["per_image_mean_iou"],
                                                  m["frequency_weighted_iou"], m["mean_f1"], m["mean_precision"],
                                                  m["mean_recall"], m["mean_boundary_iou"], m["overall_accuracy"]))
             + " |", "", "| class | IoU | accuracy | precision | recall | F1 | Boundary IoU |",
             "|---|---|---|---|---|---|---|"]
    for row in content["per_class"]:
        if row["iou"] is not None:
            lines.append(f"| {row['class']} | " + " | ".join(_fmt4(row[key]) for key in PER_CLASS) + " |")
    lines += ["", "Worst images (by their own mean IoU): " + ", ".join(f"`{n}`" for n in content["worst_images"]), ""]
    if "robustness" in content:
        r = content["robustness"]
        lines += [f"Robustness: mean corruption mIoU {_fmt4(r['mean_corruption_miou'])}, relative "
                  f"{_fmt4(r['relative_robustness'])} (clean {_fmt4(r['clean_miou'])})", "",
                  "| corruption | 1 | 2 | 3 | 4 | 5 |", "|---|---|---|---|---|---|"]
        lines += [f"| {name} | " + " | ".join(_fmt4(v) for v in values) + " |" for name, values in r["miou"].items()]
        lines.append("")
    for when, c in content.get("calibration", {}).items():
        lines.append(f"Calibration {when} (temperature {c['temperature']:.3g}): ECE {_fmt4(c['ece'])}, NLL "
                     f"{_fmt4(c['nll'])}, Brier {_fmt4(c['brier'])}  ")
    lines.append("")
    return "\n".join(lines)


def _fmt4(value) -> str:
    return "-" if value is None else f"{value:.4f}"
