"""A small transformer-like encoder, its word tokenizer and texts, for the torch tests.

The encoder takes input dicts (``input_ids``, ``attention_mask``) and
returns ``{"last_hidden_state": ...}``, as a Hugging Face model does.
"""

import functools
import os

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, h):
        return self.norm(h + self.down(torch.relu(self.up(h))))


class TinyEncoder(nn.Module):
    """Embedding and two blocks: input dicts in, the last hidden state out."""

    def __init__(self, vocab=60, d=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d, padding_idx=0)
        self.layers = nn.ModuleList([Block(d), Block(d)])

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return {"last_hidden_state": h}


def word_tokenizer(
    texts, padding=True, truncation=True, max_length=None, *, vocab=60, **kwargs
):
    """One id per word (a hash into 1 .. vocab - 1), padded with 0."""
    ids = [[1 + sum(map(ord, w)) % (vocab - 1) for w in t.split()] for t in texts]
    if max_length is not None:
        ids = [seq[:max_length] for seq in ids]
    width = max(len(seq) for seq in ids)
    input_ids = torch.tensor([seq + [0] * (width - len(seq)) for seq in ids])
    return {"input_ids": input_ids, "attention_mask": (input_ids > 0).long()}


def tokenizer_for(vocab):
    """:func:`word_tokenizer` into a vocabulary of ``vocab`` ids."""
    return functools.partial(word_tokenizer, vocab=vocab)


SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park today",
    "rain is expected over the hills tonight",
    "she paid the bill with a card",
    "the train to the city was late again",
    "bread needs flour water salt and time",
    "he fixed the bike in the garage",
    "our team won the match at home",
]


def snapshot(model):
    """What a failed call must leave as it was: module types, state, mode."""
    return (
        {n: type(m) for n, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
        model.training,
    )


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now[0] == snap[0] and now[2] == snap[2]
    assert all(torch.equal(now[1][k], snap[1][k]) for k in snap[1])


def tiny_bert(transformers, seed=0, **config):
    """A tiny BertModel, seeded, in eval mode; ``config`` overrides its sizes."""
    sizes = dict(
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.BertModel(transformers.BertConfig(**{**sizes, **config})).eval()


def weight_files(path):
    """Bytes of a folder's weight files, as the file system counts them."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
        if name.endswith(".safetensors")
    )
