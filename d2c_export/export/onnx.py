"""Stage-by-stage ONNX export with `torch.onnx.export(dynamo=True)`, graph checks and atomic writes.

Exporter: the `torch.export`-based ONNX exporter (`dynamo=True`). It is the maintained path of
PyTorch (the TorchScript exporter is deprecated), it takes the dynamic axes as `torch.export.Dim`
ranges that are verified while tracing, and it writes graphs above 2 GB with external data.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from tqdm import tqdm

from d2c_export.class_names import check_class_names, class_names_problem, default_class_names
from d2c_export.errors import BadInput, EngineError
from d2c_export.manifest import MANIFEST, Manifest, StageEntry, config_digest
from d2c_export.sources import DEFAULT_OPSET
from d2c_export.stages import DEFAULT_MAX_BATCH, MAX_EXPORT_BATCH, STAGES, StageSpec, stages_for
from reference.files import directory_lock, output_directory, publish_dir, remove_leftovers
from reference.model import D2C
from reference.pipeline import SamplingParams

log = logging.getLogger(__name__)
EXPORTER_LOGGERS = ("torch.onnx", "onnx_ir", "onnxscript")  # per-op chatter of the exporter's passes (the CLI quiets)

EXPORTER = f"torch.onnx.export(dynamo=True) torch {torch.__version__}"
EXTERNAL_DATA_BYTES = 1 << 30  # graphs whose weights exceed this keep them in a `.onnx.data` file


def graph_name(stage: str, precision: str = "fp32") -> str:
    return f"{stage}.onnx" if precision == "fp32" else f"{stage}.{precision}.onnx"


def export_file_names(stages: str | list[str] = "all") -> list[str]:
    """Every file an export of `stages` (and its `--fp16` graphs) may write into the engines directory."""
    names = list(STAGES) if stages == "all" else [stages] if isinstance(stages, str) else list(stages)
    return [MANIFEST] + [f"{graph_name(s, p)}{data}" for s in names for p in ("fp32", "fp16") for data in ("", ".data")]


def io_specs(spec: StageSpec, config) -> tuple[list[dict], list[dict]]:
    return [t.as_dict() for t in spec.input_specs(config)], [t.as_dict() for t in spec.output_specs(config)]


def entry_for(files: dict[str, str], main: str, spec: StageSpec, config, precision: str, opset: int,
              profile: dict[str, list[int]]) -> StageEntry:
    """A manifest entry whose first file is the graph `main` (its external data after it)."""
    ins, outs = io_specs(spec, config)
    return StageEntry(files={main: files[main], **{k: v for k, v in files.items() if k != main}}, precision=precision,
                      inputs=ins, outputs=outs, opset=opset, profile=profile)


def _dynamic_shapes(spec: StageSpec, config, max_batch: int) -> tuple[dict[int, torch.export.Dim] | None, ...]:
    """Positional `torch.export` dynamic shapes: one Dim per axis name, shared by every input using it.

    The inputs a wrapper takes as *args get one nested tuple, as `torch.export` matches them.
    """
    profile = spec.profile(config, max_batch)
    dims = {axis: torch.export.Dim(axis, min=lo, max=hi) for axis, (lo, _, hi) in profile.items()}
    flat = tuple(({i: dims[a] for i, a in t.dynamic_axes.items()} or None) for t in spec.input_specs(config))
    if spec.varargs_from is None or spec.varargs_from >= len(flat):  # no inputs reach the *args
        return flat
    return flat[:spec.varargs_from] + (flat[spec.varargs_from:],)


def check_graph(path: Path, spec: StageSpec, config) -> None:
    """onnx checker, shape inference, and every intended dynamic axis symbolic, every static one fixed."""
    onnx.checker.check_model(str(path), full_check=False)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    graph_io = {v.name: v for v in list(inferred.graph.input) + list(inferred.graph.output)}
    for t in spec.input_specs(config) + spec.output_specs(config):
        if t.name not in graph_io:
            raise EngineError(f"{path.name}: graph has no tensor {t.name!r}")
        dims = graph_io[t.name].type.tensor_type.shape.dim
        if len(dims) != len(t.shape):
            raise EngineError(f"{path.name}: {t.name} has rank {len(dims)}, expected {len(t.shape)}")
        for i, (d, want) in enumerate(zip(dims, t.shape)):
            if isinstance(want, str) and not d.dim_param:
                raise EngineError(f"{path.name}: axis {i} ({want}) of {t.name} is fixed to {d.dim_value}, "
                                  "expected a symbolic dimension")
            if isinstance(want, int) and d.dim_value != want:
                raise EngineError(f"{path.name}: axis {i} of {t.name} is {d.dim_param or d.dim_value}, expected {want}")


def export_stage(model: D2C, spec: StageSpec, out_dir: Path, opset: int = DEFAULT_OPSET,
                 max_batch: int = DEFAULT_MAX_BATCH) -> StageEntry:
    """Export one stage to `out_dir/<stage>.onnx` (plus `.onnx.data` when large); returns its manifest entry."""
    config = model.config
    wrapper: nn.Module = spec.wrapper(model).eval()
    feeds = spec.example_inputs(config)
    inputs = spec.input_specs(config)
    outputs = spec.output_specs(config)
    args = tuple(feeds[t.name] for t in inputs)
    big = sum(p.numel() * p.element_size() for p in wrapper.parameters()) > EXTERNAL_DATA_BYTES
    main = graph_name(spec.name)
    with publish_dir(out_dir, spec.name) as (tmp, digests), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            program = torch.onnx.export(
                wrapper, args, dynamo=True, opset_version=opset, verbose=False,
                input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
                dynamic_shapes=_dynamic_shapes(spec, config, max_batch))
        program.save(str(tmp / main), external_data=big)
        check_graph(tmp / main, spec, config)
    return entry_for(digests, main, spec, config, "fp32", opset,
                     {a: list(r) for a, r in spec.profile(config, max_batch).items()})


def export_model(model: D2C, out_dir: str | Path, source: dict, stages: str | list[str] = "all",
                 opset: int = DEFAULT_OPSET, max_batch: int = DEFAULT_MAX_BATCH, progress: bool = True,
                 sampling: dict | None = None, class_names: list[str] | None = None) -> Manifest:
    """Export the chosen stages and write/refresh `manifest.json`; stale stages of another model are dropped.

    `sampling`: the model's recommended sampling settings (SamplingParams fields) recorded for `d2c-run`; by default
    `SamplingParams.recommended_for(model.config)`. `class_names`: a name per class to record; by default the names
    an earlier export of the same model (config and source) into `out_dir` recorded, else the demo's for the demo
    checkpoint (`default_class_names`), else none.
    """
    out_dir = Path(out_dir)
    if not 1 <= max_batch <= MAX_EXPORT_BATCH:
        raise EngineError(f"max batch {max_batch} is outside 1..{MAX_EXPORT_BATCH}; export with --max-batch up to "
                          f"{MAX_EXPORT_BATCH}")
    check_finite(model)
    if class_names is not None:
        check_class_names(class_names, model.config.num_classes)
    specs = stages_for(model.config, stages)
    with output_directory(out_dir), directory_lock(out_dir, "an export"):  # a failed first export leaves no folder
        return _export_locked(model, out_dir, source, specs, opset, max_batch, progress, sampling, class_names)


def replacement_note(out_dir: Path, old: Manifest, same_model: bool, stages: list[str]) -> str:
    """What an export into `out_dir` over the export `old` replaces and what it keeps, in one line for the log."""
    builds = sorted({k for s in stages for k in old.stages.get(s, {})})
    if not same_model:
        return (f"replacing the export in {out_dir} ({old.config.get('name')}, max batch {old.max_batch}, source "
                f"{old.source}): another model, source or max batch, so every stage and build it lists "
                f"({', '.join(old.kinds()) or 'none'}) goes once the new stages are written")
    kept = [s for s in old.stages if s not in stages]
    return (f"replacing stages {', '.join(stages)} of the export in {out_dir} (the same model)"
            + (f": new onnx-fp32 graphs replace their builds ({', '.join(builds)})" if builds else "")
            + (f"; keeping stages {', '.join(kept)}" if kept else ""))


def check_finite(model: D2C) -> None:
    """Refuse weights with NaN or inf: every graph made from them would compute garbage."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise BadInput(f"the weights hold non-finite values (NaN or inf), first in {name}; export a "
                           "checkpoint whose weights are finite")


