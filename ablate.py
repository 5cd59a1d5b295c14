"""Compare variants of SegFormer the way a paper should: each trained under the same recipe for several
seeds, one table of cost and mean IoU with the seeds' spread, and a paired test against the stock model.

    python ablate.py attention:linear decoder:mmseg                     # against stock, 3 seeds, 600 steps
    python ablate.py attention:my_pkg.parts:MyAttention my_variant.json --seeds 0 1 2 3 4 --trust-code
    python ablate.py "taught=--teacher runs/distill/teacher/best" --train-args "--max-steps 1200"

A variant is one of:
  part:name         a built-in part name or an import path (segformer/parts.py): attention:linear,
                    decoder:mmseg, norm:rms_norm, attention:my_pkg.my_module:MyAttention
  FILE.json         a config.json of your own (train.py --model FILE.json: depths, widths, parts)
  b0..b5            another variant of the Mix Transformer
  NAME=FLAGS        any train.py flags under a name of your own ("taught=--teacher runs/t/best")
The stock model (B0 with SegFormer's parts, or --base) is always the first row.

Every run is train.py with --train-args (default: the built-in synthetic scenes, --max-steps 600) and
--seed N; runs of one seed share the initial weights where the architecture is the same, the batches and
the augmentation, so a per-seed difference to stock is the variant's, and the paired t-test over seeds
(two-sided, 5%) says whether the mean difference is larger than the seeds' spread. Mean IoU: the final
evaluation on the validation split. Cost, from the first seed's trained model: parameters, GFLOPs counted
by PyTorch's FlopCounterMode on one forward at --size, and CPU latency (batch 1, --threads, every model
timed in alternating order round after round; 'vs stock' the median of the per-round ratios; on a machine
running something else as well, threads that outnumber the free cores make every latency many times longer).

Resumable: one run folder per variant and seed (--out/<variant>/seed-<n>); a finished run (done.json
beside it) is read, not trained again, and a killed one continues from its last checkpoint. Writes
results.json, table.md and ablation.png (mean IoU per variant, the seeds as dots) in --out.
"""

import argparse
import json
import re
import shlex
import shutil
import statistics
import sys
from pathlib import Path

import torch

import train
from segformer import SegFormer
from segformer.cli import run_main
from segformer.config import PARTS, VARIANTS
from segformer.errors import ConfigError
from segformer.files import read_json, writable_folder, write_bytes, write_json
from segformer.visual import pyplot, save_figure

# two-sided 5% critical values of Student's t, by degrees of freedom (the normal's past 30)
T_CRITICAL = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
              10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t_critical(degrees: int) -> float:
    """The two-sided 5% critical value for `degrees` of freedom (the table's next lower entry: conservative)."""
    return T_CRITICAL[max(d for d in T_CRITICAL if d <= degrees)] if degrees <= 30 else 1.96


def variant_flags(text: str) -> tuple[str, list[str]]:
    """(name, train.py flags) of a variant as the command line gives it."""
    name, sep, flags = text.partition("=")
    if sep and re.fullmatch(r"[\w.+-]+", name):
        return name, shlex.split(flags)
    part, sep, value = text.partition(":")
    if sep and part in PARTS:
        return text, [f"--{part}", value]
    if text in VARIANTS:
        return text, ["--model", text]
    if text.endswith(".json"):
        if not Path(text).is_file():
            raise ConfigError(f"variant {text}: no such config file")
        return Path(text).stem, ["--model", text]
    raise ConfigError(f"variant {text!r}: expected part:name (parts: {', '.join(PARTS)}), a config .json file, "
                      f"one of {', '.join(VARIANTS)}, or NAME=FLAGS")


def finished_or_trained(out: Path, flags: list[str]) -> dict:
    """train.py with `flags` into `out`, unless it finished before (done.json); a killed run continues from its
    last checkpoint. Returns {"mean_iou", "best_miou"} of the run's end."""
    done = out / "done.json"
    if done.exists():
        return read_json(done, error=ConfigError)
    checkpoints = sorted((p for p in out.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)),
                         key=lambda p: int(p.name.rsplit("-", 1)[1]))  # (not a killed write's leftovers)
    if checkpoints:
        print(f"{out}: resuming from {checkpoints[-1].name}", flush=True)
        summary = train.execute(["--resume", str(checkpoints[-1])] + (["--trust-code"] if "--trust-code" in flags
                                                                      else []))
    else:
        shutil.rmtree(out, ignore_errors=True)  # killed before its first checkpoint: nothing to keep
        print(f"{out}: training", flush=True)
        summary = train.execute(flags + ["--out", str(out)])
    if summary.get("interrupted"):  # Ctrl-C or SIGTERM: train.py saved the step; not a finished run
        print(f"{out}: stopped at step {summary['step']}; the same command continues the ablation", flush=True)
        sys.exit(128 + summary["interrupted"])
    result = {"mean_iou": summary["mean_iou"], "best_miou": summary["best_miou"]}
    write_json(result, done)  # atomic: a killed write leaves no half file
    return result


def paired_test(differences: list[float]) -> tuple[float, bool]:
    """(t, significant): the paired t statistic of per-seed differences, and whether |t| passes 5%."""
    n = len(differences)
    spread = statistics.stdev(differences) if n > 1 else 0.0
    if n < 2 or spread == 0:
        return float("nan"), False
    t = statistics.mean(differences) / (spread / n ** 0.5)
    return t, abs(t) > t_critical(n - 1)


