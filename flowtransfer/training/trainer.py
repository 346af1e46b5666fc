"""The one training engine every method uses.

A method is an ``nn.Module`` with ``loss(batch) -> (scalar Tensor, dict[str, float])`` and
``predict(batch) -> Tensor`` (see ``docs/ARCHITECTURE.md``). :class:`Trainer` runs, per epoch::

    method.on_epoch_start(epoch, trainer)            # optional hook
    for batch in shuffled(train):                    # seeded per epoch; sharded under DDP
        loss, parts = method.loss(batch)             # through DDP's forward when world_size > 1
        loss.backward(); clip; optimizer.step()
    method.after_train_epoch(epoch, trainer)         # optional hook
    score = validation[config.monitor]               # validation data only
    veto = method.selection_veto(valid)              # optional hook
    scheduler.step(score)                            # ReduceLROnPlateau
    keep the best weights; count epochs without improvement; checkpoint

and, when training ends, loads the best epoch's weights back into the method, then calls
``method.on_fit_end(trainer)`` (optional hook).

**The budget rule.** Training ends on whichever comes first: the validation plateau (early
stopping after ``early_stop_patience`` epochs without improvement; the learning rate is reduced on
the way by ``ReduceLROnPlateau``), the cap of ``max_steps`` optimiser steps, or ``epochs``. The cap
is exact: the epoch in which it is reached is cut after the step that reaches it, then validated
like any other epoch. :class:`FitResult` says which rule ended the run (``stop_reason``), how many
steps were taken (``steps``), after how many the selected weights were taken (``best_step``) and
whether the validation score was still improving when the cap or the epoch limit cut the run
(``improving_at_stop``): such a run has not converged, and a table of it must say so. :meth:`Trainer.fit` takes a training and a validation dataset and nothing else: the
test split never reaches the trainer, so it cannot influence model selection.

Optional method hooks (called only if the method defines them):

- ``on_epoch_start(epoch: int, trainer: Trainer) -> None``: before each epoch (0-based), e.g. to
  change a loss weight or a curriculum (``trainer.history`` holds the past epochs). State that must survive a resume belongs in buffers or
  parameters (they are checkpointed).
- ``after_train_epoch(epoch: int, trainer: Trainer) -> None``: after the epoch's training steps and
  before its validation pass (``trainer.valid_dataset`` is the validation set), e.g. to select
  sub-models on validation data so that the trainer's score is that of the selected ones
  (:class:`~flowtransfer.methods.simple.Specialists`). What it changes is part of the state the
  trainer then scores, selects and checkpoints.
- ``selection_veto(valid_dataset) -> str | None``: after validation; a non-empty reason means the
  epoch's weights must not be selected. **A vetoed epoch before the first selectable one** (a
  warm-up, e.g. MMANet's, whose student has not distilled) **counts neither against early
  stopping's patience nor against the learning-rate schedule's**: there is no best epoch yet to be
  patient about, and the schedule never sees its score. ``Trainer.exempts_warmup`` (True) says so
  to methods that check their warm-up against the patience. A vetoed epoch after a selectable one
  (e.g. DiCMoR whose recoveries blew up) counts as an epoch without improvement for both (the
  schedule is given the worst possible score, not the vetoed one).
- ``on_fit_end(trainer: Trainer) -> None``: once, after the best epoch's weights are loaded back;
  during the call ``trainer.last_state`` holds the method's state dict at the end of training
  (the state ``last.pt`` holds; after a resume of a finished run, the checkpointed one), e.g. for
  sub-models that keep their own best epochs (:class:`~flowtransfer.methods.simple.Specialists`).
  The copy is made only for methods that define the hook, and dropped after it.
- ``prepare(train_dataset) -> None``: once at the start of :meth:`Trainer.fit` (seeded with
  ``config.seed``, before a resume restores the checkpoint), for training-set statistics such as
  fill means or k-means priors. Under DDP rank 0's result is broadcast to every rank.
- ``parameter_groups() -> list[dict]``: optimiser parameter groups (``{"params": [...], "lr": ...}``);
  keys a group omits take the :class:`TrainConfig` values (``lr``, ``weight_decay``). Parameters in
  no group are not trained. Default: every parameter in one group.

Checkpoints (``config.checkpoint_dir``): ``last.pt`` after every epoch and ``best.pt`` on each
improvement, written atomically (:func:`flowtransfer.io.atomic_save`), holding the model, optimiser
and scheduler states, the epoch, best score and epoch, patience counter, history, RNG states (per
rank) and the config as a plain dict; ``last.pt`` also holds the best weights so far. With
``resume=True`` a new trainer continues from ``last.pt`` and ends with the same weights as an
uninterrupted run: each epoch's shuffle comes from a generator seeded by ``(seed, epoch)`` and the
global RNG states are restored. Temporary files that a writer killed between its write and its
rename left in ``checkpoint_dir`` are removed when ``fit`` starts.

Multi-process (``torchrun``, see :mod:`flowtransfer.training.distributed`): the method is wrapped
in ``DistributedDataParallel`` through a small module whose ``forward`` calls ``method.loss`` (so
DDP's gradient all-reduce fires); a seeded ``DistributedSampler`` (``set_epoch`` every epoch) shards
the training set; every rank evaluates the whole validation set with the same weights and all
decisions (best epoch, schedule, early stop) use rank 0's score, broadcast; only rank 0 writes
files. DDP registers the parameters that require gradients when the trainer is built: freeze or
unfreeze modules before constructing the trainer (a new stage is a new trainer).

A trainer runs one ``fit``; a second training stage is a new :class:`Trainer` with its own config
(and its own ``checkpoint_dir``).

Example::

    trainer = Trainer(method, TrainConfig(epochs=30, lr=1e-3, monitor="mae", checkpoint_dir="ckpt"))
    result = trainer.fit(train_ds, valid_ds)
    result.best_epoch, result.best_score, result.history[-1]["valid/mae"]
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.utils.data import BatchSampler, DistributedSampler

from flowtransfer.io import CheckpointError, atomic_save, clean_stale_temp_files, safe_load
from flowtransfer.training.distributed import (
    DistributedContext,
    all_gather_objects,
    broadcast_object,
    current_context,
    weighted_means,
)
from flowtransfer.training.evaluation import evaluate, evaluate_loss
from flowtransfer.training.seeding import derive_seed, rng_state, seed_everything, set_rng_state

__all__ = ["TrainConfig", "FitResult", "Trainer", "CHECKPOINT_FORMAT", "STOP_REASONS", "load_checkpoint", "build_optimizer"]

logger = logging.getLogger(__name__)

#: the ``format`` field of trainer checkpoints
CHECKPOINT_FORMAT = "flowtransfer.trainer/1"
#: key of the non-finite-loss flag gathered with the epoch's sums (never in the returned record)
_NONFINITE = "_nonfinite_loss"

#: monitored quantities that improve downwards (besides anything starting with "loss")
_MIN_METRICS = frozenset({"mae", "mse", "rmse", "nll", "bpd"})


@dataclass
class TrainConfig:
    """Everything the trainer does, typed.

    Attributes:
        epochs: maximum number of epochs.
        batch_size: training batch size (per process under DDP).
        lr: learning rate.
        weight_decay: passed to the optimiser (L2 for ``adam``/``sgd``, decoupled for ``adamw``).
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"``.
        momentum, nesterov: ``sgd`` only.
        grad_clip_norm: clip the global gradient 2-norm to this value; None disables.
        grad_clip_value: clip each gradient entry to ``[-v, v]`` (released DiCMoR uses 0.6); None
            disables. Applied before ``grad_clip_norm`` when both are set.
        lr_plateau_factor: multiply the learning rate by this when the monitored score stalls.
        lr_plateau_patience: epochs without improvement before reducing; None disables the schedule.
        min_lr: lower bound of the schedule.
        early_stop_patience: stop after this many epochs without improvement; None disables.
        monitor: the validation quantity for model selection, schedule and early stopping:
            ``"loss"`` (the mean of ``method.loss`` over the validation set), ``"loss/<part>"``
            (one logged part of it), or a metric key of :func:`~flowtransfer.training.evaluate`
            (``"mae"``, ``"acc2_non0"``, ``"acc"``, ...).
        mode: ``"min"``, ``"max"`` or ``"auto"`` (``min`` for losses, ``mae`` and the like; ``max``
            otherwise).
        min_delta: an improvement must beat the best score by more than this.
        seed: seeds Python, NumPy and torch at the start of :meth:`Trainer.fit` and each epoch's
            shuffle.
        checkpoint_dir: folder for ``last.pt``/``best.pt``; None writes nothing.
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        progress: tqdm bars (shown only on a terminal, on rank 0).
        max_steps_per_epoch: cut each epoch after this many batches (quick runs); None = all.
        drop_last: drop the last incomplete training batch.
        eval_batch_size: batch size for validation.
        max_steps: cap on the optimiser steps of this fit (over all resumed runs); None = no cap.
            Training stops after the step that reaches it (mid-epoch if need be; that epoch is
            validated). See the module docstring for the budget rule.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None picks CUDA (this rank's device) if
            available, else CPU.
        find_unused_parameters: DDP option; keep True when some parameters get no gradient in
            some steps (for example the flow of a modality absent from a batch).
    """

    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = 0.9
    nesterov: bool = False
    grad_clip_norm: float | None = None
    grad_clip_value: float | None = None
    lr_plateau_factor: float = 0.5
    lr_plateau_patience: int | None = 5
    min_lr: float = 0.0
    early_stop_patience: int | None = 10
    monitor: str = "loss"
    mode: Literal["auto", "min", "max"] = "auto"
    min_delta: float = 0.0
    seed: int = 1111
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = True
    max_steps_per_epoch: int | None = None
    max_steps: int | None = None
    drop_last: bool = False
    eval_batch_size: int = 256
    device: str | None = None
    find_unused_parameters: bool = True

    def __post_init__(self) -> None:
        def positive_int(name: str, allow_none: bool = False, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if value is None and allow_none:
                return
            low = 0 if allow_zero else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"TrainConfig.{name} must be an int >= {low}{' or None' if allow_none else ''}, got {value!r}")

        positive_int("epochs")
        positive_int("batch_size")
        positive_int("eval_batch_size")
        positive_int("lr_plateau_patience", allow_none=True, allow_zero=True)
        positive_int("early_stop_patience", allow_none=True)
        positive_int("max_steps_per_epoch", allow_none=True)
        positive_int("max_steps", allow_none=True)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"TrainConfig.optimizer must be 'adam', 'adamw' or 'sgd', got {self.optimizer!r}")
        for name in ("grad_clip_norm", "grad_clip_value"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0 or None, got {value!r}")
        if not 0 < self.lr_plateau_factor < 1:
            raise ValueError(f"TrainConfig.lr_plateau_factor must lie in (0, 1), got {self.lr_plateau_factor!r}")
        if self.mode not in ("auto", "min", "max"):
            raise ValueError(f"TrainConfig.mode must be 'auto', 'min' or 'max', got {self.mode!r}")
        if self.min_delta < 0:
            raise ValueError(f"TrainConfig.min_delta must be >= 0, got {self.min_delta!r}")
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ValueError(f"TrainConfig.monitor must be a non-empty string, got {self.monitor!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"TrainConfig.seed must be an int, got {self.seed!r}")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("TrainConfig.resume=True needs a checkpoint_dir to resume from")
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = os.fspath(self.checkpoint_dir)

    def steps_per_epoch(self, n_samples: int, world_size: int = 1) -> int:
        """Optimiser steps of one full epoch over ``n_samples`` training samples (per process
        under DDP, whose sampler pads each rank to ``ceil(n / world_size)`` samples unless
        ``drop_last``), after ``max_steps_per_epoch``."""
        if n_samples < 0 or world_size < 1:
            raise ValueError(f"steps_per_epoch: need n_samples >= 0 and world_size >= 1, got {n_samples}, {world_size}")
        per_rank = n_samples // world_size if self.drop_last else -(-n_samples // world_size)
        steps = per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)
        if self.max_steps_per_epoch is not None:
            steps = min(steps, self.max_steps_per_epoch)
        return steps

    def planned_steps(self, n_samples: int, world_size: int = 1) -> int:
        """The most optimiser steps one fit can take: ``min(max_steps, epochs x steps_per_epoch)``
        (early stopping can only make it fewer)."""
        steps = self.epochs * self.steps_per_epoch(n_samples, world_size)
        return steps if self.max_steps is None else min(steps, self.max_steps)

    @property
    def resolved_mode(self) -> Literal["min", "max"]:
        """``mode`` with ``"auto"`` resolved from ``monitor``."""
        if self.mode != "auto":
            return self.mode
        if self.monitor.startswith("loss") or self.monitor in _MIN_METRICS:
            return "min"
        return "max"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy (for checkpoints and result files)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        return cls(**data)


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        best_epoch: 0-based epoch whose weights the method holds at the end.
        best_score: the monitored validation score at that epoch.
        monitor, mode: what was monitored and in which direction.
        history: one flat dict per epoch: ``epoch``, ``lr`` (during the epoch), ``seconds``,
            ``steps`` (optimiser steps taken so far, this epoch included),
            ``score``, ``improved``, ``train/loss``, ``train/loss/<part>``, ``train/grad_norm``
            (mean global gradient 2-norm before norm clipping), ``valid/<metric>``, and
            ``valid/loss`` (+ parts) when the monitor is a loss.
        stopped_early: True if early stopping ended training before the epoch limit.
        epochs_run: epochs completed (over all resumed runs; an epoch cut by the cap counts).
        train_seconds: wall time summed over epochs (over all resumed runs).
        steps: optimiser steps taken (over all resumed runs).
        best_step: optimiser steps taken when the selected (best) weights were recorded.
        stop_reason: which rule ended training: ``"plateau"`` (the early-stopping criterion holds:
            ``early_stop_patience`` epochs without improvement; it takes precedence when it holds
            at the same epoch as a limit), ``"cap"`` (``max_steps`` reached) or ``"epochs"``
            (``epochs`` completed).
        improving_at_stop: True when training ended on the cap or the epoch limit while the
            validation score had improved within the last patience window (the last
            ``early_stop_patience`` epochs; the last epoch when early stopping is off): the run
            had not converged. Always False for ``"plateau"``.
    """

    best_epoch: int
    best_score: float
    monitor: str
    mode: str
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    epochs_run: int = 0
    train_seconds: float = 0.0
    steps: int = 0
    best_step: int = 0
    stop_reason: Literal["plateau", "cap", "epochs"] = "epochs"
    improving_at_stop: bool = False

    def budget(self) -> dict[str, Any]:
        """The budget fields as plain data: ``steps``, ``best_step``, ``stop_reason``,
        ``improving_at_stop``, and the selected epoch's validation score ``valid_score`` with its
        name ``valid_monitor`` (the columns of a result row: the validation score beside the test
        scores shows the gap between the split that selected the model and the one that scores it)."""
        return {"steps": self.steps, "best_step": self.best_step, "stop_reason": self.stop_reason,
                "improving_at_stop": self.improving_at_stop, "valid_score": float(self.best_score),
                "valid_monitor": self.monitor}


#: the values of :attr:`FitResult.stop_reason`
STOP_REASONS: tuple[str, ...] = ("plateau", "cap", "epochs")


class _LossModule(nn.Module):
    """Wraps a method so that DDP's ``forward`` (and so its gradient hooks) run ``method.loss``."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, batch: Any) -> tuple[Tensor, dict[str, Tensor | float]]:
        return self.method.loss(batch)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a trainer checkpoint safely (``weights_only``) and check its format."""
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a trainer checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    return state


def build_optimizer(groups: list[dict[str, Any]], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser ``cfg.optimizer`` over parameter ``groups``.

    Adam and AdamW use PyTorch's fused kernel (one call updates every parameter) when every
    parameter is a floating-point tensor on a device that has it: the same update as the default
    per-parameter loop, about 5 times faster on CPU for DiCMoR's ~1700 parameter tensors.
    """
    if cfg.optimizer in ("adam", "adamw"):
        params = [p for g in groups for p in g["params"]]
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        return cls(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    return torch.optim.SGD(
        groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov
    )


class Trainer:
    """Train one method with one :class:`TrainConfig`; see the module docstring.

    Args:
        method: an ``nn.Module`` with ``loss(batch)`` and ``predict(batch)``.
        config: training settings (defaults if None).
        context: the distributed context; default :func:`current_context` (single process unless
            :func:`~flowtransfer.training.init_distributed` has joined a process group).
        on_epoch_end: called as ``on_epoch_end(trainer, record)`` after every epoch (on every
            rank) with that epoch's history record, e.g. to drive a progress bar over several
            trainings (``record["steps"]``). Not part of the checkpointed state.

    Attributes:
        optimizer, scheduler: built at construction (scheduler None if disabled).
        epoch: epochs completed; steps: optimiser steps taken; best_score, best_epoch,
            best_step, bad_epochs, history: selection state.
        exempts_warmup: True: epochs vetoed before the first selectable one count against neither
            patience (read by methods with a warm-up, e.g. MMANet, when they plan it).
        last_state: during ``method.on_fit_end`` only, the method's state dict at the end of
            training (None otherwise).
    """

    def __init__(
        self,
        method: nn.Module,
        config: TrainConfig | None = None,
        *,
        context: DistributedContext | None = None,
        on_epoch_end: Callable[[Trainer, dict[str, Any]], None] | None = None,
    ) -> None:
        if not isinstance(method, nn.Module):
            raise TypeError(f"method must be an nn.Module, got {type(method).__name__}")
        for name in ("loss", "predict"):
            if not callable(getattr(method, name, None)):
                raise TypeError(f"{type(method).__name__} has no {name}(batch) method; see docs/ARCHITECTURE.md")
        if on_epoch_end is not None and not callable(on_epoch_end):
            raise TypeError(f"on_epoch_end must be callable, got {type(on_epoch_end).__name__}")
        self.method = method
        self.on_epoch_end = on_epoch_end
        self.config = config if config is not None else TrainConfig()
        self.context = context if context is not None else current_context()
        self.mode = self.config.resolved_mode
        self.device = self._resolve_device()
        self.method.to(self.device)
        #: read and check each step's loss before its backward (a non-finite loss then stops the
        #: epoch with the weights still finite). On by default on the CPU, where reading a tensor
        #: costs nothing; off on accelerators, where it would make the device wait on the host every
        #: step: there a non-finite loss is found at the end of the epoch (still named by its step),
        #: after the steps that followed it ran. Under DDP the check is always at the end of the
        #: epoch and collective (every rank raises), so no rank waits on another that stopped.
        self.check_loss_every_step: bool = self.device.type == "cpu"
        self.optimizer = self._build_optimizer()
        self.scheduler: ReduceLROnPlateau | None = None
        if self.config.lr_plateau_patience is not None:
            self.scheduler = ReduceLROnPlateau(
                self.optimizer,
                mode=self.mode,
                factor=self.config.lr_plateau_factor,
                patience=self.config.lr_plateau_patience,
                threshold=self.config.min_delta,
                threshold_mode="abs",
                min_lr=self.config.min_lr,
            )
        self._loss_module: nn.Module | None = None
        if self.context.is_distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._loss_module = DistributedDataParallel(
                _LossModule(self.method),
                device_ids=ids,
                find_unused_parameters=self.config.find_unused_parameters,
            )
        self.epoch = 0
        self.steps = 0
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_step = 0
        self.best_state: dict[str, Tensor] | None = None
        self.bad_epochs = 0
        self.stopped_early = False
        self.history: list[dict[str, Any]] = []
        #: the datasets of the running :meth:`fit` (for hooks); None before it
        self.train_dataset: Any = None
        self.valid_dataset: Any = None
        #: the state at the end of training, during ``method.on_fit_end`` only
        self.last_state: dict[str, Tensor] | None = None
        #: epochs vetoed before the first selectable one use no patience (read by MMANet.plan)
        self.exempts_warmup = True

    # ------------------------------------------------------------------------------------ setup

    def _resolve_device(self) -> torch.device:
        if self.config.device is not None:
            device = torch.device(self.config.device)
            if device.type == "cuda" and device.index is None:
                device = torch.device("cuda", self.context.local_rank if self.context.is_distributed else 0)
            return device
        if torch.cuda.is_available():
            return torch.device("cuda", self.context.local_rank if self.context.is_distributed else 0)
        return torch.device("cpu")

    def _parameter_groups(self) -> list[dict[str, Any]]:
        hook = getattr(self.method, "parameter_groups", None)
        if hook is None:
            return [{"params": [p for p in self.method.parameters()]}]
        groups = [dict(g) for g in hook()]
        seen: set[int] = set()
        owned = {id(p) for p in self.method.parameters()}
        for i, group in enumerate(groups):
            if "params" not in group:
                raise ValueError(f"parameter_groups()[{i}] has no 'params' entry")
            params = list(group["params"])
            for p in params:
                if id(p) not in owned:
                    raise ValueError(f"parameter_groups()[{i}] holds a tensor that is not a parameter of the method")
                if id(p) in seen:
                    raise ValueError(f"parameter_groups(): a parameter appears in more than one group (group {i})")
                seen.add(id(p))
            group["params"] = params
        left = sum(p.numel() for p in self.method.parameters() if id(p) not in seen)
        if left:
            logger.info("%d parameter values are in no parameter group and will not be trained", left)
        return groups

    def _build_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        groups = self._parameter_groups()
        if not any(len(g["params"]) for g in groups):
            raise ValueError(f"{type(self.method).__name__} has no parameters to optimise")
        return build_optimizer(groups, cfg)

    @property
    def is_main(self) -> bool:
        """True on the process that writes files (rank 0)."""
        return self.context.is_main

    @property
    def planned_epochs(self) -> int | None:
        """Epochs this fit plans to run: ``epochs``, fewer when the step cap ends training sooner
        (``ceil(max_steps / steps_per_epoch)``); early stopping can only make it fewer. None before
        :meth:`fit` has its training set (schedules proportional to the budget read it)."""
        if self.train_dataset is None:
            return None
        cfg = self.config
        if cfg.max_steps is None:
            return cfg.epochs
        per_epoch = max(1, cfg.steps_per_epoch(len(self.train_dataset), self.context.world_size))
        return min(cfg.epochs, -(-cfg.max_steps // per_epoch))

    @property
    def lr(self) -> float:
        """Current learning rate of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------------------------ data

    def _train_batches(self, dataset: Any, epoch: int) -> tuple[Iterator[Any], int]:
        """This rank's training batches for ``epoch`` and how many there are."""
        cfg = self.config
        n = len(dataset)
        if self.context.is_distributed:
            sampler = DistributedSampler(
                range(n),
                num_replicas=self.context.world_size,
                rank=self.context.rank,
                shuffle=True,
                seed=cfg.seed,
                drop_last=cfg.drop_last,
            )
            sampler.set_epoch(epoch)
            chunks = BatchSampler(sampler, batch_size=cfg.batch_size, drop_last=cfg.drop_last)
            batches: Iterator[Any] = (dataset.batch(idx) for idx in chunks)
            count = len(chunks)
        else:
            loader = dataset.loader(
                cfg.batch_size, shuffle=True, seed=derive_seed(cfg.seed, epoch), drop_last=cfg.drop_last
            )
            batches, count = iter(loader), len(loader)
        if cfg.max_steps_per_epoch is not None:
            count = min(count, cfg.max_steps_per_epoch)
        if cfg.max_steps is not None:
            count = min(count, cfg.max_steps - self.steps)  # the cap is exact
        return batches, count

    # ------------------------------------------------------------------------------------ steps

    def _clip(self) -> Tensor | float:
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return 0.0
        if self.config.grad_clip_value is not None:
            torch.nn.utils.clip_grad_value_(params, self.config.grad_clip_value)
        max_norm = self.config.grad_clip_norm if self.config.grad_clip_norm is not None else math.inf
        return torch.nn.utils.clip_grad_norm_(params, max_norm).detach()  # stays on the device: no sync

    def train_epoch(self, dataset: Any, epoch: int) -> dict[str, float]:
        """One pass over (this rank's share of) ``dataset``; returns sample-weighted mean losses.

        Keys: ``loss``, ``loss/<part>`` and ``grad_norm``, averaged over ranks under DDP.

        Raises:
            FloatingPointError: a non-finite training loss (for example a method that read a NaN
                slot of a missing modality).
        """
        batches, count = self._train_batches(dataset, epoch)
        self.method.train()
        # Sums stay on the device (float64 where the device has it, so the logged means equal
        # host-side sums) and are read once at the end of the epoch. Whether each step's loss is also
        # read and checked at once: see ``check_loss_every_step`` (set in ``__init__``).
        acc = torch.float32 if self.device.type == "mps" else torch.float64
        sums: dict[str, Tensor | float] = {}
        counts: dict[str, float] = {}
        step_losses: list[Tensor] = []

        def add(key: str, value: Tensor | float, weight: int) -> None:
            if isinstance(value, Tensor):
                if value.numel() != 1:
                    raise ValueError(f"{type(self.method).__name__}.loss part {key!r} has shape "
                                     f"{tuple(value.shape)}; a logged part must be a scalar")
                term = value.detach().reshape(()).to(acc) * weight
            else:
                term = float(value) * weight
            sums[key] = sums[key] + term if key in sums else term
            counts[key] = counts.get(key, 0.0) + weight

        seen = 0
        bar = self._bar(count, f"epoch {epoch + 1}/{self.config.epochs}", leave=False)
        # a bar reads each loss anyway (it shows it); under DDP the check stays collective (below)
        per_step = (self.check_loss_every_step or bar is not None) and not self.context.is_distributed
        try:
            for step, batch in enumerate(batches):
                if step >= count:
                    break
                batch = batch.to(self.device)
                self.optimizer.zero_grad(set_to_none=True)
                if self._loss_module is not None:
                    loss, parts = self._loss_module(batch)  # DDP forward: gradient hooks armed
                else:
                    loss, parts = self.method.loss(batch)
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                    raise TypeError(f"{type(self.method).__name__}.loss must return a scalar Tensor, got {shape}")
                step_losses.append(loss.detach())
                if per_step and not math.isfinite(float(step_losses[-1])):
                    # before backward and the optimiser step: the weights stay the last finite ones
                    self._raise_if_nonfinite(0, step_losses[-1:], epoch, step)
                if not loss.requires_grad:
                    raise RuntimeError(
                        f"{type(self.method).__name__}.loss returned a tensor without gradient: "
                        "no trainable parameter contributes to it"
                    )
                loss.backward()
                grad_norm = self._clip()
                self.optimizer.step()
                self.steps += 1
                b = len(batch.labels)
                seen += b
                add("loss", loss, b)
                add("grad_norm", grad_norm, b)
                for key, part in parts.items():
                    if key != "loss":  # the total is logged already
                        add(f"loss/{key}", part, b)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(step_losses[-1]):.4f}")
        finally:
            if bar is not None:
                bar.close()
        if seen == 0:
            raise ValueError(
                f"epoch {epoch}: no training batches (n={len(dataset)}, batch_size={self.config.batch_size}, "
                f"drop_last={self.config.drop_last})"
            )
        bad = self._first_nonfinite(step_losses)
        keys = list(sums)
        values = torch.stack([torch.as_tensor(sums[k], dtype=acc, device=self.device)
                              for k in keys]).tolist()  # the epoch's one read of the sums
        local = dict(zip(keys, values))
        local[_NONFINITE] = 0.0 if bad is None else 1.0  # collective: every rank learns of any rank's failure
        counts[_NONFINITE] = 1.0
        record = weighted_means(local, counts)
        if record.pop(_NONFINITE) > 0:
            if bad is None:
                raise FloatingPointError(
                    f"training loss of {type(self.method).__name__} was non-finite on another rank in epoch {epoch}")
            self._raise_if_nonfinite(bad, step_losses, epoch, 0)
        return record

    @staticmethod
    def _first_nonfinite(losses: list[Tensor]) -> int | None:
        """Index of the first non-finite loss in ``losses`` (``None`` if all are finite); one host read."""
        finite = torch.isfinite(torch.stack(losses))
        if bool(finite.all()):
            return None
        return int((~finite).nonzero()[0, 0])

    def _raise_if_nonfinite(self, bad: int | None, losses: list[Tensor], epoch: int, first_step: int) -> None:
        """Raise :class:`FloatingPointError` naming step ``first_step + bad`` of ``epoch``."""
        if bad is None:
            return
        raise FloatingPointError(
            f"training loss is {float(losses[bad])} at epoch {epoch}, step {first_step + bad} of "
            f"{type(self.method).__name__}; absent modalities hold NaN, so a method that reads one without "
            "consulting batch.mask produces this (or the optimisation diverged: lower lr or clip gradients)"
        )

    def validate(self, dataset: Any) -> dict[str, float]:
        """Validation metrics (and validation loss when the monitor is a loss), no gradients.

        Every rank evaluates the whole validation set with identical weights; the score used for
        decisions is then taken from rank 0 (see :meth:`fit`).
        """
        record: dict[str, float] = {}
        if self.config.monitor.startswith("loss"):
            record.update(evaluate_loss(self.method, dataset, self.config.eval_batch_size, self.device))
        record.update(evaluate(self.method, dataset, self.config.eval_batch_size, self.device))
        return record

    def _bar(self, total: int, desc: str, leave: bool, initial: int = 0) -> Any:
        """A tqdm bar on rank 0 when ``config.progress`` and stderr is a terminal, else None."""
        if not (self.config.progress and self.is_main and sys.stderr.isatty()):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, leave=leave, dynamic_ncols=True)

    def _improved(self, score: float) -> bool:
        if math.isnan(score):
            return False
        if self.best_score is None:
            return True
        delta = self.config.min_delta
        if self.mode == "min":
            return score < self.best_score - delta
        return score > self.best_score + delta

    # ------------------------------------------------------------------------------------ fit

    def fit(self, train_dataset: Any, valid_dataset: Any) -> FitResult:
        """Train, select on ``valid_dataset``, and leave the method holding the best weights.

        Args:
            train_dataset: a :class:`~flowtransfer.data.MultimodalDataset` (with its training
                missing-modality mask, if any).
            valid_dataset: the validation split, the only data model selection sees.

        Returns:
            A :class:`FitResult`.
        """
        if valid_dataset is None:
            raise ValueError("fit needs a validation dataset: model selection uses the validation split only")
        if train_dataset is valid_dataset:
            raise ValueError("train_dataset and valid_dataset are the same object; select on held-out data")
        for name, ds in (("train_dataset", train_dataset), ("valid_dataset", valid_dataset)):
            if not hasattr(ds, "task") or not hasattr(ds, "loader"):
                raise TypeError(f"{name} must be a MultimodalDataset, got {type(ds).__name__}")
        if train_dataset.task != valid_dataset.task:
            raise ValueError(f"task mismatch: train is {train_dataset.task!r}, valid is {valid_dataset.task!r}")

        cfg = self.config
        self.train_dataset, self.valid_dataset = train_dataset, valid_dataset
        # the same seed on every rank for prepare(), so that it computes the same statistics
        seed_everything(cfg.seed)
        prepare = getattr(self.method, "prepare", None)
        if prepare is not None:
            prepare(train_dataset)
            self._sync_from_rank0()
        if self.context.rank > 0:
            seed_everything(derive_seed(cfg.seed, self.context.rank))  # e.g. distinct dropout per rank
        if self.checkpoint_dir is not None and self.is_main:
            clean_stale_temp_files(self.checkpoint_dir)  # temp files of a writer killed before its rename
        if cfg.resume:
            self._resume()  # restores weights, optimiser, counters and every RNG state

        planned_epochs = self.planned_epochs
        assert planned_epochs is not None
        epoch_bar = self._bar(planned_epochs, "train", leave=True, initial=min(self.epoch, planned_epochs))
        try:
            self._run_epochs(train_dataset, valid_dataset, epoch_bar)
        finally:
            if epoch_bar is not None:
                epoch_bar.close()
        if self.best_state is None:
            vetoes = [r["veto"] for r in self.history if "veto" in r]
            if self.history and len(vetoes) == len(self.history):
                raise RuntimeError(f"no epoch could be selected: the method vetoed every one (last: {vetoes[-1]})")
            raise RuntimeError(
                f"no epoch produced a usable validation score for {cfg.monitor!r} (every score was NaN)"
                if self.history else "nothing to train: epochs already completed and no best weights were saved"
            )
        fit_end = getattr(self.method, "on_fit_end", None)
        if fit_end is not None:  # the state at the end of training, for the hook
            self.last_state = {k: v.detach().clone() for k, v in self.method.state_dict().items()}
        self.method.load_state_dict(self.best_state)
        if fit_end is not None:
            try:
                fit_end(self)
            finally:
                self.last_state = None
        assert self.best_epoch is not None and self.best_score is not None
        reason = self.stop_reason()
        window = cfg.early_stop_patience if cfg.early_stop_patience is not None else 1
        return FitResult(
            best_epoch=self.best_epoch,
            best_score=self.best_score,
            monitor=cfg.monitor,
            mode=self.mode,
            history=list(self.history),
            stopped_early=self.stopped_early,
            epochs_run=self.epoch,
            train_seconds=float(sum(r["seconds"] for r in self.history)),
            steps=self.steps,
            best_step=self.best_step,
            stop_reason=reason,
            improving_at_stop=reason != "plateau" and self.bad_epochs < window,
        )

    def stop_reason(self) -> Literal["plateau", "cap", "epochs"]:
        """Which rule ends (or ended) training in the current state; see :class:`FitResult`."""
        cfg = self.config
        patience = cfg.early_stop_patience
        if self.stopped_early or (patience is not None and self.bad_epochs >= patience):
            return "plateau"
        if cfg.max_steps is not None and self.steps >= cfg.max_steps:
            return "cap"
        return "epochs"

    def _capped(self) -> bool:
        return self.config.max_steps is not None and self.steps >= self.config.max_steps

    def _sync_from_rank0(self) -> None:
        """Copy rank 0's parameters and buffers to every rank (after ``prepare``)."""
        if not self.context.is_distributed:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for tensor in self.method.state_dict().values():
                dist.broadcast(tensor, src=0)

    def _run_epochs(self, train_dataset: Any, valid_dataset: Any, epoch_bar: Any) -> None:
        cfg = self.config
        while self.epoch < cfg.epochs and not self.stopped_early and not self._capped():
            epoch = self.epoch
            hook = getattr(self.method, "on_epoch_start", None)
            if hook is not None:
                hook(epoch, self)
            start = time.perf_counter()
            lr = self.lr
            train_record = self.train_epoch(train_dataset, epoch)
            after = getattr(self.method, "after_train_epoch", None)
            if after is not None:  # e.g. per-pattern selection of sub-models, before they are scored
                after(epoch, self)
            valid_record = self.validate(valid_dataset)
            if cfg.monitor not in valid_record:
                raise ValueError(
                    f"monitor {cfg.monitor!r} is not among the validation quantities {sorted(valid_record)}"
                )
            score = float(broadcast_object(float(valid_record[cfg.monitor])))
            # a method may refuse to let this epoch be selected (e.g. DiCMoR whose recovered
            # validation features are non-finite or far outside the real ones): never the best
            veto_fn = getattr(self.method, "selection_veto", None)
            veto = broadcast_object(veto_fn(valid_dataset)) if veto_fn is not None else None
            if veto:
                valid_record["vetoed"] = 1.0
            improved = not veto and self._improved(score)
            # a vetoed epoch before any selectable one (a warm-up) uses no patience (module docstring)
            exempt = bool(veto) and self.best_epoch is None
            if improved:
                self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
                self.best_step = self.steps
                self.best_state = {k: v.detach().clone() for k, v in self.method.state_dict().items()}
            elif not exempt:
                self.bad_epochs += 1
            if self.scheduler is not None and not exempt:
                if veto:  # counts as an epoch without improvement; its own score is not trusted
                    self.scheduler.step(math.inf if self.mode == "min" else -math.inf)
                elif math.isfinite(score):
                    self.scheduler.step(score)
            record: dict[str, Any] = {"epoch": epoch, "lr": lr, "steps": self.steps}
            record.update({f"train/{k}": v for k, v in train_record.items()})
            record.update({f"valid/{k}": v for k, v in valid_record.items()})
            record.update({"score": score, "improved": improved, "seconds": time.perf_counter() - start})
            if veto:
                record["veto"] = str(veto)
                if exempt:
                    record["patience_exempt"] = True
            self.history.append(record)
            self.epoch = epoch + 1
            patience = cfg.early_stop_patience
            self.stopped_early = patience is not None and self.bad_epochs >= patience and self.epoch < cfg.epochs
            self._checkpoint(improved)
            best = math.nan if self.best_score is None else self.best_score
            if self.is_main:
                logger.info(
                    "epoch %d/%d  train loss %.4f  valid %s %.4f (best %.4f)%s  lr %.2e  %.1fs",
                    epoch + 1, cfg.epochs, train_record["loss"], cfg.monitor, score, best,
                    " *" if improved else (" (vetoed)" if veto else ""), lr, record["seconds"],
                )
            if epoch_bar is not None:
                epoch_bar.update(1)
                epoch_bar.set_postfix({cfg.monitor: f"{score:.4f}", "best": f"{best:.4f}"})
            if self.stopped_early and self.is_main:
                logger.info("early stop after epoch %d: %d epochs without improvement", epoch + 1, self.bad_epochs)
            elif self._capped() and self.is_main:
                logger.info("step cap reached after epoch %d: %d optimiser steps", epoch + 1, self.steps)
            if self.on_epoch_end is not None:
                self.on_epoch_end(self, record)

    # ------------------------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_dir(self) -> Path | None:
        """``config.checkpoint_dir`` as a path, or None."""
        return None if self.config.checkpoint_dir is None else Path(self.config.checkpoint_dir)

    def state_dict(self, include_best: bool = True) -> dict[str, Any]:
        """Everything needed to continue training (plain data and tensors only).

        Collective under DDP (gathers every rank's RNG state): call it on every rank.
        """
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "method": type(self.method).__name__,
            "epoch": self.epoch,
            "steps": self.steps,
            "best_step": self.best_step,
            "state_dict": {k: v.detach().cpu() for k, v in self.method.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "stopped_early": self.stopped_early,
            "history": [dict(r) for r in self.history],
            "world_size": self.context.world_size,
            "rng": all_gather_objects(rng_state()),
        }
        if include_best:
            state["best_state_dict"] = (
                None if self.best_state is None else {k: v.detach().cpu() for k, v in self.best_state.items()}
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (weights, optimiser, scheduler, counters, RNG states)."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a trainer checkpoint (format {state.get('format')!r})")
        if state.get("method") != type(self.method).__name__:
            raise ValueError(
                f"checkpoint was written for method {state.get('method')!r}, not {type(self.method).__name__!r}"
            )
        self.method.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        # checkpoints written before the step counter existed: the last epoch's record, else 0
        last_steps = state["history"][-1].get("steps", 0) if state.get("history") else 0
        self.steps = int(state.get("steps", last_steps))
        self.best_step = int(state.get("best_step", 0))
        self.best_score = state["best_score"]
        self.best_epoch = state["best_epoch"]
        self.bad_epochs = int(state["bad_epochs"])
        self.stopped_early = bool(state["stopped_early"])
        self.history = [dict(r) for r in state["history"]]
        best = state.get("best_state_dict")
        self.best_state = None if best is None else {k: v.to(self.device) for k, v in best.items()}
        rngs = state.get("rng") or []
        if len(rngs) == self.context.world_size:
            set_rng_state(rngs[self.context.rank])
        else:
            logger.warning(
                "checkpoint holds RNG states for %d process(es), this run has %d: reseeding per epoch; "
                "results will not match an uninterrupted run exactly", len(rngs), self.context.world_size,
            )
            seed_everything(derive_seed(self.config.seed, self.context.rank, self.epoch))

    def _resume(self) -> bool:
        path = self.checkpoint_dir / "last.pt"  # type: ignore[operator]
        if not path.is_file():
            logger.info("resume: %s not found, starting from scratch", path)
            return False
        try:
            state = load_checkpoint(path)
        except ValueError as err:  # not a trainer checkpoint
            raise CheckpointError(f"cannot resume: {err}") from None
        ignored = {"epochs", "resume", "progress", "checkpoint_dir", "device", "eval_batch_size"}
        saved = state.get("config", {})
        changed = sorted(k for k, v in self.config.to_dict().items() if k not in ignored and saved.get(k, v) != v)
        if changed:
            logger.warning(
                "resuming %s with changed settings %s: the run will differ from an uninterrupted one",
                path, {k: (saved[k], getattr(self.config, k)) for k in changed},
            )
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
            detail = f"missing entry {err}" if isinstance(err, KeyError) else str(err)
            raise CheckpointError(
                f"cannot resume from {path}: {detail} (remove the checkpoint folder to train from scratch)"
            ) from None
        logger.info("resumed from %s after epoch %d", path, self.epoch)
        return True

    def _checkpoint(self, improved: bool) -> None:
        if self.checkpoint_dir is None:
            return
        state = self.state_dict(include_best=True)  # collective: every rank takes part
        if not self.is_main:
            return
        if improved:
            best = {k: v for k, v in state.items() if k != "best_state_dict"}
            atomic_save(best, self.checkpoint_dir / "best.pt")
        atomic_save(state, self.checkpoint_dir / "last.pt")
