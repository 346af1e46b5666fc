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

**Encoders (optional).** A modality may carry a learned encoder applied to its raw input before the
convolution, e.g. :class:`~flowtransfer.models.text.BertTextEncoder` turning MMSA's ``text_bert``
token rows ``(B, 3, T)`` into hidden states ``(B, 768, T)``. The encoder must keep the sequence
length and expose ``out_channels`` (the convolution's input width); rows where the modality is
absent are never passed to it.

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


def _encoder_width(encoder: nn.Module, where: str) -> int:
    width = getattr(encoder, "out_channels", None)
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise TypeError(f"{where}: an encoder must expose an int attribute out_channels >= 1, got {width!r}")
    return width


class TemporalExtractor(nn.Module):
    r"""One modality's shallow extractor: ``Conv1d(in, out, k, padding='same', bias=False)``, then
    resampling to ``target_length`` when one is set; optionally an encoder runs first.

    .. math:: h = \mathrm{resample}_{T^\star}\big(W * E(x)\big), \quad x \in \mathbb R^{B\times C_{in}\times T}

    with :math:`E` the identity unless ``encoder`` is given.

    Args:
        in_channels: input feature width :math:`C_{in}`.
        out_channels: output width ``d``.
        kernel_size: temporal kernel (DiCMoR: 5). Any size works for any ``T >= 1``: the input is
            zero-padded so the output keeps length ``T`` (the released code does not pad: 50 -> 46).
        target_length: if given, the output length; else the output keeps the input length.
        bias: add a bias (DiCMoR: no).
        encoder: optional module ``(B, in_channels, T) -> (B, encoder.out_channels, T)`` applied
            before the convolution (whose input width is then ``encoder.out_channels``). If it has an
            ``in_channels`` attribute it must equal ``in_channels``.

    Shapes: ``(B, in_channels, T) -> (B, out_channels, target_length or T)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 5,
        target_length: int | None = None,
        bias: bool = False,
        encoder: nn.Module | None = None,
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
        conv_in = in_channels
        if encoder is not None:
            conv_in = _encoder_width(encoder, "TemporalExtractor")
            enc_in = getattr(encoder, "in_channels", None)
            if enc_in is not None and int(enc_in) != in_channels:
                raise ValueError(
                    f"in_channels={in_channels} disagrees with the encoder's in_channels={enc_in} "
                    "(with an encoder, in_channels is the width of the encoder's input)"
                )
        self.encoder = encoder
        self.conv = nn.Conv1d(conv_in, out_channels, kernel_size, padding="same", bias=bias)

    def encode(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        """Apply the encoder (identity without one): ``(B, in_channels, T) -> (B, conv_in, T)``.

        ``rows`` (``(B,)`` bool) selects the rows that go through the encoder; the others come out
        as zeros and their input is never read (it may hold NaN). Without an encoder, unselected
        rows are zeroed in the same way.
        """
        if rows is not None:
            if rows.dtype != torch.bool or rows.shape != (x.shape[0],):
                raise ValueError(f"rows must be a ({x.shape[0]},) bool tensor, got {tuple(rows.shape)} {rows.dtype}")
            if self.encoder is None:
                return torch.where(rows.view(-1, 1, 1), x, torch.zeros((), dtype=x.dtype, device=x.device))
        if self.encoder is None:
            return x
        if rows is None:
            h = self.encoder(x)
        else:
            idx = rows.nonzero().squeeze(1)
            w = self.conv.weight
            h = x.new_zeros((x.shape[0], self.conv.in_channels, x.shape[-1]), dtype=w.dtype, device=w.device)
            if idx.numel():  # absent rows cost nothing and never reach the encoder
                h = h.index_copy(0, idx, self.encoder(x.index_select(0, idx)).to(w.dtype))
        if h.dim() != 3 or h.shape[0] != x.shape[0] or h.shape[1:] != (self.conv.in_channels, x.shape[-1]):
            raise ValueError(
                f"the encoder must map (batch, {self.in_channels}, T) to (batch, {self.conv.in_channels}, T); "
                f"got {tuple(h.shape)} from input {tuple(x.shape)}"
            )
        return h

    def forward(self, x: Tensor, length: int | None = None, rows: Tensor | None = None) -> Tensor:
        """Extract ``(B, in_channels, T) -> (B, out_channels, L)``, ``L = length or target_length or T``.

        ``rows``: optional ``(B,)`` bool of the rows to use; the others are zeros before the
        convolution (and never reach the encoder), see :meth:`encode`.
        """
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (batch, {self.in_channels}, time), got shape {tuple(x.shape)}"
            )
        if x.shape[-1] < 1:
            raise ValueError("input has zero time steps")
        h = self.conv(self.encode(x, rows))
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
        encoders: optional ``{m: module}`` run on modality ``m``'s raw input before its convolution
            (e.g. ``{"L": BertTextEncoder(...)}``); ``input_dims[m]`` is then the encoder's input
            width (3 token rows for BERT) and the convolution reads ``encoder.out_channels``.

    ``forward(features, present=None)`` maps ``{m: (B, C_m, T_m)}`` to ``{m: (B, d, T*)}``. Pass the
    ``(B, M)`` presence mask (columns follow ``modalities``) when absent slots hold NaN: they are
    replaced by zeros *before* the convolution. (Masking after the convolution is not enough: the
    weight gradient multiplies the NaN input by a zero output gradient and becomes NaN.)
    For a modality with an encoder, only the present rows go through the encoder (gathered with
    ``index_select``, scattered back into zeros), so absent rows cost nothing and their content is
    never read; the convolution sees zeros there, as for the other modalities.
    A subset of the modalities may be passed; the common length is then taken over that subset.
    """

    def __init__(
        self,
        input_dims: Mapping[str, int],
        d: int,
        kernel_size: int = 5,
        target_length: int | None = None,
        bias: bool = False,
        encoders: Mapping[str, nn.Module] | None = None,
    ) -> None:
        if not input_dims:
            raise ValueError("ModalityExtractors needs at least one modality")
        encoders = dict(encoders or {})
        unknown = [m for m in encoders if m not in input_dims]
        if unknown:
            raise KeyError(f"encoders given for unknown modalities {unknown}; input_dims has {list(input_dims)}")
        for m, enc in encoders.items():
            if not isinstance(enc, nn.Module):
                raise TypeError(f"modality {m!r}: encoder must be an nn.Module, got {type(enc).__name__}")
            _encoder_width(enc, f"modality {m!r}")
        super().__init__(
            {
                m: TemporalExtractor(int(c), d, kernel_size, None, bias, encoder=encoders.get(m))
                for m, c in input_dims.items()
            }
        )
        self.modalities: tuple[str, ...] = tuple(input_dims)
        self.d = d
        self.target_length = target_length

    @property
    def encoders(self) -> dict[str, nn.Module]:
        """``{m: encoder}`` for the modalities that have one (e.g. to switch fine-tuning per stage)."""
        return {m: ext.encoder for m, ext in self.items() if ext.encoder is not None}

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
            rows = None if present is None else present[:, self.modalities.index(m)]
            out[m] = self[m](x, length, rows)
        return out
