"""ConfusionMatrix against a plain NumPy transcription of `evaluate`'s mean_iou."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from segformer.metrics import ConfusionMatrix, logits_to_predictions


def evaluate_mean_iou(predictions, references, num_labels, ignore_index):
    """`evaluate`'s mean_iou (intersect_and_union with np.histogram), written out in NumPy."""
    inter_total = union_total = pred_total = label_total = 0
    for pred, label in zip(predictions, references):
        mask = label != ignore_index
        pred, label = pred[mask], label[mask]
        intersect = pred[pred == label]
        area_intersect = np.histogram(intersect, bins=num_labels, range=(0, num_labels - 1))[0]
        area_pred = np.histogram(pred, bins=num_labels, range=(0, num_labels - 1))[0]
        area_label = np.histogram(label, bins=num_labels, range=(0, num_labels - 1))[0]
        inter_total = inter_total + area_intersect
        union_total = union_total + area_pred + area_label - area_intersect
        pred_total, label_total = pred_total + area_pred, label_total + area_label
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter_total / union_total
        acc = inter_total / label_total
    return {"mean_iou": np.nanmean(iou), "mean_accuracy": np.nanmean(acc),
            "overall_accuracy": inter_total.sum() / label_total.sum(),
            "per_category_iou": iou, "per_category_accuracy": acc}


def random_batch(seed, num_labels=6, shape=(3, 20, 30)):
    g = torch.Generator().manual_seed(seed)
    references = torch.randint(0, num_labels - 1, shape, generator=g)  # the last class is never labelled
    references[torch.rand(shape, generator=g) < 0.2] = 255
    predictions = torch.randint(0, num_labels, shape, generator=g)
    predictions[predictions == 2] = 1  # class 2 labelled but never predicted
    predictions[predictions == 3] = 4  # ...
    references[references == 3] = 0  # class 3: neither labelled nor predicted -> NaN
    return predictions, references


def test_matches_evaluate_semantics_including_nans():
    cm = ConfusionMatrix(num_labels=6, ignore_index=255)
    batches = [random_batch(seed) for seed in range(3)]
    for predictions, references in batches:
        cm.update(predictions, references)
    got = cm.compute()
    predictions = [p.numpy() for batch in batches for p in batch[0]]
    references = [r.numpy() for batch in batches for r in batch[1]]
    expected = evaluate_mean_iou(predictions, references, 6, 255)
    assert np.isnan(got["per_category_iou"][3]) and got["per_category_iou"][5] == 0.0  # absent; predicted only
    assert np.isnan(got["per_category_accuracy"][5])
    for key in ("per_category_iou", "per_category_accuracy"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-12, equal_nan=True)
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        assert got[key] == pytest.approx(float(expected[key]), rel=1e-12)


def test_perfect_predictions_and_ignored_pixels():
    cm = ConfusionMatrix(num_labels=3)
    labels = torch.tensor([[0, 1, 255], [2, 2, 255]])
    predictions = labels.clone()
    predictions[labels == 255] = 1  # whatever is predicted on ignored pixels does not count
    cm.update(predictions, labels)
    result = cm.compute()
    assert result["mean_iou"] == 1.0 and result["overall_accuracy"] == 1.0
    assert cm.matrix.sum() == 4


def test_logits_are_upsampled_before_argmax():
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 0] = 0.5
    logits[0, 1, :, 1] = 1.0  # class 1 rises from 0 to 1 left to right: it wins past the middle
    predictions = logits_to_predictions(logits, (4, 4))
    assert predictions.shape == (1, 4, 4)
    assert predictions[0, 0].tolist() == [0, 0, 1, 1]


# One process of the two below: its half of the batches, summed over both with all_reduce; rank 0 saves the sum.
TWO_PROCESS_WORKER = """
import sys
import torch
import torch.distributed as dist
from segformer.metrics import ConfusionMatrix
from test_metrics import random_batch
rank, world_size, init_method, result_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
cm = ConfusionMatrix(num_labels=6)
for seed in range(rank, 4, world_size):  # each process sees half of the batches
    cm.update(*random_batch(seed))
cm.all_reduce()
if rank == 0:
    torch.save(cm.counts, result_path)
dist.destroy_process_group()
"""


