"""heal: a short distillation of a compressed model towards the original.

The steps, one function each: check the options and the inputs → choose the
matrices that train (and, for quantized ones, train latent floats through
the rounding) → check the teacher's and the model's outputs on a first batch
→ the training loop → write the trained matrices back into their packed
quantized form, bits, group sizes and bytes unchanged.
"""

import contextlib
import math
import numbers

import torch
from torch import nn
from torch.nn.utils import parametrize

from kflats.torch.calibration._calibrate import check_count
from kflats.torch.compression._heal_loop import check_held_out, train
from kflats.torch.layers import QUANTIZED_RECORD, ProjectiveEmbedding, ProjectiveLinear
from kflats.torch.models import adapter_for, relative_mse

__all__ = ["heal"]

_TRAINABLE = ("compressed", "projective", "all")


class _Recorder:
    """Forward hooks that keep the outputs of a model's blocks for one step."""

    def __init__(self, model, stacks):
        self.outputs = []
        self.handles = []
        for stack in stacks:
            for block in model.get_submodule(stack):
                self.handles.append(block.register_forward_hook(self._keep))

    def _keep(self, module, args, output):
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self):
        outputs, self.outputs = self.outputs, []
        return outputs

    def remove(self):
        for handle in self.handles:
            handle.remove()


# --- 1. the options and the inputs, checked before anything changes --------------


def _check_options(steps, batch_size, max_length, lr, layer_weight, trainable, scales):
    if not isinstance(scales, bool):
        raise ValueError(f"heal: scales must be True or False, got {scales!r}")
    try:
        check_count(steps, "steps")
        check_count(batch_size, "batch_size")
        if max_length is not None:
            check_count(max_length, "max_length")
    except ValueError as exc:
        raise ValueError(f"heal: {exc}") from None
    if not (isinstance(lr, numbers.Real) and 0 < lr < math.inf):
        raise ValueError(f"heal: lr must be a positive float, got {lr!r}")
    if not (isinstance(layer_weight, numbers.Real) and 0 <= layer_weight < math.inf):
        raise ValueError(
            f"heal: layer_weight must be a float >= 0, got {layer_weight!r}"
        )
    if trainable not in _TRAINABLE:
        raise ValueError(
            f"heal: trainable must be one of {_TRAINABLE}, got {trainable!r}"
        )


def _check_inputs(model, teacher, data, tokenizer):
    """The texts and both models' adapters, every input checked."""
    for name, value in (("model", model), ("teacher", teacher)):
        if not isinstance(value, nn.Module):
            raise TypeError(
                f"heal: {name} must be a torch.nn.Module, got {type(value).__name__}"
            )
    if isinstance(data, str) or not isinstance(data, (list, tuple)):
        raise TypeError(
            f"heal: data must be a list of strings, got {type(data).__name__}"
        )
    texts = list(data)
    if not texts:
        raise ValueError("heal: data is empty: heal needs calibration texts")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("heal: data must be a list of strings")
    adapter, teacher_adapter = adapter_for(model), adapter_for(teacher)
    if tokenizer is None and not adapter.has_tokenizer():
        raise ValueError(
            "heal: data holds texts, and the model has no tokenizer of its own (it "
            "is not a sentence-transformers model): pass tokenizer="
        )
    if tokenizer is not None:
        adapter.check_tokenizer(tokenizer)
    return texts, adapter, teacher_adapter


# --- 2. what trains ------------------------------------------------------------------


def _quantized(module):
    return bool(getattr(module, QUANTIZED_RECORD, None))


def _trained_layers(model, which):
    """The layers whose matrices train: the whole model for ``"all"``."""
    if which == "all":
        return [model]
    layers = [
        m
        for m in model.modules()
        if isinstance(m, (ProjectiveEmbedding, ProjectiveLinear))
        or (which == "compressed" and _quantized(m))
    ]
    if not layers:
        what = "ProjectiveEmbedding or ProjectiveLinear layer"
        if which == "compressed":
            what += " nor quantized weight"
        raise ValueError(
            f"heal: trainable={which!r} but the model holds no {what}: compress "
            "it first, or pass trainable='all'"
        )
    return layers


