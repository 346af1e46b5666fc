"""A generic multimodal dataset, its batches, and the one place arrays are validated.

Any set of named modalities, each with its own width ``C_m`` and sequence length ``T_m``, plus
labels (regression or classification), optional per-sample lengths, optional sample ids and a
per-sample presence mask. Inside flowtransfer features are ``(N, C, T)`` float32 ("NCT");
:func:`from_arrays` converts MMSA's ``(N, T, C)`` ("NTC") once, with ``einops``.

The presence mask is the truth: a :class:`Batch` puts **NaN** in every absent (sample, modality)
slot, so a model that reads a missing modality without looking at the mask produces NaN instead of
silently learning from zeros. Time steps removed inside a present modality (intra-modality
missing, :meth:`MultimodalDataset.with_step_mask`) are NaN too, and ``Batch.step_mask`` says which.

Example::

    ds = from_arrays({"A": a_ntc, "L": l_ntc}, labels, task="regression", layout="NTC")
    ds = ds.with_mask(random_missing_mask(len(ds), ds.modalities, 0.3, seed=0))
    for batch in ds.loader(32, shuffle=True, seed=0):
        x = batch.filled(0.0).features["A"]        # (B, C_A, T_A), absent slots zeroed
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler

from flowtransfer.labels import SENTIMENT_CLASSES, sentiment_classes

__all__ = ["Batch", "MultimodalDataset", "from_arrays", "load_npz", "check_splits", "nonfinite_lines", "TASKS", "LAYOUTS", "SPLITS"]

#: the tasks a dataset may carry
TASKS = ("regression", "classification")
#: the array layouts :func:`from_arrays` understands
LAYOUTS = ("NTC", "NCT")
#: the splits a run needs, in order
SPLITS = ("train", "valid", "test")


# --------------------------------------------------------------------------------------------------
# Batch
# --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One mini-batch: features by modality, presence mask, labels.

    Attributes:
        features: modality name -> ``(B, C_m, T_m)`` float32; absent slots hold NaN.
        mask: ``(B, M)`` bool, True where present; columns follow ``modalities``.
        labels: ``(B,)`` float32 (regression) or int64 (classification).
        modalities: modality names, in mask-column order.
        lengths: modality name -> ``(B,)`` int64 valid lengths, or None.
        index: ``(B,)`` int64 positions of the samples in their dataset.
        classes: ``(B,)`` int64 class ids for a class-conditional prior (classification: the
            labels; regression: the 7-class sentiment rule of :mod:`flowtransfer.labels`), or None.
        step_mask: modality name -> ``(B, T_m)`` bool, **False where a time step was removed**
            (intra-modality missing; removed steps hold NaN), one entry per modality; None when no
            step is removed. It is independent of ``mask``: step ``t`` of modality ``m`` holds data
            iff ``mask[b, m] and step_mask[m][b, t]`` (:meth:`step_present`).
    """

    features: dict[str, Tensor]
    mask: Tensor
    labels: Tensor
    modalities: tuple[str, ...]
    lengths: dict[str, Tensor] | None = None
    index: Tensor | None = None
    classes: Tensor | None = None
    step_mask: dict[str, Tensor] | None = None

    def __post_init__(self) -> None:
        if self.step_mask is None:
            return
        b = int(self.mask.shape[0])
        for name, sm in self.step_mask.items():
            x = self.features.get(name)
            if x is None:
                raise KeyError(f"step_mask names modality {name!r}; this batch has {list(self.features)}")
            if sm.dtype != torch.bool or tuple(sm.shape) != (b, x.shape[-1]):
                raise ValueError(
                    f"step_mask[{name!r}] must be bool of shape ({b}, {x.shape[-1]}), got {tuple(sm.shape)} {sm.dtype}"
                )

    def __len__(self) -> int:
        return int(self.mask.shape[0])

    def __getitem__(self, name: str) -> Tensor:
        """``batch["A"]`` is ``batch.features["A"]``."""
        return self.features[name]

    def _column(self, name: str) -> int:
        try:
            return self.modalities.index(name)
        except ValueError:
            raise KeyError(f"unknown modality {name!r}; this batch has {list(self.modalities)}") from None

    def present(self, name: str) -> Tensor:
        """``(B,)`` bool: which samples have modality ``name``."""
        return self.mask[:, self._column(name)]

    def step_present(self, name: str) -> Tensor:
        """``(B, T_m)`` bool: which time steps of modality ``name`` hold data (modality present and
        step not removed)."""
        present = self.present(name)[:, None]
        if self.step_mask is None or name not in self.step_mask:
            return present.expand(-1, self.features[name].shape[-1])
        return present & self.step_mask[name]

    def filled(self, value: float | Mapping[str, float | Tensor] = 0.0) -> Batch:
        """A copy whose absent slots and removed time steps hold ``value`` instead of NaN (the mask
        and step mask are unchanged).

        ``value`` is a number, or a mapping modality -> number or tensor broadcastable to
        ``(C_m, T_m)`` (for example a per-channel training mean of shape ``(C_m, 1)``, for mean fill).
        """
        out = {}
        for name, x in self.features.items():
            if isinstance(value, Mapping):
                if name not in value:
                    raise KeyError(f"filled(): no fill value for modality {name!r}; got {list(value)}")
                v = value[name]
            else:
                v = value
            fill = torch.as_tensor(v, dtype=x.dtype, device=x.device)
            keep = self.present(name)[:, None, None]
            if self.step_mask is not None and name in self.step_mask:
                keep = keep & self.step_mask[name][:, None, :]
            out[name] = torch.where(keep, x, fill.expand_as(x[0]) if fill.dim() else fill)
        return replace(self, features=out)

    def to(self, device: torch.device | str) -> Batch:
        """A copy with every tensor on ``device``."""
        return Batch(
            features={k: v.to(device) for k, v in self.features.items()},
            mask=self.mask.to(device),
            labels=self.labels.to(device),
            modalities=self.modalities,
            lengths=None if self.lengths is None else {k: v.to(device) for k, v in self.lengths.items()},
            index=None if self.index is None else self.index.to(device),
            classes=None if self.classes is None else self.classes.to(device),
            step_mask=None if self.step_mask is None else {k: v.to(device) for k, v in self.step_mask.items()},
        )


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


