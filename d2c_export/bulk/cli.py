"""`d2c-generate`: many images on Ray workers, resumable, as numbered PNGs, `DIR.npz` and `DIR/samples.json`; on
the shared flags of `d2c_export.cli_options`."""
from __future__ import annotations

import logging
from pathlib import Path

import click
from click.core import ParameterSource

from d2c_export.bulk.shards import MAX_IMAGES
from d2c_export.bulk.workers import MAX_WORKERS
from d2c_export.cli_options import (backend_options, engines_option, engines_sampling, quiet_option, sampling_options,
                                    setup_logging)
from d2c_export.cli_support import SEED, Command, Finite, OutputPath

log = logging.getLogger("d2c")


def _classes(ctx, param, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated class labels, got {text!r}") from None
    if not values:
        raise click.BadParameter(f"expected comma-separated class labels, got {text!r}")
    return values


@click.command(cls=Command, help="Generate a class-balanced set of images on Ray workers (image i: class of index "
               "i // per-class, seed SEED + i) as DIR/{index:06d}.png, DIR.npz (arr_0, N x H x W x 3 uint8) and "
               "DIR/samples.json; rerunning the same command resumes. Sampling flags left out take the engines' "
               "recommended settings for their model.")
@engines_option
@click.option("--out", type=OutputPath(path_type=Path), required=True, help="directory of the PNGs (DIR.npz beside it)")
@click.option("--per-class", type=click.IntRange(1, MAX_IMAGES), default=50, show_default=True,
              help="images per class (unless --num-images)")
@click.option("--num-images", type=click.IntRange(1, MAX_IMAGES), help="images in all, a multiple of the classes")
@click.option("--classes", callback=_classes, help="comma-separated class labels (default: every class)")
@click.option("--seed", type=SEED, default=0, show_default=True, help="image i draws from a generator seeded SEED + i")
@click.option("--batch", type=click.IntRange(min=1), help="images per shard and generation (default: the exported "
              "max batch)")
@click.option("--workers", type=click.IntRange(1, MAX_WORKERS),
              help="Ray workers (default: one per GPU of the cluster, else 1)")
@click.option("--worker-cpus", type=Finite(min=0.0, min_open=True),
              help="CPUs Ray reserves per worker, its stage threads on a CPU (default: 1 with GPUs, else the "
              "cluster's CPUs shared by the workers)")
@click.option("--address", default=None, help="an existing Ray cluster (auto or ray://HOST:10001); default: a local "
              "Ray instance")
@click.option("--num-cpus", type=click.IntRange(1, 4096), help="CPUs of the local Ray instance (default: all)")
@sampling_options
@backend_options
@quiet_option
def generate_cli(engines_dir, out, per_class, num_images, classes, seed, batch, workers, worker_cpus, address,
                 num_cpus, backend, precision, quiet, **flags):
    from d2c_export.bulk.run import ClusterRequest, generate_bulk, make_plan
    from d2c_export.engines import Engines
    setup_logging(quiet)
    if num_images is not None:
        if click.get_current_context().get_parameter_source("per_class") is not ParameterSource.DEFAULT:
            raise click.UsageError("give --per-class or --num-images, not both")
        per_class = None
    engines = Engines.open(engines_dir)
    params = engines_sampling(engines, flags)
    plan = make_plan(engines, params, backend, precision, classes, per_class, num_images, seed, batch)
    generate_bulk(engines, plan, out, ClusterRequest(address, num_cpus, workers, worker_cpus), progress=not quiet)
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    return generate_cli.main(argv, prog_name="d2c-generate", standalone_mode=False)
