"""export_onnx: a compressed folder as an ONNX model that onnxruntime runs.

The steps: load the folder (:func:`~kflats.torch.load_compressed`, the float
path), swap the modules whose form kflats writes itself for slots
(:mod:`._slots`), trace the transformer with torch's TorchScript exporter
(the rest of the model: attention, norms, float layers), convert it to
opset 21, replace each slot by the operators built from the module's own
codes, scales and factors (:mod:`._layers`, :mod:`._graph`), check the
model (``onnx.checker``, then an onnxruntime session against the torch
model on a padded batch), and write the folder (:mod:`._layout`) under a
hidden name, renamed to its own once complete.
"""

import inspect
import io
import json
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kflats import __version__
from kflats.torch.export._graph import MS_DOMAIN, Pieces
from kflats.torch.export._layers import build_module
from kflats.torch.export._layout import (
    ONNX_FILE,
    copy_library_files,
    former_module_names,
    write_record,
)
from kflats.torch.export._slots import DOMAIN, slot_modules_
from kflats.torch.io import hushed

__all__ = ["OnnxExport", "export_onnx"]

OPSET = 21  # blocked DequantizeLinear, uint4
_TRACE_OPSET = 18
# the output written: an encoder's hidden states (what sentence-transformers'
# ONNX backend pools), or a head's logits (a masked LM's, a classifier's)
_OUTPUTS = ("last_hidden_state", "logits")
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_FORMAT = "kflats.onnx-export"
# the check of the session against the torch model: the largest difference,
# relative to the largest entry of the output, by MatMulNBits' accuracy_level
# (0, 1: float32 products, float rounding apart; 2 to 4: float16 or int8
# activations); a bug moves outputs by about their own size
_CHECK_TOLERANCE = {0: 1e-3, 1: 1e-3, 2: 0.1, 3: 0.1, 4: 0.1}


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes
    ----------
    folder : pathlib.Path
        The export folder.
    model_path : pathlib.Path
        Its ONNX file (``onnx/model.onnx`` in the transformer's folder).
    inputs, outputs : tuple of str
        The model's input and output names.
    forms : tuple of TensorForm
        What each quantized matrix of the folder became.
    onnx_bytes : int
        The ONNX file's size.
    max_difference : float
        The largest difference between onnxruntime's output and the torch
        model's on the check batch, relative to the largest entry of the
        torch output.
    """

    folder: Path
    model_path: Path
    inputs: tuple
    outputs: tuple
    forms: tuple
    onnx_bytes: int
    max_difference: float

    @property
    def fallbacks(self):
        """The forms that are not their operator's own (each says why)."""
        return tuple(f for f in self.forms if f.fallback is not None)

    def summary(self):
        """A few lines for a person: the file, the operators, what fell back."""
        ops = {}
        for form in self.forms:
            ops[form.op] = ops.get(form.op, 0) + 1
        lines = [
            f"onnx: {self.model_path} ({self.onnx_bytes / 1e6:.2f} MB), inputs "
            f"{', '.join(self.inputs)}; output {', '.join(self.outputs)}",
            f"{len(self.forms)} quantized matrices: "
            + (", ".join(f"{n} as {op}" for op, n in sorted(ops.items())) or "none"),
        ]
        if self.fallbacks:
            lines.append(
                f"{len(self.fallbacks)} not in their operator's own form (values "
                "unchanged):"
            )
            by_reason = {}
            for f in self.fallbacks:
                by_reason.setdefault((f.op, f.fallback), []).append(f.name)
            for (op, why), names in by_reason.items():
                shown = ", ".join(names[:3]) + (
                    f" and {len(names) - 3} more" if len(names) > 3 else ""
                )
                lines.append(f"  {op}, {why}: {shown}")
        lines.append(
            f"checked: onnxruntime's output within {self.max_difference:.1e} of "
            "kflats' torch model (relative to its largest entry)"
        )
        return "\n".join(lines)


def _needs_onnx():
    """onnx and onnxruntime, or an ImportError that says how to get them."""
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError as exc:
            raise ImportError(
                f"kflats export needs {name}, which is not installed: pip install "
                "'kflats[onnx]'",
                name=name,
            ) from exc


def _load(folder):
    """The folder's model (the float path) and its kflats.json."""
    from kflats.torch.io import load_compressed

    options = {}
    if "unpack" in inspect.signature(load_compressed).parameters:
        options["unpack"] = True  # the float layers, each with its codes
    model = load_compressed(folder, **options)
    manifest = json.loads((folder / "kflats.json").read_text())
    return model, manifest


def _transformer(model, manifest, where):
    """The transformers model to trace, and its folder within the export."""
    kind, root = manifest["kind"], manifest["root"]
    if kind == "sentence-transformers":
        return model.get_submodule(root["module"]).auto_model, root["path"]
    if kind == "transformers":
        return model, ""
    raise ValueError(
        f"{where} holds a plain torch module; kflats export writes transformers "
        "and sentence-transformers models"
    )


def _input_names(hf):
    parameters = inspect.signature(hf.forward).parameters
    names = [n for n in _INPUTS if n in parameters]
    if "input_ids" not in names or "attention_mask" not in names:
        raise ValueError(
            f"{type(hf).__name__} does not take input_ids and attention_mask; kflats "
            "export writes text encoders"
        )
    if "token_type_ids" in names and not getattr(hf.config, "type_vocab_size", 0):
        names.remove("token_type_ids")
    return names


def _example(hf, names, seed=0):
    """A padded batch of 2 sequences of 9 tokens (the second padded from 5)."""
    vocab = int(hf.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(5, vocab - 1), vocab, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    feeds["token_type_ids"] = torch.zeros_like(ids)
    return [feeds[n] for n in names]


class _Traced(nn.Module):
    """The transformer, called with positional inputs, one output out."""

    def __init__(self, hf, names, output):
        super().__init__()
        self.hf = hf
        self.names = list(names)
        self.output = output

    def forward(self, *inputs):
        out = self.hf(**dict(zip(self.names, inputs, strict=True)), return_dict=True)
        return out[self.output]


def _eager(hf):
    """Eager attention, the form the TorchScript exporter traces."""
    setter = getattr(hf, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter("eager")
            return
        except (ValueError, TypeError, AttributeError):  # pragma: no cover
            pass
    hf.config._attn_implementation = "eager"  # pragma: no cover - older transformers


def _trace(traced, names, inputs, ndim):
    """The TorchScript exporter's ONNX model of ``traced``, with its slots.

    ``ndim``: the output's dimensions (3 for tokens' vectors, 2 for a
    sequence's logits).
    """
    import onnx

    axes = {n: {0: "batch_size", 1: "sequence_length"} for n in names}
    axes[traced.output] = (
        {0: "batch_size", 1: "sequence_length"} if ndim > 2 else {0: "batch_size"}
    )
    options = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        options["dynamo"] = False
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            traced,
            tuple(inputs),
            buffer,
            input_names=list(names),
            output_names=[traced.output],
            dynamic_axes=axes,
            opset_version=_TRACE_OPSET,
            custom_opsets={DOMAIN: 1},
            do_constant_folding=True,
            **options,
        )
    return onnx.load_from_string(buffer.getvalue())


def _rewrite(proto, slots, accuracy_level):
    """Each slot replaced by its module's operators; the model and the forms."""
    import onnx
    from onnx import helper, version_converter

    proto = version_converter.convert_version(proto, OPSET)
    graph = proto.graph
    pieces = Pieces(accuracy_level)
    pieces.reserve(t.name for t in graph.initializer)
    pieces.reserve(t.name for t in [*graph.input, *graph.output])
    pieces.reserve(n for node in graph.node for n in [*node.output, node.name])
    nodes, rename = [], {}
    for node in graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        (key,) = [a.s.decode() for a in node.attribute if a.name == "key"]
        module, tensors = slots[key]
        start = len(pieces.nodes)
        rename[node.output[0]] = build_module(
            pieces, node.input[0], key, module, tensors, slots
        )
        nodes.extend(pieces.nodes[start:])
    for node in nodes:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    for output in graph.output:
        if output.name in rename:  # a slot's output is the model's
            nodes.append(
                helper.make_node("Identity", [rename[output.name]], [output.name])
            )
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(pieces.initializers)
    del graph.value_info[:]  # the slots' shapes; onnxruntime infers them again
    imports = [o for o in proto.opset_import if o.domain not in (DOMAIN, MS_DOMAIN)]
    del proto.opset_import[:]
    proto.opset_import.extend(imports)
    proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    proto.producer_name, proto.producer_version = "kflats", __version__
    onnx.checker.check_model(proto)
    return proto, tuple(pieces.forms)


def _check(data, names, inputs, output, reference, accuracy_level):
    """onnxruntime's output on the example against the torch model's."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    (out,) = session.run(
        [output], {n: x.numpy() for n, x in zip(names, inputs, strict=True)}
    )
    ref = reference.numpy()
    scale = max(float(np.abs(ref).max()), 1e-30)
    difference = float(np.abs(out - ref).max()) / scale
    if out.shape != ref.shape or not difference <= _CHECK_TOLERANCE[accuracy_level]:
        raise RuntimeError(  # a bug of kflats, not of its input
            f"the exported model computes another output than the folder's model "
            f"(largest difference {difference:.2e} of the output's scale)"
        )
    return difference


def _claim(out):
    if os.path.lexists(out) and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"{str(out)!r} exists and is not an empty folder; kflats export writes a "
            "new folder"
        )


def export_onnx(folder, out, *, accuracy_level=0):
    """Write a compressed folder as an ONNX model that onnxruntime runs.

    The folder :func:`~kflats.torch.save_compressed` (or ``kflats
    compress``) wrote becomes a folder that sentence-transformers' ONNX
    backend reads (``SentenceTransformer(out, backend="onnx")``, with
    optimum-onnx installed) and that a plain onnxruntime session runs:
    ``onnx/model.onnx`` beside a copy of the folder's tokenizer, config and
    sentence-transformers files (modules.json naming its modules as
    sentence-transformers 5 and 6 both read them). The model takes
    ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where the
    model does) and gives ``last_hidden_state`` (a model with a head, a
    masked LM say: ``logits``); pooling stays with sentence-transformers'
    modules.

    Each quantized matrix keeps kflats' own codes, scales and zero points,
    re-packed, never rounded again: a Linear's weight (and a factor grouped
    along its product's inner side) as onnxruntime's ``MatMulNBits``, an
    embedding table (and an embedding's coefficients) as
    ``GatherBlockQuantized``. Projective layers become their factor
    products (gathers by cluster, MatMuls, a permutation). A form an
    operator cannot hold falls back to the nearest one that holds the same
    values: codes widened to a width the operator takes (3 bits to 4, 5
    and 6 to 8; 2 to 4 in MatMulNBits), a group cut into blocks,
    the codes dequantized in the graph (folded to a float32 weight when the
    session starts), a table's gathered rows dequantized.
    :attr:`OnnxExport.fallbacks` lists them, and why.

    Parameters
    ----------
    folder : str or path-like
        A folder written by :func:`~kflats.torch.save_compressed` (a
        transformers or sentence-transformers text encoder).
    out : str or path-like
        The folder to write; it must not exist yet (or be empty).
    accuracy_level : {0, 1, 2, 3, 4}, default=0
        ``MatMulNBits``' own setting: below 4, the products in float32 (the
        outputs of kflats' torch model, up to float rounding); 4 lets
        onnxruntime quantize the activations to int8 on the fly (faster on
        CPUs with int8 dot products, no longer exact), and takes 2- and
        8-bit codes as they are.

    Returns
    -------
    OnnxExport

    Raises
    ------
    ValueError
        If ``folder`` is not a folder kflats wrote (or was written by an
        older format), holds another kind of model, or a symbolic link.
    FileExistsError
        If ``out`` exists and is not an empty folder.

    Examples
    --------
    >>> from kflats.torch.export import export_onnx
    >>> result = export_onnx("compressed", "exported")  # doctest: +SKIP
    >>> print(result.summary())  # doctest: +SKIP
    """
    if accuracy_level not in (0, 1, 2, 3, 4) or isinstance(accuracy_level, bool):
        raise ValueError(f"accuracy_level must be 0 to 4, got {accuracy_level!r}")
    _needs_onnx()
    folder, out = Path(os.fspath(folder)), Path(os.fspath(out))
    where = repr(str(folder))
    _claim(out)
    model, manifest = _load(folder)
    hf, transformer = _transformer(model, manifest, where)
    hf.eval()
    names = _input_names(hf)
    inputs = _example(hf, names)
    with torch.no_grad():
        outputs = hf(**dict(zip(names, inputs, strict=True)), return_dict=True)
    output = next((name for name in _OUTPUTS if name in outputs), None)
    if output is None:
        raise ValueError(
            f"{where}: {type(hf).__name__} gives neither of {_OUTPUTS}; kflats "
            "export writes text encoders and their heads"
        )
    reference = outputs[output]
    slots = slot_modules_(hf)
    with hushed():
        _eager(hf)
        traced = _Traced(hf, names, output).eval()
        proto = _trace(traced, names, inputs, reference.ndim)
    proto, forms = _rewrite(proto, slots, accuracy_level)
    data = proto.SerializeToString()
    difference = _check(data, names, inputs, output, reference, accuracy_level)
    record = {
        "format": _FORMAT,
        "version": 1,
        "kflats_version": __version__,
        "source": str(folder),
        "onnx": (Path(transformer) / ONNX_FILE).as_posix(),
        "opset": OPSET,
        "inputs": names,
        "outputs": [output],
        "accuracy_level": accuracy_level,
        "max_difference": difference,
        "forms": [f.to_dict() for f in forms],
    }
    tmp = out.parent / f".{out.name}.kflats-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        copy_library_files(folder, tmp, transformer)
        record["module_names"] = former_module_names(tmp)
        path = tmp / transformer / ONNX_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        write_record(tmp, record)
        if out.exists():
            out.rmdir()  # empty, as checked
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return OnnxExport(
        folder=out,
        model_path=out / transformer / ONNX_FILE,
        inputs=tuple(names),
        outputs=(output,),
        forms=forms,
        onnx_bytes=len(data),
        max_difference=difference,
    )
