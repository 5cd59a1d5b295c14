"""See, explain and share: plots, confusion matrices, TensorBoard, model cards, pushing to the hub, explain.py."""

import csv
import math

import numpy as np
import pytest
import torch
import yaml

import explain
from helpers import random_image, read_log, run_training
from segformer import SegFormer
from training import plots
from training.hub import HubError

QUICK = ["--train-split", "train[:8]", "--eval-split", "validation[:4]", "--size", "32", "--batch-size", "2",
         "--warmup-steps", "0", "--log-every", "1", "--eval-every", "2", "--save-every", "2"]


def quick(out, *extra):
    return run_training(out, *extra, base=QUICK)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    quick(out, "--max-steps", "4")
    return out


def test_plots_and_csvs_hold_what_was_logged(tiny_run):
    for name in ("curves.png", "per_class_iou.png"):
        assert (tiny_run / name).stat().st_size > 1000, name
    logged = {r["step"]: r for r in read_log(tiny_run) if "mean_iou" in r}
    assert sorted(logged) == [2, 4]
    for step, record in logged.items():
        folder = tiny_run / "evaluations" / f"step-{step}"
        assert {p.name for p in folder.iterdir()} == {"confusion.npy", "confusion.csv", "confusion.png",
                                                      "per_class.csv"}
        rows = list(csv.DictReader(open(folder / "per_class.csv")))
        assert [r["class"] for r in rows] == ["sky", "grass", "water", "wall", "ball", "box", "roof"]
        for row, iou, accuracy in zip(rows, record["per_category_iou"], record["per_category_accuracy"]):
            assert (float(row["iou"]) if row["iou"] else None) == pytest.approx(iou, abs=1e-6)
            assert (float(row["accuracy"]) if row["accuracy"] else None) == pytest.approx(accuracy, abs=1e-6)
        matrix = np.load(folder / "confusion.npy")
        assert [int(r["labelled_pixels"]) for r in rows] == matrix.sum(1).tolist()
        assert np.trace(matrix) / matrix.sum() == pytest.approx(record["overall_accuracy"], abs=1e-9)
        table = list(csv.reader(open(folder / "confusion.csv")))
        assert table[0][1:] == [r["class"] for r in rows] and np.array_equal(
            np.array([[int(v) for v in line[1:]] for line in table[1:]]), matrix)


def test_no_plots_writes_the_numbers_and_draws_nothing(tmp_path):
    quick(tmp_path, "--max-steps", "2", "--no-plots")
    assert not list(tmp_path.rglob("*.png"))
    assert {p.name for p in (tmp_path / "evaluations" / "step-2").iterdir()} == {"confusion.npy", "confusion.csv",
                                                                                 "per_class.csv"}


def test_heatmap_rows_sum_to_one_and_many_classes_show_the_most_confused_pairs(tmp_path):
    matrix = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])
    shares = plots.row_normalised(matrix)
    assert np.allclose(shares[:2].sum(1), 1.0) and (shares[2] == 0).all()  # an unlabelled class stays 0
    names = [f"class {i}" for i in range(40)]
    big = np.diag(np.full(40, 100))
    big[5, 7], big[9, 1] = 60, 10
    pairs = plots.most_confused(big, names, count=3)
    assert pairs[0] == ("class 5", "class 7", pytest.approx(60 / 160)) and pairs[1][:2] == ("class 9", "class 1")
    plt = plots.pyplot()
    plots.draw_confusion(plt, big, names, tmp_path / "pairs.png")
    assert (tmp_path / "pairs.png").stat().st_size > 1000


