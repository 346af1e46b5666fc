"""Every missing-modality protocol, in one place, reproducible by seed.

All masks are boolean arrays ``(n, M)``, **True where the modality is present**, with columns in
the order of ``modalities``. The same ``(n, modalities, rate, seed)`` always gives the same mask,
so a test mask is fixed per seed and identical for every method compared.

Protocols:

- :func:`random_missing_mask` — per-sample random missing at rate MR (GCNet, CPM-Net and later
  papers, MR = 0.0 ... 0.7), exact realised rate, every sample keeps at least one modality.
- :func:`fixed_pattern_mask` / :func:`all_patterns` — one available-modality subset for every sample.
- :func:`dicmor_batch_schedule` — the released DiCMoR per-batch schedule, quirks included
  (compatibility only, never the default).
- :func:`training_missing_mask` — SMIL's setting: only a fraction ``eta`` of samples has a modality.
- :func:`step_missing_masks` — intra-modality (time-step) missing (LNLN, TFR-Net, EMT-DLFR): a
  fraction of each present modality's valid frames/tokens removed, exact per modality.
- :func:`per_modality_missing_mask` — imbalanced missing, one rate per modality (MissBench).
- :func:`cyin_instance_mask` / :func:`cyin_dataset_mask` — CyIN's instance-level missing
  probability and dataset-level missing rate.
- :class:`MissingSetting` / :func:`evaluation_settings` — named settings (``"mr=0.3"``,
  ``"pattern=L+A"``) as the evaluation loops and result rows use them.

**One extension point.** Every setting is a :class:`Setting`: a readable unique ``name``,
``mask(n, seed) -> (n, M)``, ``step_masks(data, seed) -> {m: (n, T_m)} | None``,
``describe(mask, step_masks, data)`` (requested and realised rates) and ``apply(dataset, seed)``
(the test view). A protocol is one :class:`Setting` subclass plus one builder registered in
:data:`PROTOCOLS` with :func:`register_protocol`; :func:`protocol_settings` builds the settings of
a protocol by name (what ``run --protocol NAME`` uses).
"""

from __future__ import annotations

import abc
import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "MissingRateCapped",
    "random_missing_mask",
    "realised_missing_rate",
    "fixed_pattern_mask",
    "all_patterns",
    "pattern_name",
    "parse_pattern",
    "dicmor_batch_schedule",
    "schedule_to_mask",
    "training_missing_mask",
    "MissingSetting",
    "evaluation_settings",
    "DEFAULT_RATES",
    "format_rate",
    "save_masks",
    "load_masks",
    "valid_steps",
    "step_missing_masks",
    "realised_step_rates",
    "per_modality_missing_mask",
    "parse_modality_rates",
    "modality_rates_name",
    "cyin_instance_mask",
    "cyin_dataset_mask",
    "CYIN_PATTERNS_NOTE",
    "Setting",
    "StepSetting",
    "PerModalitySetting",
    "CyINInstanceSetting",
    "CyINDatasetSetting",
    "Protocol",
    "PROTOCOLS",
    "register_protocol",
    "protocol_settings",
    "STEP_RATES",
    "CYIN_PROBS",
    "CYIN_RATES",
    "PER_MODALITY_DEFAULTS",
]

#: the missing rates of GCNet-style evaluations
DEFAULT_RATES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
#: the test rates of intra-modality (time-step) missing (LNLN, TFR-Net, EMT-DLFR)
STEP_RATES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: CyIN's instance-level missing probabilities (``eval_cyin.sh`` of the release)
CYIN_PROBS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
#: CyIN's dataset-level missing rates (``eval_cyin.sh`` of the release)
CYIN_RATES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)

Modalities = Sequence[str] | int
Seed = int | np.random.Generator


def format_rate(rate: float) -> str:
    """``0.0 -> "0.0"``, ``0.3 -> "0.3"``, ``0.25 -> "0.25"`` (as setting names and tables show rates)."""
    text = f"{float(rate):g}"
    return f"{text}.0" if text.lstrip("-").isdigit() else text


class MissingRateCapped(UserWarning):
    """The requested missing rate exceeds ``(M-1)/M``: every sample keeps exactly one modality."""


def _names(modalities: Modalities) -> tuple[str, ...]:
    """Modality names from a sequence of names, or ``M`` -> ``("0", ..., "M-1")``."""
    if isinstance(modalities, (int, np.integer)):
        if modalities < 1:
            raise ValueError(f"need at least one modality, got {modalities}")
        return tuple(str(i) for i in range(int(modalities)))
    if isinstance(modalities, str):
        raise TypeError(f"modalities must be a sequence of names, got the string {modalities!r}")
    names = tuple(modalities)
    if len(names) == 0:
        raise ValueError("need at least one modality")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate modality names in {names}")
    return names


def _n(n: int) -> int:
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n}")
    return int(n)


