"""The evaluation report (train.py --eval-only --report DIR): report.json (everything), per_class.csv and
per_image.csv, the confusion matrix, worst.png (the worst images), reliability.png (calibration),
robustness.png (corruptions), and README.md: the checkpoint's model card with the report as a section and its
headline metrics in the model-index. Which metrics, in which order, under which names: segformer.metrics.METRICS."""

import json
import math
from pathlib import Path

import numpy as np

from segformer.files import atomic_write
from segformer.metrics import METRICS, metrics_where
from segformer.visual import blend, pyplot, save_figure

from .hub import eval_results
from .tables import _number, spreadsheet_safe, write_csv, write_evaluation

# The model card's headline, in this order: the metrics that say most first (the per-image mean beside the
# data set's), each under its table header ("mean " + it for a per-class metric's mean).
HEADLINE = ("mean_iou", "per_image_mean_iou", "frequency_weighted_iou", "mean_f1", "mean_precision", "mean_recall",
            "mean_boundary_iou", "overall_accuracy")


def write_report(directory: Path, metrics: dict, matrix: np.ndarray, report, class_names: list[str], *,
                 sample_names, colours, about: dict, card: str | None = None) -> dict:
    """report.json (everything), per_class.csv, per_image.csv, confusion.{npy,csv,png}, worst.png (the
    report's worst images: image | truth | prediction | errors), reliability.png (calibration),
    robustness.png (where corruptions were evaluated) and README.md (`card`, the checkpoint's model card,
    with these results: `report_card`). `sample_names(index)` names an image; `about` says what was
    evaluated. Returns report.json's content."""
    directory.mkdir(parents=True, exist_ok=True)
    per_class_keys = [m.per_class for m in metrics_where(per_class=True)]  # every metric of METRICS, per class
    write_evaluation(directory, matrix, class_names, metrics)  # the confusion matrix; per_class.csv, rewritten below
    names = [spreadsheet_safe(name.strip()) for name in class_names]
    labelled = matrix.sum(1)
    per_class = [{"class": class_names[i].strip(), "labelled_pixels": int(labelled[i]),
                  **{key: _json_number(metrics[f"per_category_{key}"][i]) for key in per_class_keys}}
                 for i in range(len(class_names))]
    per_image = [{"image": sample_names(row["index"]), "labelled_pixels": row["pixels"],
                  "accuracy": _json_number(row["accuracy"]), "mean_iou": _json_number(row["mean_iou"]),
                  "iou": [_json_number(v) for v in row["iou"]]} for row in report.rows]
    worst = report.worst_images()
    content = {**about, "images": len(report.rows),
               "metrics": {m.key: _json_number(metrics[m.key]) for m in metrics_where()},
               "per_image_mean_iou": _json_number(report.per_image_mean_iou()),
               "boundary_width": f"{report.boundary.ratio:g} of each image's diagonal",
               "per_class": per_class, "per_image": per_image,
               "worst_images": [sample_names(index) for index, *_ in worst],  # their IoU: per_image
               "calibration": {when: {key: [_json_number(v) for v in value] if isinstance(value, list)
                                      else _json_number(value) for key, value in values.items()}
                               for when, values in metrics.get("calibration", {}).items()},
               **({"robustness": metrics["robustness"]} if "robustness" in metrics else {})}
    atomic_write(directory / "report.json", lambda tmp: Path(tmp).write_text(json.dumps(content, indent=1)))

    write_csv(directory / "per_class.csv", [["class", *per_class_keys, "labelled_pixels"]]
              + [[names[i], *(_number(metrics[f"per_category_{key}"][i]) for key in per_class_keys), int(labelled[i])]
                 for i in range(len(names))])
    write_csv(directory / "per_image.csv", [["image", "labelled_pixels", "accuracy", "mean_iou", *(f"iou {n}" for n in names)]]
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
            if (r.dataset_name, r.dataset_split, r.metric_type) not in {(data, split, m.key) for m in metrics_where(card=True)}]
    model_card.data.eval_results = kept + eval_results(data, split, content["metrics"], metrics_where(card=True))
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
    m, per_class = content["metrics"], metrics_where(per_class=True)
    lines = [f"## Evaluation: {content.get('data')} {content.get('split')} ({content['images']} images)", "",
             f"`{content.get('checkpoint')}`, {content.get('eval_mode')} evaluation at {content.get('size')}.", "",
             "| " + " | ".join(headline_header(key) for key in HEADLINE) + " |", "|" + "---|" * len(HEADLINE),
             "| " + " | ".join(_fmt4(content["per_image_mean_iou"] if key == "per_image_mean_iou" else m[key])
                               for key in HEADLINE) + " |", "",
             "| class | " + " | ".join(metric.header for metric in per_class) + " |",
             "|---|" + "---|" * len(per_class)]
    for row in content["per_class"]:
        if row["iou"] is not None:
            lines.append(f"| {row['class']} | " + " | ".join(_fmt4(row[metric.per_class]) for metric in per_class) + " |")
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


def headline_header(key: str) -> str:
    if key == "per_image_mean_iou":
        return "per-image mean IoU"
    metric = next(m for m in METRICS if m.key == key)
    return f"mean {metric.header}" if metric.per_class else metric.header


def _fmt4(value) -> str:
    return "-" if value is None else f"{value:.4f}"
