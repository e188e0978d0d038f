"""The layout's promises: a stage is one spec, an engines directory is opened once, no import cycles, small files."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from d2c_export import engines as engines_module
from d2c_export.backends import BACKENDS, BackendSpec, Precision, Target, open_backend
from d2c_export.backends.base import Wrapper
from d2c_export.backends.hooks import FlopCounted
from d2c_export.backends.pytorch import TorchBackend
from d2c_export.bench.report import markdown, summarize
from d2c_export.bench.run import run_benchmark
from d2c_export.cli import bench_main, export_main, quality_main, run_cli, run_main
from d2c_export.engines import Engines
from d2c_export.manifest import Manifest
from d2c_export.export.onnx import export_model
from d2c_export.generate import generate_images
from d2c_export.sources import ModelRequest, build_model
from d2c_export.stages import STAGES, StageSpec, TensorSpec
from d2c_export.verify.parity import check_engines
from reference.pipeline import SamplingParams
from tests.d2c_export.cli_helpers import assert_one_line_error

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("d2c_export", "reference", "training")
MAX_LINES = 420  # "files under about 400 lines"
PARAMS = SamplingParams(cfg=2.0, num_iter=2, diffusion_steps=3)
TOY_FLOPS_PER_IMAGE = 7


class Clamp(nn.Module):
    def forward(self, images):
        return images.clamp(-0.5, 0.5)


def _images(c, name: str) -> TensorSpec:
    return TensorSpec(name, torch.float32, ("batch", 3, c.image_size, c.image_size))


TOY = StageSpec(
    name="clamp", label="clamp post-process", runs="once per generation, after vae",
    inputs=lambda c: (_images(c, "images"),), outputs=lambda c: (_images(c, "clamped"),),
    wrapper=lambda model: Clamp(), axes=lambda c, b: {"batch": (1, 2, b)},
    example=lambda c, s, gen: {"images": torch.randn(s["batch"], 3, c.image_size, c.image_size, generator=gen)},
    flops=lambda c, shapes: TOY_FLOPS_PER_IMAGE * shapes["images"][0], postprocess=True)


@pytest.fixture()
def toy_engines(monkeypatch, tmp_path) -> Engines:
    """d2c-tiny exported with a test-only sixth stage registered: nothing outside its spec knows it."""
    monkeypatch.setitem(STAGES, TOY.name, TOY)
    model, source = build_model(ModelRequest(config="d2c-tiny"))
    export_model(model, tmp_path / "engines", source, max_batch=2, progress=False)
    return Engines.open(tmp_path / "engines")


def test_a_registered_stage_is_picked_up_everywhere(toy_engines):
    engines = toy_engines
    # export and the manifest
    entry = engines.entry("clamp", "onnx-fp32")
    assert engines.file("clamp", "onnx-fp32").name == "clamp.onnx"
    assert [t["name"] for t in entry.inputs] == ["images"] and entry.profile == {"batch": [1, 2, 2]}
    # ONNX Runtime execution, inside a generation (after the vae), timed and FLOP-counted
    with open_backend(engines, Target.parse("ort")) as ort:
        assert "clamp" in ort.sessions
        counter = FlopCounted(ort)
        result, timer = generate_images(counter, [1, 3], PARAMS, seed=0)
    assert timer.calls["clamp"] == 1 and counter.flops["clamp"] == 2 * TOY_FLOPS_PER_IMAGE
    assert float(result.images.abs().max()) <= 0.5 < float(generate_images(
        open_backend(engines, Target.parse("torch"), device="cpu"), [1, 3], PARAMS, seed=0)[0].latents.abs().max())
    # the parity check
    reports = check_engines(engines, [Target.parse("ort")])
    toy = [r for r in reports if r.stage == "clamp"]
    assert len(toy) == 3 and all(r.passed for r in toy)
    # the benchmark's labels
    bench = run_benchmark(engines, [Target.parse("torch"), Target.parse("ort")], [1], PARAMS, repeat=1, warmup=1,
                          threads=1, progress=False)
    summary = summarize(bench)
    assert all(c["stages"]["clamp"]["label"] == "clamp post-process" for c in summary["results"])
    assert all(c["stages"]["clamp"]["flops_per_image"] == TOY_FLOPS_PER_IMAGE for c in summary["results"])
    assert "clamp post-process" in markdown(summary)


class Mirror(Wrapper):
    """A test-only backend: the PyTorch modules on the CPU under another name, counting what it opens and closes."""

    opened = closed = 0

    def __init__(self, engines: Engines, precision: Precision):
        super().__init__(TorchBackend(engines, "cpu", precision))
        self.target = Target("mirror", precision)
        self.description = f"mirror of {self.inner.description}"
        Mirror.opened += 1

    def close(self) -> None:
        self.inner.close()
        Mirror.closed += 1


MIRROR = BackendSpec(name="mirror", summary="test-only", precisions=(Precision.FP32,),
                     open=lambda engines, precision, options: Mirror(engines, precision), tolerance_as="torch")


def test_a_registered_backend_is_offered_everywhere(monkeypatch, engines_factory, tmp_path, capsys):
    """One registration: every command, the benchmark and the server offer it, and every holder closes it."""
    from d2c_export.bulk.cli import generate_cli
    from d2c_export.bulk.run import make_plan
    from d2c_export.bulk.workers import ShardWorker, WorkerSpec
    from d2c_export.serve.app import ServeOptions, check_options
    from d2c_export.serve.cli import serve_cli
    monkeypatch.setitem(BACKENDS, MIRROR.name, MIRROR)
    directory = str(engines_factory("d2c-tiny"))
    engines = Engines.open(directory)
    fast = ["--num-iter", "2", "--diffusion-steps", "3", "--quiet"]
    for command in (run_cli, generate_cli, serve_cli):
        assert "mirror" in CliRunner().invoke(command, ["--help"]).output, command.name
    # d2c-run: the image the PyTorch backend makes
    for name in ("torch", "mirror"):
        assert run_main(["--engines", directory, "--class", "3", "--backend", name, "--out",
                         str(tmp_path / f"{name}.png"), *fast]) == 0, capsys.readouterr().err
    assert (tmp_path / "mirror.png").read_bytes() == (tmp_path / "torch.png").read_bytes()
    # the parity check, the benchmark and the quality gate
    assert export_main(["check", "--engines", directory, "--backend", "mirror"]) == 0
    assert " 0 failed" in capsys.readouterr().out
    assert bench_main(["--engines", directory, "--backends", "torch,mirror", "--batch", "1", "--repeat", "1",
                       "--no-plot", "--out", str(tmp_path / "bench"), *fast]) == 0, capsys.readouterr().err
    assert "mirror" in (tmp_path / "bench" / "bench.md").read_text()
    assert quality_main(["--engines", directory, "--backends", "torch,mirror", "--per-class", "1",
                         "--real-per-class", "2", *fast]) == 0, capsys.readouterr().err
    # bulk generation: the plan takes it and a worker opens it, generates a shard and gives it back
    plan = make_plan(engines, SamplingParams(cfg=2.0, num_iter=2, diffusion_steps=3), "mirror", "fp32", [1, 2], 1,
                     None, 0, None)
    worker = ShardWorker(0, WorkerSpec(directory, "mirror", "fp32", 1.0, 0.0, 1), plan)
    assert len(worker.generate(plan.shards()[0])["pngs"]) == 2
    worker.close()
    # serving: the server's check takes it, and a replica opens it as d2c-run does (`open_named`)
    assert check_options(ServeOptions(engines_dir=directory, backend="mirror")).max_batch == engines.max_batch
    assert Mirror.opened == Mirror.closed == 5  # d2c-run, check, bench, quality and the worker: each closed it


@pytest.fixture()
def counted(monkeypatch):
    """Counts of manifest reads and model rebuilds."""
    counts = {"reads": 0, "builds": 0}
    read, build = Manifest.read.__func__, engines_module.model_from_source

    def counting_read(cls, path):
        counts["reads"] += 1
        return read(cls, path)

    def counting_build(*args):
        counts["builds"] += 1
        return build(*args)

    monkeypatch.setattr(Manifest, "read", classmethod(counting_read))
    monkeypatch.setattr(engines_module, "model_from_source", counting_build)
    return counts


@pytest.mark.parametrize("command,argv,builds", [
    (export_main, ["check"], 1),
    (run_main, ["--class", "1", "--class", "2", "--backend", "torch", "--num-iter", "2", "--diffusion-steps", "3",
                "--out", "{tmp}/x.png", "--quiet"], 1),
    (run_main, ["--class", "1", "--backend", "ort", "--num-iter", "2", "--diffusion-steps", "3", "--out", "{tmp}/x.png",
                "--quiet"], 0),
    (bench_main, ["--backends", "torch,ort", "--batch", "1,2", "--num-iter", "2", "--diffusion-steps", "2",
                  "--repeat", "1", "--no-plot", "--out", "{tmp}/bench", "--quiet"], 1),
], ids=["check", "run-torch", "run-ort", "bench"])
def test_engines_are_opened_once_per_command(engines_factory, counted, tmp_path, capsys, command, argv, builds):
    engines = engines_factory("d2c-tiny")
    argv = [a.format(tmp=tmp_path) for a in argv]
    argv = argv[:1] + ["--engines", str(engines)] + argv[1:] if command is export_main else ["--engines", str(engines),
                                                                                              *argv]
    assert command(argv) == 0, capsys.readouterr().err
    assert counted == {"reads": 1, "builds": builds}


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Modules of the project that `path` imports anywhere (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else ".".join(module.split(".")[:-node.level] + [node.module])
            subs = {f"{base}.{a.name}" for a in node.names} & known
            out |= subs or ({base} & known)
    return out


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` (node -> the nodes it points to), as the path that closes it, or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for other in sorted(graph.get(node, ())):
            if state.get(other) == 1:
                return path[path.index(other):] + [node, other] if other in path else [node, other]
            if other not in state and (found := visit(other, path + [node])):
                return found
        state[node] = 2
        return None

    return next((c for node in sorted(graph) if node not in state and (c := visit(node, []))), None)


def test_no_import_cycles():
    modules = _modules()
    graph = {m: _imports(p, m if not p.name == "__init__.py" else m + ".__init__", set(modules)) - {m}
             for m, p in modules.items()}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert not graph["reference.pipeline"] & {m for m in modules if m.startswith(("d2c_export", "training"))}


def _room(module: str) -> str:
    """The part of the layout a module belongs to: a package of `d2c_export` (`d2c_export/backends/`), a module of
    its own (`d2c_export/engines.py`), or a whole top-level package (`reference/`)."""
    parts = module.split(".")
    if parts[0] != "d2c_export" or len(parts) == 1:
        return parts[0] + "/"
    return f"d2c_export/{parts[1]}/" if (ROOT / "d2c_export" / parts[1]).is_dir() else f"d2c_export/{parts[1]}.py"


def test_no_import_runs_back_up():
    """Drawn as folders and files, the imports form layers: no folder imports a module that imports it back
    (`cli.py` and `bulk/`, say), which a cycle-free module graph alone does not promise."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for m, p in modules.items():
        graph.setdefault(_room(m), set()).update(_room(n) for n in _imports(p, m, set(modules)) if _room(n) != _room(m))
    cycle = _cycle(graph)
    assert cycle is None, "an import runs back up: " + " -> ".join(cycle)


