"""What each form of a causal LM's tied table costs on its own: SmolLM2-135M.

Only the table (the embedding and, tied to it, the output head) is replaced;
every other weight stays the input file's. Rank-r truncations of the table,
rows weighted by the calibration's token counts, columns whitened by the
head's input moment at several dampings (None: not whitened), against
4-bit (float16 zero points, Q4_1's layout) and 5-bit symmetric (Q5_0's)
rounding in groups of 32. Scored on kflats' ``"outside"`` sentences (text
from another source than the calibration's), against the input model:
perplexity ratio, KL, top-1 agreement. Needs ``gguf`` and ``accelerate``::

    python benchmarks/tied_table_report.py --model SmolLM2-135M-Instruct.Q4_1.gguf \
        --rank 448
"""

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from transformers import AutoModelForCausalLM, AutoTokenizer

from kflats.datasets import load_sentences
from kflats.factorize import damped_moment
from kflats.quantize import quantize
from kflats.torch.models import adapter_for


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="the input GGUF file")
    parser.add_argument("--rank", type=int, default=448)
    parser.add_argument("--calibration-texts", type=int, default=256)
    parser.add_argument("--texts", type=int, default=160)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    path = Path(args.model)
    kw = {"gguf_file": path.name}
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    base = AutoModelForCausalLM.from_pretrained(
        str(path.parent), torch_dtype=torch.float32, **kw
    ).eval()
    table, head = base.get_input_embeddings(), base.get_output_embeddings()
    d = table.weight.shape[1]
    calibration = load_sentences("calibration")[: args.calibration_texts]
    texts = load_sentences("outside")[: args.texts]
    C, counts = np.zeros((d, d)), np.zeros(table.weight.shape[0])

    def moment(module, inputs):
        x = inputs[0].reshape(-1, d).double().numpy()
        C[...] += x.T @ x

    handle = head.register_forward_pre_hook(moment)
    with torch.no_grad():
        for a in range(0, len(calibration), 16):
            batch = tok(calibration[a : a + 16], return_tensors="pt", padding=True)
            base(**batch)
            ids = batch["input_ids"][batch["attention_mask"].bool()].numpy()
            np.add.at(counts, ids, 1)
    handle.remove()
    W = table.weight.detach().double().numpy()
    adapter = adapter_for(base)
    print("| the table | perplexity x | KL | top-1 | relative error |")
    print("|---|---|---|---|---|")

    def score(replaced, label):
        model = copy.deepcopy(base)
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(torch.from_numpy(replaced))
        s = adapter.evaluate(base, model, texts, tokenizer=tok, batch_size=8)
        rel = np.sum((W - replaced) ** 2) / np.sum(W**2)
        print(
            f"| {label} | {s['perplexity_ratio']:.4f} | {s['kl']:.4f} | "
            f"{s['top1_agreement']:.3f} | {rel:.4f} |",
            flush=True,
        )

    for damping in (None, 0.01, 1.0):
        L = np.eye(d) if damping is None else damped_moment(C, d, damping)[1]
        A = (W * np.sqrt(counts + 1.0)[:, None]) @ L
        V = linalg.eigh(A.T @ A)[1][:, ::-1][:, : args.rank]
        M = (W @ L) @ V @ V.T
        rows = linalg.solve_triangular(L, M.T, lower=True, trans="T").T
        how = "not whitened" if damping is None else f"whitened, damping {damping}"
        score(rows, f"rank {args.rank}, rows weighted, {how}")
    q4 = quantize(W.astype(np.float32), 4, 32, zero_dtype="float16")
    score(q4.dequantize().astype(np.float64), "4 bits, float16 zero points, g32")
    q5 = quantize(W.astype(np.float32), 5, 32, symmetric=True)
    score(q5.dequantize().astype(np.float64), "5 bits symmetric, g32")


if __name__ == "__main__":
    main()
