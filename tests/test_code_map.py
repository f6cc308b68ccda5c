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


def test_the_tests_mirror_the_package():
    # a folder of tests holds the tests of the kflats folder of the same path
    tests = ROOT / "tests"
    folders = [
        p.relative_to(tests)
        for p in tests.rglob("*")
        if p.is_dir() and p.name != "__pycache__" and any(p.glob("test_*.py"))
    ]
    unmatched = [
        f.as_posix()
        for f in folders
        if f.parts[0] != "core" and not (ROOT / "kflats" / f).is_dir()
    ]
    assert not unmatched, (
        f"test folders with no kflats folder of that path: {unmatched}"
    )
