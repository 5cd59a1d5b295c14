"""Fine-tuning controls, each checked by its effect, not only that it runs: frozen stages, layer-wise rate
decay, the moving average of the weights, early stopping, activation checkpointing, the drop-path rate and
LoRA merged on save."""

import json

import pytest
import torch
from safetensors.torch import load_file

import train
from training import loop
from helpers import read_log, run_training
from segformer import SegFormer
from training.train_config import parse_command_line

QUICK = ["--train-split", "train[:8]", "--eval-split", "validation[:4]", "--size", "32", "--batch-size", "2",
         "--warmup-steps", "0", "--log-every", "1", "--eval-every", "100", "--save-every", "100", "--no-plots",
         "--max-steps", "3"]


def build(tmp_path, *flags):
    command = parse_command_line(QUICK + ["--out", str(tmp_path)] + list(flags))
    run = train.build_run(command, rank=0, world_size=1, device=torch.device("cpu"))
    run.log.close()
    run.log = None  # these tests save by hand: no log
    return run


def steps(run, count):
    run.model.train()
    train.frozen_to_eval(run.frozen)
    for _, micro_batches in zip(range(count), loop.steps(run)):
        train.train_step(run, micro_batches)


def test_frozen_stages_do_not_move_have_no_optimizer_state_and_run_in_eval_mode(tmp_path):
    run = build(tmp_path, "--freeze-stages", "2", "--drop-path-rate", "0.3")
    model = run.raw_model
    before = {name: t.clone() for name, t in model.state_dict().items()}
    steps(run, 2)
    frozen = [name for name in before if name.startswith(("encoder.stages.0.", "encoder.stages.1."))]
    assert frozen and all(torch.equal(model.state_dict()[name], before[name]) for name in frozen)
    assert not torch.equal(model.state_dict()["encoder.stages.2.blocks.0.attn.q.weight"],
                           before["encoder.stages.2.blocks.0.attn.q.weight"])
    in_optimizer = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in in_optimizer for p in model.encoder.stages[:2].parameters())
    assert all(id(p) not in run.optimizer.state for p in model.encoder.stages[:2].parameters())
    assert not model.encoder.stages[1].blocks[1].training and model.encoder.stages[2].blocks[0].training
    with pytest.raises(train.ConfigError, match=r"setting 'freeze_stages' must be <= 4, got 5"):
        train.TrainConfig(freeze_stages=5)


def test_layer_decay_gives_each_block_its_rate(tmp_path):
    """B0 has L = 8 blocks: block i gets lr x 0.5^(9 - i), the decoder lr x head_lr_mult."""
    run = build(tmp_path, "--layer-decay", "0.5", "--head-lr-mult", "10", "--lr", "1e-3")
    rate = {id(p): group["lr"] for group in run.optimizer.param_groups for p in group["params"]}

    def rates(module):
        return sorted({round(rate[id(p)], 12) for p in module.parameters()})
    stages = run.raw_model.encoder.stages
    blocks = [block for stage in stages for block in stage.blocks]
    for i, block in enumerate(blocks, start=1):
        assert rates(block) == pytest.approx([1e-3 * 0.5 ** (9 - i)]), i
    assert rates(stages[0].patch_embed) == pytest.approx([1e-3 * 0.5 ** 9])
    assert rates(stages[1].patch_embed) == pytest.approx([1e-3 * 0.5 ** 6])  # with block 3, its stage's first
    assert rates(stages[3].norm) == pytest.approx([1e-3 * 0.5])  # with block 8, its stage's last
    assert rates(run.raw_model.decoder) == pytest.approx([1e-2])


def test_the_moving_average_is_the_hand_computed_one_and_is_saved(tmp_path):
    decay = 0.9
    run = build(tmp_path, "--ema", str(decay))
    model, ema = run.raw_model, run.ema
    expected = None
    for _ in range(3):
        steps(run, 1)
        weights = {name: t.detach().clone() for name, t in model.state_dict().items() if t.is_floating_point()}
        expected = weights if expected is None else {name: decay * expected[name] + (1 - decay) * w
                                                      for name, w in weights.items()}
    averaged = ema.module.state_dict()
    for name, value in expected.items():
        assert torch.allclose(averaged[name], value, atol=1e-6), name
    path = train.save(run, "checkpoint-3")
    saved = SegFormer.from_pretrained(path / "ema").state_dict()
    assert all(torch.allclose(saved[name], expected[name], atol=1e-6) for name in expected)


def test_best_from_the_moving_average_and_both_evaluations_logged(tmp_path):
    run_training(tmp_path, "--ema", "0.5", "--ema-best", "--eval-every", "1", "--save-every", "3", base=QUICK)
    evaluations = [r for r in read_log(tmp_path) if "mean_iou" in r]
    assert all("ema_mean_iou" in r for r in evaluations)
    best = max(evaluations, key=lambda r: r["ema_mean_iou"])
    assert torch.load(tmp_path / "best" / "training_state.pt", weights_only=True)["best_miou"] == best["ema_mean_iou"]
    ema = load_file(tmp_path / "checkpoint-3" / "ema" / "model.safetensors")
    model = load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    assert ema.keys() == model.keys() and any(not torch.equal(ema[k], model[k]) for k in ema)
    train.execute(["--resume", str(tmp_path / "checkpoint-3"), "--max-steps", "4"])  # the average resumes too
    assert "ema_mean_iou" in read_log(tmp_path)[-1]


