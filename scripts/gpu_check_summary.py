"""The summary of scripts/gpu_check.sh as Markdown: each step's result, then s/image and images/s per batch and column
from the bench's JSON files (standard library only, so it reports even when the project does not import).

Usage: python scripts/gpu_check_summary.py STEPS_TSV OUTDIR DEVICE SECONDS
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

PYTEST_COUNTS = ("passed", "skipped", "failed", "errors")


def pytest_counts(path: Path) -> str:
    """The counts of pytest's closing line ("7 skipped, 413 deselected, 2 errors in 4.3s"), zeros included."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    last = next((line for line in reversed(lines) if re.search(r"\d+ \w+.* in [\d.]+s", line)), "")
    found = {("errors" if word.startswith("error") else word): int(n)
             for n, word in re.findall(r"(\d+) (passed|skipped|failed|errors?)\b", last)}
    return ", ".join(f"{found.get(k, 0)} {k}" for k in PYTEST_COUNTS) if last else "no pytest summary line"


def step_rows(steps: Path, out: Path) -> list[str]:
    """One row per step (name, result, seconds), the tests' counts added to theirs."""
    rows = ["| step | result | s |", "|---|---|---:|"]
    for line in steps.read_text().splitlines():
        name, result, seconds = line.split("\t")
        if name == "gpu tests":
            result = f"{result}: {pytest_counts(out / 'gpu_tests.txt')}"
        rows.append(f"| {name} | {result} | {seconds} |")
    return rows


def bench_rows(out: Path) -> list[str]:
    """s/image and images/s of every column at every batch that the bench finished, with what it ran."""
    reports = [json.loads(p.read_text()) for p in out.glob("bench-b*.json")]
    if not reports:
        return ["No bench figures (see check.log)."]
    first = reports[0]
    s = first["sampling"]
    rows = [f"{first['config']}, {s['num_iter']} masked x {s['diffusion_steps']} diffusion steps, cfg {s['cfg']}; "
            f"end to end, median of {first['repeat']} generations after {first['warmup']} warm-up, columns "
            "interleaved:", "", "| batch | backend | s/image | images/s |", "|---:|---|---:|---:|"]
    cells = sorted((c for r in reports for c in r["results"]), key=lambda c: (c["batch"], c["backend"]))
    for c in cells:
        rows.append(f"| {c['batch']} | {c['backend']} | {c['end_to_end_s']['median'] / c['batch']:.4g} | "
                    f"{c['images_per_s']:.4g} |")
    return rows


def main(argv: list[str]) -> int:
    """Print the summary of the run whose steps are in argv[0], files in argv[1]."""
    steps, out, device, seconds = Path(argv[0]), Path(argv[1]), argv[2], argv[3]
    lines = [f"# gpu_check: {device}, {seconds} s", "", *step_rows(steps, out), "", *bench_rows(out)]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
