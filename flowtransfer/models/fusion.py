r"""Fusion modules: one interface, several ways to combine modalities into one vector.

Every fusion maps ``features: {m: (B, d, T_m)}`` and an optional presence mask ``present`` of shape
``(B, M)`` (bool, columns in ``self.modalities`` order) to a representation ``(B, out_dim)``, which a
head from :mod:`flowtransfer.models.heads` turns into a prediction.

How each treats absent modalities (``present`` False; those slots may hold NaN):

* :class:`MulTFusion` and :class:`ConcatMLPFusion` zero-fill them (the zero-fill convention of the
  baselines); a method that recovers features passes ``present=None`` after filling them in.
* :class:`LateFusion` handles them natively: each modality gets its own representation and the
  representations are averaged over the *present* modalities only, so an absent modality's values
  have no effect at all.

In every case absent slots are replaced *before* any layer reads them, so NaN placeholders never
reach the output or the gradients.

Example:
    >>> import torch
    >>> fusion = build_fusion("late", ("L", "A", "V"), d=32)
    >>> feats = {m: torch.randn(4, 32, 50) for m in "LAV"}
    >>> present = torch.tensor([[True, True, False]] * 4)
    >>> fusion(feats, present).shape
    torch.Size([4, 32])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .mult import MulT, MulTConfig

__all__ = ["Fusion", "MulTFusion", "ConcatMLPFusion", "LateFusion", "build_fusion", "FUSIONS"]


class Fusion(nn.Module):
    """Base class: ``forward(features, present=None) -> (B, out_dim)``.

    Subclasses set ``out_dim`` and implement :meth:`fuse` on validated inputs. Attributes:
    ``modalities`` (the mask's column order), ``d`` (input width), ``out_dim``.
    """

    out_dim: int

    def __init__(self, modalities: Sequence[str], d: int) -> None:
        super().__init__()
        modalities = tuple(modalities)
        if len(modalities) < 2 or len(set(modalities)) != len(modalities):
            raise ValueError(f"fusion needs 2 or more distinct modalities, got {modalities}")
        if d < 1:
            raise ValueError(f"d must be >= 1, got {d}")
        self.modalities, self.d = modalities, d

    def check(self, features: Mapping[str, Tensor], present: Tensor | None) -> int:
        """Validate the inputs; return the batch size."""
        missing = [m for m in self.modalities if m not in features]
        extra = [m for m in features if m not in self.modalities]
        if missing or extra:
            raise KeyError(f"{type(self).__name__} expects {list(self.modalities)}; missing {missing}, unknown {extra}")
        batch = features[self.modalities[0]].shape[0]
        for m in self.modalities:
            x = features[m]
            if x.dim() != 3 or x.shape[0] != batch or x.shape[1] != self.d or x.shape[2] < 1:
                raise ValueError(f"modality {m!r}: expected ({batch}, {self.d}, T), got {tuple(x.shape)}")
        if present is not None and (present.shape != (batch, len(self.modalities)) or present.dtype != torch.bool):
            raise ValueError(
                f"present must be a bool tensor of shape ({batch}, {len(self.modalities)}), "
                f"got {tuple(present.shape)} {present.dtype}"
            )
        return batch

    def zero_absent(self, features: Mapping[str, Tensor], present: Tensor | None) -> dict[str, Tensor]:
        """Copies of ``features`` with absent slots set to 0 (NaN-safe: uses ``torch.where``)."""
        if present is None:
            return dict(features)
        return {
            m: torch.where(present[:, i].view(-1, 1, 1), features[m], torch.zeros((), dtype=features[m].dtype,
                                                                                   device=features[m].device))
            for i, m in enumerate(self.modalities)
        }

    def forward(self, features: Mapping[str, Tensor], present: Tensor | None = None) -> Tensor:
        self.check(features, present)
        return self.fuse(features, present)

    def fuse(self, features: Mapping[str, Tensor], present: Tensor | None) -> Tensor:  # pragma: no cover
        raise NotImplementedError


def _mlp(in_dim: int, hidden: int, out_dim: int, dropout: float) -> nn.Sequential:
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, out_dim))
    return nn.Sequential(*layers)


class MulTFusion(Fusion):
    """:class:`~flowtransfer.models.mult.MulT` as a fusion: ``out_dim = M (M-1) d``.

    Keyword arguments go to :class:`MulT` (heads, layers, dropouts, causal, pool, ...). Absent
    modalities are zero-filled (their positional encodings are kept, unlike DiCMoR's copy).
    """

    def __init__(self, modalities: Sequence[str], d: int, **mult_kwargs) -> None:
        super().__init__(modalities, d)
        self.mult = MulT(self.modalities, d=d, **mult_kwargs)
        self.out_dim = self.mult.out_dim

    @classmethod
    def from_config(cls, modalities: Sequence[str], config: MulTConfig) -> "MulTFusion":
        """Build from a :class:`MulTConfig` (e.g. ``MulTConfig.mosi()``)."""
        kwargs = config.mult_kwargs()
        return cls(modalities, kwargs.pop("d"), **kwargs)

    def fuse(self, features: Mapping[str, Tensor], present: Tensor | None) -> Tensor:
        return self.mult(features, present)


class ConcatMLPFusion(Fusion):
    r"""Mean over time, concatenation, MLP: :math:`\mathrm{MLP}([\bar x_1; \dots; \bar x_M])`.

    ``(B, M d) -> hidden -> out_dim`` (defaults: ``hidden = out_dim = M d``). Absent modalities are
    zero-filled.
    """

    def __init__(
        self, modalities: Sequence[str], d: int, hidden: int | None = None, out_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(modalities, d)
        width = len(self.modalities) * d
        self.out_dim = width if out_dim is None else out_dim
        self.mlp = _mlp(width, width if hidden is None else hidden, self.out_dim, dropout)

    def fuse(self, features: Mapping[str, Tensor], present: Tensor | None) -> Tensor:
        filled = self.zero_absent(features, present)
        return self.mlp(torch.cat([filled[m].mean(dim=-1) for m in self.modalities], dim=-1))


class LateFusion(Fusion):
    r"""Per-modality MLPs on time-pooled features, averaged over present modalities.

    .. math:: r = \frac{\sum_m p_m\, \mathrm{MLP}_m(\bar x_m)}{\sum_m p_m}

    with :math:`p_m \in \{0, 1\}` the presence mask (all ones when ``present`` is None). Each
    ``MLP_m`` maps ``d -> hidden -> out_dim`` (defaults ``hidden = out_dim = d``). The output for a
    sample does not depend on its absent modalities at all; a sample with no present modality is an
    error. This makes late fusion a natural missing-modality baseline.
    """

    def __init__(
        self, modalities: Sequence[str], d: int, hidden: int | None = None, out_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(modalities, d)
        self.out_dim = d if out_dim is None else out_dim
        self.mlps = nn.ModuleDict(
            {m: _mlp(d, d if hidden is None else hidden, self.out_dim, dropout) for m in self.modalities}
        )

    def fuse(self, features: Mapping[str, Tensor], present: Tensor | None) -> Tensor:
        filled = self.zero_absent(features, present)  # absent inputs never reach a layer
        reps = torch.stack([self.mlps[m](filled[m].mean(dim=-1)) for m in self.modalities], dim=1)  # (B, M, D)
        if present is None:
            return reps.mean(dim=1)
        count = present.sum(dim=1)
        if bool((count == 0).any()):
            rows = torch.nonzero(count == 0).flatten().tolist()
            raise ValueError(f"samples {rows[:10]} have no present modality; late fusion needs at least one")
        weights = present.to(reps.dtype) / count.unsqueeze(1).to(reps.dtype)  # (B, M)
        reps = torch.where(present.unsqueeze(-1), reps, torch.zeros((), dtype=reps.dtype, device=reps.device))
        return torch.einsum("bm,bmd->bd", weights, reps)


FUSIONS: dict[str, type[Fusion]] = {"mult": MulTFusion, "concat": ConcatMLPFusion, "late": LateFusion}


def build_fusion(name: str, modalities: Sequence[str], d: int, **kwargs) -> Fusion:
    """Build a fusion by name: ``"mult"`` (:class:`MulTFusion`), ``"concat"``
    (:class:`ConcatMLPFusion`) or ``"late"`` (:class:`LateFusion`); ``kwargs`` go to its constructor."""
    if name not in FUSIONS:
        raise ValueError(f"unknown fusion {name!r}; expected one of {sorted(FUSIONS)}")
    return FUSIONS[name](modalities, d, **kwargs)