def _as_names(features: Mapping[str, Any]) -> tuple[str, ...]:
    if not isinstance(features, Mapping) or len(features) == 0:
        raise ValueError("features must be a non-empty mapping of modality name -> array")
    for name in features:
        if not isinstance(name, str) or not name:
            raise ValueError(f"modality names must be non-empty strings, got {name!r}")
    return tuple(features)


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


class MultimodalDataset(Dataset):
    """Named modalities ``(N, C_m, T_m)`` float32, labels ``(N,)``, presence mask ``(N, M)``.

    Args:
        features: modality name -> array ``(N, C_m, T_m)`` (NCT; use :func:`from_arrays` for NTC).
            Order defines ``modalities`` and the mask columns.
        labels: ``(N,)`` (or ``(N, 1)``); stored float32 for regression, int64 for classification.
        task: ``"regression"`` or ``"classification"``.
        num_classes: classification only; inferred as ``max(label) + 1`` when omitted.
        lengths: optional modality name -> ``(N,)`` valid lengths in ``[0, T_m]``.
        mask: optional ``(N, M)`` bool presence (default: all present). Every sample must keep at
            least one modality. Values in absent slots are never exposed (batches hold NaN there).
        ids: optional ``(N,)`` sample identifiers (stored as str).
        extras: optional per-sample arrays carried along (e.g. MMSA ``raw_text``), first axis N.

    Present slots must be finite (``ValueError`` naming the modality otherwise); use
    :func:`from_arrays` with ``nonfinite="zero"`` to clean explicitly.
    """

    def __init__(
        self,
        features: Mapping[str, Any],
        labels: Any,
        task: str,
        *,
        num_classes: int | None = None,
        lengths: Mapping[str, Any] | None = None,
        mask: Any = None,
        ids: Any = None,
        extras: Mapping[str, Any] | None = None,
        _validated: bool = False,
    ) -> None:
        names = _as_names(features)
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        self.task = task
        self._modalities = names
        #: modality -> non-finite values replaced with 0 (by :func:`from_arrays`)
        self.cleaning: dict[str, int] = {}
        #: modality -> ``{"nan", "inf", "missing_slots", "zeroed"}``: what :func:`from_arrays`
        #: found and did (only modalities that held NaN/inf)
        self.nonfinite: dict[str, dict[str, int]] = {}

        feats: dict[str, np.ndarray] = {}
        n = None
        for name in names:
            x = _to_numpy(features[name])
            if x.ndim != 3:
                raise ValueError(
                    f"modality {name!r}: expected a rank-3 array (N, C, T), got shape {tuple(x.shape)}"
                )
            if n is None:
                n = x.shape[0]
            elif x.shape[0] != n:
                counts = {k: int(_to_numpy(features[k]).shape[0]) for k in names}
                raise ValueError(f"mismatched sample counts across modalities: {counts}")
            if x.shape[1] == 0 or x.shape[2] == 0:
                raise ValueError(f"modality {name!r}: empty channel or time axis, shape {tuple(x.shape)}")
            feats[name] = np.ascontiguousarray(x, dtype=np.float32)
        assert n is not None
        if n == 0:
            raise ValueError("empty dataset: 0 samples")
        self.features = feats

        # labels
        y = _to_numpy(labels)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"labels: expected shape ({n},) or ({n}, 1), got {tuple(y.shape)}")
        if y.dtype.kind not in "biuf":
            raise ValueError(f"labels must be numeric, got dtype {y.dtype}")
        if not np.all(np.isfinite(y)):
            raise ValueError(f"labels contain {int((~np.isfinite(y)).sum())} non-finite values")
        if task == "classification":
            if np.any(y != np.round(y)):
                raise ValueError("classification labels must be integers")
            y = y.astype(np.int64)
            if y.min() < 0:
                raise ValueError(f"classification labels must be >= 0, got min {int(y.min())}")
            inferred = int(y.max()) + 1
            if num_classes is None:
                num_classes = inferred
            elif inferred > num_classes:
                raise ValueError(f"label {inferred - 1} out of range for num_classes={num_classes}")
            self.num_classes: int | None = int(num_classes)
        else:
            if num_classes is not None:
                raise ValueError("num_classes is for classification; regression datasets have none")
            y = y.astype(np.float32)
            self.num_classes = None
        self.labels = y
        self._classes = y if task == "classification" else sentiment_classes(y)

        # mask
        if mask is None:
            m = np.ones((n, len(names)), dtype=bool)
        else:
            m = self._check_mask(mask, n, names)
        self.mask = m

        # lengths
        self.lengths: dict[str, np.ndarray] | None = None
        if lengths is not None:
            self.lengths = {}
            for name, ln in lengths.items():
                if name not in feats:
                    raise ValueError(f"lengths given for unknown modality {name!r}; known: {list(names)}")
                ln = _to_numpy(ln)
                if ln.shape != (n,):
                    raise ValueError(f"lengths[{name!r}]: expected shape ({n},), got {tuple(ln.shape)}")
                if ln.dtype.kind not in "biu" and np.any(ln != np.round(ln)):
                    raise ValueError(f"lengths[{name!r}] must be integers")
                ln = ln.astype(np.int64)
                t = feats[name].shape[2]
                if ln.min() < 0 or ln.max() > t:
                    raise ValueError(
                        f"lengths[{name!r}] must lie in [0, {t}], got [{int(ln.min())}, {int(ln.max())}]"
                    )
                self.lengths[name] = ln

        #: modality -> ``(N, T_m)`` bool, False where a time step is removed (see :meth:`with_step_mask`)
        self.step_mask: dict[str, np.ndarray] | None = None

        self.ids: np.ndarray | None = None
        if ids is not None:
            ids = np.asarray(ids).astype(str)
            if ids.shape != (n,):
                raise ValueError(f"ids: expected shape ({n},), got {tuple(ids.shape)}")
            self.ids = ids
        self.extras: dict[str, np.ndarray] = {}
        for key, val in (extras or {}).items():
            val = np.asarray(val)
            if val.ndim == 0 or val.shape[0] != n:
                raise ValueError(f"extras[{key!r}]: first axis must have {n} entries, got {val.shape}")
            self.extras[key] = val

        if not _validated:
            for name in names:
                x = feats[name]
                bad = ~np.isfinite(x)
                if bad.any():
                    col = m[:, names.index(name)]
                    if bad[col].any():
                        raise ValueError(
                            f"modality {name!r} holds {int(bad[col].sum())} non-finite values (NaN/inf) "
                            f"in present samples; clean them explicitly, e.g. from_arrays(..., nonfinite='zero')"
                        )
                    # absent slots: their values are never exposed; store zeros, not NaN
                    x = x.copy()
                    x[bad] = 0.0
                    feats[name] = x

    # ---------------------------------------------------------------- validation helpers

    @staticmethod
    def _check_mask(mask: Any, n: int, names: Sequence[str]) -> np.ndarray:
        m = _to_numpy(mask)
        if m.shape != (n, len(names)):
            raise ValueError(
                f"mask: expected shape ({n}, {len(names)}) for modalities {list(names)}, got {tuple(m.shape)}"
            )
        if m.dtype != np.bool_:
            if not np.all(np.isin(m, (0, 1))):
                raise ValueError("mask must be boolean (or 0/1)")
            m = m.astype(bool)
        empty = ~m.any(axis=1)
        if empty.any():
            rows = np.flatnonzero(empty)
            raise ValueError(
                f"mask: {int(empty.sum())} samples have every modality missing "
                f"(first rows {rows[:5].tolist()}); each sample must keep at least one"
            )
        return np.ascontiguousarray(m)

    def _copy_with(self, **changes: Any) -> MultimodalDataset:
        """A shallow copy (arrays shared) with some attributes replaced."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.__dict__.update(changes)
        return new

    # ---------------------------------------------------------------- properties

    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names, in mask-column order."""
        return self._modalities

    @property
    def input_dims(self) -> dict[str, int]:
        """Modality -> channel count ``C_m``."""
        return {k: int(v.shape[1]) for k, v in self.features.items()}

    @property
    def seq_lens(self) -> dict[str, int]:
        """Modality -> sequence length ``T_m``."""
        return {k: int(v.shape[2]) for k, v in self.features.items()}

    @property
    def prior_classes(self) -> int:
        """Number of classes of :meth:`class_labels` (classification: ``num_classes``; regression: 7)."""
        return self.num_classes if self.num_classes is not None else SENTIMENT_CLASSES

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {v.shape[1]}x{v.shape[2]}" for k, v in self.features.items())
        return f"MultimodalDataset(n={len(self)}, task={self.task!r}, {shapes}, missing={self.missing_rate():.3f})"

    # ---------------------------------------------------------------- derived datasets

    def with_mask(self, mask: Any, *, intersect: bool = False) -> MultimodalDataset:
        """The same arrays under a new presence mask ``(N, M)`` (True = present).

        A new mask may not mark present a slot that is absent in this dataset (its data does not
        exist); with ``intersect=True`` the new mask is AND-ed with the current one instead. Every
        sample must keep at least one modality (``ValueError`` otherwise).
        """
        m = _to_numpy(mask)
        if m.shape != self.mask.shape:
            raise ValueError(
                f"mask: expected shape {self.mask.shape} for modalities {list(self.modalities)}, got {tuple(m.shape)}"
            )
        m = m.astype(bool)
        if intersect:
            m = m & self.mask
        else:
            invented = m & ~self.mask
            if invented.any():
                raise ValueError(
                    f"mask marks {int(invented.sum())} (sample, modality) slots present whose data is absent "
                    "in this dataset; pass intersect=True to combine the masks"
                )
        return self._copy_with(mask=self._check_mask(m, len(self), self.modalities))

    def with_step_mask(self, step_masks: Mapping[str, Any]) -> MultimodalDataset:
        """The same arrays with time steps removed inside modalities (intra-modality missing).

        Args:
            step_masks: modality name -> ``(N, T_m)`` bool, **False where the step is removed**
                (e.g. from :func:`flowtransfer.data.missing.step_missing_masks`). Modalities not
                named keep every step. The result is AND-ed with any step mask this dataset
                already has (a removed step cannot come back).

        Returns:
            a view (feature arrays shared) whose batches hold NaN at removed steps and carry
            ``Batch.step_mask``. **A present modality whose every valid step is removed for a sample
            (valid: within ``lengths`` when the dataset has them) becomes absent for that sample**
            (its mask bit is cleared). Every sample must keep at least one modality (``ValueError``
            naming the rows otherwise).
        """
        if not isinstance(step_masks, Mapping):
            raise TypeError(f"step_masks must be a mapping modality -> (N, T) bool array, got {type(step_masks).__name__}")
        n = len(self)
        current = self.step_mask
        new: dict[str, np.ndarray] = {}
        for name in step_masks:
            if name not in self.features:
                raise ValueError(f"step mask given for unknown modality {name!r}; known: {list(self.modalities)}")
        mask = self.mask.copy()
        for j, name in enumerate(self.modalities):
            t = self.features[name].shape[2]
            keep = np.ones((n, t), dtype=bool) if current is None else current[name].copy()
            if name in step_masks:
                sm = _to_numpy(step_masks[name])
                if sm.shape != (n, t):
                    raise ValueError(f"step mask of modality {name!r}: expected shape ({n}, {t}), got {tuple(sm.shape)}")
                if sm.dtype != np.bool_:
                    if not np.all(np.isin(sm, (0, 1))):
                        raise ValueError(f"step mask of modality {name!r} must be boolean (or 0/1)")
                    sm = sm.astype(bool)
                keep &= sm
                valid = np.ones((n, t), dtype=bool)
                if self.lengths is not None and name in self.lengths:
                    valid &= np.arange(t)[None, :] < self.lengths[name][:, None]
                emptied = valid.any(axis=1) & ~(valid & keep).any(axis=1)
                mask[emptied, j] = False
            new[name] = np.ascontiguousarray(keep)
        empty = ~mask.any(axis=1)
        if empty.any():
            rows = np.flatnonzero(empty)
            raise ValueError(
                f"step masks remove every step of every modality of {int(empty.sum())} samples "
                f"(first rows {rows[:5].tolist()}); each sample must keep at least one step of some modality"
            )
        return self._copy_with(step_mask=new, mask=mask)

    def subset(self, indices: Any) -> MultimodalDataset:
        """The samples at ``indices`` (int positions or a boolean array of length N), copied."""
        idx = _to_numpy(indices)
        if idx.dtype == np.bool_:
            if idx.shape != (len(self),):
                raise ValueError(f"boolean subset index must have shape ({len(self)},), got {idx.shape}")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError("subset: empty index gives an empty dataset")
        if idx.min() < -len(self) or idx.max() >= len(self):
            raise IndexError(f"subset index out of range for {len(self)} samples")
        return self._copy_with(
            features={k: v[idx] for k, v in self.features.items()},
            labels=self.labels[idx],
            _classes=self._classes[idx],
            mask=self.mask[idx],
            lengths=None if self.lengths is None else {k: v[idx] for k, v in self.lengths.items()},
            ids=None if self.ids is None else self.ids[idx],
            extras={k: v[idx] for k, v in self.extras.items()},
            step_mask=None if self.step_mask is None else {k: v[idx] for k, v in self.step_mask.items()},
        )

    # ---------------------------------------------------------------- access

    def class_labels(self) -> np.ndarray:
        """``(N,)`` int64 class ids for a class-conditional prior.

        Classification: the labels. Regression: :func:`flowtransfer.labels.sentiment_classes`
        (round halves away from zero, clip to [-3, 3], shift to 0..6).
        """
        return self._classes

    def __getitem__(self, i: int) -> dict[str, Any]:
        """One sample: ``{"features": {m: (C, T)}, "mask": (M,), "label", "class", "index", "lengths",
        "step_mask"}`` (``step_mask``: ``{m: (T,) bool}`` or None).

        Absent modalities and removed time steps hold NaN.
        """
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        feats = {}
        for j, name in enumerate(self.modalities):
            x = torch.from_numpy(self.features[name][i].copy())
            if not self.mask[i, j]:
                x.fill_(float("nan"))
            elif self.step_mask is not None:
                x[:, ~torch.from_numpy(self.step_mask[name][i])] = float("nan")
            feats[name] = x
        return {
            "features": feats,
            "mask": torch.from_numpy(self.mask[i].copy()),
            "label": torch.as_tensor(self.labels[i]),
            "class": torch.as_tensor(self.class_labels()[i], dtype=torch.int64),
            "index": torch.as_tensor(i, dtype=torch.int64),
            "lengths": None if self.lengths is None else {k: torch.as_tensor(v[i]) for k, v in self.lengths.items()},
            "step_mask": None if self.step_mask is None else {
                k: torch.from_numpy(v[i].copy()) for k, v in self.step_mask.items()},
        }

    @staticmethod
    def collate(items: Sequence[Mapping[str, Any]]) -> Batch:
        """Stack items from :meth:`__getitem__` into a :class:`Batch`."""
        if len(items) == 0:
            raise ValueError("collate: no items")
        names = tuple(items[0]["features"])
        lengths = None
        if items[0]["lengths"] is not None:
            lengths = {k: torch.stack([it["lengths"][k] for it in items]).long() for k in items[0]["lengths"]}
        step_mask = None
        if items[0].get("step_mask") is not None:
            step_mask = {k: torch.stack([it["step_mask"][k] for it in items]) for k in items[0]["step_mask"]}
        return Batch(
            features={k: torch.stack([it["features"][k] for it in items]) for k in names},
            mask=torch.stack([it["mask"] for it in items]),
            labels=torch.stack([it["label"] for it in items]),
            modalities=names,
            lengths=lengths,
            index=torch.stack([it["index"] for it in items]),
            classes=torch.stack([it["class"] for it in items]),
            step_mask=step_mask,
        )

    def batch(self, indices: Any) -> Batch:
        """A :class:`Batch` of the samples at ``indices``, built with vectorised slicing."""
        idx = np.ascontiguousarray(np.asarray(indices, dtype=np.int64).reshape(-1))
        mask = torch.from_numpy(self.mask[idx])
        steps = None if self.step_mask is None else {k: torch.from_numpy(v[idx]) for k, v in self.step_mask.items()}
        feats = {}
        for j, name in enumerate(self.modalities):
            x = torch.from_numpy(self.features[name][idx])  # fancy indexing copies
            absent = ~mask[:, j]
            if absent.any():
                x[absent] = float("nan")
            if steps is not None:
                x.masked_fill_(~steps[name][:, None, :], float("nan"))  # removed steps never leak
            feats[name] = x
        return Batch(
            features=feats,
            mask=mask,
            labels=torch.from_numpy(self.labels[idx]),
            modalities=self.modalities,
            lengths=None if self.lengths is None else {k: torch.from_numpy(v[idx]) for k, v in self.lengths.items()},
            index=torch.from_numpy(idx),
            classes=torch.from_numpy(np.ascontiguousarray(self.class_labels()[idx], dtype=np.int64)),
            step_mask=steps,
        )

    def full_batch(self) -> Batch:
        """Every sample as one :class:`Batch`, in order."""
        return self.batch(np.arange(len(self)))

    def loader(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
    ) -> DataLoader:
        """A ``DataLoader`` yielding :class:`Batch` objects.

        Batches are sliced whole (no per-sample Python loop). With ``shuffle`` and a ``seed`` the
        order is reproducible: the same seed gives the same sequence of epochs.
        """
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle:
            gen = torch.Generator()
            if seed is not None:
                gen.manual_seed(int(seed))
            else:
                gen.seed()
            base = RandomSampler(range(len(self)), generator=gen)
        else:
            base = SequentialSampler(range(len(self)))
        sampler = BatchSampler(base, batch_size=int(batch_size), drop_last=drop_last)
        return DataLoader(
            _BatchView(self), batch_size=None, sampler=sampler, collate_fn=_identity, num_workers=num_workers
        )

    # ---------------------------------------------------------------- summaries

    def class_balance(self) -> dict[int, int]:
        """Class id -> count over :meth:`class_labels` (every class in range listed, zeros included)."""
        counts = np.bincount(self.class_labels(), minlength=self.prior_classes)
        return {int(c): int(k) for c, k in enumerate(counts)}

    def missing_rate(self) -> float:
        """Fraction of absent (sample, modality) slots under the current mask."""
        return float(1.0 - self.mask.mean())

    def summary(self) -> dict[str, Any]:
        """Plain-data description: sizes, shapes, labels, classes, missing rate, cleaning report."""
        out: dict[str, Any] = {
            "n": len(self),
            "task": self.task,
            "modalities": list(self.modalities),
            "shapes": {k: [int(v.shape[1]), int(v.shape[2])] for k, v in self.features.items()},
            "num_classes": self.num_classes,
            "class_balance": self.class_balance(),
            "missing_rate": self.missing_rate(),
            "present_per_modality": {k: int(self.mask[:, j].sum()) for j, k in enumerate(self.modalities)},
            "cleaning": dict(self.cleaning),
            "nonfinite": {k: dict(v) for k, v in self.nonfinite.items()},
        }
        if self.task == "regression":
            out["labels"] = {
                "mean": float(self.labels.mean()),
                "std": float(self.labels.std()),
                "min": float(self.labels.min()),
                "max": float(self.labels.max()),
            }
        if self.lengths is not None:
            out["lengths"] = {k: [int(v.min()), int(v.max())] for k, v in self.lengths.items()}
        if self.step_mask is not None:
            out["removed_steps"] = {k: int((~v).sum()) for k, v in self.step_mask.items()}
        return out


