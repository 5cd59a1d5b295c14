"""The typed training configuration: recipes, the command line, training_args.json, optimizer groups, schedule."""

import json
from dataclasses import asdict, fields, replace
from pathlib import Path

import pytest
import torch

import train
from segformer import SegFormer
from training.train_config import DEFAULT, RECIPES, TrainConfig, parse_command_line
from segformer.errors import ConfigError


def test_json_round_trip_gives_an_equal_config(tmp_path):
    custom = replace(RECIPES["paper"], reduce_labels=False, clip_grad=0.5, test_size=0.1, device="cpu",
                     class_weights="auto", class_weight_values=(0.5, 1.0, 2.25), loss="ce+dice", ohem=0.7)
    for config in [*RECIPES.values(), custom]:
        config.save(tmp_path / "training_args.json")
        assert TrainConfig.load(tmp_path / "training_args.json") == config


@pytest.mark.parametrize("edit, message", [
    (lambda v: v.update(learning_rate=0.1), r"unknown key 'learning_rate'"),
    (lambda v: v.pop("lr"), r"missing key 'lr'"),
    (lambda v: v.update(size="64"), r"setting 'size' must be an integer, got '64'"),
    (lambda v: v.update(channels_last=1), r"setting 'channels_last' must be true or false, got 1"),
    (lambda v: v.update(batch_size=0), r"setting 'batch_size' must be >= 1, got 0"),
    (lambda v: v.update(amp="fp8"), r"setting 'amp' must be one of auto, off, bf16, fp16, got 'fp8'"),
    (lambda v: v.update(lr=float("nan")), r"setting 'lr' must be a finite number"),
])
def test_a_wrong_key_or_value_in_training_args_names_the_file_and_key(tmp_path, edit, message):
    values = asdict(DEFAULT)
    edit(values)
    path = tmp_path / "training_args.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ConfigError, match=rf"training_args\.json: .*{message}"):
        TrainConfig.load(path)


def test_a_file_that_is_not_a_settings_object_is_named(tmp_path):
    for text in ["", "[1, 2]", "{not json"]:
        (tmp_path / "training_args.json").write_text(text)
        with pytest.raises(ConfigError, match=r"training_args\.json: "):
            TrainConfig.load(tmp_path / "training_args.json")


def resolved(config):
    """Where a recipe's run writes, as the command line stores it: an absolute path."""
    return replace(config, out=str(Path(config.out).resolve()))


def test_recipes_resolve_as_documented():
    assert parse_command_line([]).config == resolved(DEFAULT)
    assert parse_command_line(["--recipe", "paper"]).config == resolved(RECIPES["paper"])
    paper = RECIPES["paper"]  # what NVlabs' ADE20K config says
    assert (paper.decay_norm_bias, paper.head_lr_mult, paper.sync_bn, paper.lr, paper.weight_decay) == \
        (False, 10.0, True, 6e-5, 0.01)
    assert (paper.total_batch_size, paper.max_steps, paper.warmup_steps, paper.augment) == (16, 160_000, 1500, "paper")
    # a flag given wins over the recipe; flags not given leave it alone
    command = parse_command_line(["--recipe", "guide", "--lr", "1e-4", "--no-reduce-labels", "--channels-last"])
    assert command.config == resolved(replace(RECIPES["guide"], lr=1e-4, reduce_labels=False, channels_last=True))
    assert command.given == {"recipe", "lr", "reduce_labels", "channels_last"}
    # given alone, --epochs clears the recipe's --max-steps and --batch-size its --total-batch-size
    assert parse_command_line(["--epochs", "3"]).config.max_steps is None
    assert parse_command_line(["--recipe", "paper", "--batch-size", "4"]).config.total_batch_size is None
    assert parse_command_line(["--recipe", "guide", "--clip-grad", "none"]).config.clip_grad is None


