"""The label spec, decided once (data/spec.py): what wins over what, what is said, and what is refused with a
way to go on; and the same decision in training, --eval-only, the doctor, inference and export."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data.__main__ as doctor
import infer
import train
from data import SourceLabels, decide_labels
from data.folders import MMSEG_DEFAULT
from data.mapping import ADE, IDENTITY
from helpers import random_image, run_training, write_ade_folder
from segformer import SegFormer, load_for_inference
from segformer.checkpoint import describe
from segformer.errors import CheckpointError, ConfigError
from segformer.labels import ADE20K_CLASSES, CITYSCAPES_CLASSES
from segformer.runtimes.graph import write_side_files

QUICK = ["--size", "32", "--batch-size", "2", "--warmup-steps", "0", "--log-every", "1", "--eval-every", "2",
         "--save-every", "2", "--max-steps", "2", "--no-plots"]
ADE_FOLDER = SourceLabels("ade/", "ADEChallengeData2016 folder", class_names=ADE20K_CLASSES, mapping=ADE, known=True,
                          assumed=True)
MANIFEST = SourceLabels("mine/", "dataset.json", class_names=("sea", "boat", "rock"), mapping=IDENTITY, known=True)


def own_classes_in_ade_layout(root, classes=11):
    """The layout tutorials tell people to copy, with classes of their own (ADE convention: 0 unlabelled)."""
    masks = [np.indices((32, 32))[1] // 3 % (classes + 1) for _ in range(6)]
    return write_ade_folder(root, masks[:4], masks[4:])


# ---- the rules, on plain values --------------------------------------------------------------------------

def test_an_explicit_choice_wins_over_a_layouts_default_names_and_says_so():
    spec, lines = decide_labels(data=ADE_FOLDER, num_labels=11)
    assert spec.class_names == tuple(f"LABEL_{i}" for i in range(11)) and spec.reduce_labels
    assert any("--num-labels 11 (11: LABEL_0" in line and "wins over the 150 classes the ADEChallengeData2016 folder "
               "has by default; name them with --id2label FILE" in line for line in lines)
    assert any("does not state its convention" in line and "--no-reduce-labels" in line for line in lines)
    assert not spec.convention_stated  # train.py then looks at class 0 in the annotations
    names = {i: f"c{i}" for i in range(11)}
    spec, lines = decide_labels(data=ADE_FOLDER, id2label=names, id2label_origin="--id2label my11.json")
    assert spec.class_names == tuple(names.values()) and "--id2label my11.json (11: c0, c1" in lines[0]
    spec, lines = decide_labels(data=ADE_FOLDER, num_labels=150)  # agreeing: the layout's names, nothing to say
    assert spec.class_names == ADE20K_CLASSES and lines == [] and spec.convention_stated


def test_the_datas_own_words_must_agree_and_refusals_say_what_to_do():
    with pytest.raises(ConfigError, match=r"--num-labels 5, but the data mine/ has 3 classes \(sea, boat, rock\): "
                                          r"drop --num-labels to use the data's classes"):
        decide_labels(data=MANIFEST, num_labels=5)
    with pytest.raises(ConfigError, match=r"--id2label x\.json has 2 classes \(a, b\) but the data mine/ has 3 .*: "
                                          r"drop --id2label"):
        decide_labels(data=MANIFEST, id2label={0: "a", 1: "b"}, id2label_origin="--id2label x.json")
    with pytest.raises(ConfigError, match=r"the data does not name its classes; give --num-labels N or --id2label"):
        decide_labels(data=SourceLabels("flat/", "images/ + annotations/ folder", mapping=ADE))
    with pytest.raises(ConfigError, match=r"--num-labels 4, but --id2label has 3 classes .*: drop --num-labels, or "
                                          r"give a list of 4 names"):
        decide_labels(data=MANIFEST, id2label={0: "sea", 1: "boat", 2: "rock"}, num_labels=4)


def test_mmseg_folders_keep_class_ids_as_mmseg_does_and_say_so(tmp_path):
    mmseg = SourceLabels("m/", "img_dir/ + ann_dir/ folder", mapping=MMSEG_DEFAULT, known=False)
    spec, lines = decide_labels(data=mmseg, num_labels=4)
    assert not spec.reduce_labels and spec.mapping.table(8).tolist()[:5] == [0, 1, 2, 3, 4]
    assert any("reduce_zero_label=False" in line and "--reduce-labels if 0 means 'unlabelled'" in line
               for line in lines)
    for split in ("train", "val"):  # and from a folder: class 0 is a class, not 'unlabelled'
        (tmp_path / "img_dir" / split).mkdir(parents=True)
        (tmp_path / "ann_dir" / split).mkdir(parents=True)
        for i in range(2):
            random_image(16, 16, seed=i).save(tmp_path / "img_dir" / split / f"{i}.jpg")
            Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "ann_dir" / split / f"{i}.png")
    from data import build_dataset
    dataset = build_dataset(str(tmp_path), "train", num_labels=2, size=16)
    assert (dataset[0]["labels"] == 0).all()  # not shifted to 255 ('ignored')


def test_the_checkpoint_being_evaluated_names_the_classes_and_its_convention(tmp_path):
    model = SegFormer.from_variant("b0", num_labels=3, id2label={0: "sea", 1: "boat", 2: "rock"},
                                   depths=(1, 1, 1, 1))
    model.save_pretrained(tmp_path / "ckpt")
    from segformer.checkpoint import write_preprocessor_config
    from segformer.files import write_json
    write_preprocessor_config(tmp_path / "ckpt", size=48, reduce_labels=False)
    write_json([[1, 2, 3], [4, 5, 6], [7, 8, 9]], tmp_path / "ckpt" / "palette.json")
    facts = describe(tmp_path / "ckpt")
    spec, _ = decide_labels(checkpoint=facts)  # inference, export, the tour: the checkpoint alone
    assert (spec.class_names, spec.size, spec.reduce_labels, spec.palette) == \
        (("sea", "boat", "rock"), 48, False, ((1, 2, 3), (4, 5, 6), (7, 8, 9)))
    assert decide_labels(checkpoint=facts, size=64)[0].size == 64  # --size wins
    spec, _ = decide_labels(data=MANIFEST, checkpoint=facts)
    assert spec.mapping.reduce_labels is False
    with pytest.raises(ConfigError, match=r"the checkpoint .*ckpt has 3 classes \(sea, boat, rock\) but the data "
                                          r"synthetic has 7 .*: evaluate it on data with its classes"):
        decide_labels(data=SourceLabels("synthetic", "synthetic scenes", class_names=("a",) * 7, mapping=ADE,
                                        known=True), checkpoint=facts, reduce_labels=True)


# ---- the three cases that disagreed before --------------------------------------------------------------

def test_own_classes_in_an_ade_style_folder_train(tmp_path, capsys):
    folder = own_classes_in_ade_layout(tmp_path / "mine")
    run_training(tmp_path / "run", "--data", str(folder), "--train-split", "training", "--num-labels", "11",
                 base=QUICK)
    out = capsys.readouterr().out
    assert "--num-labels 11 (11: LABEL_0" in out and "wins over the 150 classes" in out
    assert SegFormer.from_pretrained(tmp_path / "run" / "best").config.num_labels == 11
    (tmp_path / "my11.json").write_text(json.dumps({str(i): f"part {i}" for i in range(11)}))
    run_training(tmp_path / "run2", "--data", str(folder), "--train-split", "training", "--id2label",
                 str(tmp_path / "my11.json"), base=QUICK)
    assert SegFormer.from_pretrained(tmp_path / "run2" / "best").id2label[10] == "part 10"
    assert doctor.main([str(folder), "--num-labels", "11"]) == 0  # the doctor decides the same way
    assert "11 classes (LABEL_0" in capsys.readouterr().out


def test_a_pretrained_classifier_that_fits_is_kept_whatever_config_json_says(tmp_path, caplog):
    torch.manual_seed(0)
    SegFormer.from_variant("b0", num_labels=3, depths=(1, 1, 1, 1)).save_pretrained(tmp_path / "pre")
    config = json.loads((tmp_path / "pre" / "config.json").read_text())
    config.update(num_labels=5, id2label={str(i): f"c{i}" for i in range(5)}, label2id={})
    (tmp_path / "pre" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config\.json says 5 labels, but the classifier in .*model\.safetensors "
                                              r"has 3; correct config\.json, or load with num_labels=3"):
        SegFormer.from_pretrained(tmp_path / "pre")
    with pytest.raises(ConfigError, match=r"config\.json says 5 labels, but the classifier .* has 3: correct its "
                                          r"config\.json"):
        decide_labels(checkpoint=describe(tmp_path / "pre"))
    command = train.parse_command_line(QUICK + ["--out", str(tmp_path / "run"), "--pretrained", str(tmp_path / "pre"),
                                                "--num-labels", "3", "--no-reduce-labels", "--train-split",
                                                "train[:4]", "--eval-split", "validation[:2]", "--data",
                                                str(own_classes_in_ade_layout(tmp_path / "d", classes=2))])
    run = train.build_run(command, rank=0, world_size=1, device=torch.device("cpu"))
    run.log.close()
    saved = load_file(tmp_path / "pre" / "model.safetensors")["decode_head.classifier.weight"]
    assert torch.equal(run.raw_model.decoder.classifier.weight, saved)
    assert "the classifier fits the 3 labels asked for, and is kept" in caplog.text
    assert "re-initialised" not in caplog.text


def test_eval_only_infer_explain_and_export_read_the_checkpoint_the_same_way(tmp_path):
    run_training(tmp_path / "run", "--train-split", "train[:4]", "--eval-split", "validation[:2]", "--no-reduce-labels",
                 "--num-labels", "8", base=QUICK)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    facts = describe(checkpoint)
    assert (facts.size, facts.reduce_labels, facts.class_names) == (32, False, tuple(f"LABEL_{i}" for i in range(8)))
    assert facts.training_args == checkpoint / "training_args.json" and len(facts.palette) == 8
    metrics = train.execute(["--eval-only", "--checkpoint", str(checkpoint)])
    assert len(metrics["per_category_iou"]) == 8
    random_image(30, 20).save(tmp_path / "x.png")
    assert infer.main(infer.get_args(["--checkpoint", str(checkpoint), str(tmp_path / "x.png"), "--out",
                                      str(tmp_path / "pred")])) == 0
    _, for_inference = load_for_inference(checkpoint)
    write_side_files(for_inference, tmp_path / "side")
    preprocessor = json.loads((tmp_path / "side" / "preprocessor_config.json").read_text())
    assert preprocessor["size"] == {"height": 32, "width": 32} and preprocessor["do_reduce_labels"] is False
    assert json.loads((tmp_path / "side" / "palette.json").read_text()) == json.loads(
        (checkpoint / "palette.json").read_text())


def test_cityscapes_defaults_give_way_to_an_explicit_id2label_of_as_many(tmp_path):
    cityscapes = SourceLabels("cs/", "Cityscapes folder", class_names=CITYSCAPES_CLASSES, mapping=IDENTITY,
                              known=True, assumed=True, palette=((0, 0, 0),) * 19)
    names = {i: f"mine {i}" for i in range(19)}
    spec, lines = decide_labels(data=cityscapes, id2label=names)
    assert spec.class_names[0] == "mine 0" and "wins over the 19 classes" in lines[0]


def test_eval_only_takes_inferences_size_for_a_checkpoint_that_names_none(tmp_path):
    """A checkpoint without preprocessor_config.json is evaluated at the image processor's 512, as infer.py
    runs it, not at the training default (128); a --size given still wins."""
    SegFormer.from_variant("b0", num_labels=7).save_pretrained(tmp_path / "model")
    for extra, size in (([], 512), (["--size", "64"], 64)):
        train.execute(["--eval-only", "--checkpoint", str(tmp_path / "model"), "--eval-split", "validation[:1]",
                       "--report", str(tmp_path / f"report{size}"), *extra])
        assert json.loads((tmp_path / f"report{size}" / "report.json").read_text())["size"] == size
    _, facts = load_for_inference(tmp_path / "model")
    assert facts.size == 512
