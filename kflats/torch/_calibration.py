"""Row weights for compressing an embedding table: token frequencies."""

from collections.abc import Iterable

import numpy as np


def token_frequencies(tokenizer, texts, *, vocab_size=None, smoothing=1.0):
    """How often each token id occurs in ``texts``, to weigh embedding rows.

    Rows of an embedding table are not equally important: a token that never
    occurs costs nothing when it is approximated badly. Passing these
    frequencies as ``sample_weight`` (to :func:`kflats.factorize.factorize`,
    :meth:`ProjectiveEmbedding.from_embedding` or :func:`compress` with one
    target) spends the factorization's accuracy on the tokens a model actually
    sees. Use a calibration text that resembles the model's inputs and is
    disjoint from any text you evaluate on.

    Parameters
    ----------
    tokenizer : callable
        A Hugging Face tokenizer, or any callable that maps a list of strings to
        a mapping with an ``"input_ids"`` entry: one sequence of token ids per
        string (special tokens included, as the model sees them).
    texts : iterable of str
        The calibration text, one string per line or document.
    vocab_size : int, default=None
        Length of the result; ``None`` uses ``len(tokenizer)``.
    smoothing : float, default=1.0
        Added to every count, so that no token gets weight 0 (a zero weight
        lets the factorization ignore a row entirely).

    Returns
    -------
    weights : ndarray of shape (vocab_size,), float64
        ``count + smoothing`` for every token id.

    Examples
    --------
    >>> from kflats.torch import token_frequencies
    >>> def tokenizer(texts):  # a toy tokenizer: one id per word
    ...     return {"input_ids": [[len(word) for word in t.split()] for t in texts]}
    >>> token_frequencies(tokenizer, ["a bb a", "ccc"], vocab_size=5).tolist()
    [1.0, 3.0, 2.0, 2.0, 1.0]
    """
    if isinstance(texts, str) or not isinstance(texts, Iterable):
        raise TypeError(
            "texts must be an iterable of strings (e.g. a list of lines), got "
            f"{type(texts).__name__}."
        )
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be a non-empty iterable of strings.")
    if not smoothing >= 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing!r}.")
    if vocab_size is None:
        vocab_size = len(tokenizer)
    if int(vocab_size) != vocab_size or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}.")
    ids = tokenizer(texts)["input_ids"]
    flat = np.concatenate([np.asarray(seq, dtype=np.int64).ravel() for seq in ids])
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise ValueError(
            f"the tokenizer produced ids in [{flat.min()}, {flat.max()}], outside "
            f"[0, vocab_size={vocab_size})."
        )
    counts = np.bincount(flat, minlength=int(vocab_size)).astype(np.float64)
    return counts + smoothing
