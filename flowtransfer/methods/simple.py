r"""Simple baselines and bounds: unimodal models, pattern specialists, modality dropout, AE imputation.

Every model here is built from :class:`~flowtransfer.methods.fusion_model.FusionModel` (the same
extractors, fusion and head as DiCMoR and the fill baselines), so differences in score come from how
missing modalities are handled, not from the architecture.

* ``unimodal`` (:class:`Unimodal`; SMIL's *Lower-Bound*, Ma et al., AAAI 2021): one model on one
  chosen modality. Where that modality is present the model predicts; where it is **absent** the
  method predicts the **training prior**: the mean training label (regression) or the log class
  frequencies, Laplace-smoothed (classification), so scores stay defined on every sample. Evaluate
  it on the samples that have its modality to read it as a unimodal score.
* ``specialists`` (:class:`Specialists`; MMANet's "customized" models, Wei et al., CVPR 2023): one
  model per available-modality pattern (:math:`2^M - 1` models), specialist :math:`P` trained on
  every training sample that has all of :math:`P` (restricted to :math:`P`'s modalities). Each test
  sample goes to the model of its own pattern; routing is vectorised by pattern group (one forward
  per pattern present in the batch, never one per sample). The practical ceiling of methods that
  do not invent missing data. **Each specialist is selected on validation data of its own
  pattern** (:meth:`Specialists.update_selection`): after every epoch, specialist :math:`P` is
  scored on the validation samples that have all of :math:`P`, seeing only :math:`P`'s modalities,
  and its best weights so far are kept in a frozen copy (``selected``) that ``predict`` uses. On
  complete validation data every sample goes to the full-pattern model, so one score for the whole
  method would choose every single-modality specialist by another model's score.
* ``modality_dropout`` (:class:`ModalityDropout`): a :class:`FusionModel` trained with random
  per-sample modality dropping (:func:`~flowtransfer.methods.base.simulate_missing`, each sample
  its own rate uniform in ``rate``), absent inputs filled with zeros **and** the presence mask given
  to the fusion module; evaluated the same way.
* ``ae_impute`` (:class:`AEImpute`; SMIL's *AE* baseline after Lee et al. 2019): an autoencoder
  over the extracted features of all modalities (absent ones zeroed, the mask as extra channels)
  reconstructs every modality; absent features are replaced by its reconstruction and the fusion
  model runs on top.

Departures:

* ``ae_impute`` is trained **jointly** with the fusion model (task loss plus a reconstruction loss
  on modalities dropped from samples that have them), in the extracted feature space, instead of
  SMIL's two-stage recipe (train an AE on complete samples in the input space, impute the dataset,
  then train the classifier). The reconstruction target is detached, so the extractors cannot
  shrink their features to make reconstruction trivial.
* Sub-models that see a single modality cannot use the fusion modules (they need two or more
  modalities): they use :class:`SingleModalityFusion` at the same width: a self-attention
  transformer over time when the backbone fuses with MulT (its single-stream path), the time mean
  and an MLP when it uses ``concat`` or ``late``.
* ``specialists`` sums the specialists' losses into one scalar for the shared trainer; parameters
  are disjoint, so each specialist gets its own gradient (a global gradient-norm clip couples them).
  The trainer keeps *one* best epoch for the whole method (by its monitored score); the
  per-specialist selection lives in the method (see :class:`Specialists` for the hooks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import math

import torch
from einops import rearrange
from torch import Tensor, nn

from flowtransfer.data.dataset import Batch
from flowtransfer.models.extractors import ModalityExtractors
from flowtransfer.models.mult import sinusoidal_positions

from .base import DatasetInfo, Method, register_method, simulate_missing
from .fusion_model import FusionModel, build_head_for, task_loss_for
from .fusion_model import fusion_config_from as _fusion_config
from .presets import FusionConfig

__all__ = [
    "restrict_batch",
    "sub_info",
    "planned_epochs",
    "epochs_from_fraction",
    "nonempty_patterns",
    "pattern_codes",
    "zero_loss",
    "backbone",
    "SingleModalityFusion",
    "SingleModalityModel",
    "Unimodal",
    "Specialists",
    "ModalityDropout",
    "ImputationAE",
    "AEImpute",
]


# --------------------------------------------------------------------------------------------------
# helpers shared by the baselines
# --------------------------------------------------------------------------------------------------


def restrict_batch(batch: Batch, names: Sequence[str], rows: Tensor | None = None) -> Batch:
    """The batch with only modalities ``names`` (mask columns in that order), optionally only ``rows``.

    Per-modality entries (``lengths``, ``step_mask``) are restricted the same way, so a sub-model
    still sees which time steps were removed.

    Args:
        batch: the batch.
        names: modalities to keep, each one of ``batch.modalities``.
        rows: ``(B,)`` bool or int64 index of the samples to keep; None keeps all.
    """
    names = tuple(names)
    unknown = [n for n in names if n not in batch.modalities]
    if unknown:
        raise KeyError(f"restrict_batch: unknown modalities {unknown}; batch has {list(batch.modalities)}")
    cols = [batch.modalities.index(n) for n in names]

    def take(x: Tensor | None) -> Tensor | None:
        return None if x is None or rows is None else x[rows]

    feats = {n: batch.features[n] if rows is None else batch.features[n][rows] for n in names}
    mask = batch.mask[:, cols] if rows is None else batch.mask[rows][:, cols]
    return Batch(
        features=feats,
        mask=mask,
        labels=batch.labels if rows is None else batch.labels[rows],
        modalities=names,
        lengths=None if batch.lengths is None else {
            n: (v if rows is None else v[rows]) for n, v in batch.lengths.items() if n in names
        },
        index=batch.index if rows is None else take(batch.index),
        classes=batch.classes if rows is None else take(batch.classes),
        step_mask=None if batch.step_mask is None else {
            n: (v if rows is None else v[rows]) for n, v in batch.step_mask.items() if n in names
        },
    )


def sub_info(info: DatasetInfo, names: Sequence[str]) -> DatasetInfo:
    """``info`` restricted to modalities ``names``."""
    names = tuple(names)
    unknown = [n for n in names if n not in info.modalities]
    if unknown:
        raise KeyError(f"unknown modalities {unknown}; known: {list(info.modalities)}")
    return DatasetInfo(
        modalities=names,
        input_dims={n: info.input_dims[n] for n in names},
        seq_lens={n: info.seq_lens[n] for n in names},
        task=info.task,
        num_classes=info.num_classes,
    )


def nonempty_patterns(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``modalities`` (modality order kept), ordered by bit code.

    Pattern with bit code :math:`c = \\sum_j 2^j [m_j \\in P]` is at position ``c - 1``.
    """
    mods = tuple(modalities)
    return [tuple(m for j, m in enumerate(mods) if code >> j & 1) for code in range(1, 2 ** len(mods))]


