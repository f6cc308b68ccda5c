"""What a model outputs, and how far one output is from another.

The output kinds adapters name (:data:`OUTPUT_KINDS`), the tensor a plain
module's output holds, the divergences a distortion is made of (KL of
distributions, relative squared error), and the scores of an evaluation on
held-out text, by output kind: perplexity, KL and top-1 agreement for
logits, cosine and nearest-neighbour overlap for embeddings.
"""

import math

import numpy as np
import torch
from torch import nn

from kflats.torch.evaluation import N_NEIGHBOURS, fidelity

#: What a model's final output is, as adapters name it.
OUTPUT_KINDS = (
    "sentence_embedding",
    "hidden",
    "causal_lm",
    "classifier",
    "masked_lm",
    "seq2seq",
)


def _masked_mean(values, mask):
    """Mean of ``values`` (batch, positions) over the real positions."""
    if mask is None or mask.shape != values.shape:
        return values.mean()
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1)


def _kl(student_logits, teacher_logits):
    """KL(teacher || student) of the distributions on the last axis."""
    s = torch.log_softmax(student_logits.float(), dim=-1)
    t = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)


def relative_mse(student, teacher, mask=None):
    """``||s - t||^2 / ||t||^2`` over the real (not padding) positions."""
    diff = (student - teacher) ** 2
    ref = teacher**2
    if mask is not None and diff.dim() >= 3 and diff.shape[:2] == mask.shape:
        m = mask.unsqueeze(-1).to(diff.dtype)
        diff, ref = diff * m, ref * m
    return diff.sum() / ref.sum().clamp_min(1e-12)


def _tensor_output(out):
    """The tensor of a plain module's output: sentence embedding or last state."""
    if isinstance(out, dict) and "sentence_embedding" in out:
        return out["sentence_embedding"], "sentence_embedding"
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, dict):
        hidden = out.get("last_hidden_state")
    if hidden is None:
        hidden = getattr(out, "logits", None)
    if hidden is None and isinstance(out, (tuple, list)) and out:
        hidden = out[0]
    if hidden is None and torch.is_tensor(out):
        hidden = out
    if not torch.is_tensor(hidden):
        raise TypeError(
            "the model returned a "
            f"{type(out).__name__}, which holds no sentence_embedding, "
            "last_hidden_state, logits or tensor"
        )
    return hidden, "hidden"


def evaluate_logits(pairs, kind, n_texts):
    """Scores of logits, batch by batch: KL, agreement and perplexity.

    ``pairs`` yields ``((teacher, mask, batch), (student, _, _))`` per batch
    (see :meth:`ModelAdapter.evaluate
    <kflats.torch.models.ModelAdapter.evaluate>`).
    """
    kl = agree = nll_t = nll_s = 0.0
    count = 0
    for (t, mask, batch), (s, _, _) in pairs:
        if kind == "classifier":
            kl += float(_kl(s, t).sum())
            agree += float((s.argmax(-1) == t.argmax(-1)).sum())
            count += t.shape[0]
            continue
        if mask is None:
            mask = torch.ones(t.shape[:-1], dtype=torch.bool, device=t.device)
        if kind == "causal_lm":
            # the prediction at position i is scored on token i + 1
            ids = batch["input_ids"][:, 1:]
            real = mask[:, 1:] & mask[:, :-1]
            t, s = t[:, :-1], s[:, :-1]
            for logits, which in ((t, "t"), (s, "s")):
                logp = torch.log_softmax(logits.float(), dim=-1)
                nll = -logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
                value = float(nll[real].sum())
                if which == "t":
                    nll_t += value
                else:
                    nll_s += value
        else:
            real = mask
        kl += float(_kl(s, t)[real].sum())
        agree += float((s.argmax(-1) == t.argmax(-1))[real].sum())
        count += int(real.sum())
    if count == 0:
        raise ValueError("evaluate: the texts hold no position to score")
    if kind == "classifier":
        return {
            "label_agreement": agree / count,
            "kl": kl / count,
            "n_texts": n_texts,
        }
    out = {"kl": kl / count, "top1_agreement": agree / count}
    if kind == "causal_lm":
        ppl_t, ppl_s = math.exp(nll_t / count), math.exp(nll_s / count)
        out = {
            "perplexity_original": ppl_t,
            "perplexity": ppl_s,
            "perplexity_ratio": ppl_s / ppl_t,
            **out,
        }
    out["n_tokens"] = count
    out["n_texts"] = n_texts
    return out


def evaluate_embeddings(pairs, n_texts):
    """Scores of sentence embeddings (or of hidden states' mean over tokens)."""
    ref, com = [], []
    for (t, mask, _), (s, _, _) in pairs:
        if t.dim() == 3:  # hidden states: their mean over real tokens
            m = (
                torch.ones(t.shape[:2], device=t.device)
                if mask is None
                else mask.to(t.dtype)
            ).unsqueeze(-1)
            t = (t * m).sum(1) / m.sum(1).clamp_min(1)
            s = (s * m).sum(1) / m.sum(1).clamp_min(1)
        ref.append(nn.functional.normalize(t.float(), dim=-1).cpu().numpy())
        com.append(nn.functional.normalize(s.float(), dim=-1).cpu().numpy())
    metrics = _fidelity(np.concatenate(ref), np.concatenate(com))
    return {**metrics, "n_texts": n_texts}


def _fidelity(reference, compressed):
    """Mean and worst cosine, and the mean overlap of the nearest neighbours."""
    k = min(N_NEIGHBOURS, len(reference) - 1)
    if k >= 1:
        return fidelity(reference, compressed, n_neighbours=k)
    cos = np.sum(reference * compressed, axis=1)
    return {
        "mean_cosine": float(cos.mean()),
        "worst_cosine": float(cos.min()),
        "top5_overlap": 1.0,
    }