def test_the_model_card_is_the_hubs_format_with_the_logged_metrics(tiny_run):
    card = (tiny_run / "checkpoint-4" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "image-segmentation"
    assert "segformer" in front["tags"] and front["license"] == "mit"
    metrics = {m["type"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
    logged = [r for r in read_log(tiny_run) if "mean_iou" in r and r["step"] == 4][0]
    assert metrics["mean_iou"] == round(logged["mean_iou"], 4)
    assert "SegFormer.from_pretrained" in card and "SegformerForSemanticSegmentation.from_pretrained" in card
    assert "| lr | 0.001 |" in card and (tiny_run / "best" / "README.md").is_file()


def test_the_comparison_command_draws_several_runs(tiny_run, tmp_path, capsys):
    assert plots.main([str(tiny_run), str(tiny_run), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").stat().st_size > 1000
    assert plots.main([str(tmp_path / "nowhere")]) == 2
    assert "metrics.jsonl: no such file" in capsys.readouterr().err


class FakeHub:
    """huggingface_hub.HfApi at its boundary: records what would be created and uploaded."""

    def __init__(self, fail_uploads=False):
        self.calls, self.fail_uploads = [], fail_uploads

    def __call__(self):
        return self

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None):
        self.calls.append(("create_repo", repo_id, private))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns=None):
        from pathlib import Path
        kept = sorted(p.name for p in Path(folder_path).iterdir() if p.name not in (ignore_patterns or []))
        self.calls.append(("upload_folder", repo_id, Path(folder_path).name, commit_message, kept))
        if self.fail_uploads:
            raise ConnectionError("the network went away")


def test_push_to_hub_uploads_best_with_its_card(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub)
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    quick(tmp_path, "--max-steps", "4", "--push-to-hub", "me/tiny", "--hub-private")
    assert hub.calls[0] == ("create_repo", "me/tiny", True)
    _, repo, folder, message, files = hub.calls[-1]
    assert (repo, folder) == ("me/tiny", "best") and message.startswith("best at step 4: mean IoU ")
    assert {"README.md", "model.safetensors", "config.json", "preprocessor_config.json"} <= set(files)
    assert "training_state.pt" not in files  # the optimizer's state stays home
    assert "pushed" in capsys.readouterr().out
    every = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", every)
    quick(tmp_path / "every", "--max-steps", "4", "--push-to-hub", "me/tiny", "--hub-strategy", "every_save")
    assert [c[2] for c in every.calls if c[0] == "upload_folder"] == ["checkpoint-2", "checkpoint-4", "best"]


def test_a_failed_upload_loses_no_training(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub(fail_uploads=True))
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    result = quick(tmp_path, "--max-steps", "4", "--push-to-hub", "me/tiny", "--hub-strategy", "every_save")
    assert result["step"] == 4 and (tmp_path / "best" / "model.safetensors").is_file()
    out = capsys.readouterr().out
    assert "pushing" in out and "failed (ConnectionError: the network went away); training goes on" in out


def test_no_token_or_offline_is_one_line_before_training(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import huggingface_hub.utils
    monkeypatch.setattr(huggingface_hub.utils, "get_token", lambda: None)
    with pytest.raises(HubError, match=r"--push-to-hub me/tiny: no Hugging Face token; set HF_TOKEN"):
        quick(tmp_path / "a", "--max-steps", "1", "--push-to-hub", "me/tiny")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match=r"offline mode \(HF_HUB_OFFLINE=1\)"):
        quick(tmp_path / "b", "--max-steps", "1", "--push-to-hub", "me/tiny")
    assert not list((tmp_path / "b").glob("checkpoint-*"))


def test_tensorboard_gets_scalars_and_predicted_overlays(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    quick(tmp_path, "--max-steps", "2", "--report-to", "tensorboard")
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/images_per_s", "validation/mean_iou"} <= set(scalars)
    logged = [r for r in read_log(tmp_path) if "mean_iou" in r][0]
    assert events.Scalars("validation/mean_iou")[0].value == pytest.approx(logged["mean_iou"], abs=1e-6)
    assert events.Tags()["images"] == ["validation/predictions"]


# ---- explain.py --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_image(tmp_path_factory):
    torch.manual_seed(0)
    from helpers import randomize_
    model = randomize_(SegFormer.from_variant("b0", num_labels=4), seed=2).eval()
    return model, random_image(90, 120, seed=3)


def test_attention_rows_sum_to_one_and_are_the_models_own(model_and_image):
    model, _ = model_and_image
    attention = model.encoder.stages[1].blocks[0].attn  # reduction 4, 2 heads
    x = torch.randn(2, 12 * 16, 64)
    weights, grid = attention.attention_weights(x, 12, 16)
    assert weights.shape == (2, 2, 192, 12) and grid == (3, 4)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 2, 192), atol=1e-6)
    # by hand: queries from every token, keys from the reduced map, softmax(q . k / sqrt(d))
    q = x @ attention.q.weight.T + attention.q.bias
    reduced = attention.sr(x.transpose(1, 2).reshape(2, 64, 12, 16)).flatten(2).transpose(1, 2)
    reduced = torch.nn.functional.layer_norm(reduced, (64,), attention.sr_norm.weight, attention.sr_norm.bias)
    k = reduced @ attention.k.weight.T + attention.k.bias
    for head in range(2):
        d = slice(32 * head, 32 * head + 32)
        manual = (q[..., d] @ k[..., d].transpose(1, 2) / math.sqrt(32)).softmax(-1)
        assert torch.allclose(weights[:, head], manual, atol=1e-6)
    # and with the values they give the attention's own (fused) output
    v = (reduced @ attention.v.weight.T + attention.v.bias).view(2, 12, 2, 32).transpose(1, 2)
    mixed = (weights @ v).transpose(1, 2).reshape(2, 192, 64)
    with torch.no_grad():
        assert torch.allclose(attention.proj(mixed), attention(x, 12, 16), atol=1e-5)


def test_the_tour_holds_the_models_computation(model_and_image):
    model, image = model_and_image
    result = explain.tour(model, image, size=64, pixel=(45, 60))
    assert [tuple(f.shape[1:]) for f in result["stages"]] == [(32, 16, 16), (64, 8, 8), (160, 4, 4), (256, 2, 2)]
    assert [a[2] for a in result["attention"]] == [(2, 2), (2, 2), (2, 2), (2, 2)]  # the reduced key grids
    for weights, _, _ in result["attention"]:
        assert torch.allclose(weights.sum((-2, -1)), torch.ones(weights.shape[0]), atol=1e-5)
    with torch.no_grad():  # the four terms add up to the decoder's own fused feature: its classifier input
        decoder = model.decoder
        logits = decoder.classifier(torch.relu(result["fused"]))
    assert torch.allclose(logits, result["logits"], atol=1e-4)
    assert result["prediction"].shape == (90, 120)


def test_explain_py_writes_the_figure_and_its_panels(model_and_image, tmp_path, capsys):
    model, image = model_and_image
    model.save_pretrained(tmp_path / "model")
    image.save(tmp_path / "image.png")
    assert explain.main(["--checkpoint", str(tmp_path / "model"), str(tmp_path / "image.png"), "--size", "64",
                         "--pixel", "10", "20", "--out", str(tmp_path / "tour")]) == 0
    names = {p.name for p in (tmp_path / "tour").iterdir()}
    assert names == {"tour.png", "input.png", "prediction.png", "fused.png", "attention_heads.png",
                     *(f"{kind}{i}.png" for kind in ("stage", "attention_stage", "decoder_level") for i in range(1, 5))}
    assert explain.main(["--checkpoint", str(tmp_path / "model"), str(tmp_path / "image.png"), "--pixel", "500", "0",
                         "--out", str(tmp_path / "tour")]) == 2
    assert "--pixel 500 0: outside the 120x90 image" in capsys.readouterr().err
