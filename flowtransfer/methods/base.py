r"""The one interface every method (DiCMoR, the bounds, the baselines) implements, and its registry.

A method is an ``nn.Module`` that turns a :class:`~flowtransfer.data.Batch` into

* a training loss: ``loss(batch) -> (scalar, {name: float or 0-dim tensor})`` (the logged parts);
* predictions: ``predict(batch) -> (B,)`` for regression or ``(B, K)`` logits for classification,
  **never reading labels** and never reading absent slots (they hold NaN; the mask is the truth);
* optionally recovered features: ``recover(batch) -> {modality: (B, d, T)}`` in the method's shared
  feature space, for the distribution-distance evaluation.

Methods are built by name from plain data, so a checkpoint only needs ``(name, dataset_info, config)``::

    info = DatasetInfo.from_dataset(train_ds)
    model = build_method("dicmor", info, preset="small")
    loss, parts = model.loss(batch)

Training-time missingness (:func:`simulate_missing`) is drawn **per sample**: each sample loses its
own modalities, never the whole batch the same one (the released DiCMoR per-batch schedule lives in
:mod:`flowtransfer.data.missing` under its own name).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from flowtransfer.data.dataset import TASKS, Batch
from flowtransfer.labels import SENTIMENT_CLASSES

__all__ = [
    "DatasetInfo",
    "Method",
    "METHODS",
    "register_method",
    "build_method",
    "simulate_missing",
    "prior_labels",
    "check_supports_steps",
]


# --------------------------------------------------------------------------------------------------
# What a method needs to know about its data
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """Plain-data description of a dataset, enough to build any method.

    Attributes:
        modalities: modality names, in mask-column order.
        input_dims: modality -> channel count ``C_m``.
        seq_lens: modality -> sequence length ``T_m``.
        task: ``"regression"`` or ``"classification"``.
        num_classes: classification: the number of classes; regression: ``None``.
    """

    modalities: tuple[str, ...]
    input_dims: dict[str, int]
    seq_lens: dict[str, int]
    task: str
    num_classes: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(self.modalities))
        if not self.modalities:
            raise ValueError("DatasetInfo needs at least one modality")
        for key in ("input_dims", "seq_lens"):
            got = dict(getattr(self, key))
            missing = [m for m in self.modalities if m not in got]
            extra = [m for m in got if m not in self.modalities]
            if missing or extra:
                raise ValueError(
                    f"DatasetInfo.{key} must name exactly the modalities {list(self.modalities)}; "
                    f"missing {missing}, unexpected {extra}"
                )
            for m, v in got.items():
                if int(v) < 1:
                    raise ValueError(f"DatasetInfo.{key}[{m!r}] must be >= 1, got {v}")
            object.__setattr__(self, key, {m: int(got[m]) for m in self.modalities})
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")
        if self.task == "classification":
            if self.num_classes is None or int(self.num_classes) < 2:
                raise ValueError(f"classification needs num_classes >= 2, got {self.num_classes}")
            object.__setattr__(self, "num_classes", int(self.num_classes))
        elif self.num_classes is not None:
            raise ValueError("num_classes is for classification; regression has none")

    @property
    def prior_classes(self) -> int:
        """Classes of a class-conditional prior: the task's classes, or 7 for regression."""
        return self.num_classes if self.num_classes is not None else SENTIMENT_CLASSES

    @classmethod
    def from_dataset(cls, ds: Any) -> DatasetInfo:
        """From a :class:`~flowtransfer.data.MultimodalDataset` (or anything with the same attributes)."""
        return cls(
            modalities=tuple(ds.modalities),
            input_dims=dict(ds.input_dims),
            seq_lens=dict(ds.seq_lens),
            task=ds.task,
            num_classes=getattr(ds, "num_classes", None),
        )

    @classmethod
    def coerce(cls, info: Any) -> DatasetInfo:
        """Accept a ``DatasetInfo``, a plain mapping of its fields, or a dataset."""
        if isinstance(info, cls):
            return info
        if isinstance(info, Mapping):
            return cls(**info)
        if hasattr(info, "modalities") and hasattr(info, "input_dims"):
            return cls.from_dataset(info)
        raise TypeError(f"expected DatasetInfo, a mapping of its fields or a dataset, got {type(info).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for checkpoints): ``DatasetInfo(**info.to_dict()) == info``."""
        out = asdict(self)
        out["modalities"] = list(self.modalities)
        return out


def prior_labels(batch: Batch, info: DatasetInfo) -> Tensor:
    """``(B,)`` int64 class ids for a class-conditional prior (training only: reads labels).

    Uses ``batch.classes`` when the loader filled it in, else classification labels as they are or,
    for regression, :func:`flowtransfer.labels.sentiment_classes` of the scores (7 classes).
    """
    if batch.classes is not None:
        return batch.classes.long()
    if info.task == "classification":
        return batch.labels.long()
    from flowtransfer.labels import sentiment_classes

    return sentiment_classes(batch.labels)


# --------------------------------------------------------------------------------------------------
# Method
# --------------------------------------------------------------------------------------------------


class Method(nn.Module, abc.ABC):
    r"""Base class of every method: one interface for training loss, prediction and recovery.

    Subclasses set ``name`` (the registry key) and implement :meth:`loss` and :meth:`predict`;
    methods that recover missing modalities also implement :meth:`recover` and :meth:`encode`.

    Contract:

    * ``loss(batch) -> (loss, parts)``: ``loss`` a scalar tensor to minimise, ``parts`` a dict of
      the logged terms (the total included under ``"loss"``), each a Python float or a detached
      0-dim tensor: the trainer sums tensors on the device and reads them once per epoch, so
      returning ``x.detach()`` rather than ``float(x)`` keeps the step free of host synchronisation.
      May read labels.
    * ``predict(batch) -> Tensor``: ``(B,)`` regression outputs or ``(B, K)`` logits. Never reads
      labels, never reads absent slots (``batch.mask`` False), whatever they hold.
    * ``recover(batch) -> {m: (B, d, T)}``: recovered features of every modality absent in at
      least one sample, in the method's shared feature space; rows where ``m`` is present hold NaN.
    * ``encode(batch) -> {m: (B, d, T)}``: the real features in that same space (NaN where absent).
    * ``prepare(train_dataset)``: called once before training (statistics such as fill means).
    * ``parameter_groups()``: optimiser groups holding only trainable parameters.
    * ``complete_only``: True when the method is evaluated on complete data only (upper bound).
    * ``supports_step_missing``: True when the method respects ``batch.step_mask`` (intra-modality
      missing: removed time steps hold NaN and must never be read); False (the default) when it
      cannot, and :func:`check_supports_steps` refuses it before training.
    * ``hparams``: plain data that rebuilds the method with :func:`build_method`.
    """

    #: registry name, set by subclasses
    name: str = "method"
    #: True for models meant to be evaluated on complete data only (the full-modality upper bound)
    complete_only: bool = False
    #: True for methods that respect ``batch.step_mask`` (removed time steps inside a modality);
    #: a subclass that handles them says so by setting it (see :func:`check_supports_steps`)
    supports_step_missing: bool = False

    def __init__(self, info: DatasetInfo | Mapping[str, Any] | Any) -> None:
        super().__init__()
        self.info = DatasetInfo.coerce(info)

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.info.modalities

    @property
    def task(self) -> str:
        return self.info.task

    @abc.abstractmethod
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Scalar training loss and its logged parts."""

    @abc.abstractmethod
    def predict(self, batch: Batch) -> Tensor:
        """``(B,)`` regression outputs or ``(B, K)`` logits; never reads labels or absent slots."""

    def recover(self, batch: Batch) -> dict[str, Tensor]:
        """Recovered features ``{m: (B, d, T)}`` (NaN rows where ``m`` is present)."""
        raise NotImplementedError(f"method {self.name!r} does not recover missing modalities")

    def encode(self, batch: Batch) -> dict[str, Tensor]:
        """Real features ``{m: (B, d, T)}`` in the space of :meth:`recover` (NaN rows where absent)."""
        raise NotImplementedError(f"method {self.name!r} has no shared feature space")

    def prepare(self, dataset: Any) -> None:
        """Hook called once by the trainer with the training dataset before training (default: nothing).

        Methods that need training-set statistics (mean fill, k-means priors) compute them here.
        """

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Optimiser parameter groups; only parameters with ``requires_grad``."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"name": "all", "params": params}] if params else []

    @property
    def hparams(self) -> dict[str, Any]:
        """Plain data: ``build_method(h["name"], h["dataset_info"], **h["config"])`` rebuilds this method."""
        return {"name": self.name, "dataset_info": self.info.to_dict(), "config": {}}

    # ------------------------------------------------------------------ shared helpers
    #: seed base of the simulated missingness when ``loss`` runs in eval mode (validation)
    EVAL_SIMULATION_SEED = 20231001

    def simulation_generator(self, batch: Batch) -> torch.Generator | None:
        """Generator for :func:`simulate_missing` inside ``loss``.

        ``self.generator`` when set (attribute, default ``None``); in training mode otherwise the
        global RNG (``None``); in **eval mode** a generator seeded from the batch's first sample id,
        so a validation loss is the same number at every epoch and comparable across epochs.
        """
        gen = getattr(self, "generator", None)
        if gen is not None or self.training:
            return gen
        first = int(batch.index[0]) if batch.index is not None and batch.index.numel() else 0
        return torch.Generator(device=batch.mask.device).manual_seed(self.EVAL_SIMULATION_SEED + first)

    # ------------------------------------------------------------------ shared checks
    def _check_batch(self, batch: Batch) -> None:
        """Clear errors for a batch that does not match this method's modalities and widths."""
        if tuple(batch.modalities) != self.modalities:
            raise ValueError(
                f"batch modalities {list(batch.modalities)} differ from the method's {list(self.modalities)}"
            )
        b = len(batch)
        if batch.mask.shape != (b, len(self.modalities)) or batch.mask.dtype != torch.bool:
            raise ValueError(
                f"batch.mask must be bool of shape ({b}, {len(self.modalities)}), "
                f"got {tuple(batch.mask.shape)} {batch.mask.dtype}"
            )
        if not bool(batch.mask.any(dim=1).all()):
            raise ValueError("every sample must keep at least one modality (a row of batch.mask is all False)")
        for m in self.modalities:
            x = batch.features.get(m)
            if x is None:
                raise KeyError(f"batch has no features for modality {m!r}")
            c = self.info.input_dims[m]
            if x.dim() != 3 or x.shape[0] != b or x.shape[1] != c:
                raise ValueError(f"modality {m!r}: expected features ({b}, {c}, T), got {tuple(x.shape)}")


def check_supports_steps(method: Any, name: str | None = None) -> None:
    """Refuse a method that cannot respect intra-modality (time-step) missing.

    Call it before training when the evaluation protocol removes time steps (``steps``). A method
    respects step masks when removed steps (NaN in the batch, ``batch.step_mask`` False) never reach
    its computation; methods that recover or reason about whole modalities only (DiCMoR, SMIL,
    MMANet, CyIN, ...) leave ``supports_step_missing`` False.

    Args:
        method: a :class:`Method` instance or class (anything with ``supports_step_missing``).
        name: the name to report (default: ``method.name``).

    Raises:
        flowtransfer.io.InputError: naming the method.
    """
    from flowtransfer.io import InputError

    if not bool(getattr(method, "supports_step_missing", False)):
        label = name or getattr(method, "name", None) or type(method).__name__
        raise InputError(
            f"method {label!r} cannot respect intra-modality missing (removed time steps): it handles whole "
            "modalities only; choose a method with supports_step_missing (e.g. zero_fill, mean_fill, "
            "modality_dropout) or another protocol"
        )


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

#: name -> factory ``factory(dataset_info, **config) -> Method``
METHODS: dict[str, Callable[..., Method]] = {}


def register_method(name: str) -> Callable[[Callable[..., Method]], Callable[..., Method]]:
    """Decorator registering a method class or factory under ``name``.

    The decorated object is called as ``factory(dataset_info, **config)``. Registering a name twice
    is an error (two methods may not share a name).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"method names must be non-empty strings, got {name!r}")

    def deco(factory: Callable[..., Method]) -> Callable[..., Method]:
        if name in METHODS and METHODS[name] is not factory:
            raise ValueError(f"a method named {name!r} is already registered ({METHODS[name]!r})")
        METHODS[name] = factory
        return factory

    return deco


def build_method(name: str, dataset_info: DatasetInfo | Mapping[str, Any] | Any, **config: Any) -> Method:
    """Build the registered method ``name`` for a dataset (a :class:`DatasetInfo`, its dict, or a dataset).

    ``config`` holds the method's options (for DiCMoR: ``preset=`` and any field of its config).
    """
    _import_builtin_methods()
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(METHODS)}")
    return METHODS[name](DatasetInfo.coerce(dataset_info), **config)


#: modules of this package that register methods when imported (absent ones are skipped)
BUILTIN_METHOD_MODULES = ("fusion_model", "dicmor", "simple", "smil", "mmanet", "cyin")


def _import_builtin_methods() -> None:
    """Import the modules that register the built-in methods (lazily, to avoid import cycles).

    A module that does not exist is skipped; an error raised *inside* an existing module propagates.
    """
    import importlib

    for mod in BUILTIN_METHOD_MODULES:
        name = f"flowtransfer.methods.{mod}"
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise


# --------------------------------------------------------------------------------------------------
# Training-time missingness
# --------------------------------------------------------------------------------------------------


def _pattern_mask(pattern: Any, batch: Batch) -> Tensor:
    names = batch.modalities
    b, m = batch.mask.shape
    if isinstance(pattern, Tensor):
        p = pattern.to(device=batch.mask.device)
        if p.dtype != torch.bool:
            raise TypeError(f"a pattern tensor must be bool, got {p.dtype}")
        if p.shape == (m,):
            return p.expand(b, m)
        if p.shape == (b, m):
            return p
        raise ValueError(f"a pattern tensor must have shape ({m},) or ({b}, {m}), got {tuple(p.shape)}")
    if isinstance(pattern, str):
        pattern = [pattern]
    keep = list(pattern)
    unknown = [k for k in keep if k not in names]
    if unknown:
        raise KeyError(f"pattern names unknown modalities {unknown}; known: {list(names)}")
    if not keep:
        raise ValueError("a pattern must keep at least one modality")
    row = torch.tensor([n in keep for n in names], dtype=torch.bool, device=batch.mask.device)
    return row.expand(b, m)


def simulate_missing(
    batch: Batch,
    rate: float | tuple[float, float] | None = None,
    pattern: Sequence[str] | str | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Batch:
    r"""Drop modalities **per sample** for training; return a new :class:`Batch` (the input is untouched).

    Exactly one of ``rate`` and ``pattern``:

    * ``rate = r``: every (sample, modality) slot present in the data is dropped independently with
      probability ``r``; ``rate = (lo, hi)`` first draws each sample's own rate uniformly in
      ``[lo, hi]``. A sample left with nothing gets back one of its present modalities, chosen
      uniformly, so the realised rate is a little below ``r`` at high rates.
    * ``pattern``: modality names to keep (same for every sample), or a bool tensor ``(M,)`` or
      ``(B, M)``. Intersected with the data's presence; a sample left with nothing keeps one of its
      present modalities, chosen uniformly.

    The returned batch holds NaN in every dropped slot and its mask is updated; labels, classes and
    index are shared. **Reconstruction targets come from the original batch**: a slot that is
    present in ``batch.mask`` but absent in the result is a modality the model must recover *and*
    whose true features are known (``batch.features[m]`` at those rows). Slots absent in the data
    (``batch.mask`` False) have no target.

    Args:
        generator: a ``torch.Generator`` for reproducible draws (on the batch's device).
    """
    if (rate is None) == (pattern is None):
        raise ValueError("give exactly one of rate and pattern")
    data_mask = batch.mask
    b, m = data_mask.shape
    dev = data_mask.device
    if rate is not None:
        if isinstance(rate, (tuple, list)):
            if len(rate) != 2:
                raise ValueError(f"a rate range must be (lo, hi), got {rate!r}")
            lo, hi = float(rate[0]), float(rate[1])
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"a rate range must satisfy 0 <= lo <= hi <= 1, got ({lo}, {hi})")
            r = lo + (hi - lo) * torch.rand(b, 1, generator=generator, device=dev)
        else:
            r = float(rate)
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"missing rate must lie in [0, 1], got {rate}")
        keep = torch.rand(b, m, generator=generator, device=dev) >= r
    else:
        keep = _pattern_mask(pattern, batch)
    new = keep & data_mask
    empty = ~new.any(dim=1)
    if bool(empty.any()):
        # one uniformly chosen present modality per emptied row (argmax of random keys over present slots)
        keys = torch.rand(b, m, generator=generator, device=dev).masked_fill(~data_mask, -1.0)
        rescue = torch.zeros_like(new).scatter_(1, keys.argmax(dim=1, keepdim=True), True)
        new = torch.where(empty[:, None], rescue, new)
    feats = {}
    for j, name in enumerate(batch.modalities):
        x = batch.features[name]
        dropped = (data_mask[:, j] & ~new[:, j])[:, None, None]
        feats[name] = torch.where(dropped, torch.full((), float("nan"), dtype=x.dtype, device=x.device), x)
    return replace(batch, features=feats, mask=new)
