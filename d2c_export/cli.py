"""Command line: `d2c-export` (onnx, check), `d2c-run` and `d2c-bench`; each command a few library calls."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable

from d2c_export.manifest import EngineError
from d2c_export.stages import DEFAULT_MAX_BATCH, STAGES
from reference.checkpoint import CheckpointError
from reference.model import PRESETS
from reference.pipeline import SamplingParams
from reference.sampling import CfgSchedule

log = logging.getLogger("d2c")
DEFAULT_ENGINES = "engines"
USER_ERRORS = (EngineError, CheckpointError, ValueError, KeyError, FileNotFoundError)


def _guard(fn: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; a user error becomes one line on stderr and exit status 2."""
    logging.basicConfig(level=logging.INFO if not getattr(args, "quiet", False) else logging.WARNING,
                        format="%(message)s")
    try:
        return fn(args)
    except USER_ERRORS as exc:
        message = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        print("error: " + " ".join(line.strip() for line in message.splitlines() if line.strip()), file=sys.stderr)
        return 2


# -- d2c-export ----------------------------------------------------------------------------------------
def _cmd_onnx(args: argparse.Namespace) -> int:
    from d2c_export.onnx_export import export_model
    from d2c_export.sources import model_from_args
    if args.checkpoint and args.config:
        raise ValueError("give either --config or --checkpoint, not both")
    model, source = model_from_args(args.config, args.checkpoint, args.seed)
    stages = "all" if args.stage == "all" else [args.stage]
    manifest = export_model(model, args.out, source, stages, opset=args.opset, max_batch=args.max_batch)
    log.info("wrote %s (stages: %s)", Path(args.out) / "manifest.json", ", ".join(manifest.stages))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from d2c_export.check import check_engines, format_table
    reports = check_engines(args.engines, args.precision)
    print(format_table(reports))
    failed = [r for r in reports if not r.passed]
    print(f"{len(reports) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="d2c-export", description="Export D2C stages to ONNX and check their parity.")
    sub = p.add_subparsers(dest="command", required=True)
    onnx = sub.add_parser("onnx", help="trace every stage into an ONNX graph and write manifest.json")
    onnx.add_argument("--stage", default="all", choices=["all", *STAGES])
    src = onnx.add_mutually_exclusive_group()
    src.add_argument("--config", choices=list(PRESETS), help="preset with seeded random weights (default d2c-tiny)")
    src.add_argument("--checkpoint", help="native checkpoint (.safetensors with its config)")
    onnx.add_argument("--seed", type=int, default=0, help="seed of the random weights with --config")
    onnx.add_argument("--out", default=DEFAULT_ENGINES)
    onnx.add_argument("--opset", type=int, default=18)
    onnx.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="images per call the profiles admit")
    onnx.set_defaults(fn=_cmd_onnx)
    check = sub.add_parser("check", help="per-stage parity table against the reference (teacher forcing)")
    check.add_argument("--engines", default=DEFAULT_ENGINES)
    check.add_argument("--precision", default="fp32", choices=["fp32"])
    check.set_defaults(fn=_cmd_check)
    return p


def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    return _guard(args.fn, args)


# -- d2c-run -------------------------------------------------------------------------------------------
def run_parser() -> argparse.ArgumentParser:
    d = SamplingParams()
    p = argparse.ArgumentParser(prog="d2c-run", description="Generate images from exported D2C engines.")
    p.add_argument("--engines", default=DEFAULT_ENGINES)
    p.add_argument("--class", dest="classes", type=int, action="append", required=True,
                   help="class label; repeat for several classes")
    p.add_argument("--num-images", type=int, default=1, help="images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, default=d.cfg)
    p.add_argument("--cfg-schedule", default=d.cfg_schedule.value, choices=[s.value for s in CfgSchedule])
    p.add_argument("--num-iter", type=int, default=d.num_iter)
    p.add_argument("--diffusion-steps", type=int, default=d.diffusion_steps)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--backend", default="auto", choices=["auto", "ort", "torch"])
    p.add_argument("--precision", default="fp32", choices=["fp32"])
    p.add_argument("--out", default="out.png")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def _cmd_run(args: argparse.Namespace) -> int:
    from d2c_export.runtime import check_request, generate_images, open_backend, save_images
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    params = SamplingParams(cfg=args.cfg, cfg_schedule=args.cfg_schedule, num_iter=args.num_iter,
                            diffusion_steps=args.diffusion_steps, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p)
    from d2c_export.manifest import Manifest
    manifest = Manifest.load(args.engines)
    labels = [c for c in args.classes for _ in range(args.num_images)]
    check_request(manifest.d2c_config, manifest.max_batch, labels)
    stages, description = open_backend(args.engines, args.backend, args.precision)
    log.info("backend: %s", description)
    result, timer = generate_images(stages, labels, params, args.seed, manifest.max_batch, progress=not args.quiet)
    path = save_images(result.images, args.out)
    total = sum(timer.seconds.values())
    for name, seconds in timer.seconds.items():
        log.info("  %-10s %5d calls %9.3f s", name, timer.calls[name], seconds)
    log.info("wrote %s (%d image%s, %.2f s in stages)", path, len(labels), "s" * (len(labels) > 1), total)
    return 0


def run_main(argv: list[str] | None = None) -> int:
    args = run_parser().parse_args(argv)
    return _guard(_cmd_run, args)


# -- d2c-bench -----------------------------------------------------------------------------------------
def bench_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="d2c-bench", description="Latency benchmark of the D2C stages and backends "
                                "(not available yet: only this help exists).")
    p.parse_args(argv)
    p.print_help()
    return 2
