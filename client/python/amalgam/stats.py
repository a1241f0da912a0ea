"""Collect merge statistics (Gram matrices, diagonal Fisher) from torch models.

These are the privacy-preserving statistics Amalgam's merge methods consume:

* :func:`gram` -- for every ``torch.nn.Linear`` (and GPT-2 style ``Conv1D``) layer,
  ``G = sum over input rows x of x^T x`` (``in x in``), as used by RegMean. Keyed by the
  name of the layer's weight parameter, e.g.
  ``encoder.layer.0.attention.self.query.weight``.
* :func:`fisher` -- the diagonal empirical Fisher information of every trainable
  parameter, keyed by parameter name, as used by Fisher-weighted averaging.

Both return a :class:`Statistics` whose ``tensors`` are float64 CPU tensors and whose
:meth:`Statistics.metadata` is the safetensors ``__metadata__`` the server expects.

This module depends only on torch and the standard library (no gRPC), so it can be used
without the generated protocol stubs.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import hashlib
from dataclasses import field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

__all__ = ["Statistics", "gram", "fisher"]

_REDUCTIONS = ("sum", "mean")


@dataclasses.dataclass
class Statistics:
    """A set of per-tensor statistics plus the metadata the server needs.

    Attributes:
        tensors: statistic per tensor name (float64, CPU).
        num_examples: number of rows (Gram) or examples (Fisher) summed; for a Gram the
            most common per-tensor row count.
        reduction: ``"sum"`` if the tensors are sums over rows, ``"mean"`` if they have
            been divided by their row counts.
        rows: per-tensor row counts; a tensor missing here has ``num_examples`` rows.
        aliases: Gram statistics only: weight name -> the name of another tensor of
            ``tensors`` that is equal to its own (weights that read the same input, such
            as a layer's query, key and value). Uploads store each such Gram once, under
            the name aliased, with ``alias.<weight>`` in the metadata; the server then
            solves those weights with one factorisation. ``tensors`` keeps every name.
    """

    tensors: Dict[str, torch.Tensor]
    num_examples: int
    reduction: str = "sum"
    rows: Dict[str, int] = field(default_factory=dict)
    aliases: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.reduction not in _REDUCTIONS:
            raise ValueError(
                f"reduction must be one of {_REDUCTIONS}, got {self.reduction!r}"
            )

    def rows_of(self, name: str) -> int:
        """Row count of tensor ``name`` (``num_examples`` unless recorded otherwise)."""
        return int(self.rows.get(name, self.num_examples))

    def metadata(self) -> Dict[str, str]:
        """The safetensors ``__metadata__`` for these statistics.

        Always has ``num_examples`` and ``reduction``; adds ``rows.<name>`` for every
        tensor whose row count differs from ``num_examples``, and ``alias.<name>`` for
        every alias.
        """
        meta = {"num_examples": str(int(self.num_examples)), "reduction": self.reduction}
        for name in sorted(self.rows):
            r = int(self.rows[name])
            if r != int(self.num_examples):
                meta[f"rows.{name}"] = str(r)
        for name in sorted(self.aliases):
            meta[f"alias.{name}"] = self.aliases[name]
        return meta

    def stored_tensors(self) -> Dict[str, torch.Tensor]:
        """The tensors a file of these statistics holds: all but the aliased ones."""
        return {n: t for n, t in self.tensors.items() if n not in self.aliases}

    def mean(self) -> "Statistics":
        """Return these statistics with every tensor divided by its own row count.

        The result has ``reduction == "mean"`` and the same row counts. Statistics that
        are already means are returned as a (shallow) copy; tensors with zero rows are
        left unchanged.
        """
        if self.reduction == "mean":
            return Statistics(dict(self.tensors), self.num_examples, "mean",
                              dict(self.rows), dict(self.aliases))
        out = {}
        for name, t in self.tensors.items():
            r = self.rows_of(name)
            out[name] = t / r if r > 0 else t.clone()
        return Statistics(out, self.num_examples, "mean", dict(self.rows),
                          dict(self.aliases))


# --------------------------------------------------------------------------- helpers


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside ``obj`` (tensors, tuples, lists, mappings) to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, collections.abc.Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _call(model: torch.nn.Module, batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, collections.abc.Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


class _EvalMode:
    """Put every submodule in eval mode; restore each one's previous mode on exit."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.saved: List[Tuple[torch.nn.Module, bool]] = []

    def __enter__(self) -> "_EvalMode":
        self.saved = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self

    def __exit__(self, *exc: Any) -> None:
        for m, mode in self.saved:
            m.training = mode


def _linear_in_features(m: torch.nn.Module) -> Optional[int]:
    """Input width if ``m`` is a Linear or GPT-2 style Conv1D, else None."""
    if isinstance(m, torch.nn.Linear):
        return int(m.weight.shape[1])
    if type(m).__name__ == "Conv1D":
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() == 2:
            return int(w.shape[0])  # Conv1D weight is [in, out]: y = x @ W + b
    return None


def _equal_tensors(tensors: Dict[str, torch.Tensor], rows: Dict[str, int]) -> Dict[str, str]:
    """Name -> the first name (sorted) of an equal tensor (same dtype, shape, values
    and row count)."""
    first: Dict[Tuple[Any, ...], str] = {}
    aliases: Dict[str, str] = {}
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest = hashlib.sha256(t.numpy().tobytes()).hexdigest()
        key = (t.dtype, tuple(t.shape), rows.get(name), digest)
        if key in first and torch.equal(tensors[first[key]], t):
            aliases[name] = first[key]
        else:
            first.setdefault(key, name)
    return aliases


def _most_common(counts: Iterable[int]) -> int:
    c = collections.Counter(counts)
    if not c:
        return 0
    best = max(c.values())
    return max(v for v, n in c.items() if n == best)


# --------------------------------------------------------------------------- gram


def gram(
    model: torch.nn.Module,
    batches: Iterable[Any],
    *,
    device: Union[str, torch.device, None] = None,
    skip_padding: bool = False,
    mask_key: str = "attention_mask",
    forward: Optional[Callable[[torch.nn.Module, Any], Any]] = None,
    share: bool = True,
) -> Statistics:
    """Collect the Gram matrix of the inputs of every linear layer of ``model``.

    A forward pre-hook on every ``torch.nn.Linear`` and every GPT-2 style ``Conv1D``
    (class named ``Conv1D`` with a 2-D ``[in, out]`` weight) flattens the layer input to
    rows ``x.reshape(-1, in)`` and accumulates ``x^T x`` in float64. Every token position
    counts as a row. The result is keyed by the weight's parameter name (as given by
    ``model.named_parameters()``); layers that never ran have no entry.

    Args:
        model: the model; it is put in eval mode while collecting (each submodule's
            previous mode is restored afterwards) and run under ``torch.no_grad()``. It is
            never moved.
        batches: iterable of batches. A tensor is called as ``model(batch)``, a tuple or
            list as ``model(*batch)``, a mapping as ``model(**batch)``.
        device: where to move the batches' tensors before the call; defaults to the
            device of the model's first parameter.
        skip_padding: with mapping batches that contain ``mask_key`` (shape ``[B, T]``,
            0 = padding), drop the rows of inputs whose leading dims equal the mask's shape
            where the mask is 0. Inputs with other leading shapes (e.g. a pooler on
            ``[B, H]``) count all rows.
        mask_key: the key of the attention mask in mapping batches.
        forward: ``forward(model, batch)`` replaces the default call convention.
        share: alias layers whose Grams are equal (they read the same input: a layer's
            query, key and value; gate and up) to the first of them by name, so the
            upload holds each such Gram once.

    Returns:
        :class:`Statistics` with ``reduction="sum"``, float64 CPU tensors of shape
        ``in x in``, per-tensor row counts in ``rows``, ``num_examples`` the most
        common row count (ties broken towards the largest) and, with ``share``, the
        ``aliases`` of equal Grams.
    """
    model_device = _model_device(model)
    target = torch.device(device) if device is not None else model_device

    param_names = {id(p): n for n, p in model.named_parameters()}
    acc: Dict[str, torch.Tensor] = {}
    rows: Dict[str, int] = {}
    state: Dict[str, Optional[torch.Tensor]] = {"mask": None}

    def make_hook(name: str, in_features: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            mask = state["mask"]
            if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                keep = (mask != 0).to(x.device).reshape(-1)
                x = x.reshape(-1, in_features)[keep]
            else:
                x = x.reshape(-1, in_features)
            x = x.detach()
            if x.device.type == "mps":  # no float64 on MPS
                x = x.cpu()
            x = x.to(torch.float64)
            g = acc.get(name)
            if g is None:
                acc[name] = x.t() @ x
            else:
                g.addmm_(x.t(), x)
            rows[name] = rows.get(name, 0) + int(x.shape[0])

        return hook

    handles = []
    try:
        for mod_name, m in model.named_modules():
            in_features = _linear_in_features(m)
            if in_features is None:
                continue
            w = m.weight
            name = param_names.get(id(w))
            if name is None:
                name = f"{mod_name}.weight" if mod_name else "weight"
            handles.append(m.register_forward_pre_hook(make_hook(name, in_features)))

        with _EvalMode(model), torch.no_grad():
            for batch in batches:
                batch = _to_device(batch, target)
                state["mask"] = None
                if skip_padding and isinstance(batch, collections.abc.Mapping):
                    mask = batch.get(mask_key)
                    if isinstance(mask, torch.Tensor):
                        state["mask"] = mask
                if forward is not None:
                    forward(model, batch)
                else:
                    _call(model, batch)
    finally:
        for h in handles:
            h.remove()
        state["mask"] = None

    tensors = {n: g.cpu() for n, g in acc.items()}
    num = _most_common(rows.values())
    aliases = _equal_tensors(tensors, rows) if share else {}
    return Statistics(tensors=tensors, num_examples=num, reduction="sum", rows=dict(rows),
                      aliases=aliases)


# --------------------------------------------------------------------------- fisher


def fisher(
    model: torch.nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    *,
    device: Union[str, torch.device, None] = None,
) -> Statistics:
    """Collect the diagonal empirical Fisher information of ``model``.

    For every example, the gradient of its loss with respect to every parameter that
    requires grad is squared; the squares are summed over examples and divided by the
    number of examples.

    Args:
        model: the model; it is put in eval mode while collecting (each submodule's
            previous mode is restored afterwards). Parameters' ``.grad`` are not touched
            (gradients are taken with ``torch.autograd.grad``).
        batches: iterable of batches, each passed (its tensors moved to ``device``) to
            ``loss_fn``.
        loss_fn: ``loss_fn(model, batch)`` returns either a 1-D tensor of per-example
            losses (shape ``[B]``; each example's gradient is computed separately) or a
            scalar (treated as one example).
        device: where to move the batches' tensors; defaults to the device of the
            model's first parameter.

    Returns:
        :class:`Statistics` with ``reduction="mean"``, float64 CPU tensors shaped like
        the parameters, keyed by parameter name, ``num_examples`` = examples seen.
    """
    model_device = _model_device(model)
    target = torch.device(device) if device is not None else model_device

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = [p for _, p in named]
    acc = [torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params]
    seen = 0

    if params:
        with _EvalMode(model), torch.enable_grad():
            for batch in batches:
                batch = _to_device(batch, target)
                loss = loss_fn(model, batch)
                if not isinstance(loss, torch.Tensor):
                    raise TypeError(
                        f"loss_fn must return a tensor, got {type(loss).__name__}"
                    )
                if loss.dim() == 0:
                    losses = [loss]
                elif loss.dim() == 1:
                    losses = [loss[i] for i in range(loss.shape[0])]
                else:
                    raise ValueError(
                        "loss_fn must return a scalar or a 1-D tensor of per-example "
                        f"losses, got shape {tuple(loss.shape)}"
                    )
                n = len(losses)
                for i, li in enumerate(losses):
                    grads = torch.autograd.grad(
                        li, params, retain_graph=i < n - 1, allow_unused=True
                    )
                    for a, g in zip(acc, grads):
                        if g is not None:
                            a.add_(g.detach().to(torch.float64).square())
                seen += n

    tensors = {}
    for name, a in zip(names, acc):
        if seen > 0:
            a = a / seen
        tensors[name] = a.cpu()
    return Statistics(tensors=tensors, num_examples=seen, reduction="mean")
