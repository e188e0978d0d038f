"""A model's class names: the manifest's optional `class_names`, one per class, checked one way wherever they come from.

`d2c-export onnx --class-names FILE` records them (a `.json` file: a JSON list of strings; any other file: UTF-8
text, one name per line); the demo checkpoint's export records the demo's own names (`training.data.CLASS_NAMES`,
"red circle" ...) unless given others. A model without names is shown by its class numbers.
"""
from __future__ import annotations

from pathlib import Path

from d2c_export.errors import BadInput
from d2c_export.sources import DEMO_CHECKPOINT
from reference.files import not_a_readable_file
from reference.json_files import ANY, MAX_JSON_BYTES, JsonError, ListOf, Str, read_json
from reference.model import MAX_CONFIG_INT

MAX_CLASS_NAME = 100  # characters of one class name
# The manifest's `class_names` as JSON (bounded; `class_names_problem` checks the rest against the model)
CLASS_NAMES_SCHEMA = ListOf(Str(max_len=MAX_CLASS_NAME), max_len=MAX_CONFIG_INT)
NAMES_FIX = (f"give one name per class, in class order, each printable, not blank and at most {MAX_CLASS_NAME} "
             "characters: a text file of one name per line, or a .json file of a list of strings")


def class_names_problem(names: object, num_classes: int) -> str | None:
    """What is wrong with `names` as the names of a model's `num_classes` classes (one line), or None."""
    if not isinstance(names, list):
        return f"not a list of names (a {type(names).__name__})"
    if len(names) != num_classes:
        return f"{len(names)} names for the model's {num_classes} classes"
    for i, name in enumerate(names):
        if not isinstance(name, str):
            return f"name {i} is not a string"
        if not name.strip():
            return f"name {i} is empty or blank"
        if len(name) > MAX_CLASS_NAME:
            return f"name {i} has {len(name)} characters (at most {MAX_CLASS_NAME})"
        if not name.isprintable():
            return f"name {i} ({name[:32]!r}) holds a tab, line break or other control character"
    return None


def check_class_names(names: list[str], num_classes: int, where: str = "the class names") -> list[str]:
    """`names` when they name `num_classes` classes; else BadInput naming `--class-names`, `where` and the fix."""
    problem = class_names_problem(names, num_classes)
    if problem:
        raise BadInput(f"{where}: {problem}; {NAMES_FIX}", setting="class_names")
    return names


def read_class_names(path: str | Path) -> list[str]:
    """The names in `path` (a `.json` file: a JSON list; else UTF-8 text, one name per line, line ends dropped),
    unchecked against a model; BadInput naming `--class-names` when the file cannot be read as either."""
    path = Path(path)
    problem = not_a_readable_file(path)
    if problem:
        raise BadInput(f"{path} {problem}; {NAMES_FIX}", setting="class_names")
    if path.suffix.lower() == ".json":
        try:
            return read_json(path, ListOf(ANY, max_len=MAX_CONFIG_INT))
        except JsonError as exc:
            raise BadInput(f"{path} is not a JSON list of names ({exc}); {NAMES_FIX}", setting="class_names") from None
    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise BadInput(f"{path} is larger than {MAX_JSON_BYTES} bytes; {NAMES_FIX}", setting="class_names")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInput(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); {NAMES_FIX}",
                       setting="class_names") from None
    lines = text.split("\n")
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def default_class_names(source: dict) -> list[str] | None:
    """The names an export records when none are given: the demo's for the demo checkpoint (each class's colour and
    shape, from the data it was trained on), else None (the classes are numbered)."""
    if source.get("checkpoint") == str(DEMO_CHECKPOINT):
        from training.data import CLASS_NAMES
        return list(CLASS_NAMES)
    return None
