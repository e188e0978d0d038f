"""Every command's `--help`: each option says what it is for, and the help shows what a user must know."""
from __future__ import annotations

import click
import pytest

from d2c_export.bulk.cli import generate_cli
from d2c_export.cli import bench_cli, export_cli, quality_cli, run_cli
from d2c_export.serve.cli import load_cli, serve_cli

COMMANDS = {"d2c-export": export_cli, "d2c-run": run_cli, "d2c-bench": bench_cli, "d2c-quality": quality_cli,
            "d2c-generate": generate_cli, "d2c-serve": serve_cli, "d2c-serve-load": load_cli}


def _walk(name: str, command: click.Command):
    """(name, command) of `command` and every subcommand under it."""
    yield name, command
    for sub_name, sub in getattr(command, "commands", {}).items():
        yield from _walk(f"{name} {sub_name}", sub)


ALL = [pair for name, command in COMMANDS.items() for pair in _walk(name, command)]


@pytest.mark.parametrize("name, command", ALL, ids=[name for name, _ in ALL])
def test_every_option_has_help(name, command):
    missing = [p.opts[0] for p in command.params if isinstance(p, click.Option) and not p.hidden
               and not (p.help or "").strip()]
    assert not missing, f"{name}: options without help text: {', '.join(missing)}"
    assert (command.help or "").strip(), f"{name} has no description"


def _help(command: click.Command, args: list[str], prog: str) -> str:
    with click.Context(command, info_name=prog) as ctx:
        sub = command
        for a in args:
            ctx = click.Context(sub.commands[a], info_name=a, parent=ctx)
            sub = sub.commands[a]
        return sub.get_help(ctx)


def test_export_group_help_shows_whole_descriptions():
    commands = _help(export_cli, [], "d2c-export").split("Commands:")[1]
    assert "..." not in commands, commands
    assert "(needs TensorRT and a GPU)" in commands


def test_seed_range_is_readable():
    text = _help(bench_cli, [], "d2c-bench")
    assert "2^63-1" in text and "9223372036854775807" not in text


def test_serve_load_offers_no_max_batch():
    opts = {o for p in load_cli.params for o in p.opts}
    assert "--max-batches" in opts and "--max-batch" not in opts


def test_generate_per_class_default_is_shown_as_a_default():
    text = " ".join(_help(generate_cli, [], "d2c-generate").split())
    assert "[default: 50" in text, text


def test_onnx_accepts_engines_as_its_output_folder():
    """Its own option, so that errors name the flag typed (test_class_names.py exports through it)."""
    options = {o: p for p in export_cli.commands["onnx"].params for o in p.opts}
    assert "--out" in options and "another name for --out" in options["--engines"].help


def test_check_has_quiet():
    assert "quiet" in {p.name for p in export_cli.commands["check"].params}
