"""How far a compressed model moved from its original, measured on text.

One evaluator per kind of model output, in :data:`EVALUATORS` (a dict from a
kind to a class): each takes the texts to evaluate on, gives a model's
``outputs`` on them, ``compare``\\ s the outputs of two models into scores,
and says with ``warning`` when scores mean most of the model is lost. The
sentence-embedding evaluator is used for every model today:

- :func:`sentence_embeddings`: a model's unit-norm sentence embeddings (a
  sentence-transformers model's own pipeline; for a Hugging Face model, the
  mean of its last hidden states over the real tokens);
- :func:`fidelity`: mean and worst cosine between two sets of embeddings, and
  the overlap of each text's nearest neighbours;
- :func:`probe_accuracy`: the accuracy of a logistic-regression probe on
  embeddings, by stratified cross-validation (a downstream check on a user's
  labels).

The command line (``kflats compress``) and the benchmarks measure with these.
"""

import numpy as np

__all__ = [
    "EVALUATORS",
    "SentenceEmbeddingEvaluator",
    "evaluator",
    "fidelity",
    "probe_accuracy",
    "sentence_embeddings",
]

N_NEIGHBOURS = 5
# a mean cosine below this: the compressed model lost most of the original
LOST_COSINE = 0.5


def is_sentence_transformer(model):
    """A sentence-transformers model (duck-typed: it tokenizes and encodes)."""
    return callable(getattr(model, "tokenize", None)) and callable(
        getattr(model, "encode", None)
    )


def sentence_embeddings(model, texts, *, tokenizer=None, batch_size=32):
    """Unit-norm sentence embeddings of ``texts``, one row a text.

    Parameters
    ----------
    model : torch.nn.Module
        A :class:`sentence_transformers.SentenceTransformer` (its own
        ``encode``, normalized), or a Hugging Face model: the mean of its last
        hidden states over the real (not padding) tokens, normalized, as
        sentence-transformers' mean pooling does. An encoder-decoder model is
        read through its encoder; a model without ``last_hidden_state`` (a
        causal LM, a classifier) through its last entry of ``hidden_states``.
    texts : list of str
    tokenizer : callable, optional
        The Hugging Face tokenizer; required for a Hugging Face model.
    batch_size : int, default=32

    Returns
    -------
    numpy.ndarray of shape (len(texts), hidden size), float32
    """
    if is_sentence_transformer(model):
        return model.encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
    if tokenizer is None:
        raise ValueError(
            "sentence_embeddings of a Hugging Face model needs its tokenizer="
        )
    import torch

    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    device = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                return_tensors="pt",
            ).to(device)
            result = model(**batch, output_hidden_states=True, return_dict=True)
            hidden = getattr(result, "last_hidden_state", None)
            if hidden is None:
                hidden = result.hidden_states[-1]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            normed = torch.nn.functional.normalize(mean.float(), dim=-1)
            out.append(normed.cpu().numpy())
    return np.concatenate(out)


def _neighbours(E, n):
    sim = E @ E.T
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :n]


def fidelity(reference, embeddings, *, n_neighbours=N_NEIGHBOURS):
    """How close unit-norm embeddings stay to the reference ones, row by row.

    Parameters
    ----------
    reference, embeddings : numpy.ndarray of shape (n_texts, dimension)
        Unit-norm rows (from :func:`sentence_embeddings`), the same texts in
        the same order.
    n_neighbours : int, default=5

    Returns
    -------
    dict
        ``mean_cosine`` and ``worst_cosine``, the mean and smallest cosine
        between matching rows, and ``top5_overlap``, the mean fraction of
        each text's ``n_neighbours`` nearest texts (by cosine) that both
        sets share (the key keeps its name for any ``n_neighbours``).

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.torch.evaluation import fidelity
    >>> E = np.eye(8)[:, :6] + 0.1
    >>> E /= np.linalg.norm(E, axis=1, keepdims=True)
    >>> {key: round(value, 6) for key, value in fidelity(E, E).items()}
    {'mean_cosine': 1.0, 'worst_cosine': 1.0, 'top5_overlap': 1.0}
    """
    reference = np.asarray(reference)
    embeddings = np.asarray(embeddings)
    if reference.shape != embeddings.shape or reference.ndim != 2:
        raise ValueError(
            "reference and embeddings must be 2-D arrays of the same shape, got "
            f"{reference.shape} and {embeddings.shape}"
        )
    cos = np.sum(reference * embeddings, axis=1)
    a = _neighbours(reference, n_neighbours)
    b = _neighbours(embeddings, n_neighbours)
    overlap = np.mean(
        [len(set(x) & set(y)) / n_neighbours for x, y in zip(a, b, strict=True)]
    )
    return {
        "mean_cosine": float(cos.mean()),
        "worst_cosine": float(cos.min()),
        "top5_overlap": float(overlap),
    }