def _rng(seed: Seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        raise ValueError("a seed is required: masks must be reproducible")
    return np.random.default_rng(int(seed))


# --------------------------------------------------------------------------------------------------
# random per-sample missing
# --------------------------------------------------------------------------------------------------


def realised_missing_rate(mask: np.ndarray) -> float:
    """Fraction of absent slots in a presence mask ``(n, M)``: ``1 - mean(mask)``."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"mask must be a non-empty (n, M) array, got shape {mask.shape}")
    return float(1.0 - mask.astype(bool).mean())


def random_missing_mask(n: int, modalities: Modalities, rate: float, seed: Seed) -> np.ndarray:
    """Per-sample random missing at rate MR, with the realised rate exact.

    MR is the fraction of missing (sample, modality) slots over the split. Construction: each
    sample gets a random ordering of its ``M`` modalities; its last one is protected (never
    dropped), leaving ``n (M-1)`` droppable slots, visited in one random order. The first
    ``K = round(MR * n * M)`` of them are dropped. Hence

    - every sample keeps at least one modality;
    - the realised rate is ``K / (n M)``, within ``1 / (2 n M)`` of MR (0.005 once ``n M >= 100``);
    - for one seed the masks are nested: whatever is missing at a lower MR is missing at every
      higher MR, so missing-rate curves compare like with like.

    When MR exceeds ``(M-1)/M`` (e.g. 0.7 on three modalities, as in CPM-Net and GCNet), every
    sample keeps exactly one modality (its protected one), the realised rate is ``(M-1)/M`` and a
    :class:`MissingRateCapped` warning says so.

    Args:
        n: number of samples. modalities: names (or their count M). rate: MR in ``[0, 1)``.
        seed: int (or a numpy Generator).

    Returns:
        ``(n, M)`` bool, True where present.
    """
    n = _n(n)
    names = _names(modalities)
    m = len(names)
    rate = float(rate)
    if not 0.0 <= rate < 1.0 or not np.isfinite(rate):
        raise ValueError(f"missing rate must lie in [0, 1), got {rate}")
    rng = _rng(seed)
    order = np.argsort(rng.random((n, m)), axis=1)  # random permutation per sample
    protected = order[:, -1]
    droppable = order[:, :-1]  # (n, M-1) column ids
    visit = rng.permutation(n * (m - 1))
    cap = (m - 1) / m
    if rate > cap + 1e-12:
        warnings.warn(
            f"missing rate {rate} exceeds (M-1)/M = {cap:.4f} for M={m} modalities: every sample keeps "
            f"exactly one modality (realised {cap:.4f})",
            MissingRateCapped,
            stacklevel=2,
        )
        k = n * (m - 1)
    else:
        k = min(int(np.floor(rate * n * m + 0.5)), n * (m - 1))
    mask = np.ones((n, m), dtype=bool)
    chosen = visit[:k]
    rows, slots = np.divmod(chosen, m - 1) if m > 1 else (np.zeros(0, int), np.zeros(0, int))
    mask[rows, droppable[rows, slots]] = False
    assert mask[np.arange(n), protected].all()
    return mask


# --------------------------------------------------------------------------------------------------
# fixed patterns
# --------------------------------------------------------------------------------------------------


def pattern_name(available: Iterable[str], style: str = "plus") -> str:
    """Readable name of an available-modality subset: ``"L+A"`` (``style="plus"``) or ``"{L,A}"`` (``"set"``)."""
    names = tuple(available)
    if style == "plus":
        return "+".join(names)
    if style == "set":
        return "{" + ",".join(names) + "}"
    raise ValueError(f"unknown style {style!r}; expected 'plus' or 'set'")


def parse_pattern(pattern: str | Iterable[str], modalities: Modalities) -> tuple[str, ...]:
    """Available subset from ``"L+A"``, ``"{L,A}"``, ``"L,A"`` or an iterable of names, in modality order."""
    names = _names(modalities)
    if isinstance(pattern, str):
        text = pattern.strip()
        if text.startswith("pattern="):
            text = text[len("pattern="):]
        text = text.strip("{}")
        parts = [p.strip() for p in text.replace("+", ",").split(",") if p.strip()]
    else:
        parts = list(pattern)
    unknown = [p for p in parts if p not in names]
    if unknown:
        raise ValueError(f"unknown modality {unknown[0]!r} in pattern {pattern!r}; known: {list(names)}")
    if not parts:
        raise ValueError(f"pattern {pattern!r} keeps no modality; at least one must be available")
    return tuple(nm for nm in names if nm in parts)


def fixed_pattern_mask(n: int, modalities: Modalities, available: str | Iterable[str]) -> np.ndarray:
    """Every sample has exactly the modalities in ``available`` (``(n, M)`` bool, True = present).

    ``available`` is an iterable of names or a pattern string such as ``"L+A"`` or ``"{L,A}"``.
    """
    n = _n(n)
    names = _names(modalities)
    keep = parse_pattern(available, names)
    row = np.array([nm in keep for nm in names], dtype=bool)
    return np.repeat(row[None, :], n, axis=0)


def all_patterns(modalities: Modalities) -> list[tuple[str, ...]]:
    """Every non-empty subset of ``modalities``: singletons, then pairs, ..., then the complete set.

    Within one size, subsets follow modality order: for ``("L", "A", "V")``:
    ``[("L",), ("A",), ("V",), ("L", "A"), ("L", "V"), ("A", "V"), ("L", "A", "V")]``.
    """
    names = _names(modalities)
    return [c for k in range(1, len(names) + 1) for c in itertools.combinations(names, k)]


# --------------------------------------------------------------------------------------------------
# DiCMoR's released per-batch schedule
# --------------------------------------------------------------------------------------------------

#: DiCMoR's fractions of batches keeping one modality ("miss_2") and two modalities ("miss_1")
_DICMOR_P2 = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)
_DICMOR_P1 = (0.1, 0.2, 0.3, 0.2, 0.1, 0.0, 0.0)


def dicmor_batch_schedule(
    n_batches: int, modalities: Modalities, rate: float, seed: Seed
) -> list[tuple[str, ...]]:
    """The per-batch schedule of the released DiCMoR code, reproduced with its quirks.

    For comparison with published numbers only; :func:`random_missing_mask` is the default.

    Rule (trains/singleTask/DICMOR.py in the release): with ``p2 = [.1,.2,.3,.5,.7,.9,1]`` and
    ``p1 = [.1,.2,.3,.2,.1,0,0]`` indexed by ``i = int(MR*10 - 1)`` and the denominator
    ``D = round(n_batches / 10) * 10`` (numpy rounding, halves to even), batches are visited in
    order; with counters ``c2`` and ``c1``: if ``c2 / D < p2[i]`` the batch keeps one modality
    (``c2 += 1``); elif ``c1 / D < p1[i]`` it keeps two (``c1 += 1``); else it is complete.
    Which modalities are kept is drawn once per batch, uniformly (``random.sample`` in the release;
    here a numpy Generator seeded by ``seed``, so the draws themselves differ from the release's).

    Quirks, all kept:

    1. the unit is the batch: every sample of a batch has the same pattern;
    2. the kept modality is drawn per batch, not per sample;
    3. effective MR = ``(2 p2 + p1) / 3`` on three modalities: .1, .2, .3, .4, .5, .6, then
       **0.667 for MR = 0.7** (every batch keeps one modality);
    4. **MR = 0.0 drops two modalities in every batch**: ``int(0*10 - 1) = -1`` selects
       ``p2[-1] = 1.0``;
    5. ``int(MR*10 - 1)`` truncates, so MR = 0.35 behaves as 0.3, and MR >= 0.8 has no entry
       (``ValueError`` here, an ``IndexError`` in the release);
    6. the fractions count against ``D``, not ``n_batches``: with 24 batches (D = 20) at MR = 0.7
       only the first 20 batches lose modalities, the last 4 are complete;
    7. the release hard-codes three modalities; for other M, "keep one" and "keep two" are kept
       as the rule (on two modalities "keep two" is complete);
    8. the release applies the same rule to train, valid and test, with a shuffled test loader and
       unseeded draws, so its test scores depend on the run; here the schedule is fixed by ``seed``.

    Returns:
        one tuple of available modality names per batch, in modality order.
    """
    n_batches = _n(n_batches)
    names = _names(modalities)
    rate = float(rate)
    idx = int(rate * 10 - 1)  # the release's indexing, float error included
    if not -len(_DICMOR_P2) <= idx < len(_DICMOR_P2):
        raise ValueError(f"DiCMoR's schedule has no entry for MR={rate} (index {idx}); it covers MR 0.0 ... 0.7")
    p2, p1 = _DICMOR_P2[idx], _DICMOR_P1[idx]
    denom = float(np.round(n_batches / 10) * 10)
    rng = _rng(seed)
    out: list[tuple[str, ...]] = []
    c2 = c1 = 0
    for _ in range(n_batches):
        if denom > 0 and c2 / denom < p2:
            keep, c2 = 1, c2 + 1
        elif denom > 0 and c1 / denom < p1:
            keep, c1 = 2, c1 + 1
        else:
            keep = len(names)
        keep = min(keep, len(names))
        cols = np.sort(rng.choice(len(names), size=keep, replace=False))
        out.append(tuple(names[c] for c in cols))
    return out


def schedule_to_mask(
    schedule: Sequence[Iterable[str]], modalities: Modalities, batch_size: int, n: int | None = None
) -> np.ndarray:
    """Expand a per-batch schedule into a per-sample mask for consecutive batches of ``batch_size``.

    ``n`` (default ``len(schedule) * batch_size``) allows a shorter last batch.
    """
    names = _names(modalities)
    rows = [fixed_pattern_mask(batch_size, names, pat) for pat in schedule]
    mask = np.concatenate(rows, axis=0)
    if n is not None:
        if not (len(schedule) - 1) * batch_size < n <= len(schedule) * batch_size:
            raise ValueError(f"n={n} does not fit {len(schedule)} batches of {batch_size}")
        mask = mask[:n]
    return mask


# --------------------------------------------------------------------------------------------------
# training-time missing (SMIL)
# --------------------------------------------------------------------------------------------------


def training_missing_mask(n: int, modalities: Modalities, eta: float, modality: str, seed: Seed) -> np.ndarray:
    """SMIL's setting: only ``round(eta * n)`` samples (chosen at random) have ``modality``.

    Every other modality is present for every sample, so each sample keeps at least one
    modality (``M >= 2`` is required unless ``eta = 1``).
    """
    n = _n(n)
    names = _names(modalities)
    if modality not in names:
        raise ValueError(f"unknown modality {modality!r}; known: {list(names)}")
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    if len(names) == 1 and eta < 1.0:
        raise ValueError("with a single modality, samples without it would have nothing left")
    rng = _rng(seed)
    k = int(np.floor(eta * n + 0.5))
    mask = np.ones((n, len(names)), dtype=bool)
    has = np.zeros(n, dtype=bool)
    has[rng.permutation(n)[:k]] = True
    mask[:, names.index(modality)] = has
    return mask


# --------------------------------------------------------------------------------------------------
# intra-modality (time-step) missing
# --------------------------------------------------------------------------------------------------


def valid_steps(data: Any) -> dict[str, np.ndarray]:
    """Which (sample, time step) slots hold data: modality -> ``(N, T_m)`` bool.

    ``data`` is a :class:`~flowtransfer.data.MultimodalDataset` (or anything with ``modalities``,
    ``features`` ``{m: (N, C, T)}``, ``mask`` ``(N, M)``, ``lengths`` and optionally ``step_mask``):
    a slot is valid when the modality is present for the sample, the step lies within the sample's
    valid length (``t < lengths[m][i]``; every step when the dataset has no lengths) and no earlier
    step removal took it. Or ``data`` is already such a mapping ``{m: (N, T_m) bool}`` (checked and
    returned as bool copies).
    """
    if isinstance(data, Mapping):
        out: dict[str, np.ndarray] = {}
        n = None
        for m, v in data.items():
            v = np.asarray(v)
            if v.ndim != 2:
                raise ValueError(f"valid steps of modality {m!r}: expected an (N, T) array, got shape {v.shape}")
            if v.dtype != np.bool_:
                if not np.all(np.isin(v, (0, 1))):
                    raise ValueError(f"valid steps of modality {m!r} must be boolean (or 0/1)")
            if n is None:
                n = v.shape[0]
            elif v.shape[0] != n:
                raise ValueError(f"valid steps: modalities disagree on the sample count ({n} vs {v.shape[0]} for {m!r})")
            out[str(m)] = v.astype(bool)
        if not out:
            raise ValueError("valid steps: need at least one modality")
        return out
    for attr in ("modalities", "features", "mask"):
        if not hasattr(data, attr):
            raise TypeError(f"expected a MultimodalDataset or a mapping modality -> (N, T) bool, got {type(data).__name__}")
    mask = np.asarray(data.mask, dtype=bool)
    lengths = getattr(data, "lengths", None)
    steps = getattr(data, "step_mask", None)
    out = {}
    for j, m in enumerate(data.modalities):
        t = int(data.features[m].shape[2])
        v = np.repeat(mask[:, j, None], t, axis=1)
        if lengths is not None and m in lengths:
            v &= np.arange(t)[None, :] < np.asarray(lengths[m])[:, None]
        if steps is not None and m in steps:
            v &= np.asarray(steps[m], dtype=bool)
        out[m] = v
    return out


def _per_modality_rates(rate: float | Mapping[str, float], names: Sequence[str], what: str,
                        upper_open: bool = True) -> dict[str, float]:
    """One rate per modality from a number or a mapping (omitted modalities get 0); checked."""
    if isinstance(rate, Mapping):
        unknown = [m for m in rate if m not in names]
        if unknown:
            raise ValueError(f"{what}: unknown modality {unknown[0]!r}; known: {list(names)}")
        rates = {m: float(rate.get(m, 0.0)) for m in names}
    else:
        rates = {m: float(rate) for m in names}
    for m, r in rates.items():
        ok = np.isfinite(r) and 0.0 <= r and (r < 1.0 if upper_open else r <= 1.0)
        if not ok:
            bound = "[0, 1)" if upper_open else "[0, 1]"
            raise ValueError(f"{what}: the rate of modality {m!r} must lie in {bound}, got {r}")
    return rates


def step_missing_masks(
    valid: Any, rate: float | Mapping[str, float], seed: Seed
) -> dict[str, np.ndarray]:
    r"""Intra-modality missing: remove a fraction ``rate`` of each modality's valid time steps.

    The protocol of LNLN (NeurIPS 2024), TFR-Net and EMT-DLFR, where frames or tokens inside a
    present modality go missing, at test rates 0.0 ... 0.9 (:data:`STEP_RATES`).

    Construction, per seed: every sample that has any valid slot gets one **protected** slot: a
    modality drawn uniformly among those with a valid step for it, and a step drawn uniformly among
    that modality's valid steps. Then, for each modality ``m`` with :math:`S_m` valid
    (sample, step) slots over the split (per-sample lengths respected: padding is never a slot),
    the unprotected slots are visited in one random order and the first
    :math:`K_m = \mathrm{round}(r_m S_m)` are removed. Hence

    - the realised rate of modality ``m`` is :math:`K_m / S_m`, within :math:`1/(2 S_m)` of ``rate``
      (0.005 for any split with 100 or more valid slots);
    - every sample keeps at least one step of some modality (its protected one);
    - for one seed, removals are nested across rates (what is removed at a lower rate is removed at
      every higher rate), since the visiting order does not depend on the rate.

    **A modality whose every valid step is removed for a sample becomes absent for that sample**:
    :meth:`MultimodalDataset.with_step_mask <flowtransfer.data.MultimodalDataset.with_step_mask>`
    clears its presence bit, so methods see it as a missing modality (NaN slot, mask False). The
    removed steps still count in the realised step rate.

    Args:
        valid: ``{m: (N, T_m) bool}`` valid slots, or a dataset (see :func:`valid_steps`).
        rate: the fraction in ``[0, 1)``, or one per modality (a mapping; omitted modalities: 0).
        seed: int (or a numpy Generator).

    Returns:
        ``{m: (N, T_m) bool}`` step masks, **False where a step is removed** (True elsewhere,
        padding and absent slots included).

    Raises:
        ValueError: a rate outside ``[0, 1)``, or a rate that cannot be met without removing some
            sample's last step (only with very short sequences, e.g. ``T = 1``).
    """
    v = valid_steps(valid)
    names = tuple(v)
    rates = _per_modality_rates(rate, names, "step missing")
    rng = _rng(seed)
    n = next(iter(v.values())).shape[0]
    has = np.stack([v[m].any(axis=1) for m in names], axis=1)  # (n, M)
    keys = rng.random((n, len(names)))
    keys[~has] = -1.0
    protected_modality = keys.argmax(axis=1)
    protectable = has.any(axis=1)
    out: dict[str, np.ndarray] = {}
    for j, m in enumerate(names):
        vm = v[m]
        step_keys = rng.random(vm.shape)
        step_keys[~vm] = -1.0
        protected = np.zeros_like(vm)
        rows = np.flatnonzero(protectable & (protected_modality == j))
        protected[rows, step_keys[rows].argmax(axis=1)] = True
        candidates = np.flatnonzero((vm & ~protected).ravel())
        order = rng.permutation(candidates.size)  # drawn whatever the rate: nested masks
        total = int(vm.sum())
        k = int(np.floor(rates[m] * total + 0.5))
        if k > candidates.size:
            raise ValueError(
                f"step missing: removing {k} of the {total} valid steps of modality {m!r} (rate {rates[m]}) would "
                f"remove some sample's last step; at most {candidates.size / max(total, 1):.4f} is possible here"
            )
        keep = np.ones(vm.size, dtype=bool)
        keep[candidates[order[:k]]] = False
        out[m] = keep.reshape(vm.shape)
    return out


def realised_step_rates(step_masks: Mapping[str, np.ndarray], valid: Any) -> dict[str, float]:
    """Per modality, the fraction of valid slots that ``step_masks`` removes (modalities with no
    valid slot are left out). ``valid`` as in :func:`valid_steps` (the data the masks were drawn for)."""
    v = valid_steps(valid)
    out = {}
    for m, keep in step_masks.items():
        if m not in v:
            raise ValueError(f"step mask for unknown modality {m!r}; known: {list(v)}")
        total = int(v[m].sum())
        if total:
            out[m] = float((v[m] & ~np.asarray(keep, dtype=bool)).sum() / total)
    return out


# --------------------------------------------------------------------------------------------------
# imbalanced missing: one rate per modality (MissBench)
# --------------------------------------------------------------------------------------------------


def per_modality_missing_mask(
    n: int, modalities: Modalities, rates: Mapping[str, float], seed: Seed
) -> np.ndarray:
    r"""Imbalanced missing (MissBench): each modality absent with its own rate, exact per modality.

    Modality ``m`` is absent for exactly :math:`k_m = \mathrm{round}(r_m n)` samples (realised rate
    within :math:`1/(2n)` of :math:`r_m`, 0.005 once ``n >= 100``) and every sample keeps at least
    one modality. Modalities omitted from ``rates`` are never dropped. When the rates fit exactly
    (:math:`\sum_m r_m = M - 1`) but rounding halves up would overshoot, the counts rounded up the
    most are rounded down instead (then within :math:`1/n`).

    How the constraint is met: each sample gets one **protected** modality that it keeps. The
    number :math:`p_m` of samples protecting ``m`` is the largest-remainder rounding of
    :math:`n\,a_m / \sum_{m'} a_{m'}` with :math:`a_m = n - k_m` the samples that must keep ``m``,
    so :math:`p_m \le a_m` and :math:`\sum_m p_m = n`; the protected modalities are dealt to the
    samples in a random order. Then, per modality, :math:`k_m` samples among the :math:`n - p_m`
    that do not protect it are drawn uniformly to lose it.

    Feasibility: a mask with these counts and no empty row exists **iff**
    :math:`\sum_m k_m \le n (M - 1)` (each sample can lose at most ``M - 1`` modalities; with equal
    row capacities that is also sufficient). A request beyond that (e.g. rates 0.9, 0.9, 0.9 on three
    modalities: :math:`\sum r_m = 2.7 > 2`) raises ``ValueError``.

    Returns:
        ``(n, M)`` bool, True where present.
    """
    n = _n(n)
    names = _names(modalities)
    if not isinstance(rates, Mapping):
        raise TypeError(f"rates must be a mapping modality -> rate, got {type(rates).__name__}")
    r = _per_modality_rates(rates, names, "per-modality missing", upper_open=False)
    m = len(names)
    exact = np.array([r[nm] * n for nm in names])
    k = np.floor(exact + 0.5).astype(np.int64)
    over = int(k.sum()) - n * (m - 1)
    if over > 0 and exact.sum() <= n * (m - 1) + 1e-9:
        # the rates fit but rounding halves up overshoots: round down the counts rounded up the most
        k[np.argsort(-(k - exact), kind="stable")[:over]] -= 1
    if k.sum() > n * (m - 1):
        raise ValueError(
            f"per-modality missing rates {r} cannot all be met while every sample keeps a modality: they drop "
            f"{int(k.sum())} of {n * m} slots, at most n (M-1) = {n * (m - 1)} can go (the rates must sum to at "
            f"most M-1 = {m - 1})"
        )
    rng = _rng(seed)
    keep_counts = n - k  # a_m >= 0, sum >= n
    share = n * keep_counts / keep_counts.sum()
    p = np.floor(share).astype(np.int64)
    short = n - int(p.sum())
    if short:
        p[np.argsort(-(share - p), kind="stable")[:short]] += 1
    protected = rng.permutation(np.repeat(np.arange(m), p))
    mask = np.ones((n, m), dtype=bool)
    for j in range(m):
        rows = np.flatnonzero(protected != j)
        mask[rows[rng.permutation(rows.size)[: k[j]]], j] = False
    assert mask.any(axis=1).all()
    return mask


def modality_rates_name(rates: Mapping[str, float], modalities: Modalities) -> str:
    """``{"L": 0.1, "A": 0.5, "V": 0.3} -> "L0.1+A0.5+V0.3"`` (every modality, in modality order)."""
    names = _names(modalities)
    return "+".join(f"{nm}{format_rate(float(rates.get(nm, 0.0)))}" for nm in names)


def parse_modality_rates(spec: str | Mapping[str, float], modalities: Modalities) -> dict[str, float]:
    """Per-modality rates from ``"L0.1+A0.5+V0.3"``, ``"mod=L0.1+A0.5"``, ``"L=0.1,A=0.5"`` or a mapping.

    Omitted modalities get 0. Unknown modalities, repeated ones and unreadable rates raise ``ValueError``.
    """
    names = _names(modalities)
    if isinstance(spec, Mapping):
        return _per_modality_rates(spec, names, "per-modality rates", upper_open=False)
    if not isinstance(spec, str):
        raise TypeError(f"per-modality rates must be a string such as 'L0.1+A0.5' or a mapping, got {type(spec).__name__}")
    text = spec.strip()
    if text.startswith("mod="):
        text = text[len("mod="):]
    parts = [p.strip() for p in text.replace(",", "+").split("+") if p.strip()]
    if not parts:
        raise ValueError(f"per-modality rates {spec!r}: nothing to read; expected e.g. 'L0.1+A0.5+V0.3'")
    out: dict[str, float] = {}
    for part in parts:
        found = None
        for nm in sorted(names, key=len, reverse=True):  # longest name first: 'AV' before 'A'
            if part.startswith(nm):
                rest = part[len(nm):].lstrip("=:")
                try:
                    found = (nm, float(rest))
                    break
                except ValueError:
                    continue
        if found is None:
            raise ValueError(f"per-modality rates {spec!r}: cannot read {part!r} as <modality><rate>; "
                             f"modalities: {list(names)}")
        if found[0] in out:
            raise ValueError(f"per-modality rates {spec!r}: modality {found[0]!r} given twice")
        out[found[0]] = found[1]
    return _per_modality_rates(out, names, f"per-modality rates {spec!r}", upper_open=False)


# --------------------------------------------------------------------------------------------------
# CyIN's protocols
# --------------------------------------------------------------------------------------------------

CYIN_PATTERNS_NOTE = (
    "CyIN (trains/MissingProtocol.py, commit da04a3d) draws its test masks per test batch with an unseeded "
    "torch RNG from a shuffled test loader"
)


def cyin_instance_mask(n: int, modalities: Modalities, prob: float, seed: Seed) -> np.ndarray:
    r"""CyIN's instance-level protocol: a sample is incomplete with probability ``prob``.

    **What CyIN does** (``MissingProtocol.get_mask_sample``, ``miss_prob``): for each sample of a
    test batch, a Bernoulli(``prob``) draw decides whether it is incomplete; an incomplete sample
    gets one of the six incomplete patterns of three modalities (the three pairs and the three
    singletons), drawn uniformly; the others stay complete. The expected missing rate is
    ``prob / 2`` on three modalities (a pair misses 1/3 of the slots, a singleton 2/3). CyIN
    evaluates ``prob`` in 0.1, 0.3, 0.5, 0.7, 0.9, 1.0 (:data:`CYIN_PROBS`).

    **Where this departs**, for exact and reproducible test masks: exactly
    ``round(prob * n)`` samples, chosen uniformly, are incomplete (not a Bernoulli count), and the
    incomplete patterns are dealt in equal numbers (counts differ by at most one) in a random order
    instead of drawn independently, so each sample's pattern is still uniform. The masks are drawn
    once over the split from ``seed`` (CyIN: per batch, unseeded). For ``M != 3`` the patterns are
    every non-empty proper subset of the modalities (CyIN hard-codes three).

    Returns:
        ``(n, M)`` bool, True where present.
    """
    n = _n(n)
    names = _names(modalities)
    prob = float(prob)
    if not (np.isfinite(prob) and 0.0 <= prob <= 1.0):
        raise ValueError(f"missing probability must lie in [0, 1], got {prob}")
    if len(names) < 2:
        raise ValueError("CyIN's instance-level protocol needs at least two modalities")
    patterns = [p for p in all_patterns(names) if len(p) < len(names)]
    rows = np.array([[nm in p for nm in names] for p in patterns], dtype=bool)
    rng = _rng(seed)
    k = int(np.floor(prob * n + 0.5))
    chosen = rng.permutation(n)[:k]
    dealt = rng.permutation(np.resize(np.arange(len(patterns)), k))
    mask = np.ones((n, len(names)), dtype=bool)
    mask[chosen] = rows[dealt]
    return mask


def cyin_dataset_mask(
    n: int, modalities: Modalities, rate: float, seed: Seed, batch_size: int | None = None
) -> np.ndarray:
    r"""CyIN's dataset-level protocol: missing rate ``rate`` over the (sample, modality) slots.

    **What CyIN does** (``MissingProtocol.get_mask_sample``, ``miss_rate``), per test batch: when
    the kept fraction ``1 - rate`` is at most ``1/M``, every sample keeps exactly one modality drawn
    uniformly (so 0.7 on three modalities realises 2/3). Otherwise every sample keeps one uniformly
    drawn modality, further slots are kept by independent draws whose probability is corrected for
    the overlap with the kept ones (in whole percent), and the draw is repeated until the batch's
    kept fraction is within 0.005 of ``1 - rate`` (the tolerance doubles after every 100 failed
    tries, with a printed note, for small batches). CyIN evaluates ``rate`` in 0.1 ... 0.7
    (:data:`CYIN_RATES`) on a shuffled test loader.

    **Here**: the same two regimes, with exact counts instead of rejection sampling: each sample
    keeps one uniformly drawn modality and the other slots are dropped by an exact count drawn
    uniformly (:func:`random_missing_mask`), so the realised rate is within ``1/(2 n M)`` of
    ``rate`` (of ``(M-1)/M`` when capped, without a warning: capping is CyIN's rule). With
    ``batch_size`` the samples are dealt in a random order into blocks of ``batch_size`` (CyIN's
    shuffled test batches) and each block gets its own exact draw, so every batch-sized block meets
    the rate (within ``1/(2 b M)``); without it the split is one block. Seeded, unlike CyIN.

    Returns:
        ``(n, M)`` bool, True where present.
    """
    n = _n(n)
    names = _names(modalities)
    rate = float(rate)
    if not (np.isfinite(rate) and 0.0 <= rate < 1.0):
        raise ValueError(f"missing rate must lie in [0, 1), got {rate}")
    rng = _rng(seed)
    if batch_size is None:
        blocks = [np.arange(n)]
    else:
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        order = rng.permutation(n)
        blocks = [order[i:i + int(batch_size)] for i in range(0, n, int(batch_size))]
    mask = np.ones((n, len(names)), dtype=bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MissingRateCapped)  # CyIN's rule, reported by describe()
        for rows in blocks:
            mask[rows] = random_missing_mask(rows.size, names, rate, rng)
    return mask


# --------------------------------------------------------------------------------------------------
# the setting interface (one extension point for every protocol)
# --------------------------------------------------------------------------------------------------


class Setting(abc.ABC):
    """One evaluation setting of a missing-modality protocol.

    A subclass sets ``protocol`` (its registry name) and implements :attr:`name` (readable, unique
    among settings: result rows and saved masks are keyed by it), :meth:`mask` and
    :attr:`requested_rate`; a protocol that removes time steps also implements :meth:`step_masks`.
    Everything else (:meth:`describe`, :meth:`apply`) is shared.

    Attributes:
        modalities: modality names, in mask-column order.
    """

    protocol: ClassVar[str] = ""
    modalities: tuple[str, ...]

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The setting's unique readable name (``"mr=0.3"``, ``"steps=0.3"``, ``"mod=L0.1+A0.5+V0.3"``)."""

    @abc.abstractmethod
    def mask(self, n: int, seed: Seed = 0) -> np.ndarray:
        """The ``(n, M)`` bool presence mask of this setting (True = present)."""

    @property
    def requested_rate(self) -> float | dict[str, float]:
        """What the setting asks for: one rate, or one per modality."""
        raise NotImplementedError

    def step_masks(self, data: Any, seed: Seed = 0) -> dict[str, np.ndarray] | None:
        """``{m: (N, T_m) bool}`` step masks (False = removed step) for ``data`` (a dataset or
        ``{m: (N, T_m)}`` valid slots, see :func:`valid_steps`), or None when the setting removes no
        time steps (the default)."""
        return None

    def describe(self, mask: np.ndarray, step_masks: Mapping[str, np.ndarray] | None = None,
                 data: Any = None) -> dict[str, Any]:
        """Requested and realised rates of this setting's ``mask`` (and ``step_masks``).

        Returns ``{"setting", "protocol", "requested_rate", "realised_rate", "realised_rate_<m>"...}``:
        the modality-level missing rate overall and per modality (``1 - mask.mean()``). Step
        settings report the step rates instead (see :meth:`StepSetting.describe`).
        """
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2 or mask.shape[1] != len(self.modalities):
            raise ValueError(f"mask: expected shape (n, {len(self.modalities)}), got {mask.shape}")
        out: dict[str, Any] = {"setting": self.name, "protocol": self.protocol,
                               "requested_rate": self.requested_rate, "realised_rate": realised_missing_rate(mask)}
        for j, m in enumerate(self.modalities):
            out[f"realised_rate_{m}"] = float(1.0 - mask[:, j].mean())
        return out

    def apply(self, dataset: Any, seed: Seed = 0) -> Any:
        """``dataset`` under this setting: its mask intersected with the setting's, then the step
        masks drawn for that view (``ValueError`` if a sample is left with no modality)."""
        view = dataset.with_mask(self.mask(len(dataset), seed), intersect=True)
        steps = self.step_masks(view, seed)
        return view if steps is None else view.with_step_mask(steps)

    def __str__(self) -> str:
        return self.name


# --------------------------------------------------------------------------------------------------
# named settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MissingSetting(Setting):
    """One evaluation setting: a random missing rate (``kind="mr"``) or a fixed pattern (``"pattern"``).

    The settings of the ``random`` protocol (:data:`PROTOCOLS`).

    ``name`` is ``"mr=0.3"`` or ``"pattern=L+A"``, as result rows carry it. ``mask(n, seed)``
    builds the setting's mask; ``expected_rate`` is the rate it realises (for MR, ``min(MR,
    (M-1)/M)`` up to ``1/(2nM)``).
    """

    kind: str
    modalities: tuple[str, ...]
    rate: float | None = None
    available: tuple[str, ...] | None = None

    protocol: ClassVar[str] = "random"

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", _names(self.modalities))
        if self.kind == "mr":
            if self.rate is None:
                raise ValueError("an 'mr' setting needs a rate")
        elif self.kind == "pattern":
            if not self.available:
                raise ValueError("a 'pattern' setting needs the available modalities")
            object.__setattr__(self, "available", parse_pattern(self.available, self.modalities))
        else:
            raise ValueError(f"unknown setting kind {self.kind!r}; expected 'mr' or 'pattern'")

    @property
    def name(self) -> str:
        if self.kind == "mr":
            return f"mr={format_rate(self.rate or 0.0)}"
        return f"pattern={pattern_name(self.available or ())}"

    @property
    def expected_rate(self) -> float:
        m = len(self.modalities)
        if self.kind == "mr":
            return min(float(self.rate or 0.0), (m - 1) / m)
        return 1.0 - len(self.available or ()) / m

    def mask(self, n: int, seed: Seed = 0) -> np.ndarray:
        """The ``(n, M)`` presence mask of this setting (fixed patterns ignore ``seed``)."""
        if self.kind == "mr":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", MissingRateCapped)  # reported via expected_rate
                return random_missing_mask(n, self.modalities, float(self.rate or 0.0), seed)
        return fixed_pattern_mask(n, self.modalities, self.available or ())

    @property
    def requested_rate(self) -> float:
        """MR as requested (a pattern: the rate it realises)."""
        return float(self.rate) if self.kind == "mr" else self.expected_rate

    def describe(self, mask: np.ndarray, step_masks: Mapping[str, np.ndarray] | None = None,
                 data: Any = None) -> dict[str, Any]:
        """``{"setting", "protocol", "requested_rate", "realised_rate", "realised_rate_<m>"...}`` for a mask
        of this setting (see :meth:`Setting.describe`)."""
        return super().describe(mask, step_masks, data)

    def __str__(self) -> str:
        return self.name


def evaluation_settings(
    modalities: Modalities, rates: Iterable[float] = DEFAULT_RATES, patterns: bool = True
) -> list[MissingSetting]:
    """The standard settings: one per missing rate, then (``patterns=True``) one per fixed pattern.

    Fixed patterns are every non-empty proper subset of the modalities (the complete set equals
    ``mr=0``), ordered as :func:`all_patterns`.
    """
    names = _names(modalities)
    out = [MissingSetting("mr", names, rate=float(r)) for r in rates]
    if patterns:
        out += [MissingSetting("pattern", names, available=p) for p in all_patterns(names) if len(p) < len(names)]
    return out


# --------------------------------------------------------------------------------------------------
# the settings of the other protocols
# --------------------------------------------------------------------------------------------------


def _rate(rate: float, what: str, upper_open: bool = True) -> float:
    r = float(rate)
    if not (np.isfinite(r) and 0.0 <= r and (r < 1.0 if upper_open else r <= 1.0)):
        raise ValueError(f"{what} must lie in {'[0, 1)' if upper_open else '[0, 1]'}, got {rate}")
    return r


@dataclass(frozen=True)
class StepSetting(Setting):
    """Intra-modality missing at ``rate``: ``"steps=0.3"`` (see :func:`step_missing_masks`).

    :meth:`mask` keeps every modality (what goes missing are time steps); :meth:`step_masks` draws
    the removals for a dataset. A modality left with no valid step for a sample becomes absent for
    it when the step masks are applied (:meth:`MultimodalDataset.with_step_mask`).
    """

    modalities: tuple[str, ...]
    rate: float

    protocol: ClassVar[str] = "steps"

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", _names(self.modalities))
        object.__setattr__(self, "rate", _rate(self.rate, "step missing rate"))

    @property
    def name(self) -> str:
        return f"steps={format_rate(self.rate)}"

    @property
    def requested_rate(self) -> float:
        return self.rate

    def mask(self, n: int, seed: Seed = 0) -> np.ndarray:
        """All present: this protocol removes time steps, not modalities."""
        return np.ones((_n(n), len(self.modalities)), dtype=bool)

    def step_masks(self, data: Any, seed: Seed = 0) -> dict[str, np.ndarray] | None:
        valid = valid_steps(data)
        unknown = [m for m in valid if m not in self.modalities]
        if unknown:
            raise ValueError(f"step setting {self.name}: data has modality {unknown[0]!r}, setting has {list(self.modalities)}")
        if self.rate == 0.0:
            return None
        return step_missing_masks(valid, self.rate, seed)

    def describe(self, mask: np.ndarray, step_masks: Mapping[str, np.ndarray] | None = None,
                 data: Any = None) -> dict[str, Any]:
        """``{"setting", "protocol", "requested_rate", "realised_rate", "realised_rate_<m>",
        "absent_after_<m>"}``: the pooled and per-modality fractions of valid steps removed, and per
        modality the samples that lost every valid step (the modality became absent for them).
        ``data``: the dataset (or valid slots) the step masks were drawn for."""
        out: dict[str, Any] = {"setting": self.name, "protocol": self.protocol, "requested_rate": self.rate}
        if step_masks is None:
            out["realised_rate"] = 0.0
            out.update({f"realised_rate_{m}": 0.0 for m in self.modalities})
            return out
        if data is None:
            raise ValueError(f"describe({self.name}): give data= (the dataset the step masks were drawn for)")
        valid = valid_steps(data)
        removed = total = 0
        for m in self.modalities:
            if m not in valid:
                continue
            v, keep = valid[m], np.asarray(step_masks.get(m, np.ones_like(valid[m])), dtype=bool)
            gone = v & ~keep
            removed += int(gone.sum())
            total += int(v.sum())
            out[f"realised_rate_{m}"] = float(gone.sum() / v.sum()) if v.any() else 0.0
            out[f"absent_after_{m}"] = int((v.any(axis=1) & ~(v & keep).any(axis=1)).sum())
        out["realised_rate"] = removed / total if total else 0.0
        return out


@dataclass(frozen=True)
class PerModalitySetting(Setting):
    """Imbalanced missing, one rate per modality: ``"mod=L0.1+A0.5+V0.3"``
    (see :func:`per_modality_missing_mask`). ``rates`` is stored as ``((m, r), ...)`` in modality order."""

    modalities: tuple[str, ...]
    rates: tuple[tuple[str, float], ...]

    protocol: ClassVar[str] = "per_modality"

    def __post_init__(self) -> None:
        names = _names(self.modalities)
        object.__setattr__(self, "modalities", names)
        given = self.rates if isinstance(self.rates, (Mapping, str)) else dict(self.rates)
        rates = parse_modality_rates(given, names)
        k = sum(rates.values())
        if k > len(names) - 1 + 1e-12:
            raise ValueError(
                f"per-modality rates {rates} sum to {k:g} > M-1 = {len(names) - 1}: some sample would keep no modality"
            )
        object.__setattr__(self, "rates", tuple((m, rates[m]) for m in names))

    @property
    def name(self) -> str:
        return f"mod={modality_rates_name(dict(self.rates), self.modalities)}"

    @property
    def requested_rate(self) -> dict[str, float]:
        return dict(self.rates)

    def mask(self, n: int, seed: Seed = 0) -> np.ndarray:
        return per_modality_missing_mask(n, self.modalities, dict(self.rates), seed)


@dataclass(frozen=True)
class CyINInstanceSetting(Setting):
    """CyIN's instance-level missing probability: ``"cyin_mp=0.5"`` (see :func:`cyin_instance_mask`).

    ``requested_rate`` is the probability; :meth:`describe` adds ``realised_incomplete`` (the
    fraction of incomplete samples) beside the realised missing rate."""

    modalities: tuple[str, ...]
    prob: float

    protocol: ClassVar[str] = "cyin_instance"

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", _names(self.modalities))
        object.__setattr__(self, "prob", _rate(self.prob, "missing probability", upper_open=False))
        if len(self.modalities) < 2:
            raise ValueError("CyIN's instance-level protocol needs at least two modalities")

    @property
    def name(self) -> str:
        return f"cyin_mp={format_rate(self.prob)}"

    @property
    def requested_rate(self) -> float:
        return self.prob

    @property
    def expected_rate(self) -> float:
        """The missing rate it realises: ``prob`` times the mean missing fraction of the incomplete patterns."""
        m = len(self.modalities)
        pats = [p for p in all_patterns(self.modalities) if len(p) < m]
        return self.prob * float(np.mean([1.0 - len(p) / m for p in pats]))

    def mask(self, n: int, seed: Seed = 0) -> np.ndarray:
        return cyin_instance_mask(n, self.modalities, self.prob, seed)

    def describe(self, mask: np.ndarray, step_masks: Mapping[str, np.ndarray] | None = None,
                 data: Any = None) -> dict[str, Any]:
        out = super().describe(mask, step_masks, data)
        out["realised_incomplete"] = float((~np.asarray(mask, dtype=bool)).any(axis=1).mean())
        return out


@dataclass(frozen=True)
class CyINDatasetSetting(Setting):
    """CyIN's dataset-level missing rate: ``"cyin_mr=0.3"``, or ``"cyin_mr=0.3@b32"`` with per-batch
    blocks of 32 (see :func:`cyin_dataset_mask`)."""

    modalities: tuple[str, ...]
    rate: float
    batch_size: int | None = None

    protocol: ClassVar[str] = "cyin_dataset"

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", _names(self.modalities))
        object.__setattr__(self, "rate", _rate(self.rate, "missing rate"))
        if self.batch_size is not None and (int(self.batch_size) != self.batch_size or self.batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size}")

    @property
    def name(self) -> str:
        block = "" if self.batch_size is None else f"@b{int(self.batch_size)}"
        return f"cyin_mr={format_rate(self.rate)}{block}"

    @property
    def requested_rate(self) -> float:
        return self.rate

    @property
    def expected_rate(self) -> float:
        m = len(self.modalities)
        return min(self.rate, (m - 1) / m)

    def mask(self, n: int, seed: Seed = 0) -> np.ndarray:
        return cyin_dataset_mask(n, self.modalities, self.rate, seed, batch_size=self.batch_size)


# --------------------------------------------------------------------------------------------------
# the protocol registry
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """A registered protocol: ``build(modalities, rates, **options) -> list[Setting]``.

    ``rates`` is what the protocol sweeps (its ``default_rates`` when None): missing rates,
    step rates, probabilities, or per-modality rate specifications."""

    name: str
    build: Callable[..., list[Setting]]
    default_rates: tuple[Any, ...]
    summary: str
    options: tuple[str, ...] = ()


#: protocol name -> :class:`Protocol` (``run --protocol NAME``)
PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(name: str, default_rates: Iterable[Any], summary: str, options: Iterable[str] = ()
                      ) -> Callable[[Callable[..., list[Setting]]], Callable[..., list[Setting]]]:
    """Decorator registering ``build(modalities, rates, **options) -> list[Setting]`` as protocol ``name``.

    ``options`` names the keyword options the builder accepts (anything else is refused by
    :func:`protocol_settings` with a message that lists them). Registering a name twice is an error.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"protocol names must be non-empty strings, got {name!r}")

    def deco(build: Callable[..., list[Setting]]) -> Callable[..., list[Setting]]:
        if name in PROTOCOLS and PROTOCOLS[name].build is not build:
            raise ValueError(f"a protocol named {name!r} is already registered")
        PROTOCOLS[name] = Protocol(name, build, tuple(default_rates), summary, tuple(options))
        return build

    return deco


#: the default imbalanced settings: every modality at ``balanced``, then each modality in turn at
#: ``dominant`` with the others at ``others`` (our choice of grid, not MissBench's published one)
PER_MODALITY_DEFAULTS: dict[str, float] = {"balanced": 0.3, "dominant": 0.6, "others": 0.1}


def _default_per_modality(names: tuple[str, ...]) -> list[dict[str, float]]:
    d = PER_MODALITY_DEFAULTS
    out = [{m: d["balanced"] for m in names}]
    if len(names) > 1:
        out += [{m: (d["dominant"] if m == lead else d["others"]) for m in names} for lead in names]
    return out


@register_protocol("random", DEFAULT_RATES, "per-sample random missing at rate MR (at least one modality kept), "
                   "then every fixed pattern (GCNet, MoMKE; CorrKD, HRLF, CyIN's fixed protocol)", ("patterns",))
def _random_protocol(modalities: tuple[str, ...], rates: Iterable[float], *, patterns: bool = True) -> list[Setting]:
    return list(evaluation_settings(modalities, rates, patterns=patterns))


@register_protocol("steps", STEP_RATES, "intra-modality missing: a fraction of each present modality's valid "
                   "time steps removed (LNLN, TFR-Net, EMT-DLFR)")
def _steps_protocol(modalities: tuple[str, ...], rates: Iterable[float]) -> list[Setting]:
    return [StepSetting(modalities, float(r)) for r in rates]


@register_protocol("per_modality", (), "imbalanced missing: one rate per modality (MissBench); rates are "
                   "specifications such as 'L0.1+A0.5+V0.3' or mappings")
def _per_modality_protocol(modalities: tuple[str, ...], rates: Iterable[Any]) -> list[Setting]:
    rates = list(rates)
    if not rates:
        rates = _default_per_modality(modalities)
    return [PerModalitySetting(modalities, parse_modality_rates(r, modalities)) for r in rates]


@register_protocol("cyin_instance", CYIN_PROBS, "CyIN's instance-level protocol: each sample incomplete with "
                   "probability p, then a uniform incomplete pattern")
def _cyin_instance_protocol(modalities: tuple[str, ...], rates: Iterable[float]) -> list[Setting]:
    return [CyINInstanceSetting(modalities, float(p)) for p in rates]


@register_protocol("cyin_dataset", CYIN_RATES, "CyIN's dataset-level protocol: missing rate over all slots, "
                   "one modality kept per sample, optionally per test batch", ("batch_size",))
def _cyin_dataset_protocol(modalities: tuple[str, ...], rates: Iterable[float], *,
                           batch_size: int | None = None) -> list[Setting]:
    return [CyINDatasetSetting(modalities, float(r), batch_size) for r in rates]


def protocol_settings(protocol: str, modalities: Modalities, rates: Iterable[Any] | None = None,
                      **options: Any) -> list[Setting]:
    """The settings of a registered protocol, in sweep order, names unique.

    Args:
        protocol: a key of :data:`PROTOCOLS`: ``random`` (MR sweep plus fixed patterns; option
            ``patterns``), ``steps`` (step rates 0.0 ... 0.9), ``per_modality`` (rate
            specifications such as ``"L0.1+A0.5+V0.3"``), ``cyin_instance`` (probabilities
            0.1 ... 1.0), ``cyin_dataset`` (rates 0.1 ... 0.7; option ``batch_size``).
        modalities: modality names.
        rates: what the protocol sweeps; None gives its defaults.
        **options: the protocol's options.

    Raises:
        flowtransfer.io.InputError: an unknown protocol or option, a bad rate, or two settings
            with the same name (e.g. rates 0.3 and 0.30).
    """
    from flowtransfer.io import InputError

    if protocol not in PROTOCOLS:
        raise InputError(f"unknown missing protocol {protocol!r}; known: {sorted(PROTOCOLS)}")
    spec = PROTOCOLS[protocol]
    bad = [k for k in options if k not in spec.options]
    if bad:
        allowed = ", ".join(spec.options) or "none"
        raise InputError(f"protocol {protocol!r} has no option {bad[0]!r} (its options: {allowed})")
    names = _names(modalities)
    sweep = spec.default_rates if rates is None else tuple(rates)
    try:
        settings = spec.build(names, sweep, **options)
    except (ValueError, TypeError) as err:
        raise InputError(f"protocol {protocol!r}: {err}") from err
    seen: dict[str, int] = {}
    for i, s in enumerate(settings):
        if s.name in seen:
            raise InputError(f"protocol {protocol!r}: settings {seen[s.name]} and {i} are both {s.name}; give one")
        seen[s.name] = i
    return settings


# --------------------------------------------------------------------------------------------------
# saving masks with results
# --------------------------------------------------------------------------------------------------


_STEP_KEY = "__steps__"
_SEP = "|"


def save_masks(path: str | Path, masks: Mapping[str, np.ndarray], modalities: Sequence[str],
               step_masks: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> Path:
    """Write named masks (e.g. ``{"mr=0.3": mask}``), the modality order and optionally step masks
    (``{"steps=0.3": {m: (N, T_m) bool}}``) to one ``.npz``, atomically.

    Step masks are stored under ``"__steps__|<setting>|<modality>"``; :func:`load_masks` with
    ``steps=True`` reads them back.
    """
    import io as _io

    from flowtransfer.io import atomic_write_bytes

    arrays: dict[str, np.ndarray] = {k: np.asarray(v, bool) for k, v in masks.items()}
    for setting, per_mod in (step_masks or {}).items():
        for m, arr in per_mod.items():
            if _SEP in setting or _SEP in m:
                raise ValueError(f"setting and modality names may not contain {_SEP!r}: {setting!r}, {m!r}")
            arr = np.asarray(arr)
            if arr.ndim != 2:
                raise ValueError(f"step mask {setting!r}/{m!r}: expected an (N, T) array, got shape {arr.shape}")
            arrays[f"{_STEP_KEY}{_SEP}{setting}{_SEP}{m}"] = arr.astype(bool)
    buf = _io.BytesIO()
    np.savez_compressed(buf, __modalities__=np.asarray(list(modalities), dtype=str), **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def load_masks(path: str | Path, *, steps: bool = False) -> Any:
    """Read masks written by :func:`save_masks` (no pickled objects are allowed).

    Returns ``(masks, modalities)``; with ``steps=True``
    ``(masks, modalities, {setting: {modality: (N, T_m) bool}})``.
    """
    with np.load(path, allow_pickle=False) as f:
        mods = tuple(str(x) for x in f["__modalities__"])
        masks = {k: f[k].astype(bool) for k in f.files if k != "__modalities__" and not k.startswith(_STEP_KEY + _SEP)}
        if not steps:
            return masks, mods
        step: dict[str, dict[str, np.ndarray]] = {}
        for k in f.files:
            if k.startswith(_STEP_KEY + _SEP):
                _, setting, m = k.split(_SEP, 2)
                step.setdefault(setting, {})[m] = f[k].astype(bool)
        return masks, mods, step
