"""Decoders: causal language models, their Linear-in-all-but-name layers and tied heads.

A head tied to the word embedding (GPT-2's ``lm_head``, Llama's with
``tie_word_embeddings``) is found by :meth:`ModelAdapter.ties
<kflats.torch.models.ModelAdapter.ties>` and compressed with the embedding
(:mod:`kflats.torch.models._ties`).
"""

from kflats.torch.models._transformers import TransformersAdapter


class GPT2Adapter(TransformersAdapter):
    """GPT-2: Conv1D layers (Linear in all but name), head tied to ``wte``."""

    family = "gpt2"
    model_types = ("gpt2",)
    stacks = ("h",)


class LlamaAdapter(TransformersAdapter):
    """Llama-architecture decoders (Llama, Qwen2, Mistral, SmolLM2), tied or not."""

    family = "llama"
    model_types = ("llama", "qwen2", "qwen3", "mistral")
    stacks = ("layers",)
