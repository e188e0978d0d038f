"""Train the demo D2C (d2c-demo) and the shapes classifier on the synthetic shapes; seeded and reproducible.

    python scripts/train_demo.py                       # the shipped checkpoints (about 40 minutes on one CPU thread)
    python scripts/train_demo.py --scale 0.05 --out /tmp/demo.safetensors   # a quick smoke run
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from reference.checkpoint import save_checkpoint
from training.classifier import save_classifier
from training.demo import PARTS, TrainSettings, train_demo

log = logging.getLogger("train_demo")
DEFAULT_OUT = "checkpoints/d2c-demo.safetensors"
DEFAULT_CLASSIFIER = "checkpoints/shapes-classifier.safetensors"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=DEFAULT_OUT, help="the D2C checkpoint to write")
    p.add_argument("--classifier-out", default=DEFAULT_CLASSIFIER, help="the shapes classifier to write")
    p.add_argument("--log", help="log file (default: next to --out, with .log)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every part's step count (smoke runs)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: reproducible and polite)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.scale <= 0:
        raise SystemExit("error: --scale must be positive")
    out = Path(args.out)
    log_path = Path(args.log) if args.log else out.with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(log_path, mode="w")])
    torch.set_num_threads(args.threads)
    settings = TrainSettings()
    settings.steps = {p: max(1, round(n * args.scale)) for p, n in settings.steps.items()}
    log.info("seed %d, steps %s, batch %s", args.seed, settings.steps, settings.batch)
    start = time.perf_counter()
    result = train_demo(settings, seed=args.seed, progress=not args.quiet)
    save_checkpoint(result.model, out)
    save_classifier(result.classifier, args.classifier_out)
    summary = {"seed": args.seed, "steps": settings.steps, "seconds": {p: round(result.seconds[p], 1) for p in PARTS},
               "total_seconds": round(time.perf_counter() - start, 1),
               "final_loss": {p: round(result.final_loss[p], 4) for p in PARTS},
               "checkpoint_bytes": out.stat().st_size}
    log.info("summary %s", json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
