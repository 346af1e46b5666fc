r"""MMANet: margin-aware distillation and modality-aware regularisation (Wei, Luo, Luo, CVPR 2023).

* **Teacher**: a :class:`~flowtransfer.methods.fusion_model.FusionModel` trained on complete
  samples, then frozen. Trained inside the method during the warm-up, or passed in pre-trained
  (``teacher=``; then frozen from the start).
* **Warm-up proportional to the budget**: the warm-up takes ``warmup_fraction`` (default 0.3) of
  the epochs the trainer plans to run (:func:`~flowtransfer.methods.simple.planned_epochs`: the
  epoch limit, or fewer under a cap of optimiser steps), ``round(fraction x epochs)`` and at least 1,
  fixed when training starts (:meth:`MMANet.plan`, called by the trainer hook ``on_epoch_start``
  at epoch 0) and checkpointed. ``warmup_epochs=`` fixes it in epochs instead. A budget that leaves
  no distillation epoch is refused before the first step, and so is early stopping whose patience
  cannot outlast the warm-up (see below).
* **A run that never distils is an error, not a row**: the method vetoes the selection of every
  warm-up epoch (:meth:`MMANet.selection_veto`; the student then is a modality-dropout model, not
  MMANet), so the trainer selects among distilling epochs only and, if training ends before any,
  stops with an error naming the vetoes. :class:`~flowtransfer.training.Trainer` counts the vetoed
  warm-up epochs against neither early stopping's patience nor the learning-rate schedule's (they
  come before any selectable epoch) and says so with ``trainer.exempts_warmup = True``, which
  :meth:`MMANet.plan` reads at epoch 0; with a trainer that does not say so (vetoed epochs may count
  as epochs without improvement), ``early_stop_patience <= warm-up epochs`` is refused.
* **Deployment network** (the student, the only part used by :meth:`MMANet.predict`): the same
  architecture, trained on every modality combination: each training sample gets its own pattern
  drawn uniformly among the :math:`2^M - 1` non-empty subsets (intersected with what its data has);
  dropped inputs are zeroed and the fusion gets the mask.
* **Margin-aware distillation** (:func:`mad_loss`): with :math:`F^S, F^T` the student's and the
  teacher's fused representations ``(B, D)`` and :math:`\hat G = \mathrm{rownorm}(F F^\top)`,

  .. math:: \mathcal L_{MAD} = \sum_i w_i \sum_j (\hat G^S_{ij} - \hat G^T_{ij})^2,\qquad
            w_i = \frac{H(p^T_i)}{\sum_k H(p^T_k)}

  with :math:`H` the entropy of the teacher's softmax (:func:`uncertainty_weights`): samples the
  teacher is unsure of (near the margin) weigh more, confident ones less.
* **Modality-aware regularisation**: during epochs ``[mine_start, warm-up)`` (by default the last
  three warm-up epochs, as the released code's epochs 2-4 before ``begin_epoch`` 5) the student is
  also evaluated (no gradient) under each pattern of size :math:`M-1` and under the complete
  pattern, on the **training** batches; the histograms of predicted labels give, per epoch,
  :math:`\mathrm{KL}(h_P \| h_{all})` (:func:`histogram_kl`), summed over the mining epochs. The
  pattern with the largest total is the weak one (it lacks the strong modality, whose absence
  changes the predictions most: :func:`mine_weak_pattern`); the weak set :math:`\mathcal W` is every
  non-empty pattern lacking the strong modality. From then on a regularisation head :math:`g` on
  the student's fused representation adds
  :math:`\mathcal L_{MAR} = \frac1B\sum_i \mathbb 1[p_i \in \mathcal W]\,\ell(g(x_i), y_i)`.
* **Total** after the warm-up:
  :math:`\mathcal L_{task} + \lambda_{MAD}\mathcal L_{MAD} + \lambda_{MAR}\mathcal L_{MAR}`;
  during the warm-up: the teacher's task loss (complete samples) plus the student's task loss
  (the released code also uses the task loss alone before ``begin_epoch``).

Departures from the released code (METHODS.md §5):

* **Per-sample (row) weighting** of the MAD term, as the abstract and the segmentation code; the
  classification code weights columns.
* **Mining on training data**, never test data (the code mines on ``test_loader`` and selects the
  checkpoint on test; here selection is the trainer's, on validation). Histograms are normalised
  and smoothed by ``1e-6`` instead of passed through a softmax (which flattens them to near
  uniform). Generalised to M modalities through the patterns of size :math:`M - 1`.
* **Regression** (no softmax): the teacher gets an auxiliary 7-way head trained with
  cross-entropy on the 7 sentiment classes of :mod:`flowtransfer.labels`; its softmax entropy gives
  the MAD weights, and the mining histograms bin the student's scores into the same 7 classes.
* **The regularisation network** is a second prediction head on the fused representation (the
  code duplicates the whole ResNet tail; here the fusion is shared, the head is duplicated).
  It is discarded at test.
* No epoch is skipped; MAD starts with MAR after the warm-up. Defaults
  :math:`\lambda_{MAD} = 30, \lambda_{MAR} = 0.5` are the CASIA-SURF script's.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowtransfer.data.dataset import Batch
from flowtransfer.labels import SENTIMENT_CLASSES, sentiment_classes
from flowtransfer.models.heads import build_head

from .base import Method, prior_labels, register_method, simulate_missing
from .fusion_model import FusionModel, build_head_for
from .simple import _fusion_config, epochs_from_fraction, nonempty_patterns, pattern_codes, planned_epochs

__all__ = [
    "uncertainty_weights",
    "row_normalised_gram",
    "mad_loss",
    "histogram_kl",
    "mine_weak_pattern",
    "weak_set",
    "random_patterns",
    "MMANet",
]


# --------------------------------------------------------------------------------------------------
# the mechanisms, as functions
# --------------------------------------------------------------------------------------------------


def uncertainty_weights(logits: Tensor) -> Tensor:
    r"""Per-sample weights :math:`w_i = H(p_i) / \sum_k H(p_k)` from ``(B, K)`` teacher logits.

    :math:`H(p) = -\sum_c p_c \log p_c` with :math:`p = \mathrm{softmax}(\text{logits})`. If every
    entropy is 0 (all samples certain) the weights are uniform. Returns ``(B,)`` summing to 1.
    """
    if logits.dim() != 2:
        raise ValueError(f"uncertainty_weights expects (batch, classes) logits, got {tuple(logits.shape)}")
    logp = F.log_softmax(logits, dim=1)
    h = -(logp.exp() * logp).sum(dim=1)
    total = h.sum()
    if float(total) <= 0.0:
        return torch.full_like(h, 1.0 / h.numel())
    return h / total


def row_normalised_gram(features: Tensor, eps: float = 1e-12) -> Tensor:
    r"""``(B, D) -> (B, B)``: :math:`G = F F^\top` with each row divided by its L2 norm."""
    if features.dim() != 2:
        raise ValueError(f"expected (batch, dim) features, got {tuple(features.shape)}")
    g = features @ features.T
    return g / g.norm(dim=1, keepdim=True).clamp_min(eps)


def mad_loss(student: Tensor, teacher: Tensor, weights: Tensor) -> Tensor:
    r"""Margin-aware distillation :math:`\sum_i w_i \sum_j (\hat G^S_{ij} - \hat G^T_{ij})^2`.

    Args:
        student: ``(B, D_s)`` student features.
        teacher: ``(B, D_t)`` teacher features (detach them for a frozen teacher).
        weights: ``(B,)`` per-sample (row) weights, e.g. :func:`uncertainty_weights`.
    """
    if student.shape[0] != teacher.shape[0] or weights.shape != (student.shape[0],):
        raise ValueError(
            f"mad_loss: batch sizes differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}, "
            f"weights {tuple(weights.shape)}"
        )
    diff = row_normalised_gram(student) - row_normalised_gram(teacher)
    return (weights * diff.pow(2).sum(dim=1)).sum()


def histogram_kl(hist: Tensor, reference: Tensor, eps: float = 1e-6) -> Tensor:
    r""":math:`\mathrm{KL}(p \| q)` between two count histograms ``(K,)`` (normalised, smoothed by ``eps``)."""
    p = hist.double() + eps
    q = reference.double() + eps
    p, q = p / p.sum(), q / q.sum()
    return (p * (p / q).log()).sum()


def mine_weak_pattern(divergence: dict[tuple[str, ...], float],
                      modalities: Sequence[str]) -> tuple[tuple[str, ...], str]:
    r"""The weak pattern (largest accumulated divergence from the complete pattern) and the strong
    modality it lacks.

    Args:
        divergence: pattern of size :math:`M-1` -> accumulated :math:`\mathrm{KL}(h_P\|h_{all})`.
        modalities: all modality names.
    """
    if not divergence:
        raise ValueError("mine_weak_pattern: no divergences recorded (did the mining epochs run?)")
    mods = tuple(modalities)
    for p in divergence:
        if len(p) != len(mods) - 1 or not set(p) <= set(mods):
            raise ValueError(f"candidate {p} is not a pattern of size {len(mods) - 1} over {mods}")
    weak = max(divergence, key=lambda p: (divergence[p], p))
    (strong,) = [m for m in mods if m not in weak]
    return weak, strong


def weak_set(modalities: Sequence[str], strong: str) -> list[tuple[str, ...]]:
    """Every non-empty pattern lacking ``strong`` (for L/A/V with L strong: {A, V}, {A}, {V})."""
    return [p for p in nonempty_patterns(modalities) if strong not in p]


def random_patterns(data_mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Per sample, a pattern uniform among the :math:`2^M-1` non-empty subsets: ``(B, M)`` bool
    (to intersect with the data's presence)."""
    b, m = data_mask.shape
    codes = torch.randint(1, 2 ** m, (b,), generator=generator, device=data_mask.device)
    bits = 2 ** torch.arange(m, device=data_mask.device)
    return (codes[:, None] & bits) > 0


