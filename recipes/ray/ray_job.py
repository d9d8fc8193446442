"""Ray job entry point: run prep stages, in order, as Ray tasks on a Ray cluster.

    ray job submit --address http://HEAD:8265 -- \
        python recipes/ray/ray_job.py --config /shared/my.yaml [STAGE ...] [--set key=value ...]

Inside `ray job submit` RAY_ADDRESS points at the cluster, so the driver joins it; run by hand
without it (and without --ray-address) it starts Ray on this machine. prep must be installed on
every node (same image or shared environment), and every path in the config must be on storage all
nodes see. Stages run one after the other; a stage starts only when the previous one finished every
task, and the job exits 1 at the first stage with a failed task (re-submit to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import ray
from rich.console import Console

from prep.config import load_config
from prep.errors import PrepError
from prep.runtime.runner import run_stage
from prep.runtime.summary import print_summary
from prep.stages import STAGE_ORDER, get_stage
from prep.stages.base import RunOptions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stages", nargs="*", metavar="STAGE",
                    help="stages to run (default: every stage with enable: true, in pipeline order)")
    ap.add_argument("--config", "-c", required=True, help="the stage config YAML, on shared storage")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="override a config key")
    ap.add_argument("--ray-address", default=None, help="cluster address (default: RAY_ADDRESS, else local)")
    ap.add_argument("--strict", action="store_true", help="turn warnings (damaged tars, ...) into failures")
    ap.add_argument("--json", action="store_true", help="print the summaries as JSON on stdout")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    try:
        cfg = load_config(args.config, args.overrides)
        for name in args.stages:
            get_stage(name)  # an unknown name fails here, before Ray starts
    except PrepError as err:
        for e in getattr(err, "errors", [err]):
            console.print(f"error: {e.line()}", highlight=False, markup=False)
        return 1
    names = [s for s in STAGE_ORDER if s in args.stages] if args.stages else [
        s for s in STAGE_ORDER if getattr(cfg, s).enable]
    started = not ray.is_initialized()
    if started:  # one connection for every stage, instead of one per stage
        ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    docs, code = [], 0
    try:
        opts = RunOptions(runner="ray", ray_address=args.ray_address, strict=args.strict, quiet=True)
        for name in names:
            try:
                run = run_stage(name, cfg, opts, console)
            except PrepError as err:
                console.print(f"error: {err.line()}", highlight=False, markup=False)
                code = 1
                break
            docs.append(run.to_json())
            if not args.json:
                print_summary(run, console)
            if not run.ok:
                code = 1
                break
    finally:
        if started:
            ray.shutdown()
    if args.json:
        sys.stdout.write(json.dumps(docs, indent=1) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
