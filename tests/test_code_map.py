"""docs/code_map.rst names every module of kflats/, and only modules that exist."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAP = ROOT / "docs" / "code_map.rst"
LINE = re.compile(r"^- ``(kflats/[\w/]+\.py)``: \S")


def listed():
    return [m.group(1) for m in map(LINE.match, MAP.read_text().splitlines()) if m]


def modules():
    return sorted(
        p.relative_to(ROOT).as_posix() for p in (ROOT / "kflats").rglob("*.py")
    )


def test_every_module_is_on_the_map():
    missing = [m for m in modules() if m not in listed()]
    lines = "\n".join(f"- ``{m}``: <what it is for>." for m in missing)
    assert not missing, f"add these lines to docs/code_map.rst:\n{lines}"


def test_every_line_of_the_map_names_a_module():
    gone = [m for m in listed() if not (ROOT / m).is_file()]
    assert not gone, (
        "remove these lines from docs/code_map.rst (no such module): "
        + ", ".join(f"``{m}``" for m in gone)
    )


def test_each_module_is_listed_once():
    names = listed()
    twice = sorted({m for m in names if names.count(m) > 1})
    assert not twice, f"listed more than once in docs/code_map.rst: {twice}"