# --------------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------------


def _per_sample_loss(task: str, pred: Tensor, target: Tensor) -> Tensor:
    if task == "regression":
        return (pred - target).abs()
    return F.cross_entropy(pred, target.long(), reduction="none")


class MMANet(Method):
    r"""MMANet in the common framework; see the module docstring.

    Args:
        info: dataset description.
        config, preset, **overrides: the student's and teacher's :class:`FusionConfig`.
        lambda_mad, lambda_mar: loss weights.
        warmup_fraction: fraction of the planned epochs spent on the warm-up (teacher training +
            student task loss) before distillation; used unless ``warmup_epochs`` is given.
        warmup_epochs: the warm-up in epochs (overrides ``warmup_fraction``).
        mine_start: first epoch of weak-pattern mining (mining runs until the end of the warm-up);
            default ``max(0, warm-up - 3)``.
        teacher: an optional pre-trained :class:`FusionModel` (frozen, not trained here).

    Buffers (checkpointed): ``warmup`` and ``mine_from`` (-1 until :meth:`plan`), ``epoch``, the
    mining histograms and divergences, ``weak_mask``, ``mined``.
    """

    name = "mmanet"

    def __init__(self, info: Any, config: Any = None, *, preset: str | None = None,
                 lambda_mad: float = 30.0, lambda_mar: float = 0.5, warmup_fraction: float = 0.3,
                 warmup_epochs: int | None = None, mine_start: int | None = None,
                 teacher: FusionModel | None = None, **overrides: Any) -> None:
        super().__init__(info)
        if len(self.modalities) < 2:
            raise ValueError("MMANet needs two or more modalities")
        if warmup_epochs is None:
            epochs_from_fraction(warmup_fraction, 10, "warmup_fraction")  # range check only
        elif isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 1:
            raise ValueError(f"warmup_epochs must be an int >= 1 (mining needs an epoch), got {warmup_epochs!r}")
        if mine_start is not None and (int(mine_start) < 0 or (warmup_epochs is not None and int(mine_start) >= warmup_epochs)):
            raise ValueError(f"mine_start must lie in [0, warm-up={warmup_epochs}), got {mine_start}")
        self.backbone_config = _fusion_config(config, preset, overrides)
        self.options = {"lambda_mad": float(lambda_mad), "lambda_mar": float(lambda_mar),
                        "warmup_fraction": float(warmup_fraction),
                        "warmup_epochs": None if warmup_epochs is None else int(warmup_epochs),
                        "mine_start": None if mine_start is None else int(mine_start)}
        self.student = FusionModel(self.info, self.backbone_config, name="mmanet_student")
        self.regulariser = build_head_for(self.info, self.student.fusion.out_dim, self.backbone_config)
        self.pretrained_teacher = teacher is not None
        self.teacher = teacher if teacher is not None else FusionModel(self.info, self.backbone_config,
                                                                       name="mmanet_teacher")
        if tuple(self.teacher.modalities) != self.modalities:
            raise ValueError(f"teacher modalities {list(self.teacher.modalities)} differ from {list(self.modalities)}")
        n_bins = self.info.num_classes if self.task == "classification" else SENTIMENT_CLASSES
        self.n_bins = int(n_bins)
        # regression: 7-way auxiliary teacher head whose entropy weights MAD
        self.teacher_aux = (build_head("classification", self.teacher.fusion.out_dim, SENTIMENT_CLASSES,
                                       dropout=self.backbone_config.mult.head_dropout)
                            if self.task == "regression" else None)
        # schedule and mining state (buffers: checkpointed, survive a resume)
        self.candidates = [p for p in nonempty_patterns(self.modalities) if len(p) == len(self.modalities) - 1]
        self.register_buffer("warmup", torch.tensor(-1))
        self.register_buffer("mine_from", torch.tensor(-1))
        self.register_buffer("epoch", torch.tensor(0))
        self.register_buffer("hist", torch.zeros(len(self.candidates) + 1, self.n_bins, dtype=torch.float64))
        self.register_buffer("divergence", torch.zeros(len(self.candidates), dtype=torch.float64))
        self.register_buffer("weak_mask", torch.zeros(2 ** len(self.modalities), dtype=torch.bool))
        self.register_buffer("mined", torch.tensor(False))
        self.generator: torch.Generator | None = None
        if warmup_epochs is not None:
            self._set_warmup(int(warmup_epochs))
        if self.pretrained_teacher:
            self._freeze_teacher()

    @property
    def hparams(self) -> dict[str, Any]:
        return {"name": self.name, "dataset_info": self.info.to_dict(),
                "config": {"config": self.backbone_config.to_dict(), **self.options}}

    # ------------------------------------------------------------------ schedule
    def _teacher_modules(self) -> list[nn.Module]:
        return [self.teacher] + ([self.teacher_aux] if self.teacher_aux is not None else [])

    def _freeze_teacher(self) -> None:
        for mod in self._teacher_modules():
            mod.eval()
            for p in mod.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------ budget
    def _set_warmup(self, warmup: int) -> None:
        start = self.options["mine_start"]
        start = max(0, warmup - 3) if start is None else int(start)
        if not 0 <= start < warmup:
            raise ValueError(f"mine_start must lie in [0, warm-up={warmup}), got {start}")
        self.warmup.fill_(int(warmup))
        self.mine_from.fill_(start)

    @property
    def planned(self) -> bool:
        """True once the warm-up length is fixed (:meth:`plan`, or ``warmup_epochs=``)."""
        return int(self.warmup) >= 1

    @property
    def warmup_epochs(self) -> int:
        """Epochs of warm-up (raises before :meth:`plan` when only a fraction was given)."""
        if not self.planned:
            raise RuntimeError(
                "MMANet's warm-up is a fraction of the training budget, which is not known yet: train it "
                "with the Trainer (its on_epoch_start hook calls plan) or call plan(total_epochs) first"
            )
        return int(self.warmup)

    @property
    def mine_start(self) -> int:
        """First mining epoch."""
        self.warmup_epochs  # noqa: B018 - raises when unplanned
        return int(self.mine_from)

    def plan(self, total_epochs: int, early_stop_patience: int | None = None, exempts_warmup: bool = False) -> int:
        """Fix the warm-up for a budget of ``total_epochs`` epochs and check that the run can distil.

        Returns the warm-up in epochs. Idempotent for the same budget; a resumed run keeps the
        checkpointed warm-up.

        Raises:
            ValueError: the budget leaves no distillation epoch (warm-up >= ``total_epochs``), or
                early stopping with ``early_stop_patience <= warm-up`` could stop the run before it
                distils (a trainer may count vetoed warm-up epochs as epochs without improvement),
                unless ``exempts_warmup`` (the trainer exempts them, as
                :class:`~flowtransfer.training.Trainer` does).
        """
        total = int(total_epochs)
        if total < 1:
            raise ValueError(f"MMANet: the training budget must be >= 1 epoch, got {total}")
        if not self.planned:
            fixed = self.options["warmup_epochs"]
            self._set_warmup(fixed if fixed is not None else
                             epochs_from_fraction(self.options["warmup_fraction"], total, "warmup_fraction"))
        warmup = int(self.warmup)
        if warmup >= total:
            raise ValueError(
                f"MMANet would never distil: its warm-up takes {warmup} epoch(s) and the training budget is "
                f"{total} epoch(s). Give it more epochs (or a larger step cap), a smaller warmup_fraction "
                "(or warmup_epochs), or a pre-trained teacher"
            )
        if early_stop_patience is not None and not exempts_warmup and int(early_stop_patience) <= warmup:
            raise ValueError(
                f"MMANet could stop before it distils: early_stop_patience={early_stop_patience} <= its warm-up "
                f"of {warmup} epoch(s), whose epochs are never selected (and so count as epochs without "
                "improvement). Raise the patience above the warm-up or lower warmup_fraction"
            )
        return warmup

    @property
    def distilling(self) -> bool:
        """True after the warm-up (MAD and MAR active, teacher frozen)."""
        return self.planned and int(self.epoch) >= int(self.warmup)

    def train(self, mode: bool = True) -> MMANet:
        super().train(mode)
        if self.distilling or self.pretrained_teacher:
            for mod in self._teacher_modules():
                mod.eval()
        return self

    def set_epoch(self, epoch: int) -> None:
        """Advance the schedule to ``epoch`` (0-based): close finished mining epochs, pick the weak
        pattern at the end of the warm-up, freeze the teacher."""
        epoch = int(epoch)
        w, start = self.warmup_epochs, self.mine_start
        prev = int(self.epoch)
        if epoch > prev and start <= prev < w:
            self._close_mining_epoch()
        self.epoch.fill_(epoch)
        if epoch >= w:
            if not bool(self.mined):
                self.finish_mining()
            self._freeze_teacher()

    def on_epoch_start(self, epoch: int, trainer: Any = None) -> None:
        """Trainer hook: at epoch 0 (or a first call after a resume) :meth:`plan` from the trainer's
        budget (:func:`~flowtransfer.methods.simple.planned_epochs`), its ``early_stop_patience`` and
        ``exempts_warmup`` (False when the trainer has no such attribute), then :meth:`set_epoch`.
        The trainer sets ``exempts_warmup`` at construction, before this first call."""
        if trainer is not None and (epoch == 0 or not self.planned):
            cfg = getattr(trainer, "config", None)
            self.plan(planned_epochs(trainer), getattr(cfg, "early_stop_patience", None),
                      bool(getattr(trainer, "exempts_warmup", False)))
        self.set_epoch(epoch)

    def selection_veto(self, dataset: Any = None) -> str | None:
        """Trainer hook: a warm-up epoch is never selected (its student has not distilled)."""
        if not self.distilling:
            return (f"MMANet: epoch {int(self.epoch)} is in the warm-up ({int(self.warmup)} epoch(s)); the student "
                    "has not distilled yet")
        return None

    # ------------------------------------------------------------------ mining
    def _pattern_rows(self) -> list[tuple[str, ...]]:
        return self.candidates + [self.modalities]

    @torch.no_grad()
    def record_predictions(self, pattern: Sequence[str], labels: Tensor) -> None:
        """Add predicted labels ``(B,)`` (class ids in ``[0, n_bins)``) to ``pattern``'s histogram."""
        key = tuple(m for m in self.modalities if m in set(pattern))
        rows = self._pattern_rows()
        if key not in rows:
            raise KeyError(f"pattern {list(pattern)} is not mined; mined patterns: {rows}")
        counts = torch.bincount(labels.long().flatten(), minlength=self.n_bins)[: self.n_bins]
        self.hist[rows.index(key)] += counts.to(self.hist)

    @torch.no_grad()
    def _close_mining_epoch(self) -> None:
        """Add this epoch's :math:`\\mathrm{KL}(h_P\\|h_{all})` to the totals; reset the histograms."""
        if float(self.hist[-1].sum()) > 0:
            for i in range(len(self.candidates)):
                self.divergence[i] += histogram_kl(self.hist[i], self.hist[-1])
        self.hist.zero_()

    @torch.no_grad()
    def finish_mining(self) -> tuple[tuple[str, ...], str]:
        """Close the open mining epoch, pick the weak pattern, set the weak set; returns (weak, strong)."""
        self._close_mining_epoch()
        divergence = {p: float(v) for p, v in zip(self.candidates, self.divergence)}
        if float(self.divergence.sum()) == 0.0:
            warnings.warn("MMANet: no mining data recorded (or all divergences are 0); the weak pattern "
                          "is an arbitrary tie-break", RuntimeWarning, stacklevel=2)
        weak, strong = mine_weak_pattern(divergence, self.modalities)
        self.weak_mask.zero_()
        bits = {m: 1 << j for j, m in enumerate(self.modalities)}
        for p in weak_set(self.modalities, strong):
            self.weak_mask[sum(bits[m] for m in p)] = True
        self.mined.fill_(True)
        return weak, strong

    @property
    def weak_patterns(self) -> list[tuple[str, ...]]:
        """The weak set :math:`\\mathcal W` (empty before mining)."""
        return [p for p in nonempty_patterns(self.modalities)
                if bool(self.weak_mask[sum(1 << self.modalities.index(m) for m in p)])]

    def _predicted_bins(self, pred: Tensor) -> Tensor:
        return pred.argmax(dim=1) if self.task == "classification" else sentiment_classes(pred)

    @torch.no_grad()
    def _mine(self, batch: Batch) -> None:
        complete = batch.mask.all(dim=1)
        if not bool(complete.any()):
            return
        was_training = self.student.training
        self.student.eval()  # predictions as at evaluation (no dropout), like the released code
        try:
            for pattern in self._pattern_rows():
                keep = torch.tensor([m in pattern for m in self.modalities], device=batch.mask.device)
                pred, _ = self._student(simulate_missing(batch, pattern=keep))
                self.record_predictions(pattern, self._predicted_bins(pred[complete]))
        finally:
            self.student.train(was_training)

    # ------------------------------------------------------------------ networks
    def _student(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Student prediction and fused representation; absent inputs zeroed, mask to the fusion."""
        s = self.student
        z = s.fusion(s.extractors(batch.features, batch.mask), batch.mask)
        return s.head(z), z

    def _teacher(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """Teacher prediction, fused representation and the logits that give its uncertainty."""
        t = self.teacher
        z = t.fusion(t.extractors(batch.features, batch.mask), None)
        pred = t.head(z)
        logits = pred if self.teacher_aux is None else self.teacher_aux(z)
        return pred, z, logits

    def predict(self, batch: Batch) -> Tensor:
        """The deployment network (student) only."""
        self._check_batch(batch)
        return self._student(batch)[0]

    def encode(self, batch: Batch) -> dict[str, Tensor]:
        return self.student.encode(batch)

    # ------------------------------------------------------------------ loss
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor | float]]:
        self._check_batch(batch)
        opt = self.options
        epoch = int(self.epoch)
        if self.training and self.planned and self.mine_start <= epoch < self.warmup_epochs and not bool(self.mined):
            self._mine(batch)
        dropped = simulate_missing(batch, pattern=random_patterns(batch.mask, self.generator),
                                   generator=self.generator) if self.training else batch
        pred, z_s = self._student(dropped)
        task = self.student._task_loss(pred, batch.labels)
        parts = {"task": task.detach()}
        total = task
        complete = batch.mask.all(dim=1)
        if not self.distilling and not self.pretrained_teacher:
            if bool(complete.any()):
                rows = complete
                t_pred, t_z, t_logits = self._teacher(batch)
                t_loss = self.teacher._task_loss(t_pred[rows], batch.labels[rows])
                if self.teacher_aux is not None:
                    t_loss = t_loss + F.cross_entropy(t_logits[rows], prior_labels(batch, self.info)[rows])
                total = total + t_loss
                parts["teacher"] = t_loss.detach()
        if self.distilling:
            mad = task.new_zeros(())
            if int(complete.sum()) >= 2:
                with torch.no_grad():
                    _, t_z, t_logits = self._teacher(batch)
                w = uncertainty_weights(t_logits[complete])
                mad = mad_loss(z_s[complete], t_z[complete].detach(), w)
            codes = pattern_codes(dropped.mask)
            in_weak = self.weak_mask[codes]
            per = _per_sample_loss(self.task, self.regulariser(z_s), batch.labels)
            mar = (per * in_weak.to(per.dtype)).sum() / len(batch)
            total = total + opt["lambda_mad"] * mad + opt["lambda_mar"] * mar
            parts.update(mad=mad.detach(), mar=mar.detach())
        parts["loss"] = total.detach()
        return total, parts


@register_method("mmanet")
def mmanet(info: Any, config: Any = None, *, preset: str | None = None, **kwargs: Any) -> MMANet:
    """MMANet (Wei et al., CVPR 2023): teacher, all-pattern student, MAD and MAR."""
    return MMANet(info, config, preset=preset, **kwargs)