def test_early_stopping_stops_at_the_step_patience_says(tmp_path, monkeypatch):
    scores = iter([0.5, 0.4, 0.45, 0.3, 0.9, 0.9])  # the best at step 1, then 3 evaluations without better
    original = train.evaluate

    def scripted(*args, **kwargs):
        evaluation = original(*args, **kwargs)
        evaluation.metrics["mean_iou"] = next(scores)
        return evaluation
    monkeypatch.setattr(train, "evaluate", scripted)
    result = run_training(tmp_path, "--patience", "3", "--eval-every", "1", "--max-steps", "6", base=QUICK)
    assert result["stopped_early"] and result["step"] == 4 and result["best_miou"] == 0.5
    assert read_log(tmp_path)[-1] == {"step": 4, "early_stop": True, "best_mean_iou": 0.5}
    state = torch.load(tmp_path / "checkpoint-4" / "training_state.pt", weights_only=True)
    assert state["since_best"] == 3


@pytest.mark.parametrize("seed", [0, 1])
def test_activation_checkpointing_gives_the_same_gradients(seed, monkeypatch):
    """Recomputed in the backward, with the same dropout and drop-path draws: identical gradients."""
    from segformer.encoder import Block
    forward, forwards = Block.forward, []
    monkeypatch.setattr(Block, "forward", lambda self, *args: (forwards.append(1), forward(self, *args))[1])
    grads, calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = SegFormer.from_variant("b0", num_labels=3, drop_path_rate=0.3, dropout=0.1).train()
        model.encoder.set_grad_checkpointing(checkpointing)
        forwards.clear()
        torch.manual_seed(seed)
        model(torch.randn(2, 3, 64, 96)).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        calls.append(len(forwards))
    assert calls == [8, 16]  # checkpointed, each of B0's 8 blocks ran again in the backward
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-7, rtol=1e-5), name


def test_the_drop_path_rate_reaches_the_blocks(tmp_path):
    run = build(tmp_path, "--drop-path-rate", "0.35", "--grad-checkpointing")
    rates = [getattr(block.drop_path, "p", 0.0) for stage in run.raw_model.encoder.stages for block in stage.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.35, 8).tolist())
    assert all(stage.grad_checkpointing for stage in run.raw_model.encoder.stages)


def test_lora_trains_adapters_and_saves_the_merged_model(tmp_path):
    pytest.importorskip("peft")  # a declared extra: installed by the dev extra, so CI has it
    run = build(tmp_path, "--lora-rank", "4", "--lora-alpha", "8")
    trainable = [n for n, p in run.raw_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("decoder.") for n in trainable)
    steps(run, 2)
    path = train.save(run, "checkpoint-2")
    model = run.raw_model.eval()
    x = torch.randn(1, 3, 64, 64)
    plain = SegFormer.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), model(x), atol=1e-5)
    assert "segformer.encoder.block.0.0.attention.self.query.weight" in load_file(path / "model.safetensors")
    assert json.loads((path / "config.json").read_text()).get("segformer_parts") is None  # a plain SegFormer


def test_a_run_with_every_control_resumes_exactly(tmp_path):
    """LoRA (its checkpoint merged: the adapters come back from training_state.pt), the moving average,
    layer decay and frozen stages: resumed from step 2, step 4 is the straight run's, bit for bit."""
    pytest.importorskip("peft")
    controls = ["--lora-rank", "4", "--ema", "0.9", "--layer-decay", "0.8", "--freeze-stages", "1",
                "--max-steps", "4", "--save-every", "2", "--save-total-limit", "4"]
    run_training(tmp_path / "straight", *controls, base=QUICK)
    train.execute(["--resume", str(tmp_path / "straight" / "checkpoint-2"), "--out", str(tmp_path / "resumed")])
    for name in ("model.safetensors", "ema/model.safetensors"):
        straight = load_file(tmp_path / "straight" / "checkpoint-4" / name)
        resumed = load_file(tmp_path / "resumed" / "checkpoint-4" / name)
        assert all(torch.equal(straight[key], resumed[key]) for key in straight), name


def test_resuming_a_lora_run_imports_the_code_its_settings_name_only_with_trust_code(tmp_path):
    """A LoRA run is rebuilt from its saved settings on --resume; a part those settings name by import path is
    code a file names, not the user's word this time: refused without --trust-code, in one line."""
    pytest.importorskip("peft")
    from segformer.errors import CheckpointError
    run = build(tmp_path / "run", "--lora-rank", "4", "--decoder", "custom_parts:LightHead", "--trust-code")
    steps(run, 1)
    path = train.save(run, "checkpoint-1")
    resume = ["--resume", str(path), "--out", str(tmp_path / "resumed")]
    with pytest.raises(CheckpointError, match=r"--resume .*checkpoint-1: its training_args.json names code from "
                                              r"outside this project \(decoder custom_parts:LightHead\).*--trust-code"):
        train.build_run(parse_command_line(resume), rank=0, world_size=1, device=torch.device("cpu"))
    resumed = train.build_run(parse_command_line(resume + ["--trust-code"]), rank=0, world_size=1,
                              device=torch.device("cpu"))
    resumed.log.close()
    assert type(resumed.raw_model.decoder).__name__ == "LightHead"


def test_ema_best_without_a_moving_average_is_refused_before_any_step(tmp_path):
    """It crashed at the first evaluation, losing the steps trained until then."""
    from segformer.errors import ConfigError
    with pytest.raises(ConfigError, match=r"--ema-best .* needs --ema DECAY"):
        build(tmp_path, "--ema-best")
    assert not list(tmp_path.iterdir())  # nothing written: not even the run folder's lock
