r"""The fusion model without recovery: extractors + fusion + head, and the bounds built on it.

:class:`FusionModel` is DiCMoR without its recovery branch: the same per-modality extractors, the
same fusion (MulT by default) and head. Absent modalities are filled **in the input space** before
the extractors:

* ``zero_fill``: absent inputs become zeros (trained on the data as given, normally complete);
* ``mean_fill``: absent inputs become the per-channel training mean of that modality,
  :math:`\bar x_{m,c} = \mathrm{mean}_{n \in P_m, t}\, x_{m,n,c,t}` over the training samples
  :math:`P_m` where :math:`m` is present, set by :meth:`FusionModel.fit_fill_statistics`
  (or :meth:`FusionModel.prepare`, which the trainer calls once with the training set);
* ``upper_bound``: the full-modality model. It is the same network as ``zero_fill`` and is meant
  to be **evaluated on complete test data** (``complete_only = True`` tells the evaluation code);
  given absent modalities it zero-fills them like ``zero_fill``.

**Removed time steps** (intra-modality missing, ``batch.step_mask``) are filled the same way, in
the input space: zeros or the training mean (``supports_step_missing = True``); the values held at
removed steps never reach the network. A token-id modality (a text encoder) gets 0 at removed steps
whatever the fill: the padding token. MulT gets no key padding mask: the extractor's convolution
('same' padding, kernel 5) and the resampling to a common length mix neighbouring steps, so an
extracted step does not correspond to one input step; a mask there would be an approximation.

After filling, the model treats every modality as present (the fusion receives an all-True mask):
that is what "trained complete, filled at test" means. The filled features are also what
:meth:`FusionModel.recover` returns, in the model's extracted feature space, so zero and mean
filling can be compared with DiCMoR's recovered features.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowtransfer.data.dataset import Batch
from flowtransfer.models.extractors import ModalityExtractors
from flowtransfer.models.text import text_encoders_for

from .base import DatasetInfo, Method, register_method, simulate_missing
from .presets import DiCMoRConfig, FusionConfig

__all__ = ["FusionModel", "build_fusion_for", "build_head_for", "task_loss_for"]


# --------------------------------------------------------------------------------------------------
# Adapters to flowtransfer.models (one place that knows their signatures)
# --------------------------------------------------------------------------------------------------


def build_fusion_for(cfg: DiCMoRConfig | FusionConfig, modalities: Sequence[str]) -> nn.Module:
    """The fusion module ``cfg.fusion`` over ``modalities`` at width ``cfg.d``; exposes ``out_dim``."""
    from flowtransfer.models.fusion import build_fusion

    if cfg.fusion == "mult":
        kw = cfg.mult.mult_kwargs()
        kw.pop("d", None)
        # per-source attention dropouts name modalities (DiCMoR's "A", "V"); keep the known ones
        kw["attn_dropout_by_source"] = {k: v for k, v in kw.get("attn_dropout_by_source", {}).items()
                                        if k in modalities}
        kw.update(cfg.fusion_kwargs)
    else:
        kw = dict(cfg.fusion_kwargs)
    return build_fusion(cfg.fusion, tuple(modalities), cfg.d, **kw)


def build_head_for(info: DatasetInfo, in_dim: int, cfg: DiCMoRConfig | FusionConfig) -> nn.Module:
    """The task's prediction head on an ``in_dim`` representation (dropout: ``cfg.mult.head_dropout``)."""
    from flowtransfer.models.heads import build_head

    return build_head(info.task, in_dim, info.num_classes, dropout=cfg.mult.head_dropout)


