"""What a bulk run generates and what it has finished: labels and seeds by index, shards, their records on disk.

Image `i` of a run with seed S draws from its own generator seeded S + i, and its label is a function of `i`
alone: MAR's evaluation order (`engine_mar.py`: `np.arange(class_num).repeat(num_images // class_num)`), so the
first `per_class` images are of the first class, the next `per_class` of the second, and so on. Indices are cut
into shards of `batch` consecutive images; a shard is finished when its record `.shards/{k:06d}.json` exists and
every PNG it lists is there with the sha256 it records. The record is written after the PNGs, each file under a
temporary name and renamed, so a killed run leaves either a finished shard or one that is done again.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from reference.errors import BadInput
from reference.files import leftover_temporaries, remove_leftovers, sha256_file, write_json_atomic

SAMPLES_JSON = "samples.json"
SHARDS_DIR = ".shards"
PNG_NAME = re.compile(r"^\d{6,}\.png$")


class BulkError(BadInput):
    """A bulk output directory that this command may not write, or a run that cannot complete."""


def png_name(index: int) -> str:
    return f"{index:06d}.png"


def balanced_labels(classes: list[int], per_class: int) -> list[int]:
    """Label of every index: `per_class` images of `classes[0]`, then of `classes[1]`, ... (MAR's order)."""
    return [c for c in classes for _ in range(per_class)]


@dataclass(frozen=True)
class Shard:
    number: int
    start: int  # first index
    stop: int  # one past the last index

    @property
    def indices(self) -> range:
        return range(self.start, self.stop)


@dataclass(frozen=True)
class BulkPlan:
    """Everything that decides the images of a run (and so must match when a run is resumed)."""

    engines_sha256: str  # of the engines' manifest.json
    model: str
    backend: str
    precision: str
    sampling: dict
    classes: list[int]
    per_class: int
    seed: int  # image i draws from a generator seeded seed + i
    batch: int  # images per shard (one generation)

    @property
    def num_images(self) -> int:
        return len(self.classes) * self.per_class

    @property
    def labels(self) -> list[int]:
        return balanced_labels(self.classes, self.per_class)

    def seeds(self, shard: Shard) -> list[int]:
        return [self.seed + i for i in shard.indices]

    def shards(self) -> list[Shard]:
        n = self.num_images
        return [Shard(k, start, min(start + self.batch, n)) for k, start in enumerate(range(0, n, self.batch))]

    def settings(self) -> dict:
        return {**asdict(self), "num_images": self.num_images}

    def differences(self, recorded: dict) -> list[str]:
        """The settings in which `recorded` (a samples.json's) differs from this plan, as `name X (recorded Y)`."""
        mine = self.settings()
        keys = sorted(set(mine) | set(recorded))
        out = []
        for k in keys:
            if k == "sampling" and isinstance(recorded.get(k), dict):
                out += [f"{s} {mine[k].get(s)} (recorded {recorded[k].get(s)})"
                        for s in sorted(set(mine[k]) | set(recorded[k])) if mine[k].get(s) != recorded[k].get(s)]
            elif mine.get(k) != recorded.get(k):
                shown = "the engines' manifest" if k == "engines_sha256" else None
                out.append(f"{shown} differs" if shown else f"{k} {mine.get(k)} (recorded {recorded.get(k)})")
        return out


class ShardStore:
    """The output directory of a run: its PNGs, the shard records and samples.json."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.records = self.directory / SHARDS_DIR

    @property
    def samples_json(self) -> Path:
        return self.directory / SAMPLES_JSON

    @property
    def npz(self) -> Path:
        """`DIR.npz` beside the directory, the ADM evaluator's format."""
        return self.directory.with_name(self.directory.name + ".npz")

    def read_samples(self) -> dict | None:
        if not self.samples_json.is_file():
            return None
        try:
            return json.loads(self.samples_json.read_text())
        except (OSError, ValueError) as exc:
            raise BulkError(f"{self.samples_json} is unreadable ({exc}); move it away or write elsewhere") from None

    def claim(self, plan: BulkPlan, command: str) -> dict:
        """Make the directory this plan's, or check that it already is: returns the samples.json record. Another
        plan's directory, or one with files not of a run, is refused."""
        if self.directory.exists() and not self.directory.is_dir():
            raise BulkError(f"--out {self.directory} is not a directory; name a directory for the PNGs")
        recorded = self.read_samples()
        if recorded is None:
            strays = [p.name for p in self.directory.iterdir()
                      if p.name != SHARDS_DIR and p not in leftover_temporaries(self.directory)] \
                if self.directory.is_dir() else []
            if strays:
                raise BulkError(f"--out {self.directory} holds files that are not from {command} "
                                f"({strays[0]}, ...); name a new or empty directory")
            record = {"command": command, "settings": plan.settings(), "labels": plan.labels, "complete": False,
                      "runs": []}
            self.directory.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.samples_json, record)
            return record
        differences = plan.differences(recorded.get("settings", {}))
        if differences:
            raise BulkError(f"--out {self.directory} holds samples of other settings ({'; '.join(differences)}); "
                            "rerun with the recorded settings to resume, or name another directory")
        return recorded

    def remove_leftovers(self) -> list[Path]:
        """What killed runs left under temporary names (PNGs, records, an unfinished DIR.npz)."""
        removed = remove_leftovers(self.directory) + remove_leftovers(self.records)
        prefix = f".{self.npz.name}."
        for p in leftover_temporaries(self.directory.parent):
            if p.name.startswith(prefix):
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    def record_path(self, shard: Shard) -> Path:
        return self.records / f"{shard.number:06d}.json"

    def finished(self, shard: Shard) -> bool:
        """The shard's record is there and names exactly its indices, each PNG present with its recorded sha256."""
        path = self.record_path(shard)
        if not path.is_file():
            return False
        try:
            record = json.loads(path.read_text())
            files = record["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return False
        if sorted(files) != [png_name(i) for i in shard.indices]:
            return False
        return all((self.directory / name).is_file() and sha256_file(self.directory / name) == digest
                   for name, digest in files.items())

    def write_shard(self, shard: Shard, pngs: list[bytes], worker: dict) -> None:
        """The shard's PNGs, then its record (each written whole under a temporary name, then renamed)."""
        from hashlib import sha256

        from reference.files import write_bytes_atomic
        if len(pngs) != len(shard.indices):
            raise BulkError(f"shard {shard.number} came back with {len(pngs)} images, not {len(shard.indices)}")
        digests = {}
        for index, data in zip(shard.indices, pngs):
            write_bytes_atomic(self.directory / png_name(index), data)
            digests[png_name(index)] = sha256(data).hexdigest()
        self.records.mkdir(exist_ok=True)
        write_json_atomic(self.record_path(shard), {"shard": shard.number, "start": shard.start, "stop": shard.stop,
                                                    "worker": worker, "sha256": digests})

    def recorded_digests(self, plan: BulkPlan) -> dict[str, str]:
        digests: dict[str, str] = {}
        for shard in plan.shards():
            digests.update(json.loads(self.record_path(shard).read_text())["sha256"])
        return digests
