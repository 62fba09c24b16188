"""Time train.py's fit at two revisions in alternation on one machine (same data, same flags).

    python -m tools.alternate_fit --old <revision> --data_path ../shared/data/mvtec --category bottle \\
        --rounds 3 > logs/fit_alternation_bottle_resnet18.log

The old revision is checked out into a temporary git worktree; each round runs the old and then
the current train.py (ResNet18, random weights, --val=False) as fresh processes and reads the
fit time from the "Train ends, total" line of its train.log, plus the whole process's wall time.
Alternating keeps slow drifts of a shared machine from favouring one side.
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIT_LINE = re.compile(r"Train ends, total ([0-9.]+)s")


def run_fit(checkout: Path, args, save_path: Path) -> tuple[float, float]:
    command = [sys.executable, "train.py", "--data_path", str(Path(args.data_path).resolve()),
               "--category", args.category, "--backbone", "resnet18", "--pretrained_backbone=random",
               "--val=False", "--save_path", str(save_path)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=checkout, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{checkout}: train.py failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    log = (save_path / args.category / "train.log").read_text()
    fits = FIT_LINE.findall(log)
    if not fits:
        raise SystemExit(f"{checkout}: no 'Train ends' line in its train.log")
    return float(fits[-1]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="git revision to compare with the working tree")
    parser.add_argument("--data_path", required=True)
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    print(f"# python -m tools.alternate_fit --old {args.old} --data_path {args.data_path} "
          f"--category {args.category} --rounds {args.rounds}")
    with tempfile.TemporaryDirectory(prefix="padim-alternate-") as scratch:
        old_tree = Path(scratch) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old_tree), args.old], cwd=ROOT, check=True)
        try:
            results = {"old": [], "new": []}
            for round_ in range(args.rounds):
                for side, tree in (("old", old_tree), ("new", ROOT)):
                    fit, wall = run_fit(tree, args, Path(scratch) / f"out_{side}")
                    results[side].append((fit, wall))
                    print(f"round {round_ + 1} {side:3s}: fit {fit:.2f} s, whole process {wall:.2f} s", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT)
    old_fit = statistics.median(f for f, _ in results["old"])
    new_fit = statistics.median(f for f, _ in results["new"])
    old_wall = statistics.median(w for _, w in results["old"])
    new_wall = statistics.median(w for _, w in results["new"])
    print(f"| revision | fit, median of {args.rounds} | whole process, median |")
    print("|---|---|---|")
    print(f"| {args.old} | {old_fit:.2f} s | {old_wall:.2f} s |")
    print(f"| working tree at {head} | {new_fit:.2f} s | {new_wall:.2f} s |")
    print(f"new / old: fit {new_fit / old_fit:.3f}x, whole process {new_wall / old_wall:.3f}x")


if __name__ == "__main__":
    main()
