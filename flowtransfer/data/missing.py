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
- :class:`MissingSetting` / :func:`evaluation_settings` — named settings (``"mr=0.3"``,
  ``"pattern=L+A"``) as the evaluation loops and result rows use them.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
]

#: the missing rates of GCNet-style evaluations
DEFAULT_RATES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)

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
# named settings
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MissingSetting:
    """One evaluation setting: a random missing rate (``kind="mr"``) or a fixed pattern (``"pattern"``).

    ``name`` is ``"mr=0.3"`` or ``"pattern=L+A"``, as result rows carry it. ``mask(n, seed)``
    builds the setting's mask; ``expected_rate`` is the rate it realises (for MR, ``min(MR,
    (M-1)/M)`` up to ``1/(2nM)``).
    """

    kind: str
    modalities: tuple[str, ...]
    rate: float | None = None
    available: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
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

    def describe(self, mask: np.ndarray) -> dict[str, float | str]:
        """``{"setting", "requested_rate", "realised_rate"}`` for a mask of this setting."""
        requested = float(self.rate) if self.kind == "mr" else self.expected_rate
        return {"setting": self.name, "requested_rate": requested, "realised_rate": realised_missing_rate(mask)}

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
# saving masks with results
# --------------------------------------------------------------------------------------------------


def save_masks(path: str | Path, masks: dict[str, np.ndarray], modalities: Sequence[str]) -> Path:
    """Write named masks (e.g. ``{"mr=0.3": mask}``) and the modality order to one ``.npz``, atomically."""
    import io as _io

    from flowtransfer.io import atomic_write_bytes

    buf = _io.BytesIO()
    np.savez_compressed(
        buf, __modalities__=np.asarray(list(modalities), dtype=str), **{k: np.asarray(v, bool) for k, v in masks.items()}
    )
    return atomic_write_bytes(path, buf.getvalue())


def load_masks(path: str | Path) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Read masks written by :func:`save_masks` (no pickled objects are allowed)."""
    with np.load(path, allow_pickle=False) as f:
        mods = tuple(str(x) for x in f["__modalities__"])
        return {k: f[k].astype(bool) for k in f.files if k != "__modalities__"}, mods
