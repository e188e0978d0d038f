"""Files written whole or not at all, and their digests: the one I/O module of the project.

Every file the project writes goes through `atomic_path` (one file) or `publish_dir` (the files a
step makes together, such as a graph and its external weights): the bytes are written under a
hidden temporary name in the target's own folder and renamed onto the final name only when the
writer succeeded, so an interrupted run never leaves a file that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from reference.errors import BadInput, UserError

CHUNK = 1 << 20
TEMP_PREFIX = "."  # temporary names are hidden: `.<name>.<random>.partial`
TEMP_SUFFIX = ".partial"


class OutputPathError(BadInput):
    """An output path that cannot be written as a regular file (a directory, a device, a FIFO, a bad parent)."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_file(target: str | Path) -> Path:
    """`target` resolved, refused unless it is (or will be) a regular file in a folder that exists or can be made.

    A symlink is followed to the file it names; a directory, device, FIFO or socket is refused.
    """
    if str(target) == "":
        raise OutputPathError("the output path is empty")
    path = Path(target)
    if path.is_symlink() or path.exists():
        path = path.resolve()
        if path.exists() and not stat.S_ISREG(path.stat().st_mode):
            kind = "a directory" if path.is_dir() else "not a regular file (a device, FIFO or socket)"
            raise OutputPathError(f"{target} is {kind}; name a file to write")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {target}: {parent} is not a directory")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"cannot write {target}: {parent} is not writable")
    return path


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `target`; renamed onto it only if the block succeeds, removed otherwise."""
    target = check_output_file(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=2) + "\n")


@contextmanager
def publish_dir(target_dir: str | Path, label: str) -> Iterator[tuple[Path, dict[str, str]]]:
    """A hidden temporary folder inside `target_dir` whose files are moved into `target_dir` when the block ends.

    Yields (folder, digests); after the block `digests` maps each published file name to its sha256. Files are
    moved in name order with the ones ending in `.onnx`/`.plan` last, so a graph never appears before its
    external data. On failure nothing is published and the folder is removed.
    """
    target_dir = Path(target_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{label}.", suffix=TEMP_SUFFIX, dir=target_dir))
    digests: dict[str, str] = {}
    try:
        yield tmp, digests
        files = sorted(tmp.iterdir(), key=lambda p: (p.suffix in (".onnx", ".plan"), p.name))
        digests.update({f.name: sha256_file(f) for f in files})
        for f in files:
            os.chmod(f, 0o644)
            os.replace(f, target_dir / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def output_directory(path: str | Path) -> Iterator[Path]:
    """`path` made if missing; a folder this block made is removed again when the block fails and left it empty."""
    path = Path(path)
    made = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        if made and not any(path.iterdir()):
            path.rmdir()
        raise


class BusyError(UserError, RuntimeError):
    """Another process holds the lock of a directory this one would write."""


@contextmanager
def directory_lock(directory: str | Path, what: str) -> Iterator[None]:
    """An exclusive lock on `directory` itself (flock on the folder: no lock file), refused if another holds it."""
    import fcntl
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(f"another process is writing {directory} ({what}); wait for it to finish or write "
                            "elsewhere") from None
        yield
    finally:
        os.close(fd)


def leftover_temporaries(directory: str | Path) -> list[Path]:
    """Temporary files and folders that killed writers left in `directory` (hidden, ending in `.partial`)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX) and p.name.endswith(TEMP_SUFFIX))


def remove_leftovers(directory: str | Path) -> list[Path]:
    """Remove what `leftover_temporaries` finds; returns what was removed."""
    removed = leftover_temporaries(directory)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return removed
