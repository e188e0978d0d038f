"""Every command (`d2c-export`, `d2c-run`, `d2c-bench`, `d2c-quality`): a few library calls each, on click.

The options they share (sampling, engines, backend) are defined once, in `cli_options`. Every error that is the
user's to fix, bad flag and interrupt ends as one line on stderr (`error: ...`) with exit status 2 (130 for an
interrupt); anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import logging
from pathlib import Path

import click

from d2c_export.backends import AUTO, Precision, Target, TargetError, choices, parse_list
from d2c_export.cli_options import (SAMPLING_HELP, backend_options, checked_out, engines_option, engines_sampling,
                                    int_list, options, quiet_option, samplers_option, sampling_from, sampling_options,
                                    setup_logging)
from d2c_export.cli_support import SEED, THREADS, Command, Finite, Group, OutputPath
from d2c_export.engines import DEFAULT_ENGINES, Engines
from d2c_export.errors import BadInput
from d2c_export.sources import DEFAULT_OPSET
from d2c_export.stages import DEFAULT_MAX_BATCH, MAX_EXPORT_BATCH, STAGES
from d2c_export.verify.quality import MAX_PER_CLASS
from reference.files import check_apart_from_inputs, check_output_dir, check_output_file
from reference.model import PRESETS, get_config
from reference.pipeline import SamplingParams
from reference.settings import check_request

log = logging.getLogger("d2c")


# the files and options beside a stage-2 checkpoint: `sources.OfficialParts`'s fields and `assemble`'s keywords
official_options = options(
    click.option("--gpt", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="LlamaGen c2i GPT checkpoint (stage 1 of a D2C stage-2 --checkpoint)"),
    click.option("--vae", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="MAR's KL VAE checkpoint (kl16.ckpt); needed with an official MAR --checkpoint"),
    click.option("--ema/--no-ema", default=True, show_default=True, help="use the EMA weights where a file has them"),
    click.option("--mar-heads", type=click.IntRange(min=1), help="attention heads of a MAR that is not an official size"),
    click.option("--gpt-heads", type=click.IntRange(min=1), help="attention heads of a GPT that is not an official size"),
    click.option("--mar-patch-size", type=click.IntRange(min=1),
                 help="patch size of a MAR that is not MAR's published 1 (token channels = VAE channels x patch^2)"),
)


# -- d2c-export ----------------------------------------------------------------------------------------
@click.group(cls=Group, help="Export D2C stages to ONNX and TensorRT, and check their parity.")
def export_cli():
    pass


def _stage_choice():
    return click.Choice(["all", *STAGES])


@export_cli.command("onnx", help="Trace every stage into an ONNX graph and write manifest.json.")
@click.option("--stage", type=_stage_choice(), default="all", show_default=True, help="the stage to export, or all")
@click.option("--config", type=click.Choice(list(PRESETS)), help="preset with seeded random weights (default, with no "
              "--checkpoint either: the trained demo, checkpoints/d2c-demo.safetensors)")
@click.option("--checkpoint", "--stage2", "checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="native checkpoint (.safetensors with its config), or an official MAR / D2C stage-2 file")
@official_options
@click.option("--seed", type=SEED, default=0, show_default=True, help="seed of the random weights with --config")
@click.option("--out", type=OutputPath(file_okay=False, path_type=Path), default=DEFAULT_ENGINES, show_default=True,
              help="engines directory to write (the graphs and manifest.json)")
@click.option("--engines", "engines_dir", type=OutputPath(file_okay=False, path_type=Path),
              help="another name for --out")
@click.option("--class-names", type=click.Path(dir_okay=False, path_type=Path),
              help="a name per class to record, in class order: a text file of one name a line, or a .json list of "
              "strings (default: the names an export of the same model in --out has, the demo's shapes and colours "
              "for the demo, else none: the classes are numbered)")
@click.option("--opset", type=click.IntRange(min=DEFAULT_OPSET, max=23), default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset")
@click.option("--max-batch", type=click.IntRange(1, MAX_EXPORT_BATCH), default=DEFAULT_MAX_BATCH, show_default=True,
              help="images per call the profiles admit")
@click.option("--fp16", is_flag=True, help="also write mixed-precision <stage>.fp16.onnx graphs (FP32 where FP16 breaks)")
@quiet_option
def _onnx(stage, config, checkpoint, seed, out, engines_dir, class_names, opset, max_batch, fp16, quiet, **official):
    from d2c_export.class_names import check_class_names, read_class_names
    from d2c_export.export.onnx import export_file_names, export_model
    from d2c_export.sources import ModelRequest, OfficialParts, build_model
    setup_logging(quiet)
    if engines_dir is not None:  # --out's other name: its errors name --engines
        if click.get_current_context().get_parameter_source("out") != click.core.ParameterSource.DEFAULT:
            raise BadInput("--engines is another name for --out; give one of them")
    out, flag = (engines_dir, "--engines") if engines_dir is not None else (out, "--out")
    if fp16:
        from d2c_export.export.fp16 import converter
        converter()  # installed, before the FP32 export
    check_output_dir(out, flag=flag)
    inputs = [p for p in (checkpoint, official["gpt"], official["vae"], class_names) if p is not None]
    check_apart_from_inputs({flag: [out / name for name in export_file_names(stage)]}, inputs)
    names = read_class_names(class_names) if class_names is not None else None
    parts = OfficialParts(**official)
    model, source = build_model(ModelRequest(config=config, checkpoint=checkpoint, seed=seed, parts=parts))
    if names is not None:
        check_class_names(names, model.config.num_classes, str(class_names))
    stages = "all" if stage == "all" else [stage]
    export_model(model, out, source, stages, opset=opset, max_batch=max_batch, progress=not quiet, class_names=names)
    engines = Engines.open(out)
    if fp16:
        from d2c_export.export.fp16 import convert_engines
        convert_engines(engines, stages, progress=not quiet)
    log.info("wrote %s (stages: %s)", out / "manifest.json", ", ".join(engines.manifest.stages))
    return 0


@export_cli.command("trt", help="Build one strongly typed TensorRT plan per stage (needs TensorRT and a GPU).",
                    short_help="Build one TensorRT plan per stage (needs TensorRT and a GPU).")
@engines_option
@click.option("--fp16", is_flag=True, help="FP16 plans from the fp16 graphs (made first if missing)")
@click.option("--stage", type=_stage_choice(), default="all", show_default=True, help="the stage to build, or all")
@click.option("--workspace", type=click.FloatRange(min=0, min_open=True), default=4.0, show_default=True,
              help="builder workspace limit in GiB")
@click.option("--timing-cache", type=OutputPath(dir_okay=False, path_type=Path),
              help="timing cache, loaded if present and saved after the build (default: ENGINES/timing.cache)")
@quiet_option
def _trt(engines_dir, fp16, stage, workspace, timing_cache, quiet):
    from d2c_export.export.trt_build import build_engines
    setup_logging(quiet)
    engines = Engines.open(engines_dir)
    if timing_cache is not None:
        check_output_file(timing_cache, "--timing-cache")
        check_apart_from_inputs({"--timing-cache": [timing_cache]}, engines.input_files())
    build_engines(engines, fp16, "all" if stage == "all" else [stage], workspace, timing_cache, progress=not quiet)
    log.info("wrote %s (plans: %s)", engines_dir / "manifest.json", ", ".join(engines.manifest.kinds()))
    return 0


@export_cli.command("convert", help="Write official LlamaGen / MAR files as one native checkpoint.")
@click.option("--out", type=OutputPath(dir_okay=False, path_type=Path), required=True,
              help="native checkpoint to write (.safetensors)")
@click.option("--checkpoint", "--stage2", "checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="official MAR / D2C stage-2 file (or a native checkpoint whose parts --gpt/--vae "
              "replace)")
@official_options
def _convert(out, checkpoint, **official):
    from reference.checkpoint import save_checkpoint
    from reference.official import assemble
    setup_logging(False)
    check_output_file(out, "--out")
    check_apart_from_inputs({"--out": [out]}, [p for p in (checkpoint, official["gpt"], official["vae"]) if p])
    model = assemble(checkpoint, **official)  # the option names are assemble's keywords
    save_checkpoint(model, out)
    log.info("wrote %s (config %s)", out, model.config.name)
    return 0


@export_cli.command("check", help="Per-stage parity table against the reference (teacher forcing).")
@engines_option
@backend_options
@click.option("--quiet", is_flag=True, help="print only the passed / failed line and the failures")
def _check(engines_dir, backend, precision, quiet):
    from d2c_export.verify.parity import check_engines, check_targets, format_table
    setup_logging(quiet)
    engines = Engines.open(engines_dir)
    targets = check_targets(engines, Precision(precision)) if backend == AUTO else [Target.of(backend, precision)]
    reports = check_engines(engines, targets)
    failed = [r for r in reports if not r.passed]
    if failed or not quiet:
        print(format_table(failed if quiet else reports))
    print(f"{len(reports) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


# -- d2c-run -------------------------------------------------------------------------------------------
@click.command(cls=Command, help="Generate images from exported D2C engines. " + SAMPLING_HELP)
@engines_option
@click.option("--class", "classes", type=int, multiple=True, required=True, help="class label; repeat for several")
@click.option("--num-images", type=click.IntRange(1, MAX_EXPORT_BATCH), default=1, show_default=True,
              help="images per class")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="image i draws from its own generator seeded SEED + i (the same image in any batch)")
@click.option("--batch-order", is_flag=True,
              help="draw the whole batch from one generator seeded SEED, in the official code's order")
@sampling_options
@backend_options
@click.option("--out", type=OutputPath(path_type=Path), default=Path("out.png"), show_default=True, help="a .png file")
@click.option("--zoomed", type=OutputPath(dir_okay=False, path_type=Path),
              help="also write the images 8x larger here, each pixel a block (for looking at; a .png file)")
@quiet_option
def run_cli(engines_dir, classes, num_images, seed, batch_order, backend, precision, out, zoomed, quiet, **flags):
    from d2c_export.backends import open_named
    from d2c_export.generate import generate_images
    from d2c_export.images import GRID_ZOOM, check_png_name, save_images
    setup_logging(quiet)
    checked_out(out, "--out"), checked_out(zoomed, "--zoomed")
    engines = Engines.open(engines_dir)
    check_apart_from_inputs({"--out": [out], "--zoomed": [zoomed] if zoomed else []}, engines.input_files())
    check_png_name(out, "--out")
    if zoomed:
        check_png_name(zoomed, "--zoomed")
        if zoomed.resolve() == out.resolve():
            raise BadInput(f"--zoomed {zoomed} is the --out file; name another file")
    labels = [c for c in classes for _ in range(num_images)]
    params = engines_sampling(engines, flags)
    check_request(engines.config, labels, max_batch=engines.max_batch, seed=seed, params=params,
                  too_many=lambda n: f"ask for at most {engines.max_batch} images in all ({len(classes)} --class x "
                  f"--num-images {num_images} is {n}), or re-export with "
                  f"`{engines.rebuild_command('onnx-fp32', max_batch=n)}`",
                  other_classes=engines.other_classes())
    if engines.manifest.class_names is not None:
        names = engines.class_names
        log.info("classes: %s", ", ".join(f"{c} ({names[c]})" for c in dict.fromkeys(classes)))
    with open_named(engines, backend, precision) as stages:
        log.info("backend: %s", stages.description)
        result, timer = generate_images(stages, labels, params, seed, progress=not quiet and "d2c-run",
                                        batch_order=batch_order)
    path = save_images(result.images, out)
    for name, seconds in timer.seconds.items():
        log.info("  %-10s %5d calls %9.3f s", name, timer.calls[name], seconds)
    log.info("wrote %s (%d image%s, %.2f s in stages)", path, len(labels), "s" * (len(labels) > 1),
             sum(timer.seconds.values()))
    if zoomed:
        log.info("wrote %s (%dx larger)", save_images(result.images, zoomed, zoom=GRID_ZOOM), GRID_ZOOM)
    return 0


# -- d2c-bench -----------------------------------------------------------------------------------------
def _targets(ctx, param, text: str):
    try:
        return parse_list(text)
    except TargetError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command(cls=Command, help="Latency of the D2C stages and backends, measured interleaved; writes bench.json, "
               "bench.md and bench.png. " + SAMPLING_HELP)
@click.option("--config", type=click.Choice(list(PRESETS)), help="export this preset (random weights) into a "
              "temporary engines directory first")
@engines_option(help_text="exported engines to measure (when no --config)")
@click.option("--backends", default="torch,ort", show_default=True, callback=_targets,
              help=f"comma-separated columns from {', '.join(choices())}")
@click.option("--batch", default="1,4", show_default=True, callback=int_list, help="comma-separated batch sizes")
@sampling_options
@samplers_option
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True,
              help="measured generations per backend and batch")
@click.option("--warmup", type=click.IntRange(min=1), default=1, show_default=True,
              help="unmeasured generations per backend and batch first")
@click.option("--threads", type=THREADS, default=0, help="CPU threads of every backend (0: torch's)")
@click.option("--seed", type=SEED, default=0, show_default=True, help="image i of every generation draws from a "
              "generator seeded SEED + i")
@click.option("--out", type=OutputPath(file_okay=False, path_type=Path), default=Path("bench"), show_default=True,
              help="directory of bench.json, bench.md, bench.png")
@click.option("--no-plot", is_flag=True, help="skip bench.png")
@quiet_option
def bench_cli(config, engines_dir, backends, batch, samplers, repeat, warmup, threads, seed, out, no_plot, quiet,
              **flags):
    import importlib.util

    from d2c_export.bench.report import REPORT_FILES, markdown, summarize, write_report
    from d2c_export.bench.run import bench_from_config, run_benchmark
    setup_logging(quiet)
    if not no_plot and importlib.util.find_spec("matplotlib") is None:
        raise BadInput("bench.png needs matplotlib: pip install -e '.[plot]', or pass --no-plot")
    reports = REPORT_FILES[:2] if no_plot else REPORT_FILES
    check_output_dir(out, reports, "--out")
    options = dict(repeat=repeat, warmup=warmup, threads=threads or None, seed=seed, progress=not quiet,
                   samplers=samplers)
    if config:  # the preset's recorded settings, as its exported engines would hold them, checked before the export
        preset = get_config(config)
        params = sampling_from(SamplingParams.recommended_for(preset), preset, flags)
        result = bench_from_config(config, out, backends, batch, params, **options)
    else:
        engines = Engines.open(engines_dir)
        check_apart_from_inputs({"--out": [out / name for name in reports]}, engines.input_files())
        result = run_benchmark(engines, backends, batch, engines_sampling(engines, flags), **options)
    paths = write_report(result, out, with_plot=not no_plot)
    print(markdown(summarize(result)))
    log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
    return 0


# -- d2c-quality ---------------------------------------------------------------------------------------
@click.command(cls=Command, help="Sample quality of backends on the demo shapes: class accuracy and Frechet distance "
               "under the shapes classifier; exit 1 when a backend falls behind the first. " + SAMPLING_HELP)
@engines_option
@click.option("--backends", default="torch,ort", show_default=True, callback=_targets,
              help=f"comma-separated, the first is the reference of the gate; from {', '.join(choices())}")
@click.option("--classifier", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="default: the demo's, under checkpoints/")
@click.option("--per-class", type=click.IntRange(1, MAX_PER_CLASS), default=20, show_default=True,
              help="samples per class and backend")
@click.option("--real-per-class", type=click.IntRange(2, MAX_PER_CLASS), default=200, show_default=True,
              help="held-out real images per class for the FD")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="image j of batch b draws from a generator seeded SEED + b + j, the same for every backend")
@sampling_options
@samplers_option
@click.option("--threads", type=THREADS, default=0, help="ONNX Runtime intra-op threads (0: its default)")
@click.option("--min-accuracy", type=Finite(0.0, 100.0), default=None,
              help="also fail (exit 1) when a backend's accuracy in percent is below this (a gate for one backend)")
@click.option("--grid", type=OutputPath(dir_okay=False, path_type=Path),
              help="also write the first backend's first 16 samples as a 4x4 PNG grid here (8x zoom; a .png file)")
@click.option("--json", "json_path", type=OutputPath(dir_okay=False, path_type=Path),
              help="also write the reports as JSON here")
@click.option("--samples", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="score this d2c-generate directory (its PNGs and samples.json labels) instead of sampling")
@quiet_option
def quality_cli(engines_dir, backends, classifier, per_class, real_per_class, seed, samplers, threads, min_accuracy,
                grid, json_path, samples, quiet, **flags):
    from dataclasses import asdict

    from d2c_export.images import GRID_ZOOM, check_png_name, save_images
    from d2c_export.verify.quality import (DEFAULT_CLASSIFIER, below_floor, evaluate_backends, evaluate_samples,
                                           gate_failures, markdown)
    from reference.files import write_json_atomic
    from training.classifier import load_classifier
    setup_logging(quiet)
    checked_out(grid, "--grid"), checked_out(json_path, "--json")
    classifier = classifier or DEFAULT_CLASSIFIER
    outputs = {"--grid": [grid] if grid else [], "--json": [json_path] if json_path else []}
    if samples:
        from d2c_export.bulk.pack import read_directory, sample_files
        check_apart_from_inputs(outputs, [classifier, *sample_files(samples)])
        report = evaluate_samples(str(samples), *read_directory(samples), load_classifier(classifier), real_per_class)
        print(markdown([report]))
        failures = below_floor([report], min_accuracy)
        if json_path:
            write_json_atomic(json_path, {"samples": str(samples), "reports": [asdict(report)], "failures": failures})
        for line in failures:
            print(f"FAIL {line}")
        return 1 if failures else 0
    engines = Engines.open(engines_dir)
    check_apart_from_inputs(outputs, [classifier, *engines.input_files()])
    if grid:
        check_png_name(grid, "--grid")
    params = engines_sampling(engines, flags)
    variants = {name: params.with_sampler_set(name).as_dict() for name in samplers or ()}  # refused before sampling
    model = load_classifier(classifier)
    reports, images = evaluate_backends(engines, backends, per_class, params, seed, model, real_per_class, threads,
                                        progress=not quiet, samplers=samplers)
    print(markdown(reports))
    failures = gate_failures(reports) + below_floor(reports, min_accuracy)
    if json_path:
        write_json_atomic(json_path, {"params": {**params.as_dict(), "seed": seed}, "samplers": variants or None,
                                      "reports": [asdict(r) for r in reports], "failures": failures})
    if grid:
        log.info("wrote %s", save_images(images[:16], grid, zoom=GRID_ZOOM))
    for line in failures:
        print(f"FAIL {line}")
    return 1 if failures else 0


def export_main(argv: list[str] | None = None) -> int:
    return export_cli.main(argv, prog_name="d2c-export", standalone_mode=False)


def run_main(argv: list[str] | None = None) -> int:
    return run_cli.main(argv, prog_name="d2c-run", standalone_mode=False)


def bench_main(argv: list[str] | None = None) -> int:
    return bench_cli.main(argv, prog_name="d2c-bench", standalone_mode=False)


def quality_main(argv: list[str] | None = None) -> int:
    return quality_cli.main(argv, prog_name="d2c-quality", standalone_mode=False)
