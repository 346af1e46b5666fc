r"""Affine coupling over channels whose conditioner is a ``Conv1d`` stack over time.

The input ``x`` of shape ``(B, C, T)`` is split along channels into an identity half
:math:`x_a` (the first ``C // 2`` channels) and a transformed half :math:`x_b` (the other
``C - C // 2``; odd ``C`` is fine). A network reads :math:`x_a` (and an optional conditioning input)
and outputs a shift :math:`t` and a scale pre-activation :math:`h` for every channel of
:math:`x_b` and every time step:

.. math:: (h, t) = \mathrm{NN}([x_a; \text{context}]), \qquad y = [x_a;\ g(x_b; h, t)].

The network is ``Conv1d(kernel_size, 'same' padding) -> act -> Conv1d(1x1) -> act ->
Conv1d(1x1, zero-initialised)``. With ``kernel_size=1`` the map is pointwise in time, as in the
released DiCMoR code; ``kernel_size >= 3`` lets the scale and shift at time ``t`` see the identity
half at neighbouring times (the Jacobian stays block-triangular, so the log-det is unchanged in
form). Any ``T >= 1`` works: the padding keeps the length.

The layer computes channel-major (:mod:`~flowtransfer.flows.layout`): the halves are contiguous
row blocks of ``(C, B, T)`` and each convolution of the network is one matrix product
(:func:`~flowtransfer.flows.layout.conv1d_channel_major`) with the ``nn.Sequential``'s own
parameters, so ``net`` stays an ordinary module (its ``state_dict`` and its ``(B, C, T)`` call are
unchanged).

References: Dinh et al., *Density estimation using Real NVP*, ICLR 2017; Kingma & Dhariwal,
*Glow*, NeurIPS 2018; Wang et al., *DiCMoR*, ICCV 2023.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layout import ChannelMajorTransform, conv1d_channel_major

__all__ = ["AffineCoupling", "PointwiseConv1d", "SCALE_FUNCTIONS", "coupling_network"]

#: the scale functions :class:`AffineCoupling` accepts
SCALE_FUNCTIONS = ("sigmoid", "softclamp", "additive")

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class PointwiseConv1d(nn.Conv1d):
    """A ``Conv1d`` with kernel size 1, computed as one batched matmul (faster on CPU than the
    convolution kernel for these small widths). Same parameters and ``state_dict`` as ``Conv1d``."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.matmul(self.weight.squeeze(-1), x)
        return y if self.bias is None else y + self.bias.unsqueeze(-1)