def test_the_reference_depends_on_nothing_else_of_the_project():
    modules = _modules()
    for m, p in modules.items():
        if m.startswith("reference"):
            bad = {n for n in _imports(p, m, set(modules)) if not n.startswith("reference")}
            assert not bad, (m, bad)


def test_files_stay_small():
    long = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_build_or_profiler_output_is_tracked():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    bad = [f for f in tracked if f.endswith((".onnx", ".onnx.data", ".plan", ".cache")) or "profile" in Path(f).name
           and f.endswith(".json")]
    assert not bad, bad


def test_click_runner_sees_one_line_errors(tmp_path):
    result = CliRunner().invoke(run_cli, ["--engines", str(tmp_path / "none"), "--class", "1",
                                          "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert_one_line_error(result.exit_code, result.output, "does not exist", "d2c-export onnx")
    help_text = CliRunner().invoke(run_cli, ["--help"])
    assert help_text.exit_code == 0 and "--diffusion-steps" in help_text.output and "recommended" in help_text.output


def test_the_installed_commands_run_as_processes(engines_factory, tmp_path):
    bin_dir = Path(sys.executable).parent
    out = tmp_path / "img.png"
    ok = subprocess.run([bin_dir / "d2c-run", "--engines", engines_factory("d2c-tiny"), "--class", "4", "--quiet",
                         "--num-iter", "2", "--diffusion-steps", "3", "--out", out], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([bin_dir / "d2c-export", "check", "--engines", tmp_path / "missing"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error:")
