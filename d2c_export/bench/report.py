"""The benchmark's report: a summary dict (written as JSON), a Markdown table and a PNG plot."""
from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path

import numpy as np
import torch

from d2c_export.backends.ort import onnxruntime
from d2c_export.bench.run import BenchResult, Measurement
from d2c_export.stages import STAGES
from reference.files import atomic_path, write_json_atomic, write_text_atomic
from reference.samplers import SAMPLER_FIELDS

OVERHEAD = "runtime overhead"
DRAWS = "draws (not hidden)"
REFERENCE_BACKEND = "torch"
REPORT_FILES = ("bench.json", "bench.md", "bench.png")


def spread(values: list[float]) -> dict[str, float]:
    """Median and the 10th/90th percentiles."""
    p10, median, p90 = np.percentile(np.asarray(values, dtype=np.float64), [10, 50, 90])
    return {"median": float(median), "p10": float(p10), "p90": float(p90)}


def _cell(m: Measurement, flops: dict[str, int], peak: float, reference: Measurement | None,
          exact: Measurement | None = None) -> dict:
    wall = spread(m.wall_s)
    in_stages = [sum(m.stage_s[s][r] for s in m.stage_s) for r in range(len(m.wall_s))]
    overhead = [w - t for w, t in zip(m.wall_s, in_stages)]
    stages = {}
    for name, spec in STAGES.items():
        if name not in m.stage_s:
            continue
        per_gen = float(np.median(m.stage_s[name]))
        achieved = flops.get(name, 0) / per_gen if per_gen > 0 else 0.0
        stages[name] = {
            "label": spec.label, "calls_per_generation": m.calls[name],
            "per_call_ms": {k: v * 1e3 for k, v in spread(m.call_s[name]).items()},
            "seconds_per_generation": per_gen, "share": per_gen / wall["median"],
            "flops_per_call": flops.get(name, 0) / m.calls[name], "flops_per_image": flops.get(name, 0) / m.batch,
            "achieved_flops": achieved, "roofline_fraction": achieved / peak}
    total_flops = sum(flops.values())
    cell = {
        "backend": m.backend, "batch": m.batch,
        "end_to_end_s": wall, "images_per_s": m.batch / wall["median"],
        "overhead_s": spread(overhead), "overhead_fraction": float(np.median([o / w for o, w in zip(overhead, m.wall_s)])),
        "stage_calls_s": spread(in_stages), "draws_ahead": m.draws_ahead,
        "draw_s": spread(m.draw_s), "draw_not_hidden_s": spread(m.draw_wait_s),
        "flops_per_image": total_flops / m.batch, "achieved_flops": total_flops / wall["median"],
        "peak_rss_mb": max(m.peak_rss_mb), "working_rss_mb": max(p - b for p, b in zip(m.peak_rss_mb, m.base_rss_mb)),
        "peak_gpu_mb": max(m.peak_gpu_mb) if m.peak_gpu_mb else None,
        "gpu_used_mb": max(m.gpu_used_mb) if m.gpu_used_mb else None,
        "largest_stage": max(stages, key=lambda s: stages[s]["seconds_per_generation"]),
        "largest_stage_by_flops": max(stages, key=lambda s: stages[s]["flops_per_image"]),
        "stages": stages, "raw": {"wall_s": m.wall_s, "stage_s": dict(m.stage_s), "draw_s": m.draw_s,
                                  "draw_not_hidden_s": m.draw_wait_s}}
    if reference is not None:  # paired per repeat: both ran in the same round
        cell["speedup_vs_torch"] = float(np.median([r / w for r, w in zip(reference.wall_s, m.wall_s)]))
    if m.sampler is not None:  # against the first sampler set (the exact sampler) on the same backend, paired too
        cell["sampler"] = m.sampler
        cell["speedup_vs_exact"] = float(np.median([r / w for r, w in zip(exact.wall_s, m.wall_s)]))
    return cell


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarize(result: BenchResult) -> dict:
    """Everything the report shows, as plain data."""
    by_key = {(m.backend, m.sampler, m.batch): m for m in result.measurements}
    first = next(iter(result.samplers)) if result.samplers else None
    cells = []
    for m in result.measurements:
        ref = by_key.get((REFERENCE_BACKEND, m.sampler, m.batch))
        peak = result.roofline[result.devices[m.backend]]["peak"]
        cell = _cell(m, result.flops[m.batch, m.sampler], peak, ref, by_key.get((m.backend, first, m.batch)))
        if result.samplers:
            cell["sampling"] = result.samplers[m.sampler].as_dict()
        cells.append(cell)
    return {
        "config": result.config["name"], "model_config": result.config,
        "machine": {"platform": platform.platform(), "processor": cpu_name(),
                    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "threads": result.threads, "cpus": os.cpu_count(), "torch": torch.__version__, "onnxruntime": onnxruntime().__version__},
        "sampling": {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(result.params).items()},
        "samplers": {name: p.as_dict() for name, p in result.samplers.items()} if result.samplers else None,
        "repeat": result.repeat, "warmup": result.warmup, "interleaved": True, "load_average": result.load_average,
        "backends": result.backends, "devices": result.devices, "roofline_flops": result.roofline,
        "cuda_graphs": result.graphs, "device_memory_mb": result.memory,
        "flops_per_generation": {" ".join(str(k) for k in key if k is not None): f for key, f in result.flops.items()},
        "results": cells}


