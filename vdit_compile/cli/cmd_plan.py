"""``vdit-compile plan show PLAN [--heatmaps DIR]``: print a plan's site table, draw its attention heatmaps."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="inspect a calibration plan", description="Inspect a vdit-compile plan.")
    sub = p.add_subparsers(dest="plan_command", metavar="ACTION")
    show = sub.add_parser("show", help="print the site table; optionally write PNG heatmaps",
                          description="Print a plan's table (site, layout, masks per head, density, error) and, "
                                      "with --heatmaps, a PNG of each calibrated site's frame-by-frame attention mass.")
    show.add_argument("plan", help="plan JSON written by `vdit-compile calibrate`")
    show.add_argument("--heatmaps", metavar="DIR", help="write one PNG per calibrated site into DIR")
    show.set_defaults(func=run_show)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p


def run_show(args) -> int:
    from ..plans import Plan, PlanError
    from ..plans.show import format_table, write_heatmaps

    try:
        plan = Plan.load(args.plan)
    except (FileNotFoundError, PlanError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(format_table(plan))
    if args.heatmaps:
        paths = write_heatmaps(plan, args.heatmaps)
        if paths:
            print(f"\nwrote {len(paths)} heatmap(s) to {args.heatmaps}")
        else:
            print("\nno heatmaps written: the plan has no calibrated attention mass (uniform or all-dense plan)")
    return 0