def _kept_class_names(old: Manifest | None, model: D2C, source: dict) -> list[str] | None:
    """The class names an earlier export of the same weights (config and source, at any max batch) recorded, if valid."""
    if old is None or old.class_names is None or (config_digest(old.config), old.source) != (
            config_digest(model.config.to_dict()), source):
        return None
    return None if class_names_problem(old.class_names, model.config.num_classes) else old.class_names


def _export_locked(model: D2C, out_dir: Path, source: dict, specs: list[StageSpec], opset: int, max_batch: int,
                   progress: bool, sampling: dict | None, class_names: list[str] | None) -> Manifest:
    for leftover in remove_leftovers(out_dir):
        log.info("removed %s, left by an interrupted export", leftover.name)
    config_dict = model.config.to_dict()
    old = None
    if (out_dir / MANIFEST).is_file():
        try:
            old = Manifest.read(out_dir / MANIFEST)
        except EngineError:
            old = None
    same_model = old is not None and (config_digest(old.config), old.source, old.max_batch) == (  # tuples as lists
        config_digest(config_dict), source, max_batch)
    manifest = old if same_model else Manifest(config=config_dict, source=source, max_batch=max_batch,
                                               exporter=EXPORTER)
    if old is not None:
        log.info("%s", replacement_note(out_dir, old, same_model, [s.name for s in specs]))
    recommended = SamplingParams.recommended_for(model.config) if sampling is None else sampling
    if class_names is None:
        class_names = _kept_class_names(old, model, source)
    manifest.class_names = class_names if class_names is not None else default_class_names(source)
    manifest.sampling = SamplingParams(**recommended).as_dict()  # every setting, recorded with its value
    bar = tqdm(specs, desc="d2c-export onnx", unit="stage", disable=not progress)
    for spec in bar:
        bar.set_postfix_str(spec.name)
        start = time.perf_counter()
        entry = export_stage(model, spec, out_dir, opset, max_batch)
        manifest.stages[spec.name] = {"onnx-fp32": entry}  # other builds of the stage were made from the old graph
        manifest.save(out_dir)
        log.info("exported %s in %.1f s -> %s", spec.name, time.perf_counter() - start, ", ".join(entry.files))
    if old is not None:
        for name in old.file_names() - manifest.file_names():
            stale = out_dir / name
            if stale.is_file() and stale.resolve().parent == out_dir.resolve():
                stale.unlink()
                log.info("removed %s, which the new manifest no longer lists", name)
    return manifest
