"""train.py --eval-only: a checkpoint evaluated on a data split through the label spec it implies, by the
same `evaluate` and the same batches as training; with --report DIR, the evaluation report (per class, per
image, boundaries, calibration, the worst images, the model card), --calibrate (temperature scaling saved
beside the checkpoint) and --corruptions (the robustness table)."""

from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from data import build_dataset, decide_labels
from data.corruptions import SEVERITIES, Corruption, parse_corruptions
from segformer.calibration import CALIBRATION_FILE, TEMPERATURES
from segformer.device import autocast, resolve_amp
from segformer.errors import ConfigError
from segformer.files import writable_folder, write_json
from segformer.runtimes import load_for_inference
from training.data import build_eval_loader, open_split
from training.eval_report import write_report
from training.evaluation import Report, evaluate
from training.settings import Command
from training.tables import class_table, robustness_table
from training.train_config import TrainConfig


def evaluate_checkpoint(command: Command, *, rank: int, device: torch.device) -> dict:
    """--eval-only: the data through the label spec the checkpoint implies (its classes, input size and
    label reduction, unless a flag says otherwise), then the same `evaluate` as training."""
    config, given = command.config, command.given
    if command.report:  # a folder it cannot write is said now, not after the whole evaluation
        writable_folder(command.report, "--report")
    model, loaded = load_for_inference(command.checkpoint, trust_code=command.trust_code, runtime="eager")
    facts = loaded.checkpoint  # what the checkpoint says of itself: the label spec decides with the data's word
    samples = open_split(config, config.eval_split, train=False)
    spec, notes = decide_labels(data=samples.labels, checkpoint=facts,
                                reduce_labels=config.reduce_labels if "reduce_labels" in given else None,
                                size=config.size if "size" in given else None)
    config = replace(config, size=spec.size, reduce_labels=spec.reduce_labels, amp=resolve_amp(config.amp, device))
    model = model.to(device)
    eval_set = build_dataset(samples, spec=spec, train=False, eval_mode=config.eval_mode, skip_bad=config.skip_bad)
    classes = spec.predicted_classes
    folder = facts.weights.parent
    if command.calibrate and not Path(command.checkpoint).is_dir():
        raise ConfigError(f"--calibrate saves calibration.json beside the checkpoint: {command.checkpoint} is not a "
                          f"local checkpoint folder")
    if command.calibrate:  # calibration.json goes beside the checkpoint: writable, before the evaluation
        writable_folder(folder, "--calibrate, beside the checkpoint,")
    fitting = command.calibrate and len(classes) > 1
    temperatures = TEMPERATURES if fitting else (1.0, *([facts.temperature] if facts.temperature else []))
    report = Report(len(classes), device=device, temperatures=temperatures) \
        if command.report or command.calibrate else None
    evaluation = evaluate(model, build_eval_loader(config, eval_set), num_labels=len(classes), device=device,
                          autocast=lambda: autocast(device.type, config.amp), report=report)
    metrics = evaluation.metrics
    if report is not None:
        metrics = {**metrics, **report.boundary.compute(), "per_image_mean_iou": report.per_image_mean_iou()}
        fitted = report.calibration.fit() if fitting else facts.temperature
        metrics["calibration"] = {"before": report.calibration.at(1.0)} | (
            {"after": report.calibration.at(fitted)} if fitted else {})
    if command.corruptions:
        if spec.bands is not None:
            raise ConfigError("--corruptions: the corruptions are made for 8-bit RGB photos, not images of bands")
        metrics["robustness"] = robustness(command, config, spec, samples, model, device, rank=rank,
                                           clean=metrics["mean_iou"])
    if rank == 0:
        for note in notes:
            print(note)
        print(f"{command.checkpoint} on {config.data} {config.eval_split} ({len(eval_set)} images, {config.eval_mode}, "
              f"size {spec.size}, {'reduced' if spec.reduce_labels else 'raw'} labels):")
        print(class_table(metrics, classes))
        if command.calibrate and "after" in metrics["calibration"]:
            before, after = metrics["calibration"]["before"], metrics["calibration"]["after"]
            write_json({"temperature": after["temperature"], "fitted_on": f"{config.data} {config.eval_split}",
                        "ece_before": before["ece"], "ece_after": after["ece"], "nll_before": before["nll"],
                        "nll_after": after["nll"]}, folder / CALIBRATION_FILE)
            print(f"temperature {after['temperature']:.3f} (lowest NLL on {config.eval_split}): ECE "
                  f"{before['ece']:.4f} -> {after['ece']:.4f}, NLL {before['nll']:.4f} -> {after['nll']:.4f}, Brier "
                  f"{before['brier']:.4f} -> {after['brier']:.4f}; saved in {folder / CALIBRATION_FILE}, which "
                  f"infer.py and export.py apply")
        if command.report:
            about = {"checkpoint": str(command.checkpoint), "data": str(config.data), "split": config.eval_split,
                     "eval_mode": config.eval_mode, "size": spec.size}
            card = folder / "README.md"
            own_card = card.read_text(encoding="utf-8", errors="replace") if card.is_file() else None
            write_report(Path(command.report), metrics, evaluation.confusion, report, classes,
                         sample_names=samples.name, colours=spec.palette, about=about, card=own_card)
            if "robustness" in metrics:
                print(robustness_table(metrics["robustness"]))
            print(f"mean of the images' own mean IoU {metrics['per_image_mean_iou']:.4f} (data set: "
                  f"{metrics['mean_iou']:.4f}); mean F1 {metrics['mean_f1']:.4f}, mean Boundary IoU "
                  f"{metrics['mean_boundary_iou']:.4f}; the report: {command.report}/report.json")
            if own_card is not None:
                print(f"{command.report}/README.md: the checkpoint's model card with these results (to publish "
                      f"them with it, copy it over {card})")
    return metrics


def robustness(command: Command, config: TrainConfig, spec, samples, model, device, *, rank: int,
               clean: float) -> dict:
    """Mean IoU under each corruption at each severity (data/corruptions.py), the same evaluation on the
    corrupted images; their mean (mean corruption mIoU) and its ratio to the clean mIoU (relative
    robustness)."""
    names = parse_corruptions(command.corruptions)
    table = {}
    for name in tqdm(names, desc="corruptions", disable=rank != 0):
        table[name] = []
        for severity in SEVERITIES:
            corrupted = build_dataset(samples, spec=spec, train=False, eval_mode=config.eval_mode,
                                      skip_bad=config.skip_bad, corruption=Corruption(name, severity))
            result = evaluate(model, build_eval_loader(config, corrupted), num_labels=len(spec.predicted_classes),
                              device=device, autocast=lambda: autocast(device.type, config.amp))
            table[name].append(result.metrics["mean_iou"])
    values = [v for row in table.values() for v in row]
    mean = sum(values) / len(values)
    return {"clean_miou": clean, "miou": table, "mean_corruption_miou": mean, "relative_robustness": mean / clean}
