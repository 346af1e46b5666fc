r"""Shallow temporal extractors that bring every modality to one width and one length.

DiCMoR (Wang et al., ICCV 2023) maps each modality's pre-extracted features to a common width
``d`` with one ``Conv1d`` (kernel 5, no bias) before the flows. Here that convolution is followed by
a resampling step so that every modality also shares one sequence length, which the flows, the
transfers between modalities and the fusion modules need.

Departures from the released code (``trains/singleTask/model/dicmor.py``):

* **'same' padding.** The released convolution has no padding, so a length-50 input leaves with
  length 46, and any input shorter than the kernel (an utterance vector with ``T = 1``, a short clip)
  cannot be processed at all. We zero-pad so that the output keeps the input length ``T``; a kernel
  of any size works with ``T = 1``. The four border steps the released code drops are kept.
* **A common length.** Modalities may arrive with different lengths (MMSA's unaligned pickles, 28
  image rows against 20 audio frames, ``T = 1`` vectors). The rule is :func:`common_length` followed
  by :func:`resample_time`, documented there.

Shapes: every tensor is ``(batch, channels, time)``.

Example:
    >>> import torch
    >>> ext = ModalityExtractors({"L": 768, "A": 5, "V": 20}, d=32)
    >>> out = ext({"L": torch.randn(4, 768, 50), "A": torch.randn(4, 5, 375), "V": torch.randn(4, 20, 500)})
    >>> {m: tuple(h.shape) for m, h in out.items()}
    {'L': (4, 32, 50), 'A': (4, 32, 50), 'V': (4, 32, 50)}
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["common_length", "resample_time", "TemporalExtractor", "ModalityExtractors"]


def common_length(lengths: Mapping[str, int], target_length: int | None = None) -> int:
    r"""The one sequence length every modality is brought to.

    Rule: ``target_length`` when given, otherwise the **shortest** length over the modalities,
    :math:`T^\star = \min_m T_m`. Taking the minimum never invents time steps: longer modalities are
    summarised by averaging over windows (see :func:`resample_time`), none is stretched. With an
    utterance vector among the inputs (``T = 1``) every modality becomes one vector, its time mean.

    Args:
        lengths: sequence length per modality name.
        target_length: a fixed length (>= 1) to use instead of the minimum.

    Raises:
        ValueError: no modality, a length below 1, or a target below 1.
    """
    if target_length is not None:
        if int(target_length) < 1:
            raise ValueError(f"target_length must be >= 1, got {target_length}")
        return int(target_length)
    if not lengths:
        raise ValueError("common_length needs at least one modality")
    for name, length in lengths.items():
        if int(length) < 1:
            raise ValueError(f"modality {name!r} has sequence length {length}; expected >= 1")
    return int(min(int(t) for t in lengths.values()))


def resample_time(x: Tensor, length: int) -> Tensor:
    r"""Resample ``x`` of shape ``(B, C, T)`` to ``(B, C, length)``.

    * ``length == T``: returned unchanged.
    * ``length < T``: adaptive average pooling, output step :math:`i` is the mean of the inputs in
      window :math:`[\lfloor iT/L \rfloor, \lceil (i+1)T/L \rceil)`. ``length = 1`` is the time mean.
    * ``length > T``: linear interpolation (``align_corners=False``); a ``T = 1`` input is repeated.
    """
    if x.dim() != 3:
        raise ValueError(f"expected a (batch, channels, time) tensor, got shape {tuple(x.shape)}")
    if length < 1:
        raise ValueError(f"target length must be >= 1, got {length}")
    t = x.shape[-1]
    if t == length:
        return x
    if length < t:
        return F.adaptive_avg_pool1d(x, length)
    return F.interpolate(x, size=length, mode="linear", align_corners=False)


class TemporalExtractor(nn.Module):
    r"""One modality's shallow extractor: ``Conv1d(in, out, k, padding='same', bias=False)``, then
    resampling to ``target_length`` when one is set.

    .. math:: h = \mathrm{resample}_{T^\star}\big(W * x\big), \quad x \in \mathbb R^{B\times C_{in}\times T}

    Args:
        in_channels: input feature width :math:`C_{in}`.
        out_channels: output width ``d``.
        kernel_size: temporal kernel (DiCMoR: 5). Any size works for any ``T >= 1``: the input is
            zero-padded so the output keeps length ``T`` (the released code does not pad: 50 -> 46).
        target_length: if given, the output length; else the output keeps the input length.
        bias: add a bias (DiCMoR: no).

    Shapes: ``(B, in_channels, T) -> (B, out_channels, target_length or T)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 5,
        target_length: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channels must be >= 1, got in={in_channels}, out={out_channels}")
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        if target_length is not None and target_length < 1:
            raise ValueError(f"target_length must be >= 1, got {target_length}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.target_length = target_length
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding="same", bias=bias)

    def forward(self, x: Tensor, length: int | None = None) -> Tensor:
        """Extract ``(B, in_channels, T) -> (B, out_channels, L)``, ``L = length or target_length or T``."""
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (batch, {self.in_channels}, time), got shape {tuple(x.shape)}"
            )
        if x.shape[-1] < 1:
            raise ValueError("input has zero time steps")
        h = self.conv(x)
        length = length if length is not None else self.target_length
        return h if length is None else resample_time(h, length)