def _slots(layer):
    """(owner, attribute) of each matrix that trains in a layer, in order."""
    if isinstance(layer, (ProjectiveEmbedding, ProjectiveLinear)):
        slots = [(layer.coefficients, str(c)) for c in range(len(layer.coefficients))]
        slots.append((layer, "bases"))
        if layer.means is not None:
            slots.append((layer, "means"))
        return slots
    return [(layer, "weight")]  # a quantized nn.Linear or nn.Embedding


def _leaf(owner, name):
    """The parameter the optimizer updates: a latent float where parametrized."""
    if parametrize.is_parametrized(owner, name):
        return owner.parametrizations[name].original
    return getattr(owner, name)


def _parameters(model, layers):
    """The leaves the optimizer updates, in a fixed order."""
    if layers == [model]:
        return list(model.parameters())
    out = []
    for layer in layers:
        for owner, name in _slots(layer):
            out.append(_leaf(owner, name))
            if parametrize.is_parametrized(owner, name):  # its scales, if trained
                out += list(owner.parametrizations[name][0].parameters())
    return out


def _packed_forms(model):
    """What the packed form of each quantized matrix must keep through a heal."""
    from kflats.torch.layers import quantized_tensors

    return {
        name: (qt.shape, qt.bits, qt.group_size, qt.axis, qt.symmetric, qt.nbytes)
        for name, qt in quantized_tensors(model).items()
    }


@contextlib.contextmanager
def _through_the_rounding(model, layers, scales=False):
    """Yield the parameters that train; quantized ones as latent floats.

    Each quantized matrix of ``layers`` trains as a float master copy that
    the forward rounds to its grid, the gradient passing straight through
    the rounding; on the way out (also after an error) it is rounded once
    more and written back into its packed form, whose bits, group size and
    bytes are checked to be unchanged. With ``scales``, the scales of each
    group train too and are written back.
    """
    if not any(_quantized(m) for m in model.modules()):
        yield _parameters(model, layers)
        return
    from kflats.torch.layers import register_straight_through_, requantize_

    forms = _packed_forms(model)
    for layer in layers:
        register_straight_through_(layer, scales=scales)
    try:
        yield _parameters(model, layers)
    finally:
        requantize_(model)
        if _packed_forms(model) != forms:  # pragma: no cover - a kflats bug
            raise RuntimeError("heal changed the packed form of a quantized matrix")


# --- 3. the batches, the block outputs and a first check ---------------------------


def _device(model):
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - _trained_layers found parameters
        return torch.device("cpu")


def _stacks(teacher_adapter, model, layer_weight):
    """The block stacks matched layer by layer (none when layer_weight is 0)."""
    stacks = teacher_adapter.block_stacks() if layer_weight > 0 else []
    try:
        for stack in stacks:
            model.get_submodule(stack)
    except AttributeError:
        return []  # another architecture: the shape check says so
    return stacks


class _Pair:
    """The model and its teacher: batches of text, outputs, block outputs."""

    def __init__(self, model, teacher, texts, tokenizer, max_length, stacks):
        self.adapter, self.teacher_adapter = adapter_for(model), adapter_for(teacher)
        self.model, self.teacher = model, teacher
        self.texts, self.tokenizer, self.max_length = texts, tokenizer, max_length
        self.device = _device(model)
        self.recorders = _Recorder(model, stacks), _Recorder(teacher, stacks)

    def batch(self, indices):
        return self.batch_of([self.texts[i] for i in indices])

    def batch_of(self, texts):
        batch = self.adapter.tokenize(texts, self.tokenizer, self.max_length)
        return {
            k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()
        }

    def teacher_outputs(self, batch):
        """The teacher's final output and block outputs, without gradients."""
        with torch.no_grad():
            final = self.teacher_adapter.final(self.teacher_adapter.run(batch))
            return final, self.recorders[1].take()

    def outputs(self, batch):
        """The model's final output and block outputs."""
        final = self.adapter.final(self.adapter.run(batch))
        return final, self.recorders[0].take()

    def check_shapes(self, batch_size):
        """Both models' outputs on a first batch have the same shapes."""
        first = self.batch(range(min(batch_size, len(self.texts))))
        t_final, t_layers = self.teacher_outputs(first)
        with torch.no_grad():
            s_final, s_layers = self.outputs(first)
        if t_final.shape != s_final.shape or [t.shape for t in t_layers] != [
            s.shape for s in s_layers
        ]:
            raise ValueError(
                "heal: the teacher's outputs have shape "
                f"{tuple(t_final.shape)} and the model's {tuple(s_final.shape)} "
                "(or their layers differ): heal "
                "distils a compressed model towards its own original"
            )

    def loss(self, batch, layer_weight):
        """Distortion of the output plus the weighted mean error of the blocks."""
        target, target_layers = self.teacher_outputs(batch)
        output, layers = self.outputs(batch)
        loss = self.adapter.distortion(output, target, batch)
        if layers and layer_weight > 0:
            mask = batch.get("attention_mask")
            layer_loss = sum(
                relative_mse(s, t, mask)
                for s, t in zip(layers, target_layers, strict=True)
            ) / len(layers)
            loss = loss + layer_weight * layer_loss
        return loss

    def remove(self):
        for recorder in self.recorders:
            recorder.remove()


