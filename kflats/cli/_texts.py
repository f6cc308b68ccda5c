"""The texts of ``kflats compress``: ``--calibration`` and ``--eval-labels``."""

import csv
from pathlib import Path


def _read_text_file(path, option):
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ValueError(f"{option} {str(path)!r} is a folder, not a file") from None
    except OSError as exc:
        raise ValueError(
            f"cannot read {option} {str(path)!r}: {exc.strerror}"
        ) from None
    try:
        if b"\x00" in data:
            raise UnicodeDecodeError("utf-8", data, 0, 1, "NUL byte")
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(
            f"{option} {str(path)!r} is not UTF-8 text (a binary file?)"
        ) from None


def read_texts(path):
    text = _read_text_file(path, "--calibration")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"--calibration {str(path)!r} holds no text")
    return lines


FOLDS = 5


def read_labels(path):
    """(texts, labels) of ``--eval-labels``: CSV rows text,label."""
    rows = list(csv.reader(_read_text_file(path, "--eval-labels").splitlines()))
    where = f"--eval-labels {str(path)!r}"
    if rows and [c.strip().lower() for c in rows[0]] == ["text", "label"]:
        rows = rows[1:]
    texts, labels = [], []
    for number, row in enumerate(rows, start=1):
        if not any(c.strip() for c in row):
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise ValueError(
                f"{where} row {number}: expected two fields, text,label, got "
                f"{len(row)}" + (" (one empty)" if len(row) == 2 else "")
            )
        texts.append(row[0].strip())
        labels.append(row[1].strip())
    counts = {label: labels.count(label) for label in dict.fromkeys(labels)}
    if len(counts) < 2 or min(counts.values()) < FOLDS:
        raise ValueError(
            f"{where}: a {FOLDS}-fold probe needs at least two labels with at "
            f"least {FOLDS} texts each, got {counts}"
        )
    return texts, labels
