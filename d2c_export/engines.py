"""An engines directory opened once: its manifest, config, model source, files by kind, and the fix commands.

Every command opens the directory once (`Engines.open`) and hands the object down: the manifest is
read once, each file's sha256 is checked once, and the reference model is rebuilt from its source at
most once (`Engines.model`).
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

from d2c_export.class_names import class_names_problem
from d2c_export.errors import StaleEngines
from d2c_export.manifest import MANIFEST, Manifest, StageEntry
from d2c_export.sources import export_command, model_from_source
from d2c_export.stages import DEFAULT_MAX_BATCH, stages_for
from reference.files import not_a_readable_file, sha256_file
from reference.model import D2C, D2CConfig
from reference.pipeline import SamplingParams

DEFAULT_ENGINES = Path("engines")


def export_hint(directory: Path) -> str:
    """The export command for a directory that holds no manifest (so no recorded model to name)."""
    return f"d2c-export onnx --stage all (--config PRESET | --checkpoint PATH) --out {directory}"


class Engines:
    """The exported stages of one model in one directory."""

    def __init__(self, directory: Path, manifest: Manifest):
        self.directory = directory
        self.manifest = manifest
        self._verified: dict[tuple[str, str], StageEntry] = {}
        self._model: D2C | None = None

    @classmethod
    def open(cls, directory: str | Path) -> "Engines":
        directory = Path(directory)
        if not directory.exists():
            raise StaleEngines(f"engines directory {directory} does not exist; export one with "
                               f"`{export_hint(directory)}`")
        if not directory.is_dir():
            raise StaleEngines(f"engines path {directory} is not a directory; export one with "
                               f"`{export_hint(directory)}`")
        path = directory / MANIFEST
        problem = not_a_readable_file(path)
        if problem:
            raise StaleEngines(f"{path} {problem}; export with `{export_hint(directory)}`")
        try:
            manifest = Manifest.read(path)
        except StaleEngines as exc:
            raise StaleEngines(f"{exc}; re-export with `{export_hint(directory)}`") from None
        engines = cls(directory, manifest)
        engines.config  # noqa: B018  (a config that does not build is refused here, with the export command)
        if manifest.class_names is not None:
            problem = class_names_problem(manifest.class_names, engines.config.num_classes)
            if problem:
                raise StaleEngines(f"{path} is not a valid manifest: class_names: {problem}; re-export with "
                                   f"`{engines.rebuild_command('onnx-fp32')}` (and --class-names FILE to name the "
                                   "classes)")
        return engines

    @cached_property
    def config(self) -> D2CConfig:
        try:
            return self.manifest.d2c_config
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise StaleEngines(f"{self.directory / MANIFEST} records a config that does not build ({exc}); "
                               f"re-export with `{export_hint(self.directory)}`") from None

    @property
    def max_batch(self) -> int:
        return self.manifest.max_batch

    @property
    def source(self) -> dict:
        return self.manifest.source

    @property
    def class_names(self) -> list[str]:
        """A name per class, in class order: the manifest's, else the class numbers ("0", "1", ...)."""
        if self.manifest.class_names is not None:
            return list(self.manifest.class_names)
        return [str(c) for c in range(self.config.num_classes)]

    @cached_property
    def sampling(self) -> SamplingParams:
        """The model's recommended sampling settings, recorded at export (SamplingParams' defaults where none are)."""
        try:
            return SamplingParams(**self.manifest.sampling)
        except (TypeError, ValueError) as exc:
            raise StaleEngines(f"{self.directory / MANIFEST} records invalid sampling settings ({exc}); "
                               f"re-export with `{self.rebuild_command('onnx-fp32')}`") from None

    def specs(self, names: str | list[str] = "all", kind: str | None = None):
        """The stages of the model; with `kind`, without the optional ones not built as `kind` (older engines)."""
        return [s for s in stages_for(self.config, names)
                if kind is None or not s.optional or kind in self.manifest.stages.get(s.name, {})]

    def absent_optional(self, kind: str) -> dict[str, str]:
        """Optional stages (an opt-in sampler's) not built as `kind` -> the command that builds them."""
        present = self.specs(kind=kind)
        absent = [s.name for s in self.specs() if s not in present]
        return dict.fromkeys(absent, self.rebuild_command(kind)) if absent else {}

    def model(self) -> D2C:
        """The reference model the engines were exported from, rebuilt (once) from the recorded source."""
        if self._model is None:
            self._model = model_from_source(self.config, self.source,
                                            lambda: self.rebuild_command("onnx-fp32")).eval()
        return self._model

    def rebuild_command(self, kind: str, max_batch: int | None = None) -> str:
        """The command that (re)builds files of `kind` ("onnx-fp32", "onnx-fp16", "trt-fp16", ...) of this model,
        with the recorded max batch or `max_batch`."""
        fp16 = kind.endswith("fp16")
        if kind.startswith("trt"):
            return f"d2c-export trt{' --fp16' if fp16 else ''} --engines {self.directory}"
        opsets = {e.opset for kinds in self.manifest.stages.values() for e in kinds.values() if e.opset}
        batch = max_batch or self.max_batch
        return export_command(self.source, self.config.name, self.directory, fp16=fp16,
                              max_batch=None if batch == DEFAULT_MAX_BATCH else batch,
                              opset=opsets.pop() if len(opsets) == 1 else None)

    def other_classes(self) -> str:
        """How to get a model with ImageNet's 1000 classes, for a class this model does not have."""
        names = self.manifest.class_names
        named = f" (classes {', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if names else ""
        return (f"{self.directory} holds {self.config.name}{named}; for ImageNet's 1000 classes export a full-size "
                "model: `d2c-export onnx --config d2c-b --out engines-b/` (random weights) or the official weights "
                "(`d2c-export onnx --checkpoint mar_base/checkpoint-last.pth --vae kl16.ckpt --out engines-b/`), then "
                "use `--engines engines-b/`")

    def has(self, kind: str) -> bool:
        """Whether every stage of the model has a build of `kind` recorded."""
        return all(kind in self.manifest.stages.get(s.name, {}) for s in self.specs() if not s.optional)

    def entry(self, stage: str, kind: str) -> StageEntry:
        """The entry of `stage` built as `kind`, every file present and matching its sha256 (checked once)."""
        key = (stage, kind)
        if key in self._verified:
            return self._verified[key]
        kinds = self.manifest.stages.get(stage, {})
        if kind not in kinds:
            have = ", ".join(f"{s}:{k}" for s, ks in self.manifest.stages.items() for k in ks) or "nothing"
            raise StaleEngines(f"{self.directory} has no {kind} build of stage {stage!r} (it has {have}); "
                               f"run `{self.rebuild_command(kind)}`")
        entry = kinds[kind]
        for name, digest in entry.files.items():
            path = self.path_of(name, kind)
            problem = not_a_readable_file(path)
            if problem:
                raise StaleEngines(f"{path} {problem}; rebuild with `{self.rebuild_command(kind)}`")
            if sha256_file(path) != digest:
                raise StaleEngines(f"{path} does not match its sha256 in the manifest (changed or truncated); "
                                   f"rebuild with `{self.rebuild_command(kind)}`")
        self._verified[key] = entry
        return entry

    def path_of(self, name: str, kind: str) -> Path:
        """A file named in the manifest, refused unless it lies inside the engines directory."""
        path = (self.directory / name).resolve()
        if Path(name).is_absolute() or self.directory.resolve() not in path.parents:
            raise StaleEngines(f"{self.directory / MANIFEST} names {name!r}, outside the engines directory; "
                               f"rebuild with `{self.rebuild_command(kind)}`")
        return self.directory / name

    def input_files(self) -> list[Path]:
        """Every file a command on these engines may read: the manifest, each file it lists (inside the directory),
        and the model's recorded checkpoint or official files."""
        listed = [self.directory / n for n in sorted(self.manifest.file_names())
                  if not Path(n).is_absolute() and self.directory.resolve() in (self.directory / n).resolve().parents]
        source = self.source
        recorded = ([source["checkpoint"]] if "checkpoint" in source else
                    [f["path"] for f in source.get("official", {}).values()])
        return [self.directory / MANIFEST, *listed, *map(Path, recorded)]

    def file(self, stage: str, kind: str) -> Path:
        """The main file (graph or plan) of `stage` built as `kind`, verified."""
        return self.path_of(self.entry(stage, kind).main_file, kind)

    def __repr__(self) -> str:
        return f"Engines({self.directory}, {self.config.name}, kinds {self.manifest.kinds()})"
