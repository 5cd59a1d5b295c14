"""ablate.py: variants against stock over seeds, one table and plot, resumable after a kill (the resumed
ablation's numbers are an uninterrupted one's, bit for bit), and its statistics."""

import json
import os
import signal

import pytest
import torch

import ablate
import train
from segformer.errors import ConfigError

TINY = ("--max-steps 2 --eval-every 2 --save-every 1 --size 32 --train-split train[:8] --eval-split validation[:4] "
        "--batch-size 2 --warmup-steps 0")


def ablation(out, *extra):
    return ablate.execute(["attention:linear", "--seeds", "0", "1", "--train-args", TINY,
                           "--out", str(out), "--size", "64", "--rounds", "2", *extra])


def test_an_ablation_killed_in_a_run_continues_to_the_same_table(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    try:
        check_a_killed_ablation(tmp_path, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def check_a_killed_ablation(tmp_path, monkeypatch):
    torch.set_num_threads(1)  # the latency is timed on --threads 2; training after it keeps the caller's threads
    straight = ablation(tmp_path / "straight")
    assert torch.get_num_threads() == 1  # (it changed them: the next ablation trained on 2, other sums)
    assert [row["name"] for row in straight] == ["stock", "attention:linear"]
    for file in ("results.json", "table.md", "ablation.png"):
        assert (tmp_path / "straight" / file).stat().st_size > 0
    table = (tmp_path / "straight" / "table.md").read_text()
    assert table.count("\n| ") == 2 and "| stock | 3.72 |" in table and "| attention:linear | 3.44 |" in table

    # Ctrl-C in the second seed's linear-attention run, right after its first checkpoint
    save = train.save

    def save_then_interrupt(run, name, **kwargs):
        path = save(run, name, **kwargs)
        if name == "checkpoint-1" and "attention_linear/seed-1" in str(run.out):
            os.kill(os.getpid(), signal.SIGINT)
        return path
    monkeypatch.setattr(train, "save", save_then_interrupt)
    with pytest.raises(SystemExit) as stopped:
        ablation(tmp_path / "killed")
    assert stopped.value.code == 128 + signal.SIGINT
    killed = tmp_path / "killed" / "attention_linear" / "seed-1"
    assert (killed / "checkpoint-1").is_dir() and not (killed / "done.json").exists()
    monkeypatch.setattr(train, "save", save)

    calls = []
    execute = train.execute
    monkeypatch.setattr(train, "execute", lambda argv: calls.append(argv) or execute(argv))
    resumed = ablation(tmp_path / "killed")
    assert len(calls) == 1 and calls[0][:1] == ["--resume"]  # only the killed run ran again, from its checkpoint
    for a, b in zip(straight, resumed):
        assert a["mean_iou"] == b["mean_iou"] and a["differences"] == b["differences"], a["name"]
    assert json.loads((tmp_path / "killed" / "results.json").read_text())[1]["mean_iou"] == straight[1]["mean_iou"]


def test_the_paired_test_and_the_variants_it_reads():
    t, significant = ablate.paired_test([0.010, 0.012, 0.011])
    assert t == pytest.approx(0.011 / (0.001 / 3 ** 0.5)) and significant  # t = 19.1 > 4.303 (2 degrees)
    t, significant = ablate.paired_test([0.02, -0.01, 0.005])
    assert abs(t) < 4.303 and not significant
    assert ablate.variant_flags("attention:my_pkg.parts:Attn") == ("attention:my_pkg.parts:Attn",
                                                                        ["--attention", "my_pkg.parts:Attn"])
    assert ablate.variant_flags("taught=--teacher runs/t/best --distill-weight 2") == (
        "taught", ["--teacher", "runs/t/best", "--distill-weight", "2"])
    assert ablate.variant_flags("b1") == ("b1", ["--model", "b1"])
    with pytest.raises(ConfigError, match=r"variant 'sparse': expected part:name \(parts: encoder, attention"):
        ablate.variant_flags("sparse")


def test_bad_arguments_are_one_line(tmp_path, capsys):
    assert ablate.main(["attention:linear", "--seeds", "0", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: --seeds 0: a spread needs two seeds or more\n"
    assert ablate.main(["nowhere.json", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: variant nowhere.json: no such config file\n"