def probe_accuracy(embeddings, labels, *, folds=5, random_state=0):
    """Accuracy of a logistic-regression probe on embeddings, cross-validated.

    The probe standardizes the features and fits a logistic regression; its
    accuracy is the mean over ``folds`` stratified, shuffled folds. Comparing
    it on the original's and the compressed model's embeddings of the same
    labelled texts checks a downstream use.

    Parameters
    ----------
    embeddings : numpy.ndarray of shape (n_texts, dimension)
    labels : sequence of n_texts labels (str or int), at least two classes of
        at least ``folds`` texts each.
    folds : int, default=5
    random_state : int, default=0
        The shuffle of the folds.

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> from kflats.torch.evaluation import probe_accuracy
    >>> rng = np.random.default_rng(0)
    >>> labels = np.repeat(["a", "b"], 20)
    >>> X = rng.normal(size=(40, 3)) + 4 * (labels == "a")[:, None]
    >>> probe_accuracy(X, labels)
    1.0
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2 or counts.min() < folds:
        found = dict(zip(classes.tolist(), counts.tolist(), strict=True))
        raise ValueError(
            f"a {folds}-fold probe needs at least two labels with at least {folds} "
            f"texts each, got {found}"
        )
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=random_state)
    return float(cross_val_score(probe, embeddings, labels, cv=split).mean())


class SentenceEmbeddingEvaluator:
    """Evaluation by sentence embeddings: cosine and nearest-neighbour overlap.

    Parameters
    ----------
    texts : list of str
        Texts the models read (held out from calibration).
    tokenizer : callable, optional
        For a Hugging Face model (see :func:`sentence_embeddings`).
    batch_size : int, default=32
    """

    kind = "sentence-embedding"

    def __init__(self, texts, *, tokenizer=None, batch_size=32):
        self.texts = list(texts)
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    def outputs(self, model):
        """The model's unit-norm sentence embeddings of the texts."""
        return self.outputs_of(model, self.texts)

    def outputs_of(self, model, texts):
        """The model's unit-norm sentence embeddings of other ``texts``."""
        return sentence_embeddings(
            model, texts, tokenizer=self.tokenizer, batch_size=self.batch_size
        )

    def compare(self, reference, outputs):
        """Scores of ``outputs`` against the original's: see :func:`fidelity`."""
        return fidelity(reference, outputs)

    def warning(self, scores):
        """A sentence when the scores mean most of the model is lost, else None."""
        if scores["mean_cosine"] < LOST_COSINE:
            return (
                f"the compressed model lost most of the original: mean cosine "
                f"{scores['mean_cosine']:.3f} < {LOST_COSINE} on held-out text; "
                "raise --budget, or heal (--heal-steps)"
            )
        return None


# the kind of output a model is evaluated by -> its evaluator
EVALUATORS = {SentenceEmbeddingEvaluator.kind: SentenceEmbeddingEvaluator}


def evaluator(texts, *, kind="sentence-embedding", tokenizer=None, batch_size=32):
    """The evaluator of ``kind`` (a key of :data:`EVALUATORS`) on ``texts``.

    Examples
    --------
    >>> from kflats.torch.evaluation import evaluator
    >>> evaluator(["a text"]).kind
    'sentence-embedding'
    """
    try:
        cls = EVALUATORS[kind]
    except KeyError:
        raise ValueError(
            f"kind must be one of {sorted(EVALUATORS)}, got {kind!r}"
        ) from None
    return cls(texts, tokenizer=tokenizer, batch_size=batch_size)
