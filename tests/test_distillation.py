"""Knowledge distillation (train.py --teacher): the loss against PyTorch's own KL divergence, the teacher
frozen (no gradient, unchanged, evaluation mode), its effect on the step, an exact resume with a teacher,
and one line for a teacher of other classes."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import train
from helpers import randomize_, run_training
from segformer import SegFormer
from segformer.checkpoint import write_preprocessor_config
from segformer.errors import ConfigError
from segformer.loss import distillation_loss
from training import loop
from training.train_config import parse_command_line

QUICK = ["--train-split", "train[:8]", "--eval-split", "validation[:4]", "--size", "32", "--batch-size", "2",
         "--warmup-steps", "0", "--log-every", "1", "--eval-every", "100", "--save-every", "100", "--no-plots",
         "--max-steps", "3"]
SYNTHETIC = ("sky", "grass", "water", "wall", "ball", "box", "roof")


def teacher_checkpoint(folder, variant="b1", names=SYNTHETIC):
    """A random-weight model of the synthetic classes, a bigger variant than the student's B0."""
    torch.manual_seed(0)
    model = randomize_(SegFormer.from_variant(variant, num_labels=len(names),
                                              id2label=dict(enumerate(names))), seed=5)
    model.save_pretrained(folder)
    write_preprocessor_config(folder, size=32, reduce_labels=True)
    return folder


def test_the_loss_is_t_squared_times_pytorchs_kl_divergence_over_the_labelled_pixels():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 8, 8, generator=g), torch.randn(2, 5, 8, 8, generator=g) * 3
    labels = torch.randint(0, 5, (2, 32, 32), generator=g)
    for T in (1.0, 4.0):
        per_pixel = F.kl_div(F.log_softmax(student / T, 1), F.log_softmax(teacher / T, 1), log_target=True,
                             reduction="none").sum(1)
        torch.testing.assert_close(distillation_loss(student, teacher, temperature=T), per_pixel.mean() * T * T)
        torch.testing.assert_close(distillation_loss(student, teacher, labels, temperature=T), per_pixel.mean() * T * T)
    assert distillation_loss(teacher, teacher, labels).abs() < 1e-6
    # ignored pixels (255 at the logits' resolution, nearest) are left out: what the student says there is free
    labels[:, :16] = 255
    kept = torch.ones(2, 8, 8, dtype=torch.bool)
    kept[:, :4] = False
    expected = F.kl_div(F.log_softmax(student, 1), F.log_softmax(teacher, 1), log_target=True,
                        reduction="none").sum(1)[kept].mean()
    torch.testing.assert_close(distillation_loss(student, teacher, labels), expected)
    changed = student.clone()
    changed[:, :, :4] = 100.0
    torch.testing.assert_close(distillation_loss(changed, teacher, labels), expected)
    # nothing labelled: zero, and still a graph to the student
    nothing = torch.full_like(labels, 255)
    s = student.clone().requires_grad_()
    loss = distillation_loss(s, teacher, nothing)
    loss.backward()
    assert loss.item() == 0 and s.grad is not None
    # a teacher's logits of another size are resized to the student's
    assert distillation_loss(student, F.interpolate(teacher, size=(16, 16), mode="bilinear")).isfinite()


def test_its_gradient_pulls_the_students_probabilities_to_the_teachers():
    """d/ds of T^2 KL(softmax(t/T) || softmax(s/T)), averaged over N pixels: T (softmax(s/T) - softmax(t/T)) / N."""
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(1, 4, 3, 5, generator=g).requires_grad_(), torch.randn(1, 4, 3, 5, generator=g)
    T = 2.0
    distillation_loss(student, teacher, temperature=T).backward()
    expected = T * (F.softmax(student.detach() / T, 1) - F.softmax(teacher / T, 1)) / 15
    torch.testing.assert_close(student.grad, expected)


def build(tmp_path, *flags):
    command = parse_command_line(QUICK + ["--out", str(tmp_path / "run")] + list(flags))
    run = train.build_run(command, rank=0, world_size=1, device=torch.device("cpu"))
    run.log.close()
    run.log = None
    return run


def first_step_loss(run):
    run.model.train()
    micro_batches = next(iter(loop.steps(run)))
    return train.train_step(run, micro_batches)[0]


def test_the_teacher_gets_no_gradient_stays_unchanged_in_eval_mode_and_changes_the_loss(tmp_path):
    teacher = teacher_checkpoint(tmp_path / "teacher")
    run = build(tmp_path, "--teacher", str(teacher), "--distill-weight", "2", "--distill-temperature", "2")
    before = {name: t.clone() for name, t in run.teacher.state_dict().items()}
    with_teacher = first_step_loss(run)
    assert not run.teacher.training and all(not m.training for m in run.teacher.modules())
    assert all(p.grad is None and not p.requires_grad for p in run.teacher.parameters())
    assert all(torch.equal(t, before[name]) for name, t in run.teacher.state_dict().items())  # BN stats too
    assert not any(p is q for p in run.teacher.parameters() for g in run.optimizer.param_groups for q in g["params"])
    without = first_step_loss(build(tmp_path / "plain"))
    # the same first batch and initial weights: the difference is the distillation term, which is > 0
    assert with_teacher > without + 1e-3


def test_a_run_with_a_teacher_resumes_exactly(tmp_path):
    teacher = teacher_checkpoint(tmp_path / "teacher")
    flags = ["--teacher", str(teacher), "--max-steps", "4", "--save-every", "2", "--save-total-limit", "4"]
    run_training(tmp_path / "straight", *flags, base=QUICK)
    train.execute(["--resume", str(tmp_path / "straight" / "checkpoint-2"), "--out", str(tmp_path / "resumed")])
    straight = load_file(tmp_path / "straight" / "checkpoint-4" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "checkpoint-4" / "model.safetensors")
    assert all(torch.equal(straight[key], resumed[key]) for key in straight)
    plain = run_training(tmp_path / "plain", "--max-steps", "4", base=QUICK)
    assert plain is not None
    without = load_file(tmp_path / "plain" / "checkpoint-4" / "model.safetensors")
    assert not all(torch.equal(straight[key], without[key]) for key in straight)  # the teacher did something


@pytest.mark.parametrize("names, message", [
    (SYNTHETIC[:5], r"--teacher .*teacher: it predicts 5 classes, the run has 7; a teacher must predict the run's"),
    (("sky", "grass", "water", "wall", "ball", "roof", "box"),
     r"--teacher .*teacher: its class 5 is 'roof', the run's is 'box'"),
])
def test_a_teacher_of_other_classes_is_one_line(tmp_path, names, message):
    teacher = teacher_checkpoint(tmp_path / "teacher", variant="b0", names=names)
    with pytest.raises(ConfigError, match=message):
        build(tmp_path, "--teacher", str(teacher))
    assert train.main(QUICK + ["--out", str(tmp_path / "cli"), "--teacher", str(teacher)]) != 0


def test_a_teacher_that_is_not_there_names_the_flag(tmp_path):
    from segformer.errors import CheckpointError
    with pytest.raises(CheckpointError, match=r"^--teacher .*missing: no such file or directory"):
        build(tmp_path, "--teacher", str(tmp_path / "missing"))