def _range(d: dict[str, float], scale: float = 1.0, fmt: str = ".3g") -> str:
    return f"{d['median'] * scale:{fmt}} [{d['p10'] * scale:{fmt}}, {d['p90'] * scale:{fmt}}]"


def _gpu_memory(cell: dict) -> str:
    """The driver's used device memory, then PyTorch's allocator peak in brackets; '-' on the CPU."""
    if cell["gpu_used_mb"] is None:
        return "-"
    return f"{cell['gpu_used_mb']:.0f} [{cell['peak_gpu_mb']:.0f} torch]"


def _column(cell: dict) -> str:
    """A column's name: the backend, and the sampler set where the run compares samplers."""
    return cell["backend"] + (f" {cell['sampler']}" if "sampler" in cell else "")


def markdown(summary: dict) -> str:
    """The Markdown tables: end to end, then per stage."""
    s = summary["sampling"]
    by_sampler = bool(summary.get("samplers"))
    rl = "; ".join(f"{dev}: {v['peak'] / 1e9:.1f} GFLOP/s (" + ", ".join(f"{k} {x / 1e9:.1f}" for k, x in v.items()
                                                                          if k != "peak") + ")"
                   for dev, v in summary["roofline_flops"].items())
    lines = [
        f"# d2c-bench: {summary['config']}", "",
        f"- machine: {summary['machine']['processor']}, {summary['machine']['threads']} threads"
        + (f", GPU {summary['machine']['gpu']}" if summary['machine']['gpu'] else "")
        + f"; torch {summary['machine']['torch']}, onnxruntime {summary['machine']['onnxruntime']}",
        f"- sampling: num_iter {s['num_iter']}, diffusion_steps {s['diffusion_steps']}, cfg {s['cfg']} "
        f"({s['cfg_schedule']}), " + (f"{gpt['block_size']} discrete tokens" if (gpt := summary["model_config"]["gpt"])
                                      else "no discrete stage"),
        f"- {summary['repeat']} measured repeats after {summary['warmup']} warm-up, backends interleaved round-robin; "
        "times are median [p10, p90]",
        f"- fp32 matmul roofline: {rl}",
        f"- machine load (1-minute average, {summary['machine']['cpus']} CPUs): {summary['load_average']['start']:.1f} "
        f"at the start, {summary['load_average']['end']:.1f} at the end",
        "- backends: " + "; ".join(f"`{k}` {v}" for k, v in summary["backends"].items()),
        *[f"- CUDA graphs of `{k}`: " + ", ".join(f"{n} {c} replays" for n, c in g["replays"].items())
          + f", holding {g['memory_mb']:.1f} MB" for k, g in summary.get("cuda_graphs", {}).items()],
        *[f"- device memory of `{k}`: engines {m['engines']:.1f} MB, execution contexts {m['contexts']:.1f} MB, "
          f"CUDA graphs {m['graphs']:.1f} MB, other buffers {m['buffers']:.1f} MB (at the end)"
          for k, m in summary.get("device_memory_mb", {}).items()],
        "- draws: the time spent making the loop's random draws (`ahead`: by a producer thread while the stage calls "
        "run; else when the loop asks for them), and the part of it the loop waited for, not hidden by the stage calls",
        *[f"- sampler `{name}`: " + ", ".join(f"{k} {v}" for k, v in p.items() if k in SAMPLER_FIELDS + ("diffusion_floor",))
          for name, p in (summary.get("samplers") or {}).items()], "",
        "| batch | backend | end to end s | images/s | vs torch | " + ("vs exact | " if by_sampler else "")
        + "overhead | in stage calls s | draws s | draws not hidden s | GFLOP/image | peak RSS MB | GPU MB | "
        "largest stage by time | by FLOPs |",
        "|---:|---|---|---:|---:|" + ("---:|" if by_sampler else "") + "---:|---|---|---|---:|---:|---|---|---|"]
    for c in summary["results"]:
        speed = f"{c['speedup_vs_torch']:.2f}x" if "speedup_vs_torch" in c else "-"
        speed += f" | {c['speedup_vs_exact']:.2f}x" if by_sampler else ""
        largest = [c["stages"][c[k]] for k in ("largest_stage", "largest_stage_by_flops")]
        lines.append(f"| {c['batch']} | {_column(c)} | {_range(c['end_to_end_s'])} | {c['images_per_s']:.3g} | "
                     f"{speed} | {100 * c['overhead_fraction']:.2f}% | {_range(c['stage_calls_s'])} | "
                     f"{_range(c['draw_s'])}{' ahead' if c['draws_ahead'] else ''} | "
                     f"{_range(c['draw_not_hidden_s'])} | "
                     f"{c['flops_per_image'] / 1e9:.1f} | "
                     f"{c['peak_rss_mb']:.0f} | {_gpu_memory(c)} | " + " | ".join(f"{st['label']} ({100 * st['roofline_fraction']:.0f}% "
                                                                 "of roofline)" for st in largest) + " |")
    lines += ["", "| batch | backend | stage | calls | ms per call | s per generation | share | GFLOP per call | "
              "GFLOP/s | of roofline |", "|---:|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for c in summary["results"]:
        for st in c["stages"].values():
            lines.append(f"| {c['batch']} | {_column(c)} | {st['label']} | {st['calls_per_generation']} | "
                         f"{_range(st['per_call_ms'])} | {st['seconds_per_generation']:.3g} | "
                         f"{100 * st['share']:.1f}% | {st['flops_per_call'] / 1e9:.3g} | "
                         f"{st['achieved_flops'] / 1e9:.1f} | {100 * st['roofline_fraction']:.0f}% |")
    return "\n".join(lines) + "\n"


def _seconds(cell: dict, part: str) -> float:
    """Median seconds per generation of a stage, of the draws the loop waited for, or of the rest of the overhead."""
    if part == DRAWS:
        return cell["draw_not_hidden_s"]["median"]
    if part == OVERHEAD:
        return max(cell["overhead_s"]["median"] - cell["draw_not_hidden_s"]["median"], 0.0)
    return cell["stages"].get(part, {}).get("seconds_per_generation", 0.0)


def plot(summary: dict, path: Path) -> None:
    """Stacked time per generation by stage (left) and each stage's fraction of the roofline (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cells = summary["results"]
    names = [f"{_column(c)} x{c['batch']}" for c in cells]
    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(13, 2.2 + 0.5 * len(cells)))
    left = np.zeros(len(cells))
    parts = [(name, spec.label) for name, spec in STAGES.items()] + [(DRAWS, DRAWS), (OVERHEAD, OVERHEAD)]
    for stage, label in parts:
        widths = np.array([_seconds(c, stage) / c["batch"] for c in cells])
        if widths.any():
            ax_t.barh(names, widths, left=left, label=label)
            left += widths
    ax_t.set_xlabel("seconds per image (median generation / batch)")
    ax_t.set_title(f"{summary['config']}: time by stage")
    ax_t.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    ax_t.invert_yaxis()
    stages = [s for s in STAGES if any(s in c["stages"] for c in cells)]
    height = 0.8 / max(len(stages), 1)
    for i, stage in enumerate(stages):
        ys = np.arange(len(cells)) + (i - (len(stages) - 1) / 2) * height
        ax_r.barh(ys, [100 * c["stages"].get(stage, {}).get("roofline_fraction", 0.0) for c in cells], height=height,
                  label=STAGES[stage].label)
    ax_r.set_yticks(np.arange(len(cells)), names)
    ax_r.invert_yaxis()
    ax_r.axvline(100, color="black", lw=0.8)
    ax_r.set_xlabel("achieved FLOP/s, % of the fp32 matmul roofline")
    ax_r.set_title("stage efficiency")
    ax_r.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(result: BenchResult, out: str | Path, with_plot: bool = True) -> dict[str, Path]:
    """Write bench.json, bench.md (and bench.png) into `out`; returns the paths."""
    out = Path(out)
    summary = summarize(result)
    paths = {"json": out / REPORT_FILES[0], "md": out / REPORT_FILES[1]}
    write_json_atomic(paths["json"], summary)
    write_text_atomic(paths["md"], markdown(summary))
    if with_plot:
        paths["png"] = out / REPORT_FILES[2]
        plot(summary, paths["png"])
    return paths