def pattern_codes(mask: Tensor) -> Tensor:
    """``(B, M)`` bool presence mask -> ``(B,)`` int64 bit codes :math:`\\sum_j 2^j\\,\\mathrm{mask}_{bj}`."""
    weights = 2 ** torch.arange(mask.shape[1], device=mask.device)
    return (mask.long() * weights).sum(dim=1)


def planned_epochs(trainer: Any) -> int:
    """The number of epochs a trainer plans to run (the budget a schedule can be proportional to).

    In order: ``trainer.planned_epochs`` when the trainer states it; otherwise from its config,
    ``config.epochs``, reduced to ``ceil(max_steps / steps_per_epoch)`` when the config has a cap of
    optimiser steps (``max_steps``) and ``steps_per_epoch(n_train)``. Early stopping can only make
    the run shorter.

    Raises:
        ValueError: the trainer exposes neither (e.g. a hand-written loop without a config).
    """
    stated = getattr(trainer, "planned_epochs", None)
    if stated is not None and not callable(stated):
        return int(stated)
    cfg = getattr(trainer, "config", None)
    epochs = getattr(cfg, "epochs", None)
    if epochs is None:
        raise ValueError(
            f"cannot tell the training budget from {type(trainer).__name__}: it has neither "
            "planned_epochs nor config.epochs"
        )
    epochs = int(epochs)
    cap = getattr(cfg, "max_steps", None)
    per_epoch_fn = getattr(cfg, "steps_per_epoch", None)
    train = getattr(trainer, "train_dataset", None)
    if cap is not None and callable(per_epoch_fn) and train is not None:
        world = getattr(getattr(trainer, "context", None), "world_size", 1)
        per_epoch = max(1, int(per_epoch_fn(len(train), world)))
        epochs = min(epochs, -(-int(cap) // per_epoch))
    return epochs


def epochs_from_fraction(fraction: float, total: int, name: str = "fraction") -> int:
    """``round(fraction * total)``, at least 1: the epochs of a phase that takes ``fraction`` of a
    ``total``-epoch budget. ``fraction`` must lie in ``(0, 1)``."""
    if not (isinstance(fraction, (int, float)) and 0.0 < float(fraction) < 1.0):
        raise ValueError(f"{name} must lie in (0, 1), got {fraction!r}")
    if int(total) < 1:
        raise ValueError(f"the training budget must be >= 1 epoch, got {total}")
    return max(1, int(round(float(fraction) * int(total))))


def zero_loss(module: nn.Module) -> Tensor:
    """A scalar 0 connected to every trainable parameter (for a batch with nothing to learn from)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError(f"{type(module).__name__} has no trainable parameter")
    return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=params[0].device))


class SingleModalityFusion(nn.Module):
    r"""The one-modality counterpart of the fusion modules (which need two or more modalities).

    * ``temporal=True`` (backbones with the ``mult`` fusion): MulT's single-stream path, a pre-LN
      self-attention transformer over time (input scaled by :math:`\sqrt d`, sinusoidal positions,
      ``layers`` layers of ``heads`` heads, dropout ``dropout``), pooled at the last step or by the
      mean (``pool``).
    * ``temporal=False`` (``concat`` / ``late``): the time mean, then an MLP
      :math:`W_2\,\mathrm{ReLU}(W_1 \bar h + b_1) + b_2`.

    ``out_dim = d``; an absent slot (``present`` False) is zeroed first.
    Shapes: ``forward({m: (B, d, T)}, present (B, 1) | None) -> (B, d)``.
    """

    def __init__(self, modality: str, d: int, temporal: bool = False, heads: int = 4, layers: int = 2,
                 dropout: float = 0.1, pool: str = "last") -> None:
        super().__init__()
        if pool not in ("last", "mean"):
            raise ValueError(f"pool must be 'last' or 'mean', got {pool!r}")
        self.modalities = (modality,)
        self.d = self.out_dim = d
        self.temporal, self.pool = temporal, pool
        if temporal:
            layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout, batch_first=True, norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        else:
            self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))

    def forward(self, features: Mapping[str, Tensor], present: Tensor | None = None) -> Tensor:
        (m,) = self.modalities
        x = features[m]
        if x.dim() != 3 or x.shape[1] != self.d:
            raise ValueError(f"modality {m!r}: expected (batch, {self.d}, T), got {tuple(x.shape)}")
        if present is not None:
            x = torch.where(present[:, 0].view(-1, 1, 1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        if not self.temporal:
            return self.mlp(x.mean(dim=-1))
        z = rearrange(x, "b c t -> b t c") * math.sqrt(self.d)
        z = self.encoder(z + sinusoidal_positions(z.shape[1], self.d, z.device, z.dtype))
        return z[:, -1] if self.pool == "last" else z.mean(dim=1)


class SingleModalityModel(FusionModel):
    """A :class:`FusionModel` on one modality, with :class:`SingleModalityFusion` in place of the fusion."""

    def __init__(self, info: DatasetInfo, config: FusionConfig, name: str = "unimodal") -> None:
        Method.__init__(self, info)
        if len(self.modalities) != 1:
            raise ValueError(f"SingleModalityModel takes one modality, got {list(self.modalities)}")
        (m,) = self.modalities
        self.config = config
        self.name = name
        self.complete_only = False
        self.extractors = ModalityExtractors(self.info.input_dims, config.d, config.extractor_kernel,
                                             config.target_length)
        mult = config.mult
        self.fusion = SingleModalityFusion(m, config.d, temporal=config.fusion == "mult", heads=mult.heads,
                                          layers=mult.layers, dropout=mult.attn_dropout, pool=mult.pool)
        self.head = build_head_for(self.info, self.fusion.out_dim, config)
        self._task_loss = task_loss_for(self.info.task)
        self.register_buffer(f"fill_mean_{m}", torch.zeros(self.info.input_dims[m], 1))
        self.register_buffer("fill_fitted", torch.tensor(False))
        self.generator = None


def backbone(info: DatasetInfo, cfg: FusionConfig, name: str) -> FusionModel:
    """A :class:`FusionModel` on ``info``; a :class:`SingleModalityModel` for one modality."""
    if len(info.modalities) == 1:
        return SingleModalityModel(info, cfg, name)
    return FusionModel(info, cfg, name=name)


# --------------------------------------------------------------------------------------------------
# unimodal
# --------------------------------------------------------------------------------------------------


class Unimodal(Method):
    r"""One model on one modality; the training prior where that modality is absent.

    Args:
        info: dataset description.
        config, preset, **overrides: the backbone's :class:`FusionConfig` (as for ``zero_fill``).
        modality: the modality used (default: the first of ``info.modalities``).

    Prior (buffers, checkpointed): ``label_sum``, ``label_count`` (regression mean) and
    ``class_count`` ``(K,)`` (classification). Set exactly by :meth:`prepare` (the training set),
    otherwise accumulated over the training batches :meth:`loss` sees in training mode.
    Prediction where the modality is absent: :math:`\bar y` (regression) or
    :math:`\log\frac{n_k + 1}{N + K}` (classification logits).

    Removed time steps (``batch.step_mask``) reach the backbone with the batch
    (:func:`restrict_batch`), which fills them like a fusion model fills them
    (``supports_step_missing``).
    """

    name = "unimodal"
    #: the backbone (a FusionModel) fills removed time steps; restrict_batch passes the step mask on
    supports_step_missing = True

    def __init__(self, info: Any, config: Any = None, *, preset: str | None = None,
                 modality: str | None = None, **overrides: Any) -> None:
        super().__init__(info)
        modality = self.info.modalities[0] if modality is None else modality
        if modality not in self.info.modalities:
            raise KeyError(f"unimodal: unknown modality {modality!r}; known: {list(self.info.modalities)}")
        self.modality = modality
        self.backbone_config = _fusion_config(config, preset, overrides)
        self.model = backbone(sub_info(self.info, (modality,)), self.backbone_config, "unimodal")
        k = self.info.num_classes or 1
        self.register_buffer("label_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("label_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("class_count", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("prior_fixed", torch.tensor(False))

    @property
    def hparams(self) -> dict[str, Any]:
        return {"name": self.name, "dataset_info": self.info.to_dict(),
                "config": {"config": self.backbone_config.to_dict(), "modality": self.modality}}

    @torch.no_grad()
    def _accumulate(self, labels: Tensor) -> None:
        if self.task == "classification":
            counts = torch.bincount(labels.long(), minlength=self.class_count.numel())
            self.class_count += counts[: self.class_count.numel()].to(self.class_count)
        else:
            self.label_sum += labels.double().sum()
        self.label_count += labels.numel()

    @torch.no_grad()
    def prepare(self, dataset: Any) -> None:
        """Set the prior from every training label (called once before training)."""
        labels = torch.as_tensor(dataset.labels)
        self.label_sum.zero_()
        self.label_count.zero_()
        self.class_count.zero_()
        self._accumulate(labels)
        self.prior_fixed.fill_(True)

    def prior_prediction(self, b: int) -> Tensor:
        """``(b,)`` training mean or ``(b, K)`` smoothed log class frequencies."""
        dtype = torch.float32
        if self.task == "classification":
            k = self.class_count.numel()
            logp = torch.log((self.class_count + 1.0) / (self.label_count + k)).to(dtype)
            return logp.expand(b, k).clone()
        mean = (self.label_sum / self.label_count.clamp_min(1.0)).to(dtype)
        return mean.expand(b).clone()

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor | float]]:
        """The backbone's task loss on the samples that have the modality."""
        self._check_batch(batch)
        if self.training and not bool(self.prior_fixed):
            self._accumulate(batch.labels)
        rows = batch.present(self.modality)
        if not bool(rows.any()):
            loss = zero_loss(self)
            return loss, {"loss": 0.0, "task": 0.0}
        loss, _ = self.model.loss(restrict_batch(batch, (self.modality,), rows))
        value = loss.detach()
        return loss, {"loss": value, "task": value}

    def predict(self, batch: Batch) -> Tensor:
        """The model where the modality is present, the training prior elsewhere."""
        self._check_batch(batch)
        rows = batch.present(self.modality)
        out = self.prior_prediction(len(batch)).to(batch.mask.device)
        if bool(rows.any()):
            pred = self.model.predict(restrict_batch(batch, (self.modality,), rows))
            out = out.to(pred.dtype)
            out[rows] = pred
        return out


@register_method("unimodal")
def unimodal(info: Any, config: Any = None, *, preset: str | None = None, **kwargs: Any) -> Unimodal:
    """One model on ``modality=`` (default: the first); the training prior where it is absent."""
    return Unimodal(info, config, preset=preset, **kwargs)


# --------------------------------------------------------------------------------------------------
# specialists
# --------------------------------------------------------------------------------------------------


#: selection metrics that improve downwards (the others improve upwards)
_LOWER_IS_BETTER = frozenset({"mae", "mse", "rmse"})


class Specialists(Method):
    r"""One :class:`FusionModel` per non-empty modality pattern; each sample routed to its own.

    Specialist :math:`P` trains on every sample whose data has all modalities of :math:`P`, seeing
    only those modalities. ``predict`` groups the batch by pattern code (:func:`pattern_codes`) and
    runs each pattern's model once on its group.

    **Selection per pattern.** :meth:`update_selection` scores every specialist on the validation
    samples that have its pattern (restricted to the pattern's modalities, so the score is the
    specialist's own on pattern-:math:`P` inputs) with ``select_metric``, and copies a specialist
    whose score improved on its best so far into ``selected`` (frozen copies, never trained, in the
    state dict so checkpoints and resumes keep them). Once a selection exists, ``predict`` uses the
    selected copies; ``models`` keep training. Buffers: ``selection_score`` ``(P,)`` (NaN before the
    first score), ``selection_epoch`` ``(P,)`` (-1 before).

    Hooks (the trainer calls them when present):

    * ``after_train_epoch(epoch, trainer)``: update the selection on ``trainer.valid_dataset``
      after the epoch's training and before the trainer validates, so the trainer's score is the
      selected ensemble's;
    * ``selection_veto(valid_dataset)`` (called after validation by the current trainer): updates
      the selection when ``after_train_epoch`` did not run this epoch; never vetoes;
    * ``on_fit_end(trainer)``: after the trainer loads its best epoch's state, put back the latest
      selection (the trainer's best epoch is chosen by one score; a specialist may have improved
      later), read from ``trainer.last_state`` (the state at the end of training, also after a
      resume of a finished run) or else the newest selection made in this process. Without this
      hook, the selection held at the end is the one at the trainer's best epoch: each specialist
      selected on its own pattern among the epochs up to that one. :meth:`use_latest_selection`
      does the same by hand.

    The selection (``selected.*``, ``selection_score``, ``selection_epoch``) is part of the state
    dict, hence of the trainer's checkpoints: a resumed run selects exactly as an uninterrupted one.

    Args:
        info: dataset description.
        config, preset, **overrides: the backbone :class:`FusionConfig` shared by every specialist.
        select_metric: metric of :mod:`flowtransfer.metrics` used for selection (default ``"mae"``
            for regression, ``"acc"`` for classification: the experiment's monitor); ``mae``,
            ``mse`` and ``rmse`` improve downwards, every other metric upwards.
        select_batch_size: batch size of the selection passes.
    """

    name = "specialists"
    #: every specialist is a FusionModel that fills removed time steps; restrict_batch passes the
    #: step mask on (training, selection and prediction alike)
    supports_step_missing = True

    def __init__(self, info: Any, config: Any = None, *, preset: str | None = None,
                 select_metric: str | None = None, select_batch_size: int = 256, **overrides: Any) -> None:
        super().__init__(info)
        self.backbone_config = _fusion_config(config, preset, overrides)
        self.patterns = nonempty_patterns(self.modalities)
        metric = select_metric or ("mae" if self.task == "regression" else "acc")
        known = _selection_metrics(self.task)
        if metric not in known:
            raise ValueError(f"select_metric {metric!r} is not a {self.task} metric; known: {sorted(known)}")
        if int(select_batch_size) < 1:
            raise ValueError(f"select_batch_size must be >= 1, got {select_batch_size}")
        self.select_metric = metric
        self.select_batch_size = int(select_batch_size)
        self.models = nn.ModuleDict({
            self.key(p): backbone(sub_info(self.info, p), self.backbone_config, "specialist") for p in self.patterns
        })
        self.selected = nn.ModuleDict({
            self.key(p): backbone(sub_info(self.info, p), self.backbone_config, "specialist") for p in self.patterns
        })
        for p in self.selected.parameters():
            p.requires_grad_(False)
        self.selected.load_state_dict(self.models.state_dict())
        self.register_buffer("selection_score", torch.full((len(self.patterns),), float("nan"), dtype=torch.float64))
        self.register_buffer("selection_epoch", torch.full((len(self.patterns),), -1, dtype=torch.long))
        self._latest: dict[str, Tensor] | None = None  # the newest selection (see on_fit_end)
        self._epoch = 0
        self._updated_epoch: int | None = None

    @staticmethod
    def key(pattern: Sequence[str]) -> str:
        """Module key of a pattern: its modality names joined by ``_``."""
        return "_".join(pattern)

    @property
    def hparams(self) -> dict[str, Any]:
        return {"name": self.name, "dataset_info": self.info.to_dict(),
                "config": {"config": self.backbone_config.to_dict(), "select_metric": self.select_metric,
                           "select_batch_size": self.select_batch_size}}

    @property
    def lower_is_better(self) -> bool:
        return self.select_metric in _LOWER_IS_BETTER

    @property
    def has_selection(self) -> bool:
        """True once :meth:`update_selection` has run (``predict`` then uses ``selected``)."""
        return bool((self.selection_epoch >= 0).any())

    def _ordered(self, pattern: Sequence[str]) -> tuple[str, ...]:
        ordered = tuple(m for m in self.modalities if m in set(pattern))
        if not ordered or len(ordered) != len(set(pattern)):
            raise KeyError(f"no specialist for pattern {list(pattern)}; modalities are {list(self.modalities)}")
        return ordered

    def specialist(self, pattern: Sequence[str]) -> FusionModel:
        """The model of ``pattern`` (modality names, any order) that is being trained."""
        return self.models[self.key(self._ordered(pattern))]  # type: ignore[return-value]

    def selected_specialist(self, pattern: Sequence[str]) -> FusionModel:
        """The selected (best on its own pattern's validation data) copy of ``pattern``'s model."""
        return self.selected[self.key(self._ordered(pattern))]  # type: ignore[return-value]

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Only the trained copies (``models``); the selected copies are never optimised."""
        params = [p for p in self.models.parameters() if p.requires_grad]
        return [{"name": "specialists", "params": params}] if params else []

    # ------------------------------------------------------------------ selection
    @torch.no_grad()
    def pattern_scores(self, dataset: Any, models: nn.ModuleDict | None = None) -> dict[tuple[str, ...], float]:
        """``select_metric`` of each specialist on ``dataset``'s samples that have its pattern.

        Specialist :math:`P` sees, for every sample whose presence mask has all of :math:`P`, only
        :math:`P`'s modalities (the input it gets at test for pattern :math:`P`). A pattern that no
        sample has scores NaN. ``models`` defaults to the trained copies.
        """
        from flowtransfer.metrics import classification_metrics, regression_metrics

        if tuple(dataset.modalities) != self.modalities:
            raise ValueError(f"dataset modalities {list(dataset.modalities)} differ from {list(self.modalities)}")
        models = self.models if models is None else models
        device = next(iter(self.buffers())).device
        preds: dict[str, list[Tensor]] = {self.key(p): [] for p in self.patterns}
        targets: dict[str, list[Tensor]] = {self.key(p): [] for p in self.patterns}
        was = [(m, m.training) for m in models.values()]
        for m in models.values():
            m.eval()
        try:
            for batch in dataset.loader(self.select_batch_size, shuffle=False, drop_last=False):
                batch = batch.to(device)
                for p in self.patterns:
                    cols = [self.modalities.index(m) for m in p]
                    rows = batch.mask[:, cols].all(dim=1)
                    if not bool(rows.any()):
                        continue
                    k = self.key(p)
                    sub = restrict_batch(batch, p, rows)
                    preds[k].append(models[k].predict(sub).float().cpu())
                    targets[k].append(sub.labels.cpu())
        finally:
            for m, mode in was:
                m.train(mode)
        out: dict[tuple[str, ...], float] = {}
        for p in self.patterns:
            k = self.key(p)
            if not preds[k]:
                out[p] = float("nan")
                continue
            pred, target = torch.cat(preds[k]).numpy(), torch.cat(targets[k]).numpy()
            if self.task == "regression":
                scores = regression_metrics(pred, target)
            else:
                scores = classification_metrics(pred, target, num_classes=self.info.num_classes)
            out[p] = float(scores[self.select_metric])
        return out

    @torch.no_grad()
    def update_selection(self, dataset: Any, epoch: int | None = None) -> dict[tuple[str, ...], bool]:
        """Score every trained specialist on its own pattern of ``dataset`` (:meth:`pattern_scores`)
        and keep it in ``selected`` where it beats its best score so far (strictly; the first score
        always counts). A pattern absent from ``dataset`` keeps the latest weights, score NaN.

        Returns pattern -> whether that specialist's selection changed.
        """
        epoch = self._epoch if epoch is None else int(epoch)
        scores = self.pattern_scores(dataset)
        changed: dict[tuple[str, ...], bool] = {}
        for i, p in enumerate(self.patterns):
            score, best = scores[p], float(self.selection_score[i])
            if math.isnan(score):
                better = True  # nothing to select on: follow the training
            elif math.isnan(best):
                better = True
            else:
                better = score < best if self.lower_is_better else score > best
            if better:
                k = self.key(p)
                self.selected[k].load_state_dict(self.models[k].state_dict())
                self.selection_score[i] = score
                self.selection_epoch[i] = epoch
            changed[p] = better
        self._latest = {k: v.detach().clone() for k, v in self._selection_state().items()}
        self._updated_epoch = epoch
        return changed

    def _selection_state(self) -> dict[str, Tensor]:
        state = {f"selected.{k}": v for k, v in self.selected.state_dict().items()}
        state["selection_score"] = self.selection_score
        state["selection_epoch"] = self.selection_epoch
        return state

    @torch.no_grad()
    def use_latest_selection(self) -> bool:
        """Put back the newest selection made in this process (after something loaded an older
        state dict, e.g. the trainer's best epoch). Returns False when there is none."""
        if self._latest is None:
            return False
        self.load_state_dict(self._latest, strict=False)
        return True

    @property
    def selection(self) -> dict[tuple[str, ...], tuple[int, float]]:
        """Pattern -> (selected epoch, its validation score on that pattern)."""
        return {p: (int(self.selection_epoch[i]), float(self.selection_score[i])) for i, p in enumerate(self.patterns)}

    # ------------------------------------------------------------------ trainer hooks
    def on_epoch_start(self, epoch: int, trainer: Any = None) -> None:
        """Trainer hook: remember the epoch (for the selection record)."""
        self._epoch = int(epoch)

    def after_train_epoch(self, epoch: int, trainer: Any) -> None:
        """Trainer hook (after an epoch's training, before validation): :meth:`update_selection`
        on ``trainer.valid_dataset``."""
        self.update_selection(trainer.valid_dataset, epoch)

    def selection_veto(self, dataset: Any) -> None:
        """Called by the trainer after validating: updates the selection if ``after_train_epoch``
        did not this epoch. Never vetoes an epoch."""
        if self._updated_epoch != self._epoch:
            self.update_selection(dataset, self._epoch)
        return None

    @torch.no_grad()
    def on_fit_end(self, trainer: Any = None) -> None:
        """Trainer hook (after it loaded its best epoch): put back the selection of the end of
        training, from ``trainer.last_state`` when the trainer provides it, else
        :meth:`use_latest_selection`."""
        last = getattr(trainer, "last_state", None)
        if last is None:
            self.use_latest_selection()
            return
        keys = list(self._selection_state())
        missing = [k for k in keys if k not in last]
        if missing:
            raise KeyError(f"trainer.last_state lacks the selection entries {missing[:3]} (not a Specialists state?)")
        self.load_state_dict({k: last[k] for k in keys}, strict=False)
        self._latest = {k: v.detach().clone() for k, v in self._selection_state().items()}

    # ------------------------------------------------------------------ interface
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Sum over patterns of the specialist's task loss on the samples that have the pattern."""
        self._check_batch(batch)
        total: Tensor | None = None
        parts: dict[str, float] = {}
        for p in self.patterns:
            cols = [self.modalities.index(m) for m in p]
            rows = batch.mask[:, cols].all(dim=1)
            if not bool(rows.any()):
                continue
            loss, _ = self.models[self.key(p)].loss(restrict_batch(batch, p, rows))
            parts[f"task_{self.key(p)}"] = loss.detach()
            total = loss if total is None else total + loss
        if total is None:  # cannot happen for a valid batch (every row has some modality)
            total = zero_loss(self.models)
        parts["loss"] = total.detach()
        return total, parts

    def predict(self, batch: Batch) -> Tensor:
        """Route each pattern group to its specialist (the selected copy once a selection exists):
        ``(B,)`` or ``(B, K)``."""
        self._check_batch(batch)
        models = self.selected if self.has_selection else self.models
        codes = pattern_codes(batch.mask)
        out: Tensor | None = None
        for code in torch.unique(codes).tolist():
            rows = codes == code
            p = self.patterns[int(code) - 1]
            pred = models[self.key(p)].predict(restrict_batch(batch, p, rows))
            if out is None:
                out = pred.new_zeros((len(batch),) + tuple(pred.shape[1:]))
            out[rows] = pred
        assert out is not None
        return out


def _selection_metrics(task: str) -> frozenset[str]:
    """Metric names :func:`~flowtransfer.metrics.regression_metrics` /
    :func:`~flowtransfer.metrics.classification_metrics` report for ``task``."""
    if task == "regression":
        return frozenset({"acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7", "mae", "corr"})
    return frozenset({"acc", "f1_macro", "f1_weighted"})


@register_method("specialists")
def specialists(info: Any, config: Any = None, *, preset: str | None = None, **overrides: Any) -> Specialists:
    """One model per available-modality pattern (MMANet's customized models), routed by pattern,
    each selected on validation data of its own pattern."""
    return Specialists(info, config, preset=preset, **overrides)


# --------------------------------------------------------------------------------------------------
# modality dropout
# --------------------------------------------------------------------------------------------------


class ModalityDropout(FusionModel):
    r"""A :class:`FusionModel` trained with per-sample modality dropping; zeros plus the mask at test.

    Training draws for each sample a rate :math:`r \sim U[\mathrm{lo}, \mathrm{hi}]` and drops each
    of its present modalities with probability :math:`r` (at least one kept). Absent inputs are
    zero-filled before the extractors and the fusion receives the presence mask, in training and at
    test alike.
    """

    def _forward(self, batch: Batch) -> Tensor:
        return self.head(self.fusion(self._filled_features(batch), batch.mask))


@register_method("modality_dropout")
def modality_dropout(info: Any, config: Any = None, *, preset: str | None = None,
                     rate: float | tuple[float, float] = (0.0, 0.7), **overrides: Any) -> ModalityDropout:
    """Zero fill + mask, trained with per-sample modality dropout at a rate drawn from ``rate``.

    ``rate`` is used unless the given ``config`` already sets ``train_missing_rate``.
    """
    if isinstance(rate, list):
        rate = tuple(rate)  # type: ignore[assignment]
    overrides["fill"] = "zero"
    if not isinstance(config, (FusionConfig, Mapping)) or config_rate(config) is None:
        overrides.setdefault("train_missing_rate", rate)
    return ModalityDropout(info, config, preset=preset, name="modality_dropout", **overrides)


def config_rate(config: FusionConfig | Mapping[str, Any]) -> Any:
    """``train_missing_rate`` of a config object or mapping (None when unset)."""
    return config.get("train_missing_rate") if isinstance(config, Mapping) else config.train_missing_rate


# --------------------------------------------------------------------------------------------------
# autoencoder imputation
# --------------------------------------------------------------------------------------------------


class ImputationAE(nn.Module):
    r"""Reconstruct every modality's extracted features from the available ones.

    Input: the ``M`` feature maps ``(B, d, T)`` with absent ones zeroed, stacked to ``(B, M d, T)``,
    plus the presence mask broadcast over time as ``M`` extra channels. Encoder
    ``Conv1d(M d + M, hidden, k) -> ReLU -> Conv1d(hidden, bottleneck, 1) -> ReLU``, decoder
    ``Conv1d(bottleneck, hidden, 1) -> ReLU -> Conv1d(hidden, M d, k)``, split back per modality.

    Shapes: ``forward({m: (B, d, T)}, present (B, M)) -> {m: (B, d, T)}``.
    """

    def __init__(self, modalities: Sequence[str], d: int, hidden: int = 64, bottleneck: int = 16,
                 kernel_size: int = 3) -> None:
        super().__init__()
        self.modalities = tuple(modalities)
        self.d = d
        m = len(self.modalities)
        self.encoder = nn.Sequential(
            nn.Conv1d(m * d + m, hidden, kernel_size, padding="same"), nn.ReLU(),
            nn.Conv1d(hidden, bottleneck, 1), nn.ReLU(),
        )
        self.decoder = nn.Sequential(
            nn.Conv1d(bottleneck, hidden, 1), nn.ReLU(),
            nn.Conv1d(hidden, m * d, kernel_size, padding="same"),
        )

    def forward(self, features: Mapping[str, Tensor], present: Tensor) -> dict[str, Tensor]:
        x = torch.cat([
            torch.where(present[:, j, None, None], features[m], torch.zeros((), dtype=features[m].dtype,
                                                                            device=present.device))
            for j, m in enumerate(self.modalities)
        ], dim=1)
        t = x.shape[-1]
        bits = present.to(x.dtype)[:, :, None].expand(-1, -1, t)
        out = self.decoder(self.encoder(torch.cat([x, bits], dim=1)))
        return dict(zip(self.modalities, out.split(self.d, dim=1)))


class AEImpute(Method):
    r"""Autoencoder imputation in the extracted feature space, a fusion model on top.

    Training (per batch): drop modalities per sample (``rate``, as :class:`ModalityDropout`),
    extract every modality present in the data, reconstruct with :class:`ImputationAE` from the
    kept ones, fill the dropped/absent slots with the reconstruction, fuse and predict.

    .. math:: \mathcal L = \mathcal L_{task} + \lambda_{rec}\,\frac{1}{|D|}\sum_{(b,m) \in D}
              \mathrm{mean}\big(\hat h_{b,m} - \mathrm{sg}(h_{b,m})\big)^2

    where :math:`D` are the (sample, modality) slots present in the data but dropped, and sg is a
    stop-gradient.

    Args:
        info, config, preset, **overrides: dataset and backbone :class:`FusionConfig`.
        rate: per-sample training drop rate or range.
        recon_weight: :math:`\lambda_{rec}`.
        hidden, bottleneck: autoencoder widths.
    """

    name = "ae_impute"

    def __init__(self, info: Any, config: Any = None, *, preset: str | None = None,
                 rate: float | tuple[float, float] = (0.0, 0.7), recon_weight: float = 1.0,
                 hidden: int = 64, bottleneck: int = 16, **overrides: Any) -> None:
        super().__init__(info)
        if isinstance(rate, list):
            rate = tuple(rate)  # type: ignore[assignment]
        self.rate = rate
        self.recon_weight = float(recon_weight)
        self.backbone_config = _fusion_config(config, preset, overrides)
        self.net = backbone(self.info, self.backbone_config, "ae_impute")
        self.ae = ImputationAE(self.modalities, self.backbone_config.d, hidden, bottleneck)
        self._ae_sizes = (hidden, bottleneck)
        self.generator: torch.Generator | None = None

    @property
    def hparams(self) -> dict[str, Any]:
        rate = list(self.rate) if isinstance(self.rate, tuple) else self.rate
        return {"name": self.name, "dataset_info": self.info.to_dict(),
                "config": {"config": self.backbone_config.to_dict(), "rate": rate,
                           "recon_weight": self.recon_weight, "hidden": self._ae_sizes[0],
                           "bottleneck": self._ae_sizes[1]}}

    def _impute(self, batch: Batch, kept: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Real features where ``kept``, reconstructions elsewhere; also the raw reconstructions."""
        h = self.net.extractors(batch.features, batch.mask)
        rec = self.ae(h, kept)
        filled = {m: torch.where(kept[:, j, None, None], h[m], rec[m]) for j, m in enumerate(self.modalities)}
        return filled, {"real": h, **{f"rec_{m}": rec[m] for m in self.modalities}}

    def _head(self, filled: Mapping[str, Tensor]) -> Tensor:
        return self.net.head(self.net.fusion(dict(filled), None))

    def predict(self, batch: Batch) -> Tensor:
        self._check_batch(batch)
        filled, _ = self._impute(batch, batch.mask)
        return self._head(filled)

    def recover(self, batch: Batch) -> dict[str, Tensor]:
        """Reconstructed features ``{m: (B, d, T)}`` for modalities absent somewhere (NaN where present)."""
        self._check_batch(batch)
        filled, _ = self._impute(batch, batch.mask)
        out = {}
        for j, m in enumerate(self.modalities):
            absent = ~batch.mask[:, j]
            if bool(absent.any()):
                out[m] = torch.where(absent[:, None, None], filled[m], torch.full_like(filled[m], float("nan")))
        return out

    def encode(self, batch: Batch) -> dict[str, Tensor]:
        return self.net.encode(batch)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor | float]]:
        self._check_batch(batch)
        kept = simulate_missing(batch, rate=self.rate, generator=self.generator).mask if self.training else batch.mask
        filled, aux = self._impute(batch, kept)
        task = self.net._task_loss(self._head(filled), batch.labels)
        dropped = batch.mask & ~kept
        rec = task.new_zeros(())
        if bool(dropped.any()):
            errs = []
            for j, m in enumerate(self.modalities):
                rows = dropped[:, j]
                if bool(rows.any()):
                    diff = aux[f"rec_{m}"][rows] - aux["real"][m][rows].detach()
                    errs.append(diff.pow(2).mean(dim=(1, 2)))
            rec = torch.cat(errs).mean()
        total = task + self.recon_weight * rec
        return total, {"loss": total.detach(), "task": task.detach(), "recon": rec.detach()}


@register_method("ae_impute")
def ae_impute(info: Any, config: Any = None, *, preset: str | None = None, **kwargs: Any) -> AEImpute:
    """Autoencoder imputation of absent extracted features, fusion model on top (SMIL's AE baseline)."""
    return AEImpute(info, config, preset=preset, **kwargs)