def task_loss_for(task: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The task loss ``loss(pred, target) -> scalar`` (L1 for regression, cross-entropy for classification)."""
    from flowtransfer.models.heads import task_loss

    return task_loss(task)


def fusion_config_from(config: FusionConfig | Mapping[str, Any] | str | None, preset: str | None,
                       overrides: dict[str, Any]) -> FusionConfig:
    """Resolve a fusion backbone's configuration from ``config=`` (object, mapping or preset name),
    ``preset=`` and keyword overrides (one rule for every method built on :class:`FusionModel`)."""
    if isinstance(config, str):
        if preset is not None:
            raise ValueError("give the preset either as config= or as preset=, not both")
        preset, config = config, None
    if config is None:
        return FusionConfig.preset(preset or "mosi", **overrides)
    if preset is not None:
        raise ValueError("give either config= or preset=, not both")
    if isinstance(config, Mapping):
        config = FusionConfig(**dict(config))
    if not isinstance(config, FusionConfig):
        raise TypeError(f"config must be a FusionConfig, a mapping or a preset name, got {type(config).__name__}")
    return replace(config, **overrides) if overrides else config


# --------------------------------------------------------------------------------------------------
# FusionModel
# --------------------------------------------------------------------------------------------------


class FusionModel(Method):
    """Extractors + fusion + head, with absent inputs filled by zeros or training means.

    Args:
        info: the dataset's :class:`~flowtransfer.methods.base.DatasetInfo` (or a dataset).
        config: a :class:`~flowtransfer.methods.presets.FusionConfig`, its dict, or a preset name.
        preset: preset name (``"mosi"``, ``"mosei"``, ``"small"``) when ``config`` is not given.
        name: registry name reported by ``self.name`` (``"zero_fill"``, ``"mean_fill"``, ``"upper_bound"``).
        complete_only: evaluate this model on complete data only (the upper bound).
        **overrides: any ``FusionConfig`` field (e.g. ``fill="mean"``).

    Buffers ``fill_mean_<m>`` ``(C_m, 1)`` hold the per-channel training means (zeros until fitted;
    ``fill_fitted`` records whether :meth:`fit_fill_statistics` ran).
    """

    name = "fusion"
    #: removed time steps are filled like absent modalities (zeros or training means)
    supports_step_missing = True

    def __init__(
        self,
        info: DatasetInfo | Mapping[str, Any] | Any,
        config: FusionConfig | Mapping[str, Any] | str | None = None,
        *,
        preset: str | None = None,
        name: str = "zero_fill",
        complete_only: bool = False,
        **overrides: Any,
    ) -> None:
        super().__init__(info)
        cfg = fusion_config_from(config, preset, overrides)
        self.config = cfg
        self.name = name
        self.complete_only = bool(complete_only)
        mods = self.modalities
        for m in mods:
            if not m.isidentifier():
                raise ValueError(f"modality names must be identifiers (they name sub-modules), got {m!r}")
        self.extractors = ModalityExtractors(self.info.input_dims, cfg.d, cfg.extractor_kernel, cfg.target_length,
                                             encoders=text_encoders_for(cfg, mods))
        self.fusion = build_fusion_for(cfg, mods)
        self.head = build_head_for(self.info, self.fusion.out_dim, cfg)
        self._task_loss = task_loss_for(self.info.task)
        for m in mods:
            self.register_buffer(f"fill_mean_{m}", torch.zeros(self.info.input_dims[m], 1))
        self.register_buffer("fill_fitted", torch.tensor(False))
        self.generator: torch.Generator | None = None

    @property
    def hparams(self) -> dict[str, Any]:
        return {"name": self.name, "dataset_info": self.info.to_dict(), "config": {"config": self.config.to_dict()}}

    # ------------------------------------------------------------------ filling
    def fill_values(self) -> dict[str, Tensor | float]:
        """What absent slots and removed steps become: ``0.0`` or the ``(C_m, 1)`` training means
        (always ``0.0``, the padding token, for a token-id modality read by a text encoder)."""
        if self.config.fill == "zero":
            return {m: 0.0 for m in self.modalities}
        if not bool(self.fill_fitted):
            raise RuntimeError(
                "mean fill needs training statistics: call fit_fill_statistics(train_dataset) "
                "(or prepare(train_dataset)) before predicting"
            )
        encoded = self.extractors.encoders
        return {m: 0.0 if m in encoded else getattr(self, f"fill_mean_{m}") for m in self.modalities}

    @torch.no_grad()
    def fit_fill_statistics(self, dataset: Any) -> dict[str, Tensor]:
        """Per-channel means of each modality's input features over the samples where it is present.

        ``dataset`` is a :class:`~flowtransfer.data.MultimodalDataset` (``features`` as ``(N, C, T)``
        arrays and ``mask`` ``(N, M)``). Padding beyond per-sample ``lengths`` is included (MMSA pads
        with zeros; the statistic is the mean of what the model sees); removed time steps
        (``dataset.step_mask`` False) are not. Returns ``{m: (C_m, 1)}``.
        """
        names = tuple(dataset.modalities)
        if names != self.modalities:
            raise ValueError(f"dataset modalities {list(names)} differ from the model's {list(self.modalities)}")
        mask = np.asarray(dataset.mask, dtype=bool)
        steps = getattr(dataset, "step_mask", None)
        out = {}
        for j, m in enumerate(self.modalities):
            x = np.asarray(dataset.features[m])
            rows = mask[:, j]
            if not rows.any():
                raise ValueError(f"modality {m!r} is absent from every training sample: no mean to fill with")
            if steps is None:
                mean = x[rows].astype(np.float64).mean(axis=(0, 2))
            else:  # only the steps that hold data: (C,) sum over kept (sample, step) slots / their count
                keep = np.asarray(steps[m], dtype=bool)[rows]
                if not keep.any():
                    raise ValueError(f"modality {m!r} has no kept time step in the training data: no mean to fill with")
                mean = np.einsum("nct,nt->c", x[rows].astype(np.float64), keep.astype(np.float64)) / keep.sum()
            buf = getattr(self, f"fill_mean_{m}")
            buf.copy_(torch.as_tensor(mean, dtype=buf.dtype).view(-1, 1))
            out[m] = buf.clone()
        self.fill_fitted.fill_(True)
        return out

    def prepare(self, dataset: Any) -> None:
        """Called once with the training set before training: fits the mean-fill statistics."""
        self.fit_fill_statistics(dataset)

    # ------------------------------------------------------------------ forward
    def _filled_features(self, batch: Batch) -> dict[str, Tensor]:
        self._check_batch(batch)
        encoded = self.extractors.encoders
        if not encoded:
            return self.extractors(batch.filled(self.fill_values()).features)
        # token ids cannot be zero- or mean-filled: absent text rows skip the encoder (zeros after it)
        present = batch.mask.clone()
        present[:, [j for j, m in enumerate(self.modalities) if m not in encoded]] = True
        return self.extractors(batch.filled(self.fill_values()).features, present)

    def _forward(self, batch: Batch) -> Tensor:
        return self.head(self.fusion(self._filled_features(batch), None))

    def predict(self, batch: Batch) -> Tensor:
        """``(B,)`` or ``(B, K)``; absent inputs filled first (labels never read)."""
        return self._forward(batch)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Task loss on the (optionally modality-dropped, then filled) batch."""
        if self.config.train_missing_rate is not None:
            gen = self.simulation_generator(batch)
            batch = simulate_missing(batch, rate=self.config.train_missing_rate, generator=gen)
        task = self._task_loss(self._forward(batch), batch.labels)
        value = task.detach()
        return task, {"loss": value, "task": value}

    def encode(self, batch: Batch) -> dict[str, Tensor]:
        """Extracted real features ``{m: (B, d, T)}``, NaN in rows where ``m`` is absent."""
        self._check_batch(batch)
        h = self.extractors(batch.features, batch.mask)
        return {m: torch.where(batch.mask[:, j, None, None], h[m], torch.full_like(h[m], float("nan")))
                for j, m in enumerate(self.modalities)}

    def recover(self, batch: Batch) -> dict[str, Tensor]:
        """The filled modalities in feature space: ``{m: (B, d, T)}`` for every ``m`` absent somewhere,
        NaN in rows where ``m`` is present."""
        h = self._filled_features(batch)
        out = {}
        for j, m in enumerate(self.modalities):
            absent = ~batch.mask[:, j]
            if bool(absent.any()):
                out[m] = torch.where(absent[:, None, None], h[m], torch.full_like(h[m], float("nan")))
        return out


@register_method("zero_fill")
def zero_fill(info: Any, config: Any = None, *, preset: str | None = None, **overrides: Any) -> FusionModel:
    """Trained on the data as given (complete), absent inputs zeroed at test."""
    overrides.setdefault("fill", "zero")
    return FusionModel(info, config, preset=preset, name="zero_fill", **overrides)


@register_method("mean_fill")
def mean_fill(info: Any, config: Any = None, *, preset: str | None = None, **overrides: Any) -> FusionModel:
    """Trained complete, absent inputs replaced by per-channel training means at test."""
    overrides.setdefault("fill", "mean")
    return FusionModel(info, config, preset=preset, name="mean_fill", **overrides)


@register_method("upper_bound")
def upper_bound(info: Any, config: Any = None, *, preset: str | None = None, **overrides: Any) -> FusionModel:
    """The full-modality model: trained and evaluated on complete data (``complete_only``)."""
    overrides.setdefault("fill", "zero")
    return FusionModel(info, config, preset=preset, name="upper_bound", complete_only=True, **overrides)