class ModalityExtractors(nn.ModuleDict):
    r"""A :class:`TemporalExtractor` per modality, all to width ``d`` and one common length.

    Args:
        input_dims: input width per modality name (any names, any number of modalities).
        d: common output width.
        kernel_size: temporal kernel of every extractor (DiCMoR: 5).
        target_length: common output length; ``None`` uses :func:`common_length`'s rule (the
            shortest input length of the call).

    ``forward(features, present=None)`` maps ``{m: (B, C_m, T_m)}`` to ``{m: (B, d, T*)}``. Pass the
    ``(B, M)`` presence mask (columns follow ``modalities``) when absent slots hold NaN: they are
    replaced by zeros *before* the convolution. (Masking after the convolution is not enough: the
    weight gradient multiplies the NaN input by a zero output gradient and becomes NaN.)
    A subset of the modalities may be passed; the common length is then taken over that subset.
    """

    def __init__(
        self,
        input_dims: Mapping[str, int],
        d: int,
        kernel_size: int = 5,
        target_length: int | None = None,
        bias: bool = False,
    ) -> None:
        if not input_dims:
            raise ValueError("ModalityExtractors needs at least one modality")
        super().__init__(
            {m: TemporalExtractor(int(c), d, kernel_size, None, bias) for m, c in input_dims.items()}
        )
        self.modalities: tuple[str, ...] = tuple(input_dims)
        self.d = d
        self.target_length = target_length

    def forward(  # type: ignore[override]
        self, features: Mapping[str, Tensor], present: Tensor | None = None
    ) -> dict[str, Tensor]:
        unknown = [m for m in features if m not in self.modalities]
        if unknown:
            raise KeyError(f"unknown modalities {unknown}; extractors exist for {list(self.modalities)}")
        if not features:
            raise ValueError("no features given")
        lengths = {}
        for m, x in features.items():
            if x.dim() != 3:
                raise ValueError(f"modality {m!r}: expected (batch, channels, time), got {tuple(x.shape)}")
            lengths[m] = x.shape[-1]
        length = common_length(lengths, self.target_length)
        if present is not None:
            batch = next(iter(features.values())).shape[0]
            if present.shape != (batch, len(self.modalities)) or present.dtype != torch.bool:
                raise ValueError(
                    f"present must be a bool tensor of shape ({batch}, {len(self.modalities)}), "
                    f"got {tuple(present.shape)} {present.dtype}"
                )
        out = {}
        for m, x in features.items():
            if present is not None:
                keep = present[:, self.modalities.index(m)].view(-1, 1, 1)
                x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
            out[m] = self[m](x, length)
        return out
