"""What a teacher is worth: a B0 trained on the built-in synthetic scenes with a stronger teacher
(train.py --teacher) against the same B0 without, over several seeds, paired by seed.

    python benchmarks/bench_distill.py                         # B1 teacher (1200 steps), B0 students, 3 seeds
    python benchmarks/bench_distill.py --seeds 0 1 2 3 4 --student-steps 1200 --out runs/distill

First the teacher: a B1 run of train.py's default recipe (or --teacher CHECKPOINT, one you have). Then for
each seed two B0 runs of --student-steps, identical but for --teacher: the same initial weights, batches and
augmentation (the seed sets them all), so the difference between a pair is the teacher's. The table: each
side's final validation mean IoU as mean +- standard deviation over seeds, the paired difference, and a
paired t-test over seeds (two-sided, 5%) saying whether the difference is larger than the seeds' spread.

Resumable: every run has its folder under --out (teacher/, seed-<n>/plain, seed-<n>/taught); a finished
run (done.json) is read, not trained again, and a killed one continues from its last checkpoint.
"""

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

# two-sided 5% critical values of Student's t, by degrees of freedom
T_CRITICAL = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
              10: 2.228}


def finished_or_trained(out: Path, flags: list[str]) -> dict:
    """train.py with `flags` into `out`, unless it finished before (done.json); a killed run is resumed from
    its last checkpoint. Returns {"mean_iou", "best_miou"} of the run's end."""
    done = out / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
    if checkpoints:
        print(f"{out}: resuming from {checkpoints[-1].name}", flush=True)
        summary = train.execute(["--resume", str(checkpoints[-1])])
    else:
        shutil.rmtree(out, ignore_errors=True)  # killed before its first checkpoint: nothing to keep
        print(f"{out}: training", flush=True)
        summary = train.execute(flags + ["--out", str(out)])
    result = {"mean_iou": summary["mean_iou"], "best_miou": summary["best_miou"]}
    done.write_text(json.dumps(result))
    return result


def paired_test(differences: list[float]) -> tuple[float, bool]:
    """(t, significant): the paired t statistic of per-seed differences and whether |t| passes 5%."""
    n = len(differences)
    spread = statistics.stdev(differences) if n > 1 else float("nan")
    if n < 2 or spread == 0:
        return float("nan"), False
    t = statistics.mean(differences) / (spread / n ** 0.5)
    return t, abs(t) > T_CRITICAL.get(n - 1, 1.96)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/distill", help="folder of every run (default: runs/distill)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the students' seeds")
    p.add_argument("--teacher", help="a trained checkpoint to teach with (default: train a B1 first)")
    p.add_argument("--teacher-variant", default="b1", help="the variant trained as the teacher (default: b1)")
    p.add_argument("--teacher-steps", type=int, default=1200, help="the teacher's training steps")
    p.add_argument("--student-steps", type=int, default=600, help="each student's training steps")
    p.add_argument("--distill-weight", default="1.0", help="train.py --distill-weight")
    p.add_argument("--distill-temperature", default="1.0", help="train.py --distill-temperature")
    args = p.parse_args(argv)
    out = Path(args.out)
    common = ["--no-plots", "--save-total-limit", "1"]
    teacher = args.teacher
    if teacher is None:
        taught_by = finished_or_trained(out / "teacher", common + [
            "--model", args.teacher_variant, "--max-steps", str(args.teacher_steps)])
        teacher = str(out / "teacher" / "best")
        print(f"teacher ({args.teacher_variant}, {args.teacher_steps} steps): mean IoU {taught_by['mean_iou']:.4f}")
    student = common + ["--model", "b0", "--max-steps", str(args.student_steps),
                        "--eval-every", str(args.student_steps // 2), "--save-every", str(args.student_steps // 4)]
    plain, taught = [], []
    for seed in args.seeds:
        seeded = student + ["--seed", str(seed)]
        plain.append(finished_or_trained(out / f"seed-{seed}" / "plain", seeded)["mean_iou"])
        taught.append(finished_or_trained(out / f"seed-{seed}" / "taught", seeded + [
            "--teacher", teacher, "--distill-weight", args.distill_weight,
            "--distill-temperature", args.distill_temperature])["mean_iou"])
        print(f"seed {seed}: mean IoU {plain[-1]:.4f} without the teacher, {taught[-1]:.4f} with", flush=True)

    def spread(values):
        return f"{statistics.mean(values):.4f} +- {statistics.stdev(values) if len(values) > 1 else 0:.4f}"
    differences = [b - a for a, b in zip(plain, taught)]
    t, significant = paired_test(differences)
    table = {"seeds": args.seeds, "plain": plain, "taught": taught, "t": t, "significant": significant}
    (out / "results.json").write_text(json.dumps(table, indent=2))
    print(f"\nB0, {args.student_steps} steps, final validation mean IoU over seeds {args.seeds}:")
    print(f"  without a teacher        {spread(plain)}")
    print(f"  with the teacher         {spread(taught)}")
    print(f"  paired difference        {spread(differences)}  (t = {t:.2f}: "
          f"{'larger' if significant else 'not larger'} than the seeds' spread at 5%)")


if __name__ == "__main__":
    main()
