"""The four places a contributor extends the project, each with a toy one added in a few lines (README's
"Where things are"): a dataset layout (a row of data.folders.FOLDER_LAYOUTS), a decoder (a class by import
path), a metric (a row of segformer.metrics.METRICS and its computation), an export runtime (a module with
`load` and `write`, and a row of segformer.runtimes.RUNTIMES). If a map entry goes stale, its test fails."""

import json

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

import export
import infer
import train
from data import build_dataset
from data import folders
from helpers import random_image
from segformer import SegFormer, load_for_inference, metrics
from segformer.metrics import METRICS, ConfusionMatrix, Metric
from segformer.runtimes import RUNTIMES, Runtime


def test_a_dataset_layout_is_one_row(tmp_path, monkeypatch):
    """A folder of `pics/` and `masks/` whose mask values are the class ids of 3 classes: one row, tried first."""
    for name in ("pics", "masks"):
        (tmp_path / name).mkdir()
    for i in range(3):
        random_image(32, 32, seed=i).save(tmp_path / "pics" / f"{i}.png")
        Image.fromarray(np.full((32, 32), i, np.uint8)).save(tmp_path / "masks" / f"{i}.png")
    toy = folders.FolderLayoutRule("pics and masks", folders.has_folders("pics", "masks"), lambda found, root: (
        folders.FolderLayout("pics/ + masks/ folder", {"all": folders.folder_pairs(root / "pics", root / "masks")},
                             class_names=("a", "b", "c"), assumed=False)))
    monkeypatch.setattr(folders, "FOLDER_LAYOUTS", [toy, *folders.FOLDER_LAYOUTS])
    assert folders.detect_folder_layout(tmp_path).name == "pics/ + masks/ folder"
    dataset = build_dataset(str(tmp_path), split="train", size=32, test_size=0)  # the whole folder
    assert dataset.spec.class_names == ("a", "b", "c")
    assert [dataset[i]["labels"].unique().tolist() for i in range(len(dataset))] == [[0], [1], [2]]


def test_a_decoder_is_a_class_by_import_path(tmp_path):
    model = SegFormer.from_variant("b0", num_labels=4, decoder="custom_parts:LightHead").eval()
    x = torch.randn(1, 3, 64, 64)
    assert model(x).shape == (1, 4, 16, 16)
    model.save_pretrained(tmp_path)
    reloaded, facts = load_for_inference(tmp_path, trust_code=True)
    assert type(reloaded.decoder).__name__ == "LightHead" and facts.class_names == tuple(model.config.label_names())
    assert torch.equal(reloaded(x), model(x))


def test_a_metric_is_one_row_plus_its_computation(tmp_path, monkeypatch, capsys):
    """A toy metric, half of each class's accuracy: its row and its computation, and the eval-only class
    table, report.json, per_class.csv and the report card's table and model-index show it."""
    compute = ConfusionMatrix.compute

    def with_toy(self):
        values = compute(self)
        values["per_category_toy"] = values["per_category_accuracy"] * 0.5
        values["mean_toy"] = float(np.nanmean(values["per_category_toy"]))
        return values
    monkeypatch.setattr(ConfusionMatrix, "compute", with_toy)
    monkeypatch.setattr(metrics, "METRICS", (*METRICS, Metric("mean_toy", "Mean Toy", "toy", "toy", card="report",
                                                              table="toy")))
    checkpoint = tmp_path / "model"
    SegFormer.from_variant("b0", num_labels=7).save_pretrained(checkpoint)
    (checkpoint / "README.md").write_text("---\nlibrary_name: transformers\n---\n# a model\n")
    assert train.main(["--eval-only", "--checkpoint", str(checkpoint), "--eval-split", "validation[:2]", "--size", "32",
                       "--report", str(tmp_path / "report")]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("class "))
    assert header.split()[-1] == "toy"
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["metrics"]["mean_toy"] == pytest.approx(report["metrics"]["mean_accuracy"] * 0.5, abs=1e-6)  # 6 places
    assert "toy" in (tmp_path / "report" / "per_class.csv").read_text().splitlines()[0].split(",")
    card = ModelCard((tmp_path / "report" / "README.md").read_text())
    assert [r.metric_value for r in card.data.eval_results if r.metric_name == "Mean Toy"] == \
        [round(report["metrics"]["mean_toy"], 4)]
    assert "| class | IoU | accuracy | precision | recall | F1 | Boundary IoU | toy |" in card.text


def test_an_export_runtime_is_one_module_and_one_row(tmp_path, monkeypatch):
    monkeypatch.setitem(RUNTIMES, "f64", Runtime("float64 (a toy)", "toy_runtime", (".f64",)))
    checkpoint = tmp_path / "model"
    torch.manual_seed(0)
    SegFormer.from_variant("b0", num_labels=3).save_pretrained(checkpoint)
    assert export.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "f64"), "--runtime", "f64",
                        "--size", "64"]) == 0
    model, facts = load_for_inference(tmp_path / "f64" / "model.f64")
    assert facts.runtime == "f64" and type(model).__name__ == "Float64Model" and facts.size == 64
    image = tmp_path / "photo.png"
    random_image(48, 80).save(image)
    for source, out in ((checkpoint, "eager"), (tmp_path / "f64" / "model.f64", "f64")):
        assert infer.main(infer.get_args(["--checkpoint", str(source), str(image), "--out", str(tmp_path / out),
                                          "--size", "64"])) == 0
    same = [np.array_equal(np.asarray(Image.open(tmp_path / out / "photo_mask.png")),
                           np.asarray(Image.open(tmp_path / "eager" / "photo_mask.png"))) for out in ("f64",)]
    assert same == [True]
