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
    model, source = model_from_args(args.config, args.checkpoint, args.seed, **_official_options(args))
    stages = "all" if args.stage == "all" else [args.stage]
    manifest = export_model(model, args.out, source, stages, opset=args.opset, max_batch=args.max_batch)
    if args.fp16:
        from d2c_export.fp16 import convert_engines
        manifest = convert_engines(args.out, stages)
    log.info("wrote %s (stages: %s)", Path(args.out) / "manifest.json", ", ".join(manifest.stages))
    return 0


def _cmd_trt(args: argparse.Namespace) -> int:
    from d2c_export.trt_build import build_engines
    stages = "all" if args.stage == "all" else [args.stage]
    manifest = build_engines(args.engines, args.fp16, stages, args.workspace, args.timing_cache)
    log.info("wrote %s (plans: %s)", Path(args.engines) / "manifest.json",
             ", ".join(s for s, kinds in manifest.stages.items() if any(k.startswith("trt") for k in kinds)))
    return 0


def _official_options(args: argparse.Namespace) -> dict:
    return dict(gpt=args.gpt, vae=args.vae, ema=args.ema, mar_heads=args.mar_heads, gpt_heads=args.gpt_heads)


def _add_official_inputs(p: argparse.ArgumentParser) -> None:
    """Options of the parts beside --checkpoint: official LlamaGen / MAR files as published."""
    p.add_argument("--gpt", help="LlamaGen c2i GPT checkpoint (stage 1 of a D2C stage-2 --checkpoint)")
    p.add_argument("--vae", help="MAR's KL VAE checkpoint (kl16.ckpt); needed with an official MAR --checkpoint")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True,
                   help="use the EMA weights where a file has them (default: yes)")
    p.add_argument("--mar-heads", type=int, help="attention heads of a MAR that is not an official size")
    p.add_argument("--gpt-heads", type=int, help="attention heads of a GPT that is not an official size")


def _cmd_convert(args: argparse.Namespace) -> int:
    from reference.checkpoint import save_checkpoint
    from reference.official import assemble
    if args.checkpoint is None:
        raise ValueError("convert needs the stage-2 file: --checkpoint PATH (or --stage2 PATH with --gpt)")
    model = assemble(args.checkpoint, args.gpt, args.vae, ema=args.ema, mar_heads=args.mar_heads,
                     gpt_heads=args.gpt_heads)
    save_checkpoint(model, args.out)
    log.info("wrote %s (config %s)", args.out, model.config.name)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from d2c_export.check import check_engines, format_table
    from d2c_export.trt_check import available_plan_reports
    reports = check_engines(args.engines, args.precision)
    reports += available_plan_reports(args.engines, args.precision)  # TensorRT plans, where TensorRT runs
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
    src.add_argument("--config", choices=list(PRESETS), help="preset with seeded random weights (default, with no "
                     "--checkpoint either: the trained demo, checkpoints/d2c-demo.safetensors)")
    src.add_argument("--checkpoint", "--stage2", dest="checkpoint",
                     help="native checkpoint (.safetensors with its config), or an official MAR / D2C stage-2 file")
    _add_official_inputs(onnx)
    onnx.add_argument("--seed", type=int, default=0, help="seed of the random weights with --config")
    onnx.add_argument("--out", default=DEFAULT_ENGINES)
    onnx.add_argument("--opset", type=int, default=18)
    onnx.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="images per call the profiles admit")
    onnx.add_argument("--fp16", action="store_true",
                      help="also write mixed-precision <stage>.fp16.onnx graphs (FP32 kept where FP16 breaks)")
    onnx.set_defaults(fn=_cmd_onnx)
    from d2c_export.trt_build import DEFAULT_WORKSPACE_GIB
    trt = sub.add_parser("trt", help="build one strongly typed TensorRT plan per stage (needs TensorRT and a GPU)")
    trt.add_argument("--engines", default=DEFAULT_ENGINES)
    trt.add_argument("--fp16", action="store_true", help="FP16 plans from the fp16 graphs (made first if missing)")
    trt.add_argument("--stage", default="all", choices=["all", *STAGES])
    trt.add_argument("--workspace", type=float, default=DEFAULT_WORKSPACE_GIB, help="builder workspace limit in GiB")
    trt.add_argument("--timing-cache", help="timing cache file, loaded if present and saved after the build "
                     "(default: ENGINES/timing.cache)")
    trt.set_defaults(fn=_cmd_trt)
    convert = sub.add_parser("convert", help="write official LlamaGen / MAR files as one native checkpoint")
    convert.add_argument("--out", required=True, help="native checkpoint to write (.safetensors)")
    convert.add_argument("--checkpoint", "--stage2", dest="checkpoint",
                         help="official MAR / D2C stage-2 file (or a native checkpoint whose parts --gpt/--vae replace)")
    _add_official_inputs(convert)
    convert.set_defaults(fn=_cmd_convert)
    check = sub.add_parser("check", help="per-stage parity table against the reference (teacher forcing)")
    check.add_argument("--engines", default=DEFAULT_ENGINES)
    check.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
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
    p.add_argument("--backend", default="auto", choices=["auto", "trt", "ort", "torch"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
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
def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def bench_parser() -> argparse.ArgumentParser:
    from d2c_export.bench import BENCH_BACKENDS
    d = SamplingParams()
    p = argparse.ArgumentParser(prog="d2c-bench", description="Latency of the D2C stages and backends, measured "
                                "interleaved; writes bench.json, bench.md and bench.png.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config", choices=list(PRESETS), help="export this preset (random weights) into a "
                     "temporary engines directory first")
    src.add_argument("--engines", help=f"exported engines to measure (default {DEFAULT_ENGINES})")
    p.add_argument("--backends", default="torch,ort", type=lambda t: [b.strip() for b in t.split(",") if b.strip()],
                   help=f"comma-separated columns from {', '.join(BENCH_BACKENDS)} (default torch,ort)")
    p.add_argument("--batch", default=[1, 4], type=_int_list, help="comma-separated batch sizes (default 1,4)")
    p.add_argument("--num-iter", type=int, default=d.num_iter)
    p.add_argument("--diffusion-steps", type=int, default=d.diffusion_steps)
    p.add_argument("--cfg", type=float, default=d.cfg)
    p.add_argument("--repeat", type=int, default=3, help="measured generations per backend and batch")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured generations per backend and batch first")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of every backend (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench", help="directory of bench.json, bench.md, bench.png")
    p.add_argument("--no-plot", action="store_true", help="skip bench.png")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    return p


def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib.util

    from d2c_export.bench import bench_from_config, run_benchmark
    from d2c_export.bench_report import markdown, summarize, write_report
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        raise ValueError("bench.png needs matplotlib: pip install -e '.[plot]', or pass --no-plot")
    params = SamplingParams(cfg=args.cfg, num_iter=args.num_iter, diffusion_steps=args.diffusion_steps)
    options = dict(repeat=args.repeat, warmup=args.warmup, threads=args.threads or None, seed=args.seed,
                   progress=not args.quiet)
    if args.config:
        result = bench_from_config(args.config, Path(args.out), args.backends, args.batch, params, **options)
    else:
        result = run_benchmark(args.engines or DEFAULT_ENGINES, args.backends, args.batch, params, **options)
    paths = write_report(result, args.out, with_plot=not args.no_plot)
    print(markdown(summarize(result)))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0


def bench_main(argv: list[str] | None = None) -> int:
    args = bench_parser().parse_args(argv)
    return _guard(_cmd_bench, args)