@pytest.mark.parametrize("argv, message", [
    (["--size", "0"], r"--size: .*must be >= 32, got 0"),
    (["--num-labels", "0"], r"--num-labels: .*must be >= 1, got 0"),
    (["--num-labels", "70000"], r"--num-labels: .*must be <= 4096, got 70000"),
    (["--batch-size", "-2"], r"--batch-size: .*must be >= 1"),
    (["--lr", "0"], r"--lr: .*must be > 0"),
    (["--test-size", "1.5"], r"--test-size: .*must be <= 0.99"),
    (["--workers", "x"], r"--workers: expected an integer, got 'x'"),
    (["--eval-every", "0"], r"--eval-every: .*must be >= 1"),
    (["--model", "b9"], r"--model b9: expected one of b0, b1, b2, b3, b4, b5, or a config.json file"),
    (["--eval-only"], r"--eval-only needs --checkpoint"),
])
def test_bad_flags_are_refused_when_parsed_naming_the_flag(argv, message, capsys):
    import train
    try:
        code = train.main(argv)
    except SystemExit as exit_:  # argparse's own refusal, with the usage line
        code = exit_.code
    assert code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_help_lists_every_setting_and_what_resume_may_change(capsys):
    with pytest.raises(SystemExit):
        parse_command_line(["--help"])
    text = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert ("--" + f.name.replace("_", "-") in text) == f.metadata["flag"], f.name
    assert "--no-reduce-labels" in text and "--no-decay-norm-bias" in text and "--skip-bad" in text
    may_change = text.split("On --resume these may change: ")[1].split(";")[0].split()
    assert {"--out", "--skip-bad", "--workers", "--max-steps", "--patience", "--grad-checkpointing"} <= set(may_change)
    assert "--lr" not in may_change and "--freeze-stages" not in may_change and "--ema" not in may_change


def test_optimizer_groups_rates_and_decay():
    model = SegFormer.from_variant("b0", num_labels=3)
    config = replace(DEFAULT, lr=1e-3, weight_decay=0.05, head_lr_mult=10.0, decay_norm_bias=False)
    optimizer = train.get_optimizer(config, model)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"encoder", "encoder, no decay", "head", "head, no decay"}
    assert [(groups[n]["lr"], groups[n]["weight_decay"]) for n in sorted(groups)] == \
        [(1e-3, 0.05), (1e-3, 0.0), (1e-2, 0.05), (1e-2, 0.0)]
    group_of = {id(p): g["name"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert group_of[id(params["encoder.stages.0.blocks.0.norm1.weight"])] == "encoder, no decay"
    assert group_of[id(params["encoder.stages.0.blocks.0.attn.sr_norm.bias"])] == "encoder, no decay"
    assert group_of[id(params["encoder.stages.0.blocks.0.attn.q.bias"])] == "encoder"  # a bias, not a norm
    assert group_of[id(params["decoder.norm.weight"])] == "head, no decay"
    assert group_of[id(params["decoder.classifier.weight"])] == "head"
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(params)
    plain = train.get_optimizer(DEFAULT, model)
    assert [g["name"] for g in plain.param_groups] == ["encoder", "head"]
    assert all(g["lr"] == DEFAULT.lr and g["weight_decay"] == DEFAULT.weight_decay for g in plain.param_groups)


def test_poly_schedule_warmup_decay_and_last_step():
    factor = train.poly_schedule(warmup_steps=4, total_steps=14, power=1.0)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # linear warmup, full rate at its end
    assert [factor(s) for s in (4, 9, 13, 14)] == [1.0, 0.5, pytest.approx(0.1), 0.0]  # then linear to 0
    squared = train.poly_schedule(warmup_steps=0, total_steps=10, power=2.0)
    assert squared(0) == 1.0 and squared(5) == 0.25 and squared(10) == 0.0 and squared(12) == 0.0
    # with the optimizer: the rate of step s is base * factor(s)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    rates = []
    for _ in range(14):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == pytest.approx(0.025) and rates[3] == pytest.approx(0.1) and rates[-1] == pytest.approx(0.01)
