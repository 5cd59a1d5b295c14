"""What a teacher is worth: a B0 trained on the built-in synthetic scenes with a stronger teacher
(train.py --teacher) against the same B0 without, over several seeds, paired by seed.

    python benchmarks/bench_distill.py                         # B1 teacher (1200 steps), B0 students, 3 seeds
    python benchmarks/bench_distill.py --seeds 0 1 2 3 4 --student-steps 1200 --out runs/distill

First the teacher: a B1 run of train.py's default recipe (or --teacher CHECKPOINT, one you have). Then
ablate.py compares B0 students of --student-steps with the teacher ("taught") and without ("stock"), seed by
seed: the same initial weights, batches and augmentation (the seed sets them all), so the difference between
a pair is the teacher's. Its table (mean IoU as mean +- standard deviation over seeds, the paired difference
and a paired t-test over seeds) and plot are written to --out/ablation.

Resumable: the teacher's run and every student's have their own folders under --out; a finished run is read,
not trained again, and a killed one continues from its last checkpoint.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ablate  # noqa: E402


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
        taught_by = ablate.finished_or_trained(out / "teacher", common + [
            "--model", args.teacher_variant, "--max-steps", str(args.teacher_steps)])
        teacher = str(out / "teacher" / "best")
        print(f"teacher ({args.teacher_variant}, {args.teacher_steps} steps): mean IoU {taught_by['mean_iou']:.4f}")
    steps = args.student_steps
    ablate.execute([f"taught=--teacher {teacher} --distill-weight {args.distill_weight} "
                    f"--distill-temperature {args.distill_temperature}",
                    "--seeds", *map(str, args.seeds), "--out", str(out / "ablation"),
                    "--train-args", f"--max-steps {steps} --eval-every {steps // 2} --save-every {steps // 4}"])


if __name__ == "__main__":
    main()
