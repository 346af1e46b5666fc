r"""Conditioners: the networks that predict a coupling's parameters from the identity half.

The contract (what a coupling needs from its conditioner):

    ``factory(in_channels, out_channels) -> nn.Module``

The module maps ``(B, in_channels, T) -> (B, out_channels, T)`` for every ``T >= 1`` and keeps the
length. ``in_channels`` is the identity half plus any conditioning channels; ``out_channels`` is
the number of parameters per transformed channel times the transformed channels, laid out
parameter-major (rows ``[p * C_b, (p + 1) * C_b)`` hold parameter ``p`` of every transformed
channel). A conditioner should output zeros at initialisation (a zero-initialised last layer): every
coupling of this package is then exactly the identity at initialisation.

Optionally the module also implements ``forward_cm(x)`` on channel-major ``(in_channels, B, T)``
tensors, returning ``(out_channels, B, T)`` (:mod:`~flowtransfer.flows.layout`); couplings use it
when present and otherwise call the module on ``(B, C, T)`` (two transposed copies). A module is
always called as a whole, never interpreted layer by layer, so any layer works inside it (a
``BatchNorm1d`` normalises over batch and time, as on any ``(B, C, T)`` input).

:class:`TemporalConditioner` is the default: ``Conv1d(k, same) -> act -> Conv1d(1) -> act ->
Conv1d(1, zero init)``, DiCMoR's coupling network with a temporal first kernel.

Example:
    >>> from functools import partial
    >>> factory = partial(TemporalConditioner, hidden=16, kernel_size=3)
    >>> net = factory(2, 6)
    >>> net(torch.randn(4, 2, 10)).shape
    torch.Size([4, 6, 10])
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import Tensor, nn

from .layout import conv1d_channel_major

__all__ = [
    "ACTIVATIONS",
    "ConditionerFactory",
    "PointwiseConv1d",
    "TemporalConditioner",
    "apply_conditioner_cm",
    "resolve_conditioner",
    "temporal_conditioner",
]

#: a callable ``(in_channels, out_channels) -> nn.Module`` (see the module docstring)
ConditionerFactory = Callable[[int, int], nn.Module]

#: activations :class:`TemporalConditioner` accepts
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class PointwiseConv1d(nn.Conv1d):
    """A ``Conv1d`` with kernel size 1, computed as one batched matmul (faster on CPU than the
    convolution kernel for these small widths). Same parameters and ``state_dict`` as ``Conv1d``."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.matmul(self.weight.squeeze(-1), x)
        return y if self.bias is None else y + self.bias.unsqueeze(-1)


class TemporalConditioner(nn.Sequential):
    r"""``Conv1d(kernel_size, 'same') -> act -> Conv1d(1) -> act -> Conv1d(1, zero init)``.

    With ``kernel_size=1`` the network is pointwise in time (DiCMoR's released code); larger kernels
    let the parameters at time ``t`` see the identity half at neighbouring times (the coupling's
    Jacobian stays block-triangular). "Same" padding puts ``(k - 1) // 2`` zeros before and
    ``k // 2`` after every sequence, so ``T`` is kept for any ``T >= 1`` and even kernels work.

    It is an ``nn.Sequential`` (its ``state_dict`` keys are the layer indices, as in earlier
    releases) that also computes itself channel-major in :meth:`forward_cm`: each convolution is
    one matrix product (:func:`~flowtransfer.flows.layout.conv1d_channel_major`) with the layers'
    own parameters. :meth:`forward_cm` knows this network's structure; it is not a general
    interpreter of ``Sequential`` s.

    Arguments:
        in_channels, out_channels: the conditioner contract (see the module docstring).
        hidden: hidden width.
        kernel_size: temporal kernel of the first convolution (>= 1).
        activation: one of :data:`ACTIVATIONS`.

    Shapes: ``(B, in, T) -> (B, out, T)``; :meth:`forward_cm`: ``(in, B, T) -> (out, B, T)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int = 64,
        kernel_size: int = 3,
        activation: str = "relu",
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if int(kernel_size) != kernel_size or kernel_size < 1:
            raise ValueError(f"kernel_size must be an integer >= 1, got {kernel_size}")
        if int(hidden) != hidden or hidden < 1:
            raise ValueError(f"hidden must be an integer >= 1, got {hidden}")
        kernel_size, hidden = int(kernel_size), int(hidden)
        act = ACTIVATIONS[activation]
        pad = ((kernel_size - 1) // 2, kernel_size // 2)
        layers: list[nn.Module] = [nn.ConstantPad1d(pad, 0.0)] if pad[0] != pad[1] else []
        if kernel_size == 1:
            layers.append(PointwiseConv1d(in_channels, hidden))
        else:
            layers.append(nn.Conv1d(in_channels, hidden, kernel_size, padding=pad[0] if pad[0] == pad[1] else 0))
        last = PointwiseConv1d(hidden, out_channels)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers += [act(), PointwiseConv1d(hidden, hidden), act(), last]
        super().__init__(*layers)
        self.kernel_size = kernel_size
        self._pad = pad
        self._first = len(layers) - 5  # index of the first convolution

    def forward_cm(self, x: Tensor) -> Tensor:
        """The network on a channel-major input ``(in, B, T) -> (out, B, T)``."""
        first, act1, mid, act2, last = (self[self._first + i] for i in range(5))
        x = act1(conv1d_channel_major(x, first.weight, first.bias, self._pad))
        x = act2(conv1d_channel_major(x, mid.weight, mid.bias))
        return conv1d_channel_major(x, last.weight, last.bias)


def temporal_conditioner(hidden: int = 64, kernel_size: int = 3, activation: str = "relu") -> ConditionerFactory:
    """A :data:`ConditionerFactory` building :class:`TemporalConditioner` s of these sizes."""
    TemporalConditioner(1, 1, hidden, kernel_size, activation)  # validate the arguments now
    return partial(TemporalConditioner, hidden=hidden, kernel_size=kernel_size, activation=activation)


def resolve_conditioner(
    conditioner: ConditionerFactory | None, hidden: int = 64, kernel_size: int = 3, activation: str = "relu"
) -> ConditionerFactory:
    """``conditioner`` itself, or the default :class:`TemporalConditioner` of these sizes when it is
    ``None``. The sizes only size the default: given with a factory, they are an error (never ignored)."""
    if conditioner is None:
        return temporal_conditioner(hidden, kernel_size, activation)
    if (hidden, kernel_size, activation) != (64, 3, "relu"):
        raise ValueError("hidden, kernel_size and activation size the default conditioner; "
                         "leave them at their defaults when a conditioner factory is given")
    return conditioner


def apply_conditioner_cm(net: nn.Module, x: Tensor) -> Tensor:
    """Run a conditioner on a channel-major input ``(in, B, T) -> (out, B, T)``: its own
    ``forward_cm`` when it has one, else the module on ``(B, in, T)`` between two transposes."""
    fast = getattr(net, "forward_cm", None)
    if fast is not None:
        return fast(x)
    return net(x.transpose(0, 1)).transpose(0, 1)
