"""CLI: ``python -m tvm_scalpel.training list`` / ``run RECIPE [--checkpoint-dir D] [--target T] [--device D]``."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

from .loop import run_recipe
from .recipes import get_recipe, recipe_names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tvm_scalpel.training", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list the named recipes")
    r = sub.add_parser("run", help="train a recipe (append /quick for the quick variant)")
    r.add_argument("recipe")
    r.add_argument("--checkpoint-dir", help="write a checkpoint every epoch and resume from it")
    r.add_argument("--no-resume", action="store_true")
    r.add_argument("--target", help="target whose SIMD lanes set w, or whose tile sets the GPU tile "
                                    "(shorthand, tag, or JSON dict)")
    r.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    r.add_argument("--device", default="cpu", help="torch device to train on, e.g. cuda (default cpu)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.cmd == "list":
        for name in recipe_names():
            print(name, "", name + "/quick")
        return 0
    torch.set_num_threads(args.threads)
    target = args.target
    if target and target.startswith("{"):
        target = json.loads(target)
    result = run_recipe(get_recipe(args.recipe, target=target), checkpoint_dir=args.checkpoint_dir,
                        resume=not args.no_resume, device=args.device)
    print(json.dumps({k: v for k, v in result.to_dict().items() if k != "history"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