class _BatchView(Dataset):
    """Index by a list of positions -> a whole :class:`Batch` (used by :meth:`MultimodalDataset.loader`)."""

    def __init__(self, ds: MultimodalDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, indices: list[int]) -> Batch:
        return self.ds.batch(indices)


def _identity(x: Any) -> Any:
    return x


# --------------------------------------------------------------------------------------------------
# from_arrays
# --------------------------------------------------------------------------------------------------


def from_arrays(
    features: Mapping[str, Any],
    labels: Any,
    task: str,
    layout: str = "NTC",
    lengths: Mapping[str, Any] | None = None,
    mask: Any = None,
    ids: Any = None,
    num_classes: int | None = None,
    nonfinite: str = "error",
    extras: Mapping[str, Any] | None = None,
) -> MultimodalDataset:
    """Build a :class:`MultimodalDataset` from arrays, with the layout stated explicitly.

    Args:
        features: modality name -> array. ``layout="NTC"`` (MMSA: ``(N, T, C)``) is converted with
            ``einops.rearrange(x, "n t c -> n c t")``; ``"NCT"`` is taken as is.
        labels: ``(N,)``; task ``"regression"`` or ``"classification"``.
        nonfinite: what to do with NaN/inf values in present slots. A (sample, modality) slot whose
            values are **all** non-finite is the modality missing for that sample: it is marked
            absent in the mask, whatever ``nonfinite`` says. Other non-finite values: ``"error"``
            (default) raises ``ValueError`` naming the modality and the counts; ``"zero"``
            replaces them with 0, records ``ds.cleaning[modality] = count`` and emits a warning
            saying what was cleaned (MMSA audio holds ``-inf``). ``ds.nonfinite`` reports, per
            modality that held any, the NaN and inf counts, the slots marked missing and the
            values zeroed; a warning names the slots marked missing.
        lengths, mask, ids, num_classes, extras: as in :class:`MultimodalDataset`.

    Example::

        ds = from_arrays({"L": np.zeros((8, 50, 768)), "A": np.zeros((8, 50, 5))}, np.zeros(8), "regression")
        ds.input_dims  # {"L": 768, "A": 5}
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if nonfinite not in ("error", "zero"):
        raise ValueError(f"nonfinite must be 'error' or 'zero', got {nonfinite!r}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    names = _as_names(features)
    arrays: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for name in names:
        x = _to_numpy(features[name])
        if x.ndim != 3:
            hint = " (utterance-level vectors (N, C) become (N, 1, C) with x[:, None, :])" if x.ndim == 2 else ""
            raise ValueError(
                f"modality {name!r}: expected a rank-3 array in layout {layout}, got shape {tuple(x.shape)}{hint}"
            )
        if x.dtype.kind not in "biuf":
            raise ValueError(f"modality {name!r}: expected a numeric array, got dtype {x.dtype}")
        counts[name] = int(x.shape[0])
        if layout == "NTC":
            x = rearrange(x, "n t c -> n c t")
        arrays[name] = np.ascontiguousarray(x, dtype=np.float32)
    if len(set(counts.values())) > 1:
        raise ValueError(f"mismatched sample counts across modalities: {counts}")

    n = counts[names[0]]
    present = None
    if mask is not None:
        present = MultimodalDataset._check_mask(mask, n, names)
    cleaning: dict[str, int] = {}
    report: dict[str, dict[str, int]] = {}
    new_mask = None
    for j, name in enumerate(arrays):
        x = arrays[name]
        bad = ~np.isfinite(x)
        if not bad.any():
            continue
        column = present[:, j] if present is not None else np.ones(n, dtype=bool)
        whole_slot = bad.reshape(n, -1).all(axis=1)  # every value non-finite: the modality is missing
        now_missing = whole_slot & column
        live = bad & (column & ~whole_slot)[:, None, None]  # absent slots are never exposed; the dataset zeroes them
        nbad = int(live.sum())
        report[name] = {
            "nan": int(np.isnan(x).sum()), "inf": int(np.isinf(x).sum()),
            "missing_slots": int(now_missing.sum()), "zeroed": 0,
        }
        if now_missing.any():
            if new_mask is None:
                new_mask = present.copy() if present is not None else np.ones((n, len(names)), dtype=bool)
            new_mask[now_missing, j] = False
        if nbad == 0:
            continue
        if nonfinite == "error":
            n_nan = int((np.isnan(x) & live).sum())
            raise ValueError(
                f"modality {name!r} holds {nbad} non-finite values ({n_nan} NaN, {nbad - n_nan} inf); "
                "pass nonfinite='zero' to replace them with 0 (reported), or clean them yourself"
            )
        x = x.copy()  # never modify the caller's array
        x[live] = 0.0
        arrays[name] = x
        cleaning[name] = nbad
        report[name]["zeroed"] = nbad
    if cleaning:
        detail = ", ".join(f"{k}: {v} of {arrays[k].size}" for k, v in cleaning.items())
        warnings.warn(f"from_arrays: replaced non-finite values (NaN/inf) with 0 in {detail}", stacklevel=2)
    if new_mask is not None:
        empty = ~new_mask.any(axis=1)
        if empty.any():
            rows = np.flatnonzero(empty)
            raise ValueError(
                f"{int(empty.sum())} samples have no finite modality (every present slot is entirely NaN/inf; "
                f"first rows {rows[:5].tolist()}): drop them or give them data"
            )
        detail = ", ".join(f"{k}: {v['missing_slots']} of {n}" for k, v in report.items() if v["missing_slots"])
        warnings.warn(f"from_arrays: samples whose modality is entirely NaN/inf are treated as missing it: {detail}",
                      stacklevel=2)
        mask = new_mask
    ds = MultimodalDataset(
        arrays, labels, task, num_classes=num_classes, lengths=lengths, mask=mask, ids=ids, extras=extras
    )
    ds.cleaning = cleaning
    ds.nonfinite = report
    return ds


# --------------------------------------------------------------------------------------------------
# bring-your-own data: .npz
# --------------------------------------------------------------------------------------------------


def check_splits(
    splits: Mapping[str, MultimodalDataset],
    source: str = "the data",
    required: Sequence[str] = (),
) -> None:
    """Check that splits agree with each other and that the ``required`` ones exist.

    Every split must have the modalities of the reference split (``train`` when present, else the
    first) in the same order, with the same channel counts, the same task and the same number of
    classes; sequence lengths may differ.

    Raises:
        flowtransfer.io.InputError: naming ``source``, the split and what differs.
    """
    from flowtransfer.io import InputError

    missing = [s for s in required if s not in splits]
    if missing:
        raise InputError(
            f"{source} has no {' or '.join(repr(s) for s in missing)} split (it has {list(splits) or 'none'}); "
            f"need {', '.join(repr(s) for s in required)}"
        )
    if not splits:
        return
    ref_name = "train" if "train" in splits else next(iter(splits))
    ref = splits[ref_name]
    for name, ds in splits.items():
        where = f"{source}: split {name!r}"
        if tuple(ds.modalities) != tuple(ref.modalities):
            raise InputError(f"{where} has modalities {list(ds.modalities)}, split {ref_name!r} has {list(ref.modalities)}")
        if ds.input_dims != ref.input_dims:
            raise InputError(f"{where} has channels {ds.input_dims}, split {ref_name!r} has {ref.input_dims}")
        if ds.task != ref.task:
            raise InputError(f"{where} is a {ds.task} task, split {ref_name!r} a {ref.task} task")
        if ds.num_classes != ref.num_classes:
            raise InputError(
                f"{where} has {ds.num_classes} classes, split {ref_name!r} has {ref.num_classes}; "
                "the class count must come from the training split"
            )


def nonfinite_lines(splits: Mapping[str, MultimodalDataset]) -> list[str]:
    """One readable line per split and modality that held NaN/inf (see ``ds.nonfinite``)."""
    lines = []
    for split, ds in splits.items():
        for m, r in ds.nonfinite.items():
            done = []
            if r.get("missing_slots"):
                done.append(f"{r['missing_slots']} samples entirely non-finite, treated as missing {m}")
            if r.get("zeroed"):
                done.append(f"{r['zeroed']} values replaced with 0")
            lines.append(f"[{split}] {m}: {r['nan']} NaN, {r['inf']} inf" + (f"; {'; '.join(done)}" if done else ""))
    return lines


def _check_npz_sizes(path: Path) -> None:
    """Every member of an ``.npz`` must hold exactly the array its header declares, checked
    before numpy allocates it (a tiny archive could otherwise declare a huge shape)."""
    import zipfile

    from flowtransfer.io import check_npy_size

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"cannot read {path} as an .npz archive ({type(err).__name__}: {err})") from err
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            try:
                with archive.open(info) as member:
                    check_npy_size(member, info.file_size, f"{path} [{info.filename[:-4]}]")
            except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as err:
                raise ValueError(f"cannot read {path} as an .npz archive ({type(err).__name__}: {err})") from err


def load_npz(
    path: str | os.PathLike,
    task: str | None = None,
    layout: str = "NTC",
    nonfinite: str = "error",
    num_classes: int | None = None,
) -> dict[str, MultimodalDataset]:
    """Load one ``.npz`` holding several splits of free-named modalities.

    Keys (no pickled objects: read with ``allow_pickle=False``):

    - ``<split>.<modality>``: features in ``layout`` (default ``(N, T, C)``), one per modality;
    - ``<split>.labels``: ``(N,)`` labels (required);
    - optional ``<split>.mask`` ``(N, M)`` presence, its columns in the order of **that split's**
      modality keys; ``<split>.ids`` ``(N,)``, ``<split>.lengths.<modality>`` ``(N,)``;
    - optional ``num_classes`` (a 0-d integer): the class count of a classification task.

    ``task`` is ``"classification"`` or ``"regression"``; ``None`` infers it from the training
    labels' dtype (integers -> classification). The number of classes is ``num_classes`` (the
    argument, else the archive's key), else ``max(label) + 1`` of the **training** split, so a
    validation or test split that lacks the top class gets the same class count; a label outside
    it is an error. Every split must hold the same modalities with the same channel counts; a
    sample whose modality is entirely NaN/inf is missing it (see :func:`from_arrays`).
    Returns split name -> dataset, splits in the order ``train``, ``valid``, ``test``, then others.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz data file not found: {path}")
    _check_npz_sizes(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as err:
        raise ValueError(f"cannot read {path}: {err} (object arrays are refused; store strings as fixed-width str)") from err
    except Exception as err:
        raise ValueError(f"cannot read {path} as an .npz archive ({type(err).__name__}: {err})") from err
    if "num_classes" in arrays:
        declared = arrays.pop("num_classes")
        if declared.shape != () or declared.dtype.kind not in "iu" or int(declared) < 1:
            raise ValueError(f"{path}: 'num_classes' must be a positive 0-d integer, got {declared!r}")
        num_classes = int(declared) if num_classes is None else num_classes
    splits: dict[str, dict[str, Any]] = {}
    for key, val in arrays.items():
        if "." not in key:
            raise ValueError(f"{path}: key {key!r} is not '<split>.<name>'")
        split, rest = key.split(".", 1)
        splits.setdefault(split, {})[rest] = val
    if not splits:
        raise ValueError(f"{path}: the archive is empty")
    order = [s for s in SPLITS if s in splits] + [s for s in splits if s not in SPLITS]
    reserved = {"labels", "mask", "ids"}
    mods_ref: tuple[str, ...] | None = None
    out: dict[str, MultimodalDataset] = {}
    for split in order:
        d = splits[split]
        if "labels" not in d:
            raise ValueError(f"{path}: split {split!r} has no '{split}.labels' array")
        mods = tuple(k for k in d if k not in reserved and not k.startswith("lengths."))
        if not mods:
            raise ValueError(f"{path}: split {split!r} has no modality arrays")
        if mods_ref is None:
            mods_ref = mods
            if task is None:
                task = "classification" if d["labels"].dtype.kind in "biu" else "regression"
        elif set(mods) != set(mods_ref):
            raise ValueError(f"{path}: split {split!r} has modalities {list(mods)}, expected {list(mods_ref)}")
        lengths = {k.split(".", 1)[1]: v for k, v in d.items() if k.startswith("lengths.")} or None
        mask = d.get("mask")
        if mask is not None and mask.ndim == 2 and mask.shape[1] == len(mods) and mods != mods_ref:
            mask = mask[:, [mods.index(m) for m in mods_ref]]  # this split's key order -> the dataset's
        try:
            out[split] = from_arrays(
                {m: d[m] for m in mods_ref}, d["labels"], task, layout=layout, lengths=lengths,
                mask=mask, ids=d.get("ids"), nonfinite=nonfinite,
                num_classes=num_classes if task == "classification" else None,
            )
        except ValueError as err:
            hint = ""
            if "out of range for num_classes" in str(err) and split != order[0]:
                hint = f" (the class count comes from the {order[0]!r} split)"
            raise ValueError(f"{path} [{split}]: {err}{hint}") from err
        if task == "classification" and num_classes is None:
            num_classes = out[split].num_classes  # the first (training) split fixes the class count
    check_splits(out, source=str(path))
    return out