def coupling_network(
    in_channels: int,
    out_channels: int,
    hidden: int = 64,
    kernel_size: int = 3,
    activation: str = "relu",
) -> nn.Sequential:
    """``Conv1d(k, same) -> act -> Conv1d(1) -> act -> Conv1d(1, zero init)``; keeps ``T``."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}")
    if kernel_size < 1:
        raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
    act = _ACTIVATIONS[activation]
    last = PointwiseConv1d(hidden, out_channels)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    # "same" padding: (k - 1) // 2 zeros before and k // 2 after, so T is kept for any T >= 1
    # (explicit, so even kernels need no padded copy inside the convolution)
    pad = ((kernel_size - 1) // 2, kernel_size // 2)
    first: list[nn.Module] = [nn.ConstantPad1d(pad, 0.0)] if pad[0] != pad[1] else []
    if kernel_size == 1:
        first.append(PointwiseConv1d(in_channels, hidden))
    else:
        first.append(nn.Conv1d(in_channels, hidden, kernel_size, padding=pad[0] if pad[0] == pad[1] else 0))
    return nn.Sequential(
        *first,
        act(),
        PointwiseConv1d(hidden, hidden),
        act(),
        last,
    )


class AffineCoupling(ChannelMajorTransform):
    r"""Affine coupling layer for ``(B, C, T)`` inputs (an nflows ``Transform``).

    Scale functions (``scale=``), for the transformed half :math:`x_b`:

    ``"sigmoid"`` (Glow; what DiCMoR's released code uses)
        :math:`y_b = (x_b + t)\,\sigma(h + 2)`, log-det :math:`\sum \log\sigma(h+2)`;
        inverse :math:`x_b = y_b / \sigma(h+2) - t`.
        The scale lies in :math:`(0, 1)`: the forward (data to noise) map can only contract, which
        keeps it and its log-det bounded above whatever the network outputs (stable training).
        The inverse divides by the scale, so it can expand without bound where the network drives
        :math:`\sigma(h+2)` towards 0 (up to :math:`1/\sigma(h+2)`, e.g. x100 at :math:`h=-6.6`):
        sampling and latent-to-data transfer are the sensitive direction. At initialisation
        (zero last layer) the layer scales :math:`x_b` by :math:`\sigma(2) \approx 0.88`.
    ``"softclamp"``
        :math:`y_b = x_b\, e^{c \tanh(h / c)} + t`, log-det :math:`\sum c\tanh(h/c)`;
        inverse :math:`x_b = (y_b - t)\, e^{-c\tanh(h/c)}`.
        An exp-scale whose log is softly clamped to :math:`(-c, c)`: each layer scales by a factor
        in :math:`(e^{-c}, e^{c})` in *both* directions, so neither the forward nor the inverse can
        blow up, and the layer is exactly the identity at initialisation. ``clamp`` sets :math:`c`.
    ``"additive"`` (NICE)
        :math:`y_b = x_b + t`, log-det 0, inverse :math:`x_b = y_b - t`. Volume preserving: the
        most stable and exactly invertible up to rounding, but the layer cannot change scale (leave
        that to ActNorm / the prior). The network then outputs only :math:`t`.

    Arguments:
        channels: number of channels :math:`C \ge 2`.
        hidden: hidden width of the network.
        kernel_size: temporal kernel of the first convolution (1 = pointwise, as released DiCMoR).
        scale: ``"sigmoid"``, ``"softclamp"`` or ``"additive"``.
        cond_channels: channels of the optional conditioning input ``context``, given as
            ``(B, cond_channels, T)`` or ``(B, cond_channels)`` (broadcast over time) and
            concatenated to the network input. 0 means unconditional.
        clamp: the bound :math:`c` of ``"softclamp"``.
        activation: ``"relu"`` (DiCMoR), ``"gelu"``, ``"elu"``, ``"silu"`` or ``"tanh"``.

    Shapes: ``(B, C, T) -> (B, C, T)``, log-det ``(B,)``.
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        kernel_size: int = 3,
        scale: Literal["sigmoid", "softclamp", "additive"] = "softclamp",
        cond_channels: int = 0,
        clamp: float = 2.0,
        activation: str = "relu",
    ):
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling needs channels >= 2 (it splits them in halves), got {channels}")
        if scale not in SCALE_FUNCTIONS:
            raise ValueError(f"unknown scale {scale!r}; choose one of {SCALE_FUNCTIONS}")
        if cond_channels < 0:
            raise ValueError(f"cond_channels must be >= 0, got {cond_channels}")
        if scale == "softclamp" and not clamp > 0:
            raise ValueError(f"clamp must be > 0, got {clamp}")
        self.channels = int(channels)
        self.split = self.channels // 2  # identity half: [0, split); transformed: [split, C)
        self.transformed = self.channels - self.split
        self.scale = scale
        self.clamp = float(clamp)
        self.cond_channels = int(cond_channels)
        self.kernel_size = int(kernel_size)
        mult = 1 if scale == "additive" else 2
        self.net = coupling_network(
            self.split + self.cond_channels, mult * self.transformed, hidden, kernel_size, activation
        )
        # _network_cm computes every Conv1d as stride 1, dilation 1, one group, integer padding
        assert all(
            c.stride == (1,) and c.dilation == (1,) and c.groups == 1 and not isinstance(c.padding, str)
            for c in self.net if isinstance(c, nn.Conv1d)
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, scale={self.scale!r}, kernel_size={self.kernel_size}, "
            f"cond_channels={self.cond_channels}"
        )

    reads_context = True

    # ------------------------------------------------------------------ helpers
    def _network_cm(self, x: Tensor) -> Tensor:
        """``self.net`` applied to a channel-major input ``(C_in, B, T) -> (C_out, B, T)``."""
        pad = (0, 0)
        for layer in self.net:
            if isinstance(layer, nn.ConstantPad1d):
                pad = tuple(layer.padding)
            elif isinstance(layer, nn.Conv1d):
                p = layer.padding[0] if isinstance(layer.padding, tuple) else 0
                x = conv1d_channel_major(x, layer.weight, layer.bias, (pad[0] + p, pad[1] + p))
                pad = (0, 0)
            else:  # activations act elementwise, whatever the layout
                x = layer(x)
        return x

    def _params_cm(self, xa: Tensor, context: Tensor | None) -> tuple[Tensor | None, Tensor]:
        """Scale pre-activation ``h`` and shift ``t``, each ``(C - C//2, B, T)`` (``h`` is ``None``
        for the additive scale); ``context`` is channel-major ``(cond, B, T)`` or ``None``."""
        inp = xa if context is None else torch.cat([xa, context.to(xa.dtype)], dim=0)
        out = self._network_cm(inp)
        if self.scale == "additive":
            return None, out
        return out[: self.transformed], out[self.transformed :]

    # ------------------------------------------------------------------ transform (channel-major)
    def forward_cm(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        xa, xb = x[: self.split], x[self.split :]
        h, t = self._params_cm(xa, context)
        if self.scale == "sigmoid":
            z = h + 2.0
            yb = (xb + t) * torch.sigmoid(z)
            logdet = F.logsigmoid(z).sum((0, 2))
        elif self.scale == "softclamp":
            log_s = self.clamp * torch.tanh(h / self.clamp)
            yb = torch.addcmul(t, xb, torch.exp(log_s))
            logdet = log_s.sum((0, 2))
        else:
            yb = xb + t
            logdet = x.new_zeros(x.shape[1])
        return torch.cat([xa, yb], dim=0), logdet

    def inverse_cm(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ya, yb = y[: self.split], y[self.split :]
        h, t = self._params_cm(ya, context)
        if self.scale == "sigmoid":
            z = h + 2.0
            xb = yb / torch.sigmoid(z) - t
            logdet = -F.logsigmoid(z).sum((0, 2))
        elif self.scale == "softclamp":
            log_s = self.clamp * torch.tanh(h / self.clamp)
            xb = (yb - t) / torch.exp(log_s)  # the forward's exact factor: one rounding
            logdet = -log_s.sum((0, 2))
        else:
            xb = yb - t
            logdet = y.new_zeros(y.shape[1])
        return torch.cat([ya, xb], dim=0), logdet
