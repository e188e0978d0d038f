"""Running the commands in-process and judging their errors: one `error:` line, nothing left behind."""
from __future__ import annotations

from pathlib import Path


def run_cli(main, argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def files_in(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root` (itself too) with its type, inode, size and mtime: equal snapshots mean nothing was
    created, replaced, changed or left behind."""
    import stat
    out = {}
    for p in [root, *root.rglob("*")]:
        st = p.lstat()
        out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_ino, st.st_size, st.st_mtime_ns)
    return out