def costs(models: dict, size: int, threads: int, rounds: int) -> dict:
    """{name: (params M, GFLOPs, latency ms, latency / stock's)} of the trained models, timed alternately."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
    from bench_model import alternating
    from model_report import count_flops
    x = torch.randn(1, next(iter(models.values())).config.in_channels, size, size)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            times = alternating({name: model.eval() for name, model in models.items()}, x, rounds)
    finally:  # the caller's threads again: the training that follows must not change its arithmetic
        torch.set_num_threads(before)
    stock = times[next(iter(models))]
    return {name: (sum(p.numel() for p in model.parameters()) / 1e6, count_flops(lambda: model(x)) / 1e9,
                   statistics.median(times[name]) * 1000,
                   statistics.median(t / s for t, s in zip(times[name], stock)))
            for name, model in models.items()}


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def write_table(rows: list[dict], path: Path, *, size: int, threads: int, recipe: str) -> str:
    lines = [f"| variant | params (M) | GFLOPs at {size} | latency, {threads} threads | vs stock | mean IoU "
             f"(mean ± sd over seeds) | difference to stock | larger than the seeds' spread? |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row["name"] == "stock":
            difference = verdict = "-"
        else:
            difference = f"{mean_sd(row['differences'])} (t = {row['t']:.2f})"
            verdict = "yes (paired t-test, 5%)" if row["significant"] else "no"
        lines.append(f"| {row['name']} | {row['params_m']:.2f} | {row['gflops']:.2f} | {row['latency_ms']:.0f} ms | "
                     f"{row['latency_vs_stock']:.2f}x | {mean_sd(row['mean_iou'])} | {difference} | {verdict} |")
    text = "\n".join(lines) + f"\n\n(train.py {recipe}; seeds {rows[0]['seeds']})\n"
    write_bytes(text.encode(), path)
    return text


def plot(rows: list[dict], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(1.6 * len(rows) + 2, 4))
    for i, row in enumerate(rows):
        values = row["mean_iou"]
        axis.bar(i, statistics.mean(values), yerr=statistics.stdev(values) if len(values) > 1 else 0,
                 capsize=6, color="tab:blue" if row["name"] == "stock" else "tab:orange", alpha=0.6)
        axis.plot([i] * len(values), values, "k.", markersize=8)
    axis.set_xticks(range(len(rows)), [row["name"] for row in rows], rotation=15)
    low = min(min(row["mean_iou"]) for row in rows)
    axis.set_ylim(max(0.0, low - 0.05), min(1.0, max(max(row["mean_iou"]) for row in rows) + 0.02))
    axis.set_ylabel("mean IoU (final evaluation)")
    axis.set_title("bars: mean over seeds, whiskers: standard deviation, dots: the seeds")
    save_figure(plt, figure, path)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="+", help="part:name, FILE.json, b0..b5 or NAME=FLAGS (see above)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of every variant (default 0 1 2)")
    p.add_argument("--base", default="b0", help="the stock model's variant (default b0)")
    p.add_argument("--train-args", default="--max-steps 600",
                   help="train.py flags of every run (default: '--max-steps 600' on the synthetic scenes)")
    p.add_argument("--out", default="runs/ablation", help="folder of the runs and the results (default runs/ablation)")
    p.add_argument("--size", type=int, default=512, help="input size of the FLOPs and latency (default 512)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the latency (default 2)")
    p.add_argument("--rounds", type=int, default=7, help="latency rounds (default 7)")
    p.add_argument("--trust-code", action="store_true", help="import parts of your own named by import path")
    return p.parse_args(argv)


def execute(argv=None) -> list[dict]:
    args = parse_args(argv)
    if len(set(args.seeds)) < 2:
        raise ConfigError(f"--seeds {' '.join(map(str, args.seeds))}: a spread needs two seeds or more")
    common = shlex.split(args.train_args) + ["--no-plots", "--save-total-limit", "1", "--model", args.base] + \
        (["--trust-code"] if args.trust_code else [])
    variants = [("stock", [])] + [variant_flags(v) for v in args.variants]
    if len({name for name, _ in variants}) < len(variants):
        raise ConfigError(f"variants {' '.join(args.variants)}: two have the same name")
    out = writable_folder(args.out)  # before the first of many trainings

    def folder(name: str, seed: int) -> Path:  # a variant's name as a folder name: attention:linear -> attention_linear
        return out / re.sub(r"[^\w.+=-]", "_", name) / f"seed-{seed}"
    results = {}
    for seed in args.seeds:  # seed by seed: an interrupted ablation already has whole pairs
        for name, flags in variants:
            results.setdefault(name, []).append(
                finished_or_trained(folder(name, seed), common + flags + ["--seed", str(seed)])["mean_iou"])
    models = {name: SegFormer.from_pretrained(folder(name, args.seeds[0]) / "best", trust_code=args.trust_code)
              for name, _ in variants}
    cost = costs(models, args.size, args.threads, args.rounds)
    rows = []
    for name, _ in variants:
        differences = [v - s for v, s in zip(results[name], results["stock"])]
        t, significant = paired_test(differences) if name != "stock" else (float("nan"), False)
        params, gflops, latency, ratio = cost[name]
        rows.append(dict(name=name, seeds=args.seeds, mean_iou=results[name], differences=differences, t=t,
                         significant=significant, params_m=params, gflops=gflops, latency_ms=latency,
                         latency_vs_stock=ratio))
    write_bytes(json.dumps(rows, indent=2).encode(), out / "results.json")  # atomic
    print("\n" + write_table(rows, out / "table.md", size=args.size, threads=args.threads,
                             recipe=" ".join(shlex.split(args.train_args))))
    if plot(rows, out / "ablation.png"):
        print(f"wrote {out / 'results.json'}, {out / 'table.md'} and {out / 'ablation.png'}")
    return rows


def main(argv=None) -> int:
    return run_main(lambda: execute(argv))


if __name__ == "__main__":
    sys.exit(main())