def test_two_process_sum_equals_one_process(tmp_path):
    """Two processes of their own (not forked from the test's: torch.multiprocessing.spawn's children share
    the pytest-xdist worker's stdout, its channel to the controller, and took the worker down with them),
    meeting through a file (no port to race for)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    init_method = f"file://{tmp_path / 'rendezvous'}"
    workers = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_WORKER, str(rank), "2", init_method,
                                 str(tmp_path / "counts.pt")], cwd=root, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    try:
        outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    assert [worker.returncode for worker in workers] == [0, 0], "\n".join(outputs)[-3000:]
    single = ConfusionMatrix(num_labels=6)
    for seed in range(4):
        single.update(*random_batch(seed))
    assert torch.equal(torch.load(tmp_path / "counts.pt"), single.counts)


# ---- precision, recall, F1 (torchmetrics), frequency-weighted IoU, Boundary IoU (the authors' algorithm) ------

@pytest.mark.parametrize("seed", [0, 1])
def test_precision_recall_f1_match_torchmetrics_with_ignore_index(seed):
    tm = pytest.importorskip("torchmetrics.classification")
    predictions, references = random_batch(seed)
    references[0] = 255  # an image with nothing labelled
    confusion = ConfusionMatrix(num_labels=6)
    confusion.update(predictions, references)
    metrics = confusion.compute()
    present = ~np.isnan(metrics["per_category_iou"])
    assert not present[3] and present[5]  # absent from both: NaN here; predicted, never labelled: counted
    for name, reference in (("precision", tm.MulticlassPrecision), ("recall", tm.MulticlassRecall),
                            ("f1", tm.MulticlassF1Score)):
        per_class = reference(6, average=None, ignore_index=255)(predictions, references).numpy()
        macro = reference(6, average="macro", ignore_index=255)(predictions, references).item()
        np.testing.assert_allclose(metrics[f"per_category_{name}"][present], per_class[present], atol=1e-6)
        assert np.isnan(metrics[f"per_category_{name}"][3])
        assert metrics[f"mean_{name}"] == pytest.approx(macro, abs=1e-6)
    labelled = confusion.matrix.sum(1).double().numpy()
    expected = np.nansum(labelled / labelled.sum() * np.nan_to_num(metrics["per_category_iou"]))
    assert metrics["frequency_weighted_iou"] == pytest.approx(expected)


def mask_to_boundary(mask: np.ndarray, d: int) -> np.ndarray:
    """The Boundary IoU authors' mask_to_boundary (cv2: pad 1 with 0, erode 3x3 d times, crop, subtract),
    with scipy's erosion, zeros beyond the image."""
    from scipy import ndimage
    return mask & ~ndimage.binary_erosion(mask, structure=np.ones((3, 3)), iterations=d, border_value=0)


def boundary_iou_by_hand(predictions, references, num_labels, ratio=0.02):
    intersection, union = np.zeros(num_labels), np.zeros(num_labels)
    for prediction, reference in zip(predictions.numpy(), references.numpy()):
        d = max(1, round(ratio * np.hypot(*reference.shape)))
        valid = reference != 255
        for c in range(num_labels):
            label_band = mask_to_boundary(reference == c, d) & valid
            predicted_band = mask_to_boundary(prediction == c, d) & valid
            intersection[c] += (label_band & predicted_band).sum()
            union[c] += (label_band | predicted_band).sum()
    with np.errstate(invalid="ignore"):
        return intersection / union


def test_boundary_iou_matches_the_authors_algorithm_on_random_and_crafted_maps():
    from segformer.metrics import BoundaryIoU, boundary_band
    square = torch.zeros(1, 60, 60, dtype=torch.bool)
    square[0, 10:50, 10:50] = True
    band = boundary_band(square, 3)[0]
    assert band.sum() == 40 * 40 - 34 * 34 and not band[20:40, 20:40].any()  # a ring 3 pixels wide
    edge = torch.ones(1, 20, 20, dtype=torch.bool)
    assert boundary_band(edge, 2)[0].sum() == 400 - 16 * 16  # the image's border is a boundary too
    for seed in range(3):
        predictions, references = random_batch(seed, shape=(2, 48, 64))
        g = torch.Generator().manual_seed(seed)
        blocks = torch.randint(0, 6, (2, 6, 8), generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)
        predictions = torch.where(torch.rand(blocks.shape, generator=g) < 0.9, blocks, predictions)  # regions
        references = torch.where(references == 255, references, blocks)
        metric = BoundaryIoU(6, classes_at_once=2)
        metric.update(predictions, references)
        expected = boundary_iou_by_hand(predictions, references, 6)
        np.testing.assert_allclose(metric.compute()["per_category_boundary_iou"], expected, equal_nan=True)
    perfect = BoundaryIoU(6)
    perfect.update(references, references)
    values = perfect.compute()["per_category_boundary_iou"]
    assert np.all(values[~np.isnan(values)] == 1.0)
    empty = BoundaryIoU(6)
    empty.update(predictions, torch.full_like(references, 255))  # nothing labelled: no band anywhere
    assert np.isnan(empty.compute()["mean_boundary_iou"])


# ---- calibration: ECE (torchmetrics), NLL, Brier score, at every temperature --------------------------------

def test_calibration_matches_torchmetrics_cross_entropy_and_brier_at_any_temperature():
    tm = pytest.importorskip("torchmetrics.classification")
    from segformer.calibration import Calibration
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 24, 32, generator=g) * 3
    labels = torch.where(torch.rand(2, 24, 32, generator=g) < 0.6, logits.argmax(1), torch.randint(0, 5, (2, 24, 32),
                                                                                                 generator=g))
    labels[0, :4] = 255
    calibration = Calibration(5, temperatures=(0.5, 1.0, 2.0))
    calibration.update(logits[:1], labels[:1], pixels_at_once=100)  # in pieces: the same sums
    calibration.update(logits[1:], labels[1:])
    for t in (0.5, 1.0, 2.0):
        got = calibration.at(t)
        p = (logits / t).softmax(1)
        ece = tm.MulticlassCalibrationError(5, n_bins=15, norm="l1", ignore_index=255)(p, labels).item()
        nll = torch.nn.functional.cross_entropy(logits / t, labels, ignore_index=255).item()
        keep = labels != 255
        one_hot = torch.nn.functional.one_hot(labels.clamp(max=4), 5).permute(0, 3, 1, 2).float()
        brier = ((p - one_hot) ** 2).sum(1)[keep].mean().item()
        assert got["ece"] == pytest.approx(ece, abs=1e-5), t
        assert got["nll"] == pytest.approx(nll, abs=1e-5) and got["brier"] == pytest.approx(brier, abs=1e-5)
    assert calibration.fit() == min((0.5, 1.0, 2.0), key=lambda t: calibration.at(t)["nll"])
