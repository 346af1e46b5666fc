"""The main job: train methods, evaluate them under every missing-modality setting, write results.

One run = one dataset x methods x seeds x settings. For each seed:

1. the test masks of every setting (``mr=0.0 ... mr=0.7`` per-sample random masks and every fixed
   pattern) are drawn once from the seed and saved to ``masks/seed<k>.npz``: every method sees the
   same masks;
2. each method is built from the registry (:func:`flowtransfer.methods.build_method`) and trained by
   the one :class:`~flowtransfer.training.Trainer`, selecting on the **validation** split only:
   complete validation data for models trained on complete data (``upper_bound``, ``zero_fill``,
   ``mean_fill``), a fixed random mask at ``valid_missing_rate`` for methods that train under missing
   modalities (``dicmor`` ...). Methods with stages (DiCMoR) train ``complete`` then ``recovery``.
   **One budget rule for every method**: each training ends on the validation plateau (early
   stopping with ``early_stop_patience``, learning rate on plateau with ``lr_plateau_patience``),
   on the cap of ``max_steps`` optimiser steps, or after ``epochs``, whichever comes first. The cap
   is the same for every method, and **a staged method shares it between its stages**
   (:func:`stage_cap`: each later stage is guaranteed ``max_steps // n_stages`` steps, and what a
   stage leaves unused passes on to the next), so DiCMoR takes no more optimiser steps in all than
   a one-stage method. Every result row records ``steps``, ``best_step``, ``stop_reason`` and
   ``improving_at_stop`` (:func:`combine_budgets` says how stages combine), and the printed table
   marks a method that hit the cap or the epoch limit while still improving.
   A fusion model whose training is the same computation as one already trained for this seed
   (``upper_bound`` after ``zero_fill``: same network, data, selection and seed) takes its weights
   instead of training again (:func:`_training_key`);
3. each trained model is evaluated on the test split under every setting: task metrics, and for
   methods that recover features, the Fréchet distance between recovered and real features in the
   method's own feature space, beside the same distance for zero and mean filling in that space.

``upper_bound`` is only evaluated on complete test data (setting ``complete``): it is the ceiling
that every row of a setting is read against.

Outputs in ``out``: ``results.csv`` / ``results.json`` (one row per method, dataset, setting, seed),
``summary.csv`` (mean ± std over seeds), ``table.txt`` (with the budget table), ``masks/``,
``config.json`` (the settings and, under ``data``, what the loader found: NaN/inf per split and
modality, slots marked missing, values zeroed), ``curves.png`` (score against missing rate), and
whatever :func:`flowtransfer.report.finish_run` writes (called last, on the main process).

Progress: with ``progress=True`` one outer bar (a tqdm bar on a terminal, log lines otherwise)
counts the optimiser steps of every (seed, method) training of the run against the planned ones
(``min(max_steps, epochs x steps per epoch)`` per training) and gives an ETA for the whole run;
it is updated after every epoch and re-planned as trainings stop early. ``progress=False`` is
silent.

Everything is checked before any training starts (:meth:`ExperimentConfig.validate`, the data's
splits against each other, the output folder's writability). Data with missing slots of its own
(a modality entirely NaN/inf for a sample) is handled throughout: validation and training masks
never mark such a slot present, a test setting is intersected with the data's own mask (samples
left with nothing are left out of that setting and counted in ``samples_without_input``), and
recovery distances use the test samples that have every modality. With ``resume=True`` each
training continues from its last complete checkpoint and ends with the same weights as an
uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from flowtransfer.data import MultimodalDataset, random_missing_mask, training_missing_mask
from flowtransfer.data.dataset import SPLITS, check_splits, nonfinite_lines
from flowtransfer.data.missing import PROTOCOLS, MissingSetting, Setting, protocol_settings, save_masks
from flowtransfer.methods.base import check_supports_steps
from flowtransfer.data.summary import DATASETS, load_dataset
from flowtransfer.io import InputError, atomic_write_json, atomic_write_text, clean_stale_temp_files, ensure_writable_dir
from flowtransfer.methods import PRESETS, DatasetInfo, build_method
from flowtransfer.metrics import frechet_distance
from flowtransfer.training import (
    Trainer,
    TrainConfig,
    evaluate,
    format_table,
    is_main_process,
    summarise,
    write_results,
)
from flowtransfer.training.distributed import current_context
from flowtransfer.training.evaluation import method_device
from flowtransfer.training.results import UNCONVERGED_MARK, format_budget_table, result_row, unconverged
from flowtransfer.training.seeding import seed_everything

__all__ = [
    "ExperimentConfig",
    "run_experiment",
    "load_splits",
    "data_report",
    "known_methods",
    "build_seeded",
    "train_method",
    "evaluate_method",
    "check_compatible",
    "DEFAULT_METHODS",
    "COMPLETE_DATA_METHODS",
    "VALID_MASK_SEED_OFFSET",
    "STAGES",
    "DEVICES",
    "main_metrics",
    "stage_cap",
    "combine_budgets",
    "planned_steps",
]

#: what ``flowtransfer run`` compares by default
DEFAULT_METHODS: tuple[str, ...] = ("dicmor", "zero_fill", "upper_bound")
#: methods trained on complete data, hence selected on complete validation data
COMPLETE_DATA_METHODS = frozenset({"upper_bound", "zero_fill", "mean_fill", "specialists", "unimodal"})
#: evaluated on complete test data only
BOUND_METHODS = frozenset({"upper_bound"})
#: default rates of the random per-sample protocol
DEFAULT_RATES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
#: the fixed validation mask of seed ``k`` is drawn with seed ``k + VALID_MASK_SEED_OFFSET``
VALID_MASK_SEED_OFFSET = 104729
#: the training stages of a staged method (one with ``set_stage``), in order
STAGES: tuple[str, ...] = ("complete", "recovery")
#: accepted values of :attr:`ExperimentConfig.device`
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")


@dataclass
class ExperimentConfig:
    """Everything one run does.

    Attributes:
        dataset: a name of :data:`flowtransfer.data.summary.DATASETS` (``synthetic``, ``mmsa``,
            ``avmnist``, ``npz``).
        data: path for real data (an MMSA pickle, the AV-MNIST sources folder, an ``.npz``).
        task: ``regression`` or ``classification`` where the loader lets you choose.
        methods: registered method names.
        seeds: one trained model per method and seed.
        rates: missing rates of the random per-sample protocol.
        patterns: also evaluate every fixed pattern of available modalities (random protocol).
        protocol: the test-time missing protocol, a key of
            :data:`flowtransfer.data.missing.PROTOCOLS`: ``random`` (default: ``rates`` and
            ``patterns``), ``steps`` (time steps missing inside each modality), ``per_modality``
            (one rate per modality), ``cyin_instance``, ``cyin_dataset``.
        protocol_rates: what a protocol other than ``random`` sweeps (step rates, probabilities,
            per-modality specifications such as ``"L0.1+A0.5+V0.3"``); None = its defaults.
        protocol_options: that protocol's options (``cyin_dataset``: ``batch_size``).
        preset: model size preset for DiCMoR and the fusion models (``small``, ``avmnist``,
            ``mosi``, ``mosei``); ``None`` picks the dataset's
            (:func:`~flowtransfer.methods.preset_for_dataset`: ``small`` for the embedded data,
            ``avmnist`` for AV-MNIST, ``mosi`` otherwise).
        epochs, batch_size, lr, weight_decay, early_stop_patience, grad_clip_norm: trainer settings.
            ``epochs`` limits each stage of a staged method (DiCMoR: ``complete`` then
            ``recovery``); ``max_steps`` is what makes budgets equal.
        lr_plateau_patience: epochs without improvement before the learning rate is halved; None
            disables the schedule. The default 5 is the trainer's, which with
            ``early_stop_patience=4`` never acts: set it below the early-stopping patience for the
            plateau rule to reduce the rate before stopping.
        max_steps: **one cap on the optimiser steps of every method** (None = no cap). A staged
            method shares it between its stages: see :func:`stage_cap`. At least ``len(STAGES)``.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available, else CPU), for training
            and evaluation; ``"cuda"`` without CUDA is refused by :meth:`validate`.
        valid_missing_rate: missing rate of the fixed validation mask used to select methods that
            train under missing modalities.
        max_steps_per_epoch: cut epochs short (quick runs and tests).
        method_options: per-method keyword arguments for :func:`build_method`.
        dataset_options: keyword arguments for the dataset loader (for example smaller synthetic
            splits: ``{"n_train": 200}``).
        train_eta, train_eta_modality: SMIL's training setting: only a fraction ``train_eta`` of
            the training (and validation) samples has ``train_eta_modality`` (default: the last
            modality); ``None`` trains on complete data.
        out: output folder.
        progress: tqdm bars.
        resume: continue every training from its last complete checkpoint in ``out/checkpoints``
            (bit-identical to an uninterrupted run); finished trainings are not repeated.
    """

    dataset: str = "synthetic"
    data: str | None = None
    task: str | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (0, 1)
    rates: tuple[float, ...] = DEFAULT_RATES
    patterns: bool = True
    preset: str | None = None
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    early_stop_patience: int | None = 4
    grad_clip_norm: float | None = 5.0
    valid_missing_rate: float = 0.3
    max_steps_per_epoch: int | None = None
    lr_plateau_patience: int | None = 5
    max_steps: int | None = None
    device: str = "auto"
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    train_eta: float | None = None
    train_eta_modality: str | None = None
    protocol: str = "random"
    protocol_rates: tuple[Any, ...] | None = None
    protocol_options: dict[str, Any] = field(default_factory=dict)
    out: str = "runs/latest"
    progress: bool = True
    resume: bool = False

    def resolved_preset(self) -> str:
        """``preset``, or the dataset's preset when None (:func:`~flowtransfer.methods.preset_for_dataset`)."""
        from flowtransfer.methods import preset_for_dataset

        return self.preset or preset_for_dataset(self.dataset)

    def settings(self, modalities: Sequence[str]) -> list[Setting]:
        """The evaluation settings of this run's protocol for ``modalities``, in sweep order.

        Raises:
            flowtransfer.io.InputError: an unknown protocol or option, or a bad rate."""
        if self.protocol == "random":
            return protocol_settings("random", modalities, self.rates, patterns=self.patterns)
        return protocol_settings(self.protocol, modalities, self.protocol_rates, **self.protocol_options)

    def resolved_device(self) -> str:
        """``device`` with ``"auto"`` resolved: ``"cuda"`` when CUDA is available, else ``"cpu"``."""
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def train_config(self, task: str, seed: int, **changes: Any) -> TrainConfig:
        """The :class:`TrainConfig` of one training stage (validated by ``TrainConfig`` itself)."""
        settings: dict[str, Any] = dict(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
            early_stop_patience=self.early_stop_patience, grad_clip_norm=self.grad_clip_norm,
            monitor=_monitor(task), seed=seed, progress=self.progress,
            max_steps_per_epoch=self.max_steps_per_epoch, lr_plateau_patience=self.lr_plateau_patience,
            max_steps=self.max_steps, device=self.resolved_device(),
        )
        settings.update(changes)
        return TrainConfig(**settings)

    def validate(self, *, train: bool = True) -> None:
        """Check every setting before anything is loaded, trained or written.

        ``train=False`` checks only what evaluating needs (dataset, seeds, rates).

        Raises:
            flowtransfer.io.InputError: naming the setting and what is wrong with it.
        """
        if self.dataset not in DATASETS:
            raise InputError(f"unknown dataset {self.dataset!r}; known: {sorted(DATASETS)}")
        if self.task not in (None, "regression", "classification"):
            raise InputError(f"unknown task {self.task!r}; expected 'regression' or 'classification'")
        _check_unique("seeds", self.seeds, lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool),
                      "integers")
        _check_unique("rates", self.rates, lambda v: _is_real(v) and 0.0 <= v < 1.0, "numbers in [0, 1)",
                      allow_empty=self.patterns)
        if not self.rates and not self.patterns:
            raise InputError("nothing to evaluate: no missing rates and no fixed patterns")
        from flowtransfer.data.missing import format_rate

        names: dict[str, Any] = {}
        for rate in self.rates:
            other = names.setdefault(format_rate(rate), rate)
            if other != rate:
                raise InputError(f"rates {other!r} and {rate!r} are both the setting mr={format_rate(rate)}; give one")
        if not train:
            return
        _check_unique("methods", self.methods, lambda v: isinstance(v, str) and bool(v), "method names")
        known = known_methods()
        unknown = [m for m in self.methods if m not in known]
        if unknown:
            raise InputError(f"unknown method{'s' if len(unknown) > 1 else ''} {unknown}; registered: {sorted(known)}")
        stray = sorted(set(self.method_options) - set(self.methods))
        if stray:
            raise InputError(f"method_options given for {stray}, which this run does not train (methods {list(self.methods)})")
        if self.preset is not None and self.preset not in PRESETS:
            raise InputError(f"unknown preset {self.preset!r}; known: {sorted(PRESETS)}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value):
                raise InputError(f"{name} must be a finite number, got {value!r}")
        if not (_is_real(self.valid_missing_rate) and 0.0 <= self.valid_missing_rate < 1.0):
            raise InputError(f"valid_missing_rate must lie in [0, 1), got {self.valid_missing_rate!r}")
        if self.train_eta is not None and not (_is_real(self.train_eta) and 0.0 < self.train_eta <= 1.0):
            raise InputError(f"train_eta must lie in (0, 1], got {self.train_eta!r}")
        if not isinstance(self.out, str) or not self.out:
            raise InputError(f"out must be a folder path, got {self.out!r}")
        if self.max_steps is not None and (
            not isinstance(self.max_steps, (int, np.integer)) or isinstance(self.max_steps, bool)
            or self.max_steps < len(STAGES)
        ):
            raise InputError(f"max_steps must be an integer >= {len(STAGES)} (a staged method shares it between "
                             f"its {len(STAGES)} stages) or None, got {self.max_steps!r}")
        if self.protocol not in PROTOCOLS:
            raise InputError(f"unknown missing protocol {self.protocol!r}; known: {sorted(PROTOCOLS)}")
        if self.protocol == "random" and (self.protocol_rates is not None or self.protocol_options):
            raise InputError("protocol_rates/protocol_options are for protocols other than 'random' "
                             "(the random protocol takes rates and patterns)")
        if self.device not in DEVICES:
            raise InputError(f"device must be one of {list(DEVICES)}, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise InputError("device 'cuda' was asked for but this machine has no usable CUDA device "
                             "(torch.cuda.is_available() is False); use device 'cpu' or 'auto'")
        try:
            self.train_config("classification", 0)
        except (ValueError, TypeError) as err:
            raise InputError(str(err).replace("TrainConfig.", "")) from None


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def _check_unique(what: str, values: Any, ok: Callable[[Any], bool], kind: str, allow_empty: bool = False) -> None:
    """``values`` must be a non-empty sequence of ``kind`` without repeats."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise InputError(f"{what} must be a sequence of {kind}, got {values!r}")
    if not values and not allow_empty:
        raise InputError(f"no {what} given: need at least one")
    bad = [v for v in values if not ok(v)]
    if bad:
        raise InputError(f"{what} must be {kind}, got {bad[0]!r}")
    seen: set[Any] = set()
    repeated = [v for v in values if v in seen or seen.add(v)]  # type: ignore[func-returns-value]
    if repeated:
        raise InputError(f"{what} repeat {sorted(set(repeated))}: each may appear once")


def known_methods() -> frozenset[str]:
    """The names :func:`~flowtransfer.methods.build_method` accepts."""
    from flowtransfer.methods.base import METHODS, _import_builtin_methods

    _import_builtin_methods()
    return frozenset(METHODS)


def main_metrics(task: str) -> list[str]:
    """The metric columns a table shows first for a task."""
    if task == "regression":
        return ["acc2_non0", "f1_non0", "acc7", "mae", "corr"]
    return ["acc", "f1_macro"]


def _monitor(task: str) -> str:
    return "mae" if task == "regression" else "acc"


def stage_cap(max_steps: int | None, n_stages: int, index: int, used: int) -> int | None:
    """The step cap of stage ``index`` (0-based) of a method whose ``n_stages`` stages share
    ``max_steps``, when the stages before it took ``used`` steps in all.

    The rule: every stage after this one is guaranteed an equal share, ``max_steps // n_stages``
    steps; this stage may use the rest of what is left, and what it leaves unused passes on to the
    next. For two stages (DiCMoR) the ``complete`` stage gets at most ``ceil(max_steps / 2)`` and
    the ``recovery`` stage everything the ``complete`` stage left (at least ``max_steps // 2``); the
    stages never take more than ``max_steps`` together.

    Args:
        max_steps: the method's cap (None: no cap, returns None).
        n_stages: the method's number of stages.
        index: this stage's position, ``0 <= index < n_stages``.
        used: steps the earlier stages took.

    Raises:
        ValueError: a bad ``n_stages``/``index``, or nothing left for this stage.
    """
    if n_stages < 1 or not 0 <= index < n_stages:
        raise ValueError(f"stage_cap: need n_stages >= 1 and 0 <= index < n_stages, got {n_stages}, {index}")
    if max_steps is None:
        return None
    cap = max_steps - used - (n_stages - 1 - index) * (max_steps // n_stages)
    if cap < 1:
        raise ValueError(f"stage_cap: no step left for stage {index} (max_steps {max_steps}, used {used}, "
                         f"{n_stages} stages)")
    return cap


def combine_budgets(stages: Sequence[tuple[str | None, Any]]) -> dict[str, Any]:
    """The budget columns of a result row from the :class:`~flowtransfer.training.FitResult` of
    each stage, in training order (``(stage name or None, result)``).

    ``steps``: the sum over stages (what the cap bounds). ``best_step``: the steps taken before the
    final weights were selected, counted over the whole training (every earlier stage's steps plus
    the last stage's ``best_step``). ``stop_reason``: the last stage's (the one that produced the
    final weights). ``improving_at_stop``: True if **any** stage ended on its cap or the epoch
    limit while still improving. ``valid_score``/``valid_monitor``: the last stage's selected validation
    score and what it measures. Staged methods also get ``stage_stops``, for example
    ``"complete=plateau@120,recovery=cap@200"`` (each stage's stop reason and steps).
    """
    if not stages:
        raise ValueError("combine_budgets: no stage results")
    earlier = sum(int(r.steps) for _, r in stages[:-1])
    last = stages[-1][1]
    out: dict[str, Any] = {
        "steps": earlier + int(last.steps),
        "best_step": earlier + int(last.best_step),
        "stop_reason": last.stop_reason,
        "improving_at_stop": any(bool(r.improving_at_stop) for _, r in stages),
        "valid_score": float(last.best_score),
        "valid_monitor": last.monitor,
    }
    if len(stages) > 1 or stages[0][0] is not None:
        out["stage_stops"] = ",".join(f"{name}={r.stop_reason}@{r.steps}" for name, r in stages)
    return out


def _stages_of(method: Any) -> list[str | None]:
    return list(STAGES) if hasattr(method, "set_stage") else [None]


def planned_steps(cfg: ExperimentConfig, n_train: int, n_stages: int = 1, world_size: int = 1) -> int:
    """The most optimiser steps one training of ``cfg`` can take on ``n_train`` samples: each of
    ``n_stages`` stages at most ``epochs x steps per epoch``, all together at most ``max_steps``."""
    per_stage = cfg.train_config("classification", 0).planned_steps(n_train, world_size)
    total = per_stage * n_stages
    return total if cfg.max_steps is None else min(total, cfg.max_steps)


def _fit(method: Any, train: MultimodalDataset, valid: MultimodalDataset, valid_mask: np.ndarray | None,
         cfg: ExperimentConfig, seed: int, ckpt: Path,
         on_epoch_end: Callable[[Any, dict[str, Any]], None] | None = None) -> tuple[float, dict[str, Any]]:
    """Train ``method`` (both stages when it has them); return ``(training seconds, budget)``,
    ``budget`` being :func:`combine_budgets` of the stages.

    ``valid`` is the complete validation split; ``valid_mask`` (or None) the presence mask under
    which methods that train with missing modalities are selected. A ``complete`` stage always
    selects on complete validation data. The stages share ``cfg.max_steps`` (:func:`stage_cap`).
    With ``cfg.resume`` every stage continues from its last complete checkpoint (a finished stage
    only reloads its best weights); each stage's cap depends only on the steps of the stages
    before it, so a resumed run gets the same caps."""
    start = time.perf_counter()
    stages = _stages_of(method)
    results: list[tuple[str | None, Any]] = []
    used = 0
    for i, stage in enumerate(stages):
        if stage is not None:
            method.set_stage(stage)
        stage_valid = valid if stage == "complete" or valid_mask is None else valid.with_mask(valid_mask)
        train_cfg = cfg.train_config(train.task, seed, checkpoint_dir=str(ckpt / (stage or "single")), resume=cfg.resume,
                                     max_steps=stage_cap(cfg.max_steps, len(stages), i, used))
        result = Trainer(method, train_cfg, on_epoch_end=on_epoch_end).fit(train, stage_valid)
        used += result.steps
        results.append((stage, result))
    return time.perf_counter() - start, combine_budgets(results)


def load_splits(
    dataset: str,
    data: str | None = None,
    task: str | None = None,
    options: Mapping[str, Any] | None = None,
    required: Sequence[str] = SPLITS,
) -> dict[str, MultimodalDataset]:
    """Load a registered dataset and check it: the ``required`` splits exist and every split has
    the training split's modalities, channels, task and class count.

    Raises:
        flowtransfer.io.InputError: an unreadable or malformed file (the loader's message), a
            missing split, or splits that disagree (naming both).
        flowtransfer.data.UnsafePickleError: a pickle that asks for code or absurd allocations.
    """
    from flowtransfer.data.mmsa import UnsafePickleError

    kwargs = dict(options or {})
    if task:
        kwargs["task"] = task
    try:
        splits = load_dataset(dataset, data, **kwargs)
    except (InputError, UnsafePickleError):
        raise
    except (ValueError, KeyError, TypeError, OSError) as err:  # the loaders' messages name the file and the problem
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        raise InputError(str(message)) from err
    check_splits(splits, source=f"dataset {dataset!r}" + (f" ({data})" if data else ""), required=required)
    return splits


def data_report(splits: Mapping[str, MultimodalDataset]) -> dict[str, Any]:
    """Plain data for ``config.json``: per split, its size, the missing rate in the data itself and
    what the loader found and did about NaN/inf (per modality: counts, slots marked missing, values
    replaced with 0)."""
    return {
        split: {"n": len(ds), "missing_rate": ds.missing_rate(),
                "nonfinite": {m: dict(r) for m, r in ds.nonfinite.items()},
                "preprocessing": getattr(ds, "preprocessing", None) or {}}
        for split, ds in splits.items()
    }


def build_seeded(name: str, info: DatasetInfo, cfg: ExperimentConfig, seed: int) -> Any:
    """Build method ``name`` after seeding every generator with ``seed``: its initial weights
    depend on the seed only, so the same seed builds the same model in ``run`` and ``train``."""
    seed_everything(seed)
    options = {"preset": cfg.resolved_preset(), **cfg.method_options.get(name, {})}
    return build_method(name, info, **options)


def _within(ds: MultimodalDataset, mask: np.ndarray) -> np.ndarray:
    """``mask`` restricted to the slots ``ds`` has; a sample it would leave with nothing keeps its
    own present modalities (for validation and training masks, which must not drop samples)."""
    eff = np.asarray(mask, dtype=bool) & ds.mask
    empty = ~eff.any(axis=1)
    if empty.any():
        eff[empty] = ds.mask[empty]
    return eff


def train_method(
    name: str,
    train: MultimodalDataset,
    valid: MultimodalDataset,
    cfg: ExperimentConfig,
    seed: int,
    checkpoint_dir: Path,
    on_epoch_end: Callable[[Any, dict[str, Any]], None] | None = None,
) -> tuple[Any, float]:
    """Build ``name`` seeded with ``seed`` and train it exactly as :func:`run_experiment` trains
    that method for that seed (same validation mask, same shared step cap); return
    ``(method, seconds)``. ``on_epoch_end(trainer, record)`` is passed to every stage's trainer."""
    method = build_seeded(name, DatasetInfo.from_dataset(train), cfg, seed)
    valid_mask = None
    if name not in COMPLETE_DATA_METHODS and cfg.train_eta is None:
        valid_mask = _within(valid, random_missing_mask(len(valid), valid.modalities, cfg.valid_missing_rate,
                                                        seed=seed + VALID_MASK_SEED_OFFSET))
    seconds, _ = _fit(method, train, valid, valid_mask, cfg, seed, checkpoint_dir, on_epoch_end=on_epoch_end)
    return method, seconds


def check_compatible(info: DatasetInfo, ds: MultimodalDataset, what: str = "the model") -> None:
    """Raise :class:`~flowtransfer.io.InputError` unless ``ds`` has the modalities, channels, task
    and class count ``info`` describes."""
    if tuple(ds.modalities) != tuple(info.modalities):
        raise InputError(f"{what} was trained on modalities {list(info.modalities)}; the data has {list(ds.modalities)}")
    if dict(ds.input_dims) != dict(info.input_dims):
        raise InputError(f"{what} expects channels {dict(info.input_dims)}; the data has {dict(ds.input_dims)}")
    if ds.task != info.task:
        raise InputError(f"{what} is a {info.task} model; the data is loaded as a {ds.task} task")
    if ds.num_classes != info.num_classes:
        raise InputError(f"{what} predicts {info.num_classes} classes; the data has {ds.num_classes}")


def _setting_view(test: MultimodalDataset, mask: np.ndarray, steps: Mapping[str, np.ndarray] | None = None
                  ) -> tuple[MultimodalDataset | None, np.ndarray, int]:
    """``test`` under a setting's ``mask`` intersected with the data's own mask, and its per-time-step
    masks ``steps`` (``{m: (N, T_m)}``, False = removed) when the setting removes time steps.

    Returns ``(dataset, effective mask, left out)``: samples left with no modality are left out
    (``dataset`` is None when that is every sample)."""
    eff = np.asarray(mask, dtype=bool) & test.mask
    keep = eff.any(axis=1)
    if not keep.any():
        return None, eff[keep], len(test)
    if keep.all():
        view, left_out = test.with_mask(eff), 0
    else:
        view, left_out = test.subset(np.flatnonzero(keep)).with_mask(eff[keep]), int((~keep).sum())
    if steps is not None:
        view = view.with_step_mask(steps if keep.all() else {m: a[keep] for m, a in steps.items()})
    return view, np.asarray(view.mask, dtype=bool), left_out


def evaluate_method(
    method: Any,
    name: str,
    dataset: str,
    test: MultimodalDataset,
    masks: Mapping[str, np.ndarray],
    seed: int,
    train_seconds: float | None = None,
    progress: bool = False,
    log: Callable[[str], None] = print,
    budget: Mapping[str, Any] | None = None,
    steps: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    realised: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One result row per setting: task metrics of ``method`` on ``test`` under each mask, and
    recovery distances where something is missing (``setting name -> (N, M) mask``). ``budget``
    (:func:`combine_budgets`: ``steps``, ``best_step``, ``stop_reason``, ``improving_at_stop``)
    is copied into every row. ``steps`` holds the per-time-step masks of the settings that remove
    time steps (``setting -> {m: (N, T_m)}``); ``realised`` extra per-setting columns (the realised
    per-modality and step rates that the protocol's ``describe`` reports).

    Test data that lacks modalities itself is handled: see :func:`_setting_view`; the recovery
    distances use the samples that have every modality (real features are needed where the
    setting removes one)."""
    complete_rows = np.flatnonzero(test.mask.all(axis=1))
    rows: list[dict[str, Any]] = []
    # a bar on a terminal only (disable=None): log files get the run's progress lines instead
    for setting, mask in tqdm(list(masks.items()), desc=f"evaluate {name}", disable=None if progress else True,
                              leave=False):
        view, eff, left_out = _setting_view(test, mask, (steps or {}).get(setting))
        if view is None:
            log(f"[seed {seed}] {name}: setting {setting} leaves no test sample with a modality; skipped")
            continue
        metrics = evaluate(method, view)
        if len(complete_rows) == len(test):
            metrics.update(recovery_distances(method, test, eff))
        elif len(complete_rows):
            metrics.update(recovery_distances(method, test.subset(complete_rows), np.asarray(mask, bool)[complete_rows]))
        extra: dict[str, Any] = {"samples_without_input": left_out} if left_out else {}
        extra.update((realised or {}).get(setting, {}))
        extra.update(budget or {})
        rows.append(result_row(name, dataset, setting, seed, metrics, realised_missing_rate=float(1.0 - eff.mean()),
                               train_seconds=train_seconds, **extra))
    return rows


def _training_key(method: Any, complete_selection: bool) -> str | None:
    """A key equal for two methods whose training is the same computation, else ``None``.

    Fusion models (``zero_fill``, ``upper_bound``, ...) differ only in what they do with absent
    inputs at test time. Two of them with the same configuration (the fill included, which matters
    when the training data itself has absent inputs), selected on the same validation data and
    seeded alike, train to the same weights, so the second reuses the first's instead of
    repeating it (``zero_fill`` and ``upper_bound`` in the main job).
    """
    from flowtransfer.methods.fusion_model import FusionModel

    if type(method) is not FusionModel:
        return None
    return json.dumps({"config": method.config.to_dict(), "complete_selection": complete_selection},
                      sort_keys=True, default=str)


def _chunks(ds: MultimodalDataset, size: int = 256):
    for start in range(0, len(ds), size):
        yield ds.batch(np.arange(start, min(start + size, len(ds))))


def _recovers(method: Any) -> bool:
    """Whether ``method`` overrides both ``recover`` and ``encode`` of the :class:`Method` base
    (the base versions raise ``NotImplementedError``)."""
    from flowtransfer.methods import Method

    cls = type(method)
    return all(getattr(cls, name, None) is not getattr(Method, name) for name in ("recover", "encode"))


def recovery_distances(method: Any, test: MultimodalDataset, mask: np.ndarray) -> dict[str, float]:
    """Fréchet distances (``reduce="mean_time"``) between recovered and real features of the
    samples whose modality is missing, in the method's own feature space, pooled over modalities
    (sample-weighted mean). Also the distances of zero filling and of filling with the mean real
    feature, in the same space. Empty when nothing is missing or the method recovers nothing.

    Recovered rows holding a NaN or inf are failures: they are counted in ``recovered_nonfinite``
    (and leave ``fd_recovered`` to the finite rows), never dropped silently;
    ``recovered_max_ratio`` is the largest absolute recovered value over the largest absolute real
    one (a run-away inverse shows as a ratio far above 1)."""
    if mask.all() or not _recovers(method):
        return {}
    complete = test.with_mask(np.ones_like(mask))
    masked = test.with_mask(mask)
    device = method_device(method)
    real: dict[str, list[np.ndarray]] = {}
    rec: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        was = method.training
        method.eval()
        try:
            for full_batch, miss_batch in zip(_chunks(complete), _chunks(masked)):
                full_batch, miss_batch = full_batch.to(device), miss_batch.to(device)
                enc = method.encode(full_batch)
                out = method.recover(miss_batch)
                for j, m in enumerate(test.modalities):
                    rows = (~miss_batch.mask[:, j]).nonzero().squeeze(1)
                    if m not in out or rows.numel() == 0:
                        continue
                    real.setdefault(m, []).append(enc[m].index_select(0, rows).cpu().numpy())
                    rec.setdefault(m, []).append(out[m].index_select(0, rows).cpu().numpy())
        finally:
            method.train(was)
    parts: dict[str, list[tuple[int, float]]] = {"fd_recovered": [], "fd_zero_fill": [], "fd_mean_fill": []}
    failures, total, worst_ratio = 0, 0, 0.0
    for m in rec:
        r, x = np.concatenate(rec[m]), np.concatenate(real[m])
        # a recovered row with any non-finite value is a failed recovery: counted, never dropped
        finite = np.isfinite(r.reshape(len(r), -1)).all(axis=1)
        failures += int((~finite).sum())
        total += len(r)
        scale = float(np.abs(x).max()) if x.size else 0.0
        if finite.any() and scale > 0:
            worst_ratio = max(worst_ratio, float(np.abs(r[finite]).max()) / scale)
        r = r[finite]
        if len(x) < 3 or len(r) < 3:
            continue
        n = len(x)
        parts["fd_recovered"].append((n, frechet_distance(r, x, reduce="mean_time")))
        parts["fd_zero_fill"].append((n, frechet_distance(np.zeros_like(x), x, reduce="mean_time")))
        mean = np.broadcast_to(x.mean(axis=0, keepdims=True), x.shape).copy()
        parts["fd_mean_fill"].append((n, frechet_distance(mean, x, reduce="mean_time")))
    out = {k: float(sum(n * v for n, v in vals) / sum(n for n, _ in vals)) for k, vals in parts.items() if vals}
    if total:
        # failures: recovered rows with a NaN/inf value (excluded from fd_recovered, which then
        # describes only the finite rows); max_ratio: largest |recovered| over largest |real|
        out["recovered_nonfinite"] = float(failures)
        out["recovered_max_ratio"] = worst_ratio
    return out


def run_experiment(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run ``cfg``; write every output into ``cfg.out``; return the result rows.

    Every setting, the data and the output folder are checked before any training starts.
    Under ``torchrun`` (after :func:`flowtransfer.training.init_distributed`) every process trains
    its share of each epoch through DDP and evaluates identically; only the main process logs and
    writes files.

    Raises:
        flowtransfer.io.InputError: a bad setting, a missing or inconsistent split, or an output
            folder that cannot be written.
    """
    cfg.validate()
    main_process = is_main_process()
    if not main_process:
        log = lambda _message: None  # noqa: E731
    out = Path(cfg.out)
    if main_process:
        ensure_writable_dir(out)
        clean_stale_temp_files(out, recursive=True)  # left by a killed run
    splits = load_splits(cfg.dataset, cfg.data, cfg.task, cfg.dataset_options)
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    modalities = train.modalities
    for line in nonfinite_lines(splits):
        log(f"data: {line}")
    if main_process:
        atomic_write_json(out / "config.json", {**asdict(cfg), "data": data_report(splits)})
    if cfg.train_eta is not None:
        scarce = cfg.train_eta_modality or modalities[-1]
        train = train.with_mask(_within(train, training_missing_mask(len(train), modalities, cfg.train_eta, scarce, seed=0)))
        valid = valid.with_mask(_within(valid, training_missing_mask(len(valid), modalities, cfg.train_eta, scarce, seed=1)))
        log(f"training setting: only {cfg.train_eta:.0%} of training and validation samples have {scarce}")
    info = DatasetInfo.from_dataset(train)
    settings = cfg.settings(modalities)
    if any(map(_removes_steps, settings)):
        for name in cfg.methods:  # refuse, before any training, a method that cannot respect step masks
            check_supports_steps(build_seeded(name, info, cfg, cfg.seeds[0]), name)
    log(f"dataset {cfg.dataset}: train/valid/test {len(train)}/{len(valid)}/{len(test)}, "
        f"modalities {dict(train.input_dims)}, lengths {dict(train.seq_lens)}, task {train.task}")
    chosen = "" if cfg.preset else " (the dataset's default; --preset to change)"
    log(f"methods {list(cfg.methods)}, seeds {list(cfg.seeds)}, protocol {cfg.protocol} ({len(settings)} settings), "
        f"preset {cfg.resolved_preset()}{chosen}, device {cfg.resolved_device()}")

    world = current_context().world_size
    n_stages = {name: len(_declared_stages(name)) for name in cfg.methods}
    progress = _RunProgress(
        sum(planned_steps(cfg, len(train), n_stages[name], world) for name in cfg.methods) * len(cfg.seeds),
        enabled=cfg.progress and main_process, log=log,
    )
    rows: list[dict[str, Any]] = []
    first_trained: dict[str, Any] = {}  # method name -> trained method of the first seed (for the report)
    try:
        rows = _train_and_evaluate(cfg, train, valid, test, info, settings, out, main_process, progress,
                                   n_stages, first_trained, log)
    finally:
        progress.close()

    if not main_process:
        return rows
    summary = summarise(rows)
    metric_names = main_metrics(train.task) + ["fd_recovered", "fd_zero_fill", "fd_mean_fill", "recovered_nonfinite"]
    flagged = unconverged(rows)
    marks = {method: UNCONVERGED_MARK for method, _ in flagged}
    table = format_table(summary, metrics=[m for m in metric_names if any(m in r for r in rows)], marks=marks)
    table += "\n" + format_budget_table(rows)
    header = (f"flowtransfer run: dataset={cfg.dataset} task={train.task} seeds={list(cfg.seeds)} "
              f"max_steps={cfg.max_steps} epochs={cfg.epochs} "
              f"(mean ± std over seeds; percentages x100; fd_* are Fréchet distances, lower is closer)\n")
    atomic_write_text(out / "table.txt", header + table + "\n")
    _write_summary_csv(summary, out / "summary.csv")
    try:
        from flowtransfer.plots import plot_missing_rate_curves

        fig = plot_missing_rate_curves(rows, metric=main_metrics(train.task)[0])
        fig.savefig(out / "curves.png", dpi=120, bbox_inches="tight")
    except ImportError:  # plotting is optional for the run itself
        pass
    log(header + table)
    from flowtransfer.report import finish_run  # lazily: the report module is optional for training

    finish_run(out, cfg, {"train": train, "valid": valid, "test": test}, rows, first_trained, log)
    log(f"results written to {out.resolve()}")
    return rows


def _train_and_evaluate(
    cfg: ExperimentConfig, train: MultimodalDataset, valid: MultimodalDataset, test: MultimodalDataset,
    info: DatasetInfo, settings: Sequence[Setting], out: Path, main_process: bool, progress: _RunProgress,
    n_stages: Mapping[str, int], first_trained: dict[str, Any], log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """The (seed, method) loop of :func:`run_experiment`: train, evaluate, write rows after each."""
    modalities = train.modalities
    world = current_context().world_size
    rows: list[dict[str, Any]] = []
    for seed in cfg.seeds:
        masks = {s.name: s.mask(len(test), seed) for s in settings}
        steps = {}
        for s in filter(_removes_steps, settings):  # drawn on the test view of the setting's modality mask
            view, _, _ = _setting_view(test, masks[s.name])
            drawn = s.step_masks(view, seed) if view is not None and len(view) == len(test) else None
            if drawn is not None:
                steps[s.name] = drawn
        realised = {s.name: _realised_columns(s, masks[s.name] & test.mask, steps.get(s.name), test) for s in settings}
        if main_process:
            save_masks(out / "masks" / f"seed{seed}.npz", masks, modalities, step_masks=steps or None)
        valid_mask: np.ndarray | None = _within(valid, random_missing_mask(
            len(valid), modalities, cfg.valid_missing_rate, seed=seed + VALID_MASK_SEED_OFFSET))
        if cfg.train_eta is not None:
            valid_mask = None  # the validation split already carries the training setting's mask
        # training key -> (method name, weights, budget, device)
        trained: dict[str, tuple[str, dict[str, Tensor], dict[str, Any], torch.device]] = {}
        for name in cfg.methods:
            method = build_seeded(name, info, cfg, seed)
            sel_mask = None if name in COMPLETE_DATA_METHODS else valid_mask
            key = _training_key(method, sel_mask is None)
            planned = planned_steps(cfg, len(train), n_stages[name], world)
            if key is not None and key in trained:
                twin, weights, budget, device = trained[key]
                method.load_state_dict(weights)
                method.to(device)
                seconds = 0.0
                progress.replan(-planned)
                log(f"[seed {seed}] {name}: the same network, data, selection and seed as {twin}; "
                    f"its trained weights are reused")
            else:
                note = " (resuming from its last checkpoint, if any)" if cfg.resume else ""
                log(f"[seed {seed}] training {name}{note} ...")
                actual = len(_stages_of(method))
                if actual != n_stages[name]:  # a factory whose stages could not be read in advance
                    progress.replan(planned_steps(cfg, len(train), actual, world) - planned)
                    planned = planned_steps(cfg, len(train), actual, world)
                taken = progress.training_started()
                seconds, budget = _fit(method, train, valid, sel_mask, cfg, seed,
                                       out / "checkpoints" / name / f"seed{seed}", on_epoch_end=progress.on_epoch_end)
                progress.replan(progress.taken_since(taken) - planned)  # stopped early or resumed: fewer steps
                progress.report(f"seed {seed} {name}: {budget['steps']} steps, stopped on {budget['stop_reason']}")
                if key is not None:
                    trained[key] = (name, {k: v.detach().clone() for k, v in method.state_dict().items()}, budget,
                                    method_device(method))
            method.eval()
            if seed == cfg.seeds[0]:
                first_trained[name] = method
            evals = {"complete": np.ones((len(test), len(modalities)), dtype=bool)} if name in BOUND_METHODS else masks
            rows += evaluate_method(method, name, cfg.dataset, test, evals, seed, train_seconds=seconds,
                                    progress=cfg.progress, log=log, budget=budget, steps=steps, realised=realised)
            if main_process:
                write_results(rows, out)
            if seconds:
                improving = " while still improving" if budget["improving_at_stop"] else ""
                log(f"[seed {seed}] {name}: trained in {seconds:.0f} s, {budget['steps']} steps "
                    f"(best at {budget['best_step']}), stopped on {budget['stop_reason']}{improving}")
    return rows


def _removes_steps(setting: Setting) -> bool:
    """Whether ``setting`` can remove time steps (its class overrides :meth:`Setting.step_masks`)."""
    return type(setting).step_masks is not Setting.step_masks


def _realised_columns(setting: Setting, mask: np.ndarray, steps: Mapping[str, np.ndarray] | None,
                      test: MultimodalDataset) -> dict[str, Any]:
    """The per-modality (and, for step settings, per-time-step) realised rates a protocol reports,
    as row columns: ``realised_rate_<m>``, ``realised_step_rate`` and ``realised_step_rate_<m>``,
    ``realised_incomplete`` (CyIN's instance level) and ``absent_after_<m>`` (step settings)."""
    if isinstance(setting, MissingSetting):  # the random protocol: realised_missing_rate says it all
        return {}
    desc = setting.describe(mask, steps, test if steps is not None else None)
    step_setting = desc.get("protocol") == "steps"
    out: dict[str, Any] = {}
    for key, value in desc.items():
        if not key.startswith(("realised_rate", "realised_incomplete", "absent_after_")):
            continue
        if step_setting and key.startswith("realised_rate"):
            key = key.replace("realised_rate", "realised_step_rate", 1)
        out[key] = value
    return out


def _declared_stages(name: str) -> list[str | None]:
    """The stages of registered method ``name`` as far as its factory shows them before anything is
    built (a class, or a function annotated to return one); ``[None]`` otherwise. Only for
    planning: :func:`_fit` reads the stages of the built method."""
    import typing

    from flowtransfer.methods.base import METHODS

    factory = METHODS.get(name)
    target = factory
    if factory is not None and not isinstance(factory, type):
        try:
            target = typing.get_type_hints(factory).get("return")
        except Exception:  # noqa: BLE001 - unresolvable annotations: plan one stage
            target = None
    return list(STAGES) if isinstance(target, type) and hasattr(target, "set_stage") else [None]


class _RunProgress:
    """One bar over every training of a run: optimiser steps done against planned, with an ETA.

    On a terminal a tqdm bar (unit: optimiser steps); otherwise log lines, after every training and
    at most once a minute in between. Disabled: silent. ``replan`` changes the total as trainings
    stop early, are resumed or are skipped (a reused twin)."""

    def __init__(self, total: int, enabled: bool, log: Callable[[str], None]) -> None:
        import sys

        self.total, self.done, self.enabled = int(total), 0, enabled
        self.start = time.perf_counter()
        self._last_log = self.start
        self._log = log
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=self.total, desc="run", unit="step", dynamic_ncols=True, position=0, leave=True)

    def training_started(self) -> int:
        """A token for :meth:`taken_since` (the steps done so far)."""
        return self.done

    def taken_since(self, token: int) -> int:
        return self.done - token

    def on_epoch_end(self, trainer: Any, record: dict[str, Any]) -> None:
        """The trainer's per-epoch callback: advance by the steps of that epoch."""
        previous = trainer.history[-2]["steps"] if len(trainer.history) > 1 else 0
        self.advance(int(record["steps"]) - int(previous))
        if self.bar is None and self.enabled and time.perf_counter() - self._last_log >= 60.0:
            self.report("")

    def advance(self, steps: int) -> None:
        self.done += steps
        if self.bar is not None:
            self.bar.update(steps)

    def replan(self, delta: int) -> None:
        self.total = max(self.done, self.total + int(delta))
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def eta_seconds(self) -> float:
        """Remaining planned steps at the rate measured so far (NaN before the first step)."""
        elapsed = time.perf_counter() - self.start
        if self.done == 0 or elapsed <= 0:
            return math.nan
        return (self.total - self.done) * elapsed / self.done

    def report(self, what: str) -> None:
        """A log line (when there is no bar): steps done / planned, elapsed, ETA."""
        if not self.enabled or self.bar is not None:
            return
        self._last_log = time.perf_counter()
        elapsed = self._last_log - self.start
        eta = self.eta_seconds()
        share = self.done / self.total if self.total else 1.0
        self._log(f"progress: {self.done}/{self.total} optimiser steps ({share:.0%}), elapsed {_clock(elapsed)}, "
                  f"ETA {'-' if math.isnan(eta) else _clock(eta)}" + (f"  [{what}]" if what else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _write_summary_csv(summary: Sequence[dict[str, Any]], path: Path) -> None:
    import csv
    import io

    columns: list[str] = []
    for row in summary:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in summary:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())
