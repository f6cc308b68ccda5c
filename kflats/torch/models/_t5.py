"""Encoder-decoders: T5, whose word embedding is shared by its two stacks."""

from kflats.torch.models._transformers import TransformersAdapter


class T5Adapter(TransformersAdapter):
    """T5: the encoder alone, or the encoder-decoder.

    The word embedding is ``shared``, which the encoder's and decoder's
    ``embed_tokens`` (and a tied ``lm_head``) hold too: compressing it
    compresses them all, through the same factors.
    """

    family = "t5"
    model_types = ("t5", "mt5", "umt5")
    stacks = ("encoder.block", "decoder.block")


# -- sentence-transformers -------------------------------------------------------
