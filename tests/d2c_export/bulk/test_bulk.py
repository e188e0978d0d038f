"""`d2c-generate` on the session's Ray instance: bytes equal to a single-process run, exactly once through a killed
worker and a killed driver, refusals in one line, and `d2c-quality --samples` on the result."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from d2c_export.backends import open_named
from d2c_export.bulk.cli import generate_main
from d2c_export.bulk.run import ClusterRequest, generate_bulk, make_plan
from d2c_export.bulk.shards import SHARDS_DIR, ShardStore, png_name
from d2c_export.cli import quality_main
from d2c_export.engines import Engines
from d2c_export.generate import generate_images
from d2c_export.images import png_bytes, read_png, to_uint8
from reference.files import leftover_temporaries
from reference.pipeline import SamplingParams
from tests.d2c_export.cli_helpers import assert_one_line_error, run_cli

# d2c-tiny (max batch 4): 40 images of 4 classes in 10 shards, slow enough (~0.2 s a shard) to be killed midway
CLASSES, PER_CLASS, SEED, BATCH = [0, 3, 5, 9], 10, 7, 4
STEPS = {"num_iter": 4, "diffusion_steps": 400}
N = len(CLASSES) * PER_CLASS
KILL_TIMEOUT_S = 90


def argv(engines: Path, out: Path, *extra) -> list[str]:
    return ["--engines", str(engines), "--out", str(out), "--classes", ",".join(map(str, CLASSES)),
            "--per-class", str(PER_CLASS), "--seed", str(SEED), "--batch", str(BATCH), "--backend", "ort",
            "--num-iter", str(STEPS["num_iter"]), "--diffusion-steps", str(STEPS["diffusion_steps"]),
            "--worker-cpus", "0.5", "--quiet", *extra]


@pytest.fixture(scope="module")
def engines(engines_factory, ray_local) -> Path:
    return engines_factory("d2c-tiny")


@pytest.fixture(scope="module")
def expected(engines) -> list[bytes]:
    """The PNG bytes of a single-process run: image i of class CLASSES[i // PER_CLASS], seed SEED + i, all at once."""
    e = Engines.open(engines)
    params = SamplingParams(**{**vars(e.sampling), **STEPS})
    labels = [CLASSES[i // PER_CLASS] for i in range(N)]
    out = []
    with open_named(e, "ort", "fp32", 1) as stages:
        for start in range(0, N, e.max_batch):
            stop = min(start + e.max_batch, N)
            result, _ = generate_images(stages, labels[start:stop], params, list(range(SEED + start, SEED + stop)))
            out += [png_bytes(p) for p in to_uint8(result.images)]
    return out


def assert_complete(out: Path, expected: list[bytes]) -> dict:
    """Exactly the N numbered PNGs with the expected bytes, no temporary left, the .npz of the same pixels."""
    names = sorted(p.name for p in out.iterdir() if p.suffix == ".png")
    assert names == [png_name(i) for i in range(N)]
    assert not leftover_temporaries(out) and not leftover_temporaries(out / SHARDS_DIR)
    assert [(out / png_name(i)).read_bytes() for i in range(N)] == expected
    arr = np.load(ShardStore(out).npz)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (N, 16, 16, 3)
    np.testing.assert_array_equal(arr, np.stack([read_png(out / png_name(i)) for i in range(N)]))
    record = json.loads((out / "samples.json").read_text())
    assert record["complete"] and record["labels"] == [CLASSES[i // PER_CLASS] for i in range(N)]
    return record


def test_two_workers_write_the_bytes_of_one_process_and_a_rerun_skips_them(engines, expected, tmp_path, capsys):
    out = tmp_path / "samples"
    assert generate_main(argv(engines, out, "--workers", "2")) == 0
    record = assert_complete(out, expected)
    (run,) = record["runs"]
    assert run["workers"] == 2 and sum(w["images"] for w in run["per_worker"]) == N
    assert all(w["images"] > 0 and w["images_per_s"] > 0 for w in run["per_worker"])
    assert record["settings"]["engines_sha256"] and record["settings"]["sampling"]["diffusion_steps"] == 400
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert generate_main(argv(engines, out, "--workers", "1")) == 0  # nothing to do: no worker, no file rewritten
    assert len(json.loads((out / "samples.json").read_text())["runs"]) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    # other settings into the same directory: refused in one line, nothing touched
    code, err = run_cli(generate_main, argv(engines, out, "--cfg", "2.0"), capsys)
    assert_one_line_error(code, err, "other settings", "cfg 2.0 (recorded")
    code, err = run_cli(generate_main, argv(engines, out, "--seed", "8"), capsys)
    assert_one_line_error(code, err, "seed 8 (recorded 7)")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_a_killed_worker_is_restarted_by_ray_and_the_set_completes(engines, expected, tmp_path):
    e = Engines.open(engines)
    params = SamplingParams(**{**vars(e.sampling), **STEPS})
    plan = make_plan(e, params, "ort", "fp32", CLASSES, PER_CLASS, None, SEED, BATCH)
    killed: list[dict] = []

    def kill_first(shard, result):  # SIGKILL the worker process that sent the first shard, while it holds another
        if not killed:
            os.kill(result["pid"], signal.SIGKILL)
            killed.append(result)

    out = tmp_path / "samples"
    record = generate_bulk(e, plan, out, ClusterRequest(workers=2, worker_cpus=0.5), on_result=kill_first)
    assert killed
    assert_complete(out, expected)
    (run,) = record["runs"]
    victim = run["per_worker"][killed[0]["rank"]]
    assert victim["processes"] == 2, victim  # the same worker answered from a new process after the kill


def test_a_driver_killed_midway_resumes_with_the_same_command(engines, expected, tmp_path):
    import ray
    out = tmp_path / "samples"
    command = argv(engines, out, "--workers", "1", "--address", ray.get_runtime_context().gcs_address)
    driver = subprocess.Popen([Path(sys.executable).parent / "d2c-generate", *command], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    records = out / SHARDS_DIR
    deadline = time.monotonic() + KILL_TIMEOUT_S
    try:
        while not (records.is_dir() and any(records.glob("*.json"))):
            assert driver.poll() is None, f"the driver ended before its first shard: {driver.stderr.read()}"
            assert time.monotonic() < deadline, "no shard was recorded in time"
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait(timeout=30)
    finished = len(list(records.glob("*.json")))
    assert 1 <= finished < N // BATCH, finished  # killed midway, not after the end
    assert not ShardStore(out).npz.exists()
    assert generate_main(command) == 0  # the same command, in this process
    record = assert_complete(out, expected)
    (run,) = record["runs"]  # the killed run recorded nothing; the rerun generated only what was missing
    assert run["images"] <= N - BATCH


def test_quality_scores_a_generated_directory_on_the_gate_path(engines, expected, tmp_path, capsys):
    import torch

    from d2c_export.verify.quality import DEFAULT_CLASSIFIER, real_features, score_images
    from training.classifier import load_classifier
    out = tmp_path / "samples"
    assert generate_main(argv(engines, out, "--workers", "1")) == 0
    capsys.readouterr()
    assert quality_main(["--samples", str(out), "--real-per-class", "8", "--json", str(tmp_path / "q.json")]) == 0
    printed = capsys.readouterr().out
    (report,) = json.loads((tmp_path / "q.json").read_text())["reports"]
    assert report["images"] == N and f"| {N} | {report['accuracy']:.1f} | {report['frechet']:.3f} |" in printed
    classifier = load_classifier(DEFAULT_CLASSIFIER)
    pixels = np.load(ShardStore(out).npz)["arr_0"]
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    acc, fd = score_images(classifier, images, [CLASSES[i // PER_CLASS] for i in range(N)],
                           real_features(classifier, 8))
    assert (report["accuracy"], report["frechet"]) == pytest.approx((acc, fd))


@pytest.mark.parametrize("extra, needle", [
    (("--classes", "3,10"), "class 10 is out of range"),
    (("--num-images", "41"), "--per-class or --num-images"),
    (("--batch", "5"), "exceed max batch 4; use a smaller --batch"),
])
def test_bad_requests_are_one_line_before_any_work(engines, tmp_path, capsys, extra, needle):
    out = tmp_path / "samples"
    code, err = run_cli(generate_main, argv(engines, out, *extra), capsys)
    assert_one_line_error(code, err, needle)
    assert not out.exists()


def test_a_directory_of_other_files_is_refused(engines, tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("x")
    code, err = run_cli(generate_main, argv(engines, tmp_path), capsys)
    assert_one_line_error(code, err, "not from d2c-generate", "mine.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
