"""The GPU machine's image on the CPU: a `sitecustomize` that hides every module the project imports whose
distribution that image lacks (`lent_image_packages.txt`), so a run here fails where a run there would."""
from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = Path(__file__).with_name("lent_image_packages.txt")
PROJECT_DIRS = ("d2c_export", "reference", "training", "tests", "scripts")
OWN = {"d2c_export", "reference", "training", "tests", "__future__"}

SITECUSTOMIZE = '''"""Modules the GPU machine's image lacks, made absent here (written by tests/scripts/lent_image.py)."""
import sys

MODULES = frozenset({modules!r})
DISTRIBUTIONS = frozenset({distributions!r})


def _normal(name):
    return name.lower().replace("_", "-").replace(".", "-")


class _WithoutLentImageGaps:
    """A meta path finder that finds nothing of MODULES (as if not installed) and passes everything else on."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in MODULES or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        found = getattr(self.finder, "find_distributions", None)
        if found is None:
            return iter(())
        return (d for d in found(*args, **kwargs) if _normal(d.metadata["Name"] or "") not in DISTRIBUTIONS)

    def __getattr__(self, name):
        return getattr(self.finder, name)


sys.meta_path[:] = [_WithoutLentImageGaps(f) for f in sys.meta_path]
'''


def normal(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lent_packages() -> set[str]:
    """The distributions of the GPU machine's image, normalised."""
    lines = (line.strip() for line in PACKAGES.read_text().splitlines())
    return {normal(line) for line in lines if line and not line.startswith("#")}


def project_imports() -> set[str]:
    """The top-level modules the project's code, tests and scripts import (outside the standard library)."""
    names = set()
    for folder in PROJECT_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(a.name.partition(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.partition(".")[0])
    return {n for n in names if n not in OWN and n not in sys.stdlib_module_names}


def missing_modules() -> dict[str, set[str]]:
    """Each imported module the image lacks -> its distributions (by this environment's metadata, else its name)."""
    lent, owners = lent_packages(), metadata.packages_distributions()
    missing = {}
    for module in sorted(project_imports()):
        dists = {normal(d) for d in owners.get(module, [module])}
        if not dists & lent:
            missing[module] = dists
    return missing


def write_blocker(directory: Path) -> Path:
    """Write `sitecustomize.py` into `directory` (put it first on PYTHONPATH); returns the directory."""
    missing = missing_modules()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(SITECUSTOMIZE.format(
        modules=sorted(missing), distributions=sorted(set().union(*missing.values()))))
    return directory
