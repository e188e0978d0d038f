"""Hostile bulk directories and careless `d2c-generate` commands: damaged or edited samples.json, shard records, PNGs
and DIR.npz; outputs that cannot be written; clusters that cannot place the workers; SIGTERM to the driver. Refusals
are one line, exit 2, nothing created or replaced; a damaged run is repaired by the same command."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from d2c_export.bulk import workers as bulk_workers
from d2c_export.bulk.cli import generate_main
from d2c_export.bulk.shards import SHARDS_DIR, ShardStore, png_name
from d2c_export.cli import quality_main
from tests.d2c_export.cli_helpers import assert_one_line_error, snapshot

CLASSES, PER_CLASS, BATCH = [1, 4], 4, 2  # 8 images in 4 shards of d2c-tiny, a few steps each
DEEP = "[" * 100_000 + "]" * 100_000
WORKERS = ("--workers", "1", "--worker-cpus", "0.5")  # half of the session's 2-CPU Ray instance


def argv(engines: Path, out: Path, *extra) -> list[str]:
    return ["--engines", str(engines), "--out", str(out), "--classes", ",".join(map(str, CLASSES)), "--per-class",
            str(PER_CLASS), "--batch", str(BATCH), "--backend", "ort", "--num-iter", "2", "--diffusion-steps", "3",
            "--quiet", *extra]


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming width x height pixels (no image data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def edit_samples(edit):
    def setup(run: Path) -> None:
        data = json.loads((run / "samples.json").read_text())
        edit(data)
        (run / "samples.json").write_text(json.dumps(data))
    return setup


def settings_field(key, value):
    return edit_samples(lambda d: d["settings"].__setitem__(key, value))


def write(relative: str, content: bytes | str, rerecord: bool = False):
    """Replace a file of the run; `rerecord`: rewrite its shard record's sha256 to match, as an attacker would."""
    def setup(run: Path) -> None:
        path = run / relative
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        if rerecord:
            record_path = run / SHARDS_DIR / f"{int(path.stem) // BATCH:06d}.json"
            record = json.loads(record_path.read_text())
            record["sha256"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
            record_path.write_text(json.dumps(record))
    return setup


def copy_png(src: int, dst: int):
    return lambda run: shutil.copy(run / png_name(src), run / png_name(dst))


def fifo(relative: str):
    def setup(run: Path) -> None:
        (run / relative).unlink()
        os.mkfifo(run / relative)
    return setup


def other_size_png(run: Path) -> None:
    from PIL import Image
    Image.new("RGB", (32, 32)).save(run / png_name(3))
    write(png_name(3), (run / png_name(3)).read_bytes(), rerecord=True)(run)


QUALITY = ["--samples", "{run}", "--real-per-class", "4", "--quiet"]
SAMPLES = [  # (id, command, argv, setup, needles); {run}: a finished run of CLASSES x PER_CLASS
    ("q-samples-deep", quality_main, QUALITY, write("samples.json", DEEP), ["samples.json", "deeper than"]),
    ("q-samples-list", quality_main, QUALITY, write("samples.json", "[]"), ["samples.json", "not an object"]),
    ("q-samples-huge", quality_main, QUALITY, lambda run: os.truncate(run / "samples.json", 100 << 20),
     ["samples.json", "bytes"]),
    ("q-no-settings", quality_main, QUALITY, edit_samples(lambda d: d.pop("settings")), ["samples.json",
                                                                                         "settings"]),
    ("q-settings-string", quality_main, QUALITY, edit_samples(lambda d: d.__setitem__("settings", "x")),
     ["samples.json", "settings"]),
    ("q-no-model", quality_main, QUALITY, edit_samples(lambda d: d["settings"].pop("model")), ["samples.json",
                                                                                               "model"]),
    ("q-sampling-list", quality_main, QUALITY, settings_field("sampling", [1]), ["samples.json", "sampling"]),
    ("q-labels-empty", quality_main, QUALITY, edit_samples(lambda d: d.__setitem__("labels", [])),
     ["samples.json", "labels"]),
    ("q-label-negative", quality_main, QUALITY, edit_samples(lambda d: d["labels"].__setitem__(0, -1)),
     ["samples.json", "labels[0]"]),
    ("q-labels-strings", quality_main, QUALITY, edit_samples(lambda d: d.__setitem__("labels", ["a"] * 8)),
     ["samples.json", "labels[0]"]),
    ("q-relabelled", quality_main, QUALITY, edit_samples(lambda d: d.__setitem__("labels", [1] * 8)),
     ["samples.json", "labels"]),
    ("q-complete-string", quality_main, QUALITY, edit_samples(lambda d: d.__setitem__("complete", "yes")),
     ["samples.json", "complete"]),
    ("q-class-outside-the-classifier", quality_main, QUALITY, edit_samples(
        lambda d: (d["settings"].__setitem__("classes", [1, 40]), d.__setitem__("labels", [1] * 4 + [40] * 4))),
     ["class 40", "10 classes"]),
    ("q-png-replaced", quality_main, QUALITY, copy_png(1, 0), ["000000.png", "shard record"]),
    ("q-png-bomb", quality_main, QUALITY, write(png_name(0), png_header(20000, 20000), rerecord=True),
     ["000000.png", "400000000 pixels"]),
    ("q-png-bomb-unrecorded", quality_main, QUALITY, write(png_name(0), png_header(20000, 20000)),
     ["000000.png", "shard record"]),
    ("q-png-other-size", quality_main, QUALITY, other_size_png, ["000003.png", "32 x 32 pixels, not 16 x 16"]),
    ("q-png-fifo", quality_main, QUALITY, fifo(png_name(2)), ["000002.png", "not a regular file"]),
    ("q-record-deep", quality_main, QUALITY, write(f"{SHARDS_DIR}/000000.json", DEEP), ["000000.json"]),
    ("q-record-list", quality_main, QUALITY, write(f"{SHARDS_DIR}/000001.json", "[1]"), ["000001.json"]),
    ("q-record-missing", quality_main, QUALITY, lambda run: (run / SHARDS_DIR / "000003.json").unlink(),
     ["000003.json"]),
    ("q-json-is-samples-json", quality_main, [*QUALITY, "--json", "{run}/samples.json"], None,
     ["--json", "samples.json", "input"]),
    ("q-json-is-a-png", quality_main, [*QUALITY, "--json", "{run}/000001.png"], None, ["--json", "000001.png",
                                                                                      "input"]),
    ("g-samples-deep", generate_main, [], write("samples.json", DEEP), ["samples.json", "deeper than"]),
    ("g-samples-list", generate_main, [], write("samples.json", "[]"), ["samples.json", "not an object"]),
    ("g-settings-string", generate_main, [], edit_samples(lambda d: d.__setitem__("settings", "x")),
     ["samples.json", "settings"]),
    ("g-labels-edited", generate_main, [], edit_samples(lambda d: d.__setitem__("labels", [4] * 8)),
     ["samples.json", "labels"]),
    ("g-settings-seed-string", generate_main, [], settings_field("seed", "7"), ["samples.json", "settings.seed"]),
    ("g-out-loop", generate_main, ["--out", "{ws}/loop"], None, ["--out", "symlink loop"]),
    ("g-out-through-loop", generate_main, ["--out", "{ws}/loop/s"], None, ["--out", "symlink loop"]),
    ("g-out-empty", generate_main, ["--out", ""], None, ["--out", "empty"]),
    ("g-out-unwritable", generate_main, ["--out", "/proc/samples"], None, ["--out", "/proc"]),
    ("g-out-a-file", generate_main, ["--out", "{ws}/afile"], None, ["--out", "afile", "not a directory"]),
    ("g-npz-loop", generate_main, ["--out", "{ws}/new"], lambda run: (run.parent / "new.npz").symlink_to(
        run.parent / "new.npz"), ["--out", "new.npz", "symlink loop"]),
    ("g-num-images-billions", generate_main, ["--out", "{ws}/new", "--num-images", str(4 * 10 ** 9)], None,
     ["--num-images"]),
    ("g-per-class-billions", generate_main, ["--out", "{ws}/new", "--per-class", str(10 ** 9)], None,
     ["--per-class"]),
    ("g-too-many-images", generate_main, ["--out", "{ws}/new", "--per-class", "600000"], None,
     ["1200000 images", "1000000"]),
    ("g-workers-1000", generate_main, ["--out", "{ws}/new", "--workers", "1000"], None, ["--workers"]),
    ("g-workers-3-on-2-cpus", generate_main, ["--out", "{ws}/new", "--workers", "3"], None,
     ["cannot place 3 workers", "--workers"]),
    ("g-workers-3-of-0.99-cpus", generate_main, ["--out", "{ws}/new", "--workers", "3", "--worker-cpus", "0.99"],
     None, ["cannot place 3 workers"]),
    ("g-worker-cpus-3", generate_main, ["--out", "{ws}/new", "--workers", "1", "--worker-cpus", "3"], None,
     ["cannot place 1 workers", "--worker-cpus"]),
]


@pytest.fixture(scope="module")
def engines(engines_factory, ray_local) -> Path:
    return engines_factory("d2c-tiny")


@pytest.fixture(scope="module")
def finished_run(engines, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("bulk_hostile") / "run"
    assert generate_main(argv(engines, run, "--workers", "2", "--worker-cpus", "0.5")) == 0
    return run


@pytest.fixture()
def workspace(finished_run, tmp_path, monkeypatch) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    shutil.copytree(finished_run, ws / "run", symlinks=True)
    shutil.copy(ShardStore(finished_run).npz, ws / "run.npz")
    (ws / "afile").write_text("a file")
    (ws / "loop").symlink_to(ws / "loop")
    monkeypatch.chdir(ws)
    return ws


def test_every_class_has_cases():
    kinds = {case[0].split("-")[1] for case in SAMPLES}
    assert {"samples", "png", "record", "out", "workers"} <= kinds and len(SAMPLES) >= 40


@pytest.mark.parametrize("case_id,main,extra,setup,needles", SAMPLES, ids=[c[0] for c in SAMPLES])
def test_hostile_bulk_input_is_refused_cleanly(engines, workspace, capsys, case_id, main, extra, setup, needles):
    run = workspace / "run"
    if setup is not None:
        setup(run)
    args = [a.format(run=run, ws=workspace) for a in extra]
    if main is generate_main:
        args = argv(engines, run) + args  # a later --out wins
    before = snapshot(workspace)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert_one_line_error(code, err, *needles)
    assert snapshot(workspace) == before, "a file was created, replaced or left behind"


def _truncate_npz(run: Path) -> None:
    npz = ShardStore(run).npz
    npz.write_bytes(npz.read_bytes()[:100])


REPAIRS = [  # (id, setup): the same command completes the run again, every file as a clean run writes it
    ("npz-truncated", _truncate_npz),
    ("npz-missing", lambda run: ShardStore(run).npz.unlink()),
    ("png-replaced", copy_png(1, 0)),
    ("record-deep", write(f"{SHARDS_DIR}/000000.json", DEEP)),
    ("record-sha-list", write(f"{SHARDS_DIR}/000001.json", '{"shard": 1, "start": 2, "stop": 4, "worker": {}, '
                                                             '"sha256": []}')),
]


@pytest.mark.parametrize("case_id,setup", REPAIRS, ids=[c[0] for c in REPAIRS])
def test_a_damaged_run_is_repaired_by_the_same_command(engines, finished_run, workspace, case_id, setup):
    run = workspace / "run"
    setup(run)
    assert generate_main(argv(engines, run, *WORKERS)) == 0
    for i in range(len(CLASSES) * PER_CLASS):
        assert (run / png_name(i)).read_bytes() == (finished_run / png_name(i)).read_bytes()
    assert ShardStore(run).npz.read_bytes() == ShardStore(finished_run).npz.read_bytes()
    record = json.loads((run / "samples.json").read_text())
    assert record["complete"] and record["npz_sha256"] == hashlib.sha256(ShardStore(run).npz.read_bytes()).hexdigest()


def test_an_unreachable_cluster_creates_nothing(engines, tmp_path, capsys, monkeypatch):
    from d2c_export import ray_cluster
    from d2c_export.errors import ClusterUnreachable, Setting

    def unreachable(address, num_cpus=None):
        raise ClusterUnreachable("cannot connect to the Ray cluster at ", Setting("address", address), " (timed out)")
    monkeypatch.setattr(ray_cluster, "connect", unreachable)
    out = tmp_path / "samples"
    code, err = generate_main(argv(engines, out, *WORKERS, "--address", "ray://192.0.2.1:10001")), \
        capsys.readouterr().err
    assert_one_line_error(code, err, "--address")
    assert list(tmp_path.iterdir()) == []


def test_resources_that_stay_taken_fail_in_bounded_time(engines, tmp_path, capsys, monkeypatch):
    """Another job holds every CPU of the cluster: the run fails with one line after the placement timeout."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    monkeypatch.setattr(bulk_workers, "PLACEMENT_TIMEOUT_S", 2.0)
    holder = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])  # all of them, once they are free
    assert holder.wait(timeout_seconds=60)
    try:
        out = tmp_path / "samples"
        code, err = generate_main(argv(engines, out, *WORKERS)), capsys.readouterr().err
    finally:
        remove_placement_group(holder)
    assert_one_line_error(code, err, "did not free", "2 s")
    assert sorted(p.name for p in out.iterdir()) == ["samples.json"]  # a claimed, resumable, empty run


def test_sigterm_to_the_driver_ends_as_an_interrupt_does(engines, finished_run, tmp_path):
    import ray
    out = tmp_path / "samples"
    command = argv(engines, out, *WORKERS, "--diffusion-steps", "300", "--address",
                   ray.get_runtime_context().gcs_address)
    driver = subprocess.Popen([Path(sys.executable).parent / "d2c-generate", *command], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    records = out / SHARDS_DIR
    deadline = time.monotonic() + 90
    try:
        while not (records.is_dir() and any(records.glob("*.json"))):
            assert driver.poll() is None, f"the driver ended before its first shard: {driver.stderr.read()}"
            assert time.monotonic() < deadline, "no shard was recorded in time"
            time.sleep(0.02)
        driver.send_signal(signal.SIGTERM)
        err = driver.communicate(timeout=60)[1]
    finally:
        driver.kill()
    assert driver.returncode == 128 + signal.SIGTERM, err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: terminated (SIGTERM); nothing was written under a final name"], err
    assert not any(word in err for word in ("Traceback", "Aborted", "core dumped", "Stack trace", "*** SIG")), err
    assert generate_main(command[:-2]) == 0  # the same run resumes in this process