@contextlib.contextmanager
def _eval_mode(model, teacher):
    """Both models in eval mode; afterwards the teacher as it was, the model
    in eval mode once training began (``started[0]`` set), else as it was."""
    teacher_training, model_training = teacher.training, model.training
    started = [False]
    teacher.eval()
    model.eval()
    try:
        yield started
    finally:
        teacher.train(teacher_training)
        model.train(model_training and not started[0])


@contextlib.contextmanager
def _only_trained(model, params):
    """Gradients for ``params`` alone; every flag as it was afterwards."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


# --- 5. heal ------------------------------------------------------------------------


def heal(
    model,
    teacher,
    data,
    *,
    steps=200,
    batch_size=16,
    lr=1e-4,
    trainable="compressed",
    layer_weight=1.0,
    tokenizer=None,
    max_length=None,
    progress=None,
    validation=None,
    eval_every=None,
    patience=3,
    scales=False,
):
    """Distil a compressed model towards the original, on calibration text.

    Each step draws ``batch_size`` texts at random, runs the original model
    (``teacher``, without gradients) and the compressed one, and takes one
    Adam step on the compressed model's factors (and quantized weights). The
    loss is

    - on the output, the distortion of the model's adapter for its output
      kind: ``1 - cosine`` between the sentence embeddings of a
      sentence-transformers model; the KL divergence of the original's
      token distributions from the compressed model's for the logits of a
      causal LM (next tokens), a masked LM or an encoder-decoder (over real
      positions), and of the class distributions of a classifier; the
      relative squared error of the last hidden state for any other model;
    - plus ``layer_weight`` times the mean relative squared error of the
      hidden states after each block of the model's block stacks (as its
      adapter names them; for an unknown model, its longest
      :class:`torch.nn.ModuleList` of identical blocks), padding left out:
      matching the states layer by layer tells every factor where its error
      comes from, which the final output alone does not.

    The learning rate rises linearly over the first 10% of the steps and
    then decays to 0 along a cosine; gradients are clipped to norm 1. The
    cluster ids never change. The model stays in eval mode (no dropout), so
    that the same ``torch.manual_seed`` gives the same result.

    A quantized matrix (:func:`kflats.quantize.quantize_module_`, or a
    ``unit="bytes"`` :func:`compress`) trains through its rounding: a float
    master copy is updated, the forward rounds it to the matrix's grid
    (scales and zero points fixed), and the gradient passes through the
    rounding unchanged (straight-through estimator). At the end each is
    rounded once more into its packed form: the same bits, group size and
    bytes, and a save and load gives the healed outputs bit for bit.

    Parameters
    ----------
    model : torch.nn.Module
        The compressed model (from :func:`compress`); trained in place.
    teacher : torch.nn.Module
        The original model, of the same architecture and output shapes; not
        changed.
    data : list of str
        Calibration text, disjoint from any evaluation text; needs a
        tokenizer (the model's own for a sentence-transformers model, else
        ``tokenizer=``).
    steps : int, default=200
        Optimizer steps, >= 1.
    batch_size : int, default=16
    lr : float, default=1e-4
        Peak learning rate of Adam. On all-MiniLM-L6-v2 compressed to half
        its numbers, 1e-4 lifted the held-out fidelity from 0.892 to 0.912 in
        300 steps, 3e-4 to 0.904, and 1e-3 lowered it to 0.873. Compressed
        to 0.10x of its bytes (``unit="bytes"``, every matrix quantized or
        factored), 300 steps at 1e-4 lifted it from 0.9749 to 0.9756 (and
        lowered it on movie-review snippets, text from elsewhere, from
        0.965 to 0.960); at 1e-3 no step did better on the held-out texts.
    trainable : {"compressed", "projective", "all"}, default="compressed"
        ``"compressed"``: the factors of the projective layers (coefficients,
        bases, means) and the weight of each quantized layer train;
        ``"projective"``: the factors alone; ``"all"``: every parameter of
        ``model``. Without quantized layers the first two are the same.
    layer_weight : float, default=1.0
        Weight of the layer-by-layer term; 0 matches the output alone.
    tokenizer : callable, default=None
    max_length : int, default=None
        Truncate texts to this many tokens.
    progress : bool, default=None
        Show a tqdm progress bar; ``None``: from 20 steps on.
    validation : list of str, default=None
        Held-out texts, none of them in ``data``: every ``eval_every`` steps
        (and before the first) the output's distortion is measured on them,
        and at the end the model holds the trained matrices of the best
        measure (the untrained ones if no step helped); ``patience``
        measures without a better one stop the heal early.
    eval_every : int, default=None
        Steps between held-out measures; ``None``: a tenth of ``steps``
        (at least 1).
    patience : int, default=3
        Held-out measures without improvement before the heal stops.
    scales : bool, default=False
        Train the scales of each quantized matrix that trains too, through
        the rounding (in log space, the rounding's gradient taken as the
        identity's), and write them into its packed form: the same bytes.

    Returns
    -------
    losses : HealLosses
        A list: the loss at each step run (before that step's update); its
        ``validation`` holds the held-out measures ``(step, loss)``, its
        ``best_step`` the step the model was left at, and
        ``stopped_early`` whether ``patience`` ended it.

    Raises
    ------
    ValueError
        If ``steps < 1``, ``data`` is empty or not texts, ``validation`` is
        empty or shares texts with ``data``, no tokenizer is
        known, the model holds nothing compressed to train (no projective
        layer, nor quantized weight for ``"compressed"``), or the teacher's
        outputs have other shapes than the model's. The model is untouched then.

    See Also
    --------
    compress : Compress the model first.

    Examples
    --------
    >>> import torch
    >>> from kflats.torch import compress, heal
    >>> class Model(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.emb = torch.nn.Embedding(50, 16)
    ...         self.out = torch.nn.Linear(16, 16)
    ...     def forward(self, input_ids, attention_mask=None):
    ...         return self.out(self.emb(input_ids))
    >>> def tokenizer(texts, **kwargs):  # one id per word
    ...     ids = [[len(w) for w in t.split()][:4] + [0] * 4 for t in texts]
    ...     return {"input_ids": torch.tensor([i[:4] for i in ids])}
    >>> _ = torch.manual_seed(0)
    >>> teacher = Model()
    >>> model = Model()
    >>> _ = model.load_state_dict(teacher.state_dict())
    >>> _ = compress(model, 0.4, targets="emb", k=2, random_state=0)
    >>> texts = ["a bb ccc dddd", "eeeee ff g hh", "iii jjjj k ll"]
    >>> losses = heal(model, teacher, texts, steps=30, batch_size=2,
    ...               lr=1e-2, tokenizer=tokenizer)
    >>> len(losses), losses[-1] < losses[0], model.training
    (30, True, False)
    """
    _check_options(steps, batch_size, max_length, lr, layer_weight, trainable, scales)
    texts, _, teacher_adapter = _check_inputs(model, teacher, data, tokenizer)
    held_out = check_held_out(texts, validation, eval_every, patience, steps)
    layers = _trained_layers(model, trainable)
    stacks = _stacks(teacher_adapter, model, layer_weight)
    pair = _Pair(model, teacher, texts, tokenizer, max_length, stacks)
    try:
        with _eval_mode(model, teacher) as started:
            pair.check_shapes(batch_size)  # before anything changes
            started[0] = True
            with (
                _through_the_rounding(model, layers, scales) as params,
                _only_trained(model, params),
            ):
                return train(
                    pair,
                    params,
                    steps=steps,
                    batch_size=batch_size,
                    lr=lr,
                    layer_weight=layer_weight,
                    progress=progress,
                    held_out=held_out,
                )
    finally:
        pair.remove()
