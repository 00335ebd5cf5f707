#!/usr/bin/env python
"""Routing-collapse ablations on CPU: the tiny Quadrivium trained with one change at a time, evaluated on the
whole held-out split, written as one table.

    python tools/ablate_routing.py                        # every run (about 1-2 hours on 2 idle cores)
    python tools/ablate_routing.py --only faithful,aux0.1 # some runs (their dense references run first)
    python tools/ablate_routing.py --list

Runs live under --work-dir (default runs/ablations); a finished run (its eval.json exists) is skipped and an
interrupted one resumes from its checkpoints, so re-running the same command continues. The report
(--output-dir, default reports/ablations) is report.md (the table) and results.json (every number and each
run's evaluation curve), rewritten from whatever runs have finished.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nvium_dist.cli import int_at_least  # noqa: E402
from nvium_dist.replicate.ablation import ABLATIONS  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated run names (default: all)")
    p.add_argument("--list", action="store_true", help="print the runs and what each changes, then exit")
    p.add_argument("--work-dir", default="runs/ablations", help="run directories (not committed)")
    p.add_argument("--output-dir", default="reports/ablations", help="report.md and results.json")
    p.add_argument("--nproc", type=int_at_least(1), default=2, help="training processes per run")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from finished runs, train nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for a in ABLATIONS:
            print(f"{a.name:<18} {a.steps:>5} steps x {a.global_batch:>3} seqs  {a.change}")
        return 0
    from nvium_dist.replicate.ablation import AblationRunner, write_ablation_report

    resolve = lambda p: Path(p) if Path(p).is_absolute() else REPO / p  # noqa: E731
    work, output = resolve(args.work_dir), resolve(args.output_dir)
    if args.report_only:
        print(write_ablation_report(work, output)["report"])
        return 0
    names = [n for n in args.only.split(",") if n] or [a.name for a in ABLATIONS]
    return AblationRunner(work, output, nproc=args.nproc, names=names).run()


if __name__ == "__main__":
    sys.exit(main())
