r"""Coupling layers over channels for ``(B, C, T)`` inputs, and the registry that builds them.

The input ``x`` is split along channels into an identity half :math:`x_a` (the first ``C // 2``
channels) and a transformed half :math:`x_b` (the other ``C - C // 2``; odd ``C`` is fine). A
conditioner network (:mod:`~flowtransfer.flows.conditioner`) reads :math:`x_a` and an optional
conditioning input and predicts, for every channel of :math:`x_b` and every time step, the
parameters :math:`\theta` of an elementwise invertible map :math:`g`:

.. math:: \theta = \mathrm{NN}([x_a; \text{context}]), \qquad y = [x_a;\ g(x_b; \theta)],
          \qquad \log\lvert\det J\rvert = \sum_{c,t} \log g'(x_{b,c,t}; \theta_{c,t}).

:class:`Coupling` does the splitting, the conditioning and the bookkeeping once; a coupling type is
one small subclass that sets :attr:`Coupling.num_params` and implements the elementwise map in both
directions (:meth:`Coupling.elementwise` / :meth:`Coupling.elementwise_inverse`), plus
:meth:`Coupling.inverse_bound_transformed` if it can bound its inverse. This module has the affine
family (:class:`AffineCoupling`: Real NVP / Glow / NICE); :mod:`~flowtransfer.flows.spline` has the
rational-quadratic spline. :func:`build_coupling` turns a name (``"affine"``, ``"additive"``,
``"spline"``, or any name added with :func:`register_coupling`) or a callable into a layer.

Everything computes channel-major (:mod:`~flowtransfer.flows.layout`): the halves are contiguous row
blocks of ``(C, B, T)``.

References: Dinh et al., *NICE*, 2015, and *Real NVP*, ICLR 2017; Kingma & Dhariwal, *Glow*,
NeurIPS 2018; Wang et al., *DiCMoR*, ICCV 2023.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .conditioner import (
    ConditionerFactory,
    PointwiseConv1d,
    TemporalConditioner,
    apply_conditioner_cm,
    resolve_conditioner,
    temporal_conditioner,
)
from .layout import ChannelMajorTransform

__all__ = [
    "AffineCoupling",
    "COUPLINGS",
    "Coupling",
    "CouplingBuilder",
    "PointwiseConv1d",
    "SCALE_FUNCTIONS",
    "build_coupling",
    "coupling_network",
    "register_coupling",
]

#: the scale functions :class:`AffineCoupling` accepts
SCALE_FUNCTIONS = ("sigmoid", "softclamp", "additive")


def coupling_network(
    in_channels: int,
    out_channels: int,
    hidden: int = 64,
    kernel_size: int = 3,
    activation: str = "relu",
) -> TemporalConditioner:
    """The default conditioner, :class:`~flowtransfer.flows.conditioner.TemporalConditioner`."""
    return TemporalConditioner(in_channels, out_channels, hidden, kernel_size, activation)


class Coupling(ChannelMajorTransform):
    r"""Base class of coupling layers: split, condition, apply an elementwise map to one half.

    Subclasses set :attr:`num_params` (parameters per transformed element; may be set in
    ``__init__`` before calling :meth:`build_conditioner`) and implement

    - :meth:`elementwise` ``(xb, theta) -> (yb, logdet)`` and
    - :meth:`elementwise_inverse` ``(yb, theta) -> (xb, logdet)``, and optionally
      :meth:`elementwise_nologdet` ``(xb, theta) -> yb`` and :meth:`elementwise_inverse_nologdet`
      ``(yb, theta) -> xb`` (the maps without their log-det),

    where ``xb`` is ``(C_b, B, T)``, ``theta`` is ``(num_params, C_b, B, T)`` (the conditioner's
    output viewed parameter-major) and ``logdet`` is the per-sample ``(B,)`` log-det of the map.

    Arguments:
        channels: number of channels :math:`C \ge 2`.
        conditioner: a :data:`~flowtransfer.flows.conditioner.ConditionerFactory`; ``None`` gives
            :class:`~flowtransfer.flows.conditioner.TemporalConditioner` with ``hidden=64,
            kernel_size=3``.
        cond_channels: channels of the optional conditioning input ``context``, given as
            ``(B, cond_channels, T)`` or ``(B, cond_channels)`` (broadcast over time) and
            concatenated to the conditioner's input. 0 means unconditional.

    Shapes: ``(B, C, T) -> (B, C, T)``, log-det ``(B,)``.
    """

    reads_context = True
    num_params: int = 1

    def __init__(self, channels: int, conditioner: ConditionerFactory | None = None, cond_channels: int = 0):
        super().__init__()
        if int(channels) != channels or channels < 2:
            raise ValueError(f"a coupling needs channels >= 2 (it splits them in halves), got {channels}")
        if int(cond_channels) != cond_channels or cond_channels < 0:
            raise ValueError(f"cond_channels must be an integer >= 0, got {cond_channels}")
        self.channels = int(channels)
        self.split = self.channels // 2  # identity half: [0, split); transformed: [split, C)
        self.transformed = self.channels - self.split
        self.cond_channels = int(cond_channels)
        self._conditioner_factory = conditioner if conditioner is not None else temporal_conditioner()

    def build_conditioner(self) -> None:
        """Build ``self.net`` for ``num_params`` parameters per transformed channel."""
        n_in, n_out = self.split + self.cond_channels, self.num_params * self.transformed
        net = self._conditioner_factory(n_in, n_out)
        if not isinstance(net, nn.Module):
            raise TypeError(f"the conditioner factory must return an nn.Module, got {type(net).__name__}")
        self.net = net
        self.kernel_size = getattr(net, "kernel_size", None)

    # ------------------------------------------------------------------ to implement
    def elementwise(self, xb: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def elementwise_inverse(self, yb: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def elementwise_nologdet(self, xb: Tensor, theta: Tensor) -> Tensor:
        """:meth:`elementwise` without the log-det (the same ``yb``); override it where the log-det
        costs something. The default computes it and drops it."""
        return self.elementwise(xb, theta)[0]

    def elementwise_inverse_nologdet(self, yb: Tensor, theta: Tensor) -> Tensor:
        """:meth:`elementwise_inverse` without the log-det (the same ``xb``); override it where
        the log-det costs something. The default computes it and drops it."""
        return self.elementwise_inverse(yb, theta)[0]

    def inverse_bound_transformed(self, radius: Tensor) -> Tensor:
        """Per-channel bound on ``|x_b|`` from the inverse given ``|y_b| <= radius`` (``(C_b,)``);
        ``inf`` where the map cannot bound it (the default)."""
        return torch.full_like(radius, math.inf)

    # ------------------------------------------------------------------ shared machinery
    def _theta(self, xa: Tensor, context: Tensor | None) -> Tensor:
        """Conditioner output for identity half ``xa`` ``(C_a, B, T)``, as ``(P, C_b, B, T)``."""
        inp = xa if context is None else torch.cat([xa, context.to(xa.dtype)], dim=0)
        out = apply_conditioner_cm(self.net, inp)
        expected = (self.num_params * self.transformed, xa.shape[1], xa.shape[2])
        if tuple(out.shape) != expected:
            raise ValueError(
                f"{type(self).__name__}: the conditioner returned shape (batch, channels, time) = "
                f"{(out.shape[1], out.shape[0], out.shape[2])}, expected "
                f"{(expected[1], expected[0], expected[2])} (it must keep the length)"
            )
        return out.reshape(self.num_params, self.transformed, xa.shape[1], xa.shape[2])

    def forward_cm(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        xa, xb = x[: self.split], x[self.split :]
        yb, logdet = self.elementwise(xb, self._theta(xa, context))
        return torch.cat([xa, yb], dim=0), logdet

    def inverse_cm(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ya, yb = y[: self.split], y[self.split :]
        xb, logdet = self.elementwise_inverse(yb, self._theta(ya, context))
        return torch.cat([ya, xb], dim=0), logdet

    def forward_cm_nologdet(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if type(self).forward_cm is not Coupling.forward_cm:  # a subclass changed the map: follow it
            return self.forward_cm(x, context)[0]
        xa, xb = x[: self.split], x[self.split :]
        return torch.cat([xa, self.elementwise_nologdet(xb, self._theta(xa, context))], dim=0)

    def inverse_cm_nologdet(self, y: Tensor, context: Tensor | None = None) -> Tensor:
        if type(self).inverse_cm is not Coupling.inverse_cm:
            return self.inverse_cm(y, context)[0]
        ya, yb = y[: self.split], y[self.split :]
        return torch.cat([ya, self.elementwise_inverse_nologdet(yb, self._theta(ya, context))], dim=0)

    def inverse_bound(self, radius: Tensor) -> Tensor:
        """Per-channel bound on the inverse's output given ``|y_c| <= radius_c``: the identity half
        keeps its radius, the transformed half gets :meth:`inverse_bound_transformed`."""
        return torch.cat([radius[: self.split], self.inverse_bound_transformed(radius[self.split :])])


class AffineCoupling(Coupling):
    r"""Affine coupling (an nflows ``Transform``): :math:`y_b = s \odot x_b + t` in three flavours.

    Scale functions (``scale=``), for the transformed half :math:`x_b`:

    ``"sigmoid"`` (Glow; what DiCMoR's released code uses)
        :math:`y_b = (x_b + t)\,\sigma(h + 2)`, log-det :math:`\sum \log\sigma(h+2)`;
        inverse :math:`x_b = y_b / \sigma(h+2) - t`. The scale lies in :math:`(0, 1)`, so the
        forward map only contracts; the inverse divides by the scale, which the network can drive
        towards 0: the inverse is **unbounded** (no bound even with a bounded shift).
    ``"softclamp"``
        :math:`y_b = x_b\, e^{c \tanh(h / c)} + t`, log-det :math:`\sum c\tanh(h/c)`;
        inverse :math:`x_b = (y_b - t)\, e^{-c\tanh(h/c)}`. Each layer scales by a factor in
        :math:`(e^{-c}, e^{c})`, identity at initialisation. The *scale* is bounded, but the inverse
        is not: with an unbounded shift the conditioner (a ReLU network, linear far from its
        training range) feeds back through the stack, each inverse layer can multiply by up to
        :math:`e^{c}` and add a shift that grows with its input (seen: 1e20 after 32 layers).
        With ``shift_bound`` :math:`\tau` the shift is :math:`\tau\tanh(t/\tau)` and the inverse of
        one layer obeys :math:`|x_b| \le (|y_b| + \tau)\, e^{c}`: bounded, but the bound compounds
        as :math:`e^{cL}` over :math:`L` layers.
    ``"additive"`` (NICE)
        :math:`y_b = x_b + t`, log-det 0. With ``shift_bound`` :math:`\tau`, :math:`|x_b| \le
        |y_b| + \tau` per layer (a bound growing linearly with depth).

    Arguments:
        channels: number of channels :math:`C \ge 2`.
        hidden, kernel_size, activation: sizes of the default conditioner
            (:class:`~flowtransfer.flows.conditioner.TemporalConditioner`); ignored (and must be left
            at their defaults) when ``conditioner`` is given.
        scale: ``"sigmoid"``, ``"softclamp"`` or ``"additive"``.
        cond_channels: see :class:`Coupling`.
        clamp: the bound :math:`c` of ``"softclamp"``.
        shift_bound: ``None`` (unbounded shift, as in the papers) or :math:`\tau > 0`.
        conditioner: a conditioner factory (see :mod:`~flowtransfer.flows.conditioner`).

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
        *,
        shift_bound: float | None = None,
        conditioner: ConditionerFactory | None = None,
    ):
        if scale not in SCALE_FUNCTIONS:
            raise ValueError(f"unknown scale {scale!r}; choose one of {SCALE_FUNCTIONS}")
        if scale == "softclamp" and not clamp > 0:
            raise ValueError(f"clamp must be > 0, got {clamp}")
        if shift_bound is not None and not (math.isfinite(shift_bound) and shift_bound > 0):
            raise ValueError(f"shift_bound must be a finite number > 0 or None, got {shift_bound}")
        conditioner = resolve_conditioner(conditioner, hidden, kernel_size, activation)
        super().__init__(channels, conditioner, cond_channels)
        self.scale = scale
        self.clamp = float(clamp)
        self.shift_bound = None if shift_bound is None else float(shift_bound)
        self.num_params = 1 if scale == "additive" else 2
        self.build_conditioner()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, scale={self.scale!r}, kernel_size={self.kernel_size}, "
            f"cond_channels={self.cond_channels}, shift_bound={self.shift_bound}"
        )

    def _split_theta(self, theta: Tensor) -> tuple[Tensor | None, Tensor]:
        h, t = (None, theta[0]) if self.scale == "additive" else (theta[0], theta[1])
        if self.shift_bound is not None:
            t = self.shift_bound * torch.tanh(t / self.shift_bound)
        return h, t

    def elementwise(self, xb: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        h, t = self._split_theta(theta)
        if self.scale == "sigmoid":
            z = h + 2.0
            return (xb + t) * torch.sigmoid(z), F.logsigmoid(z).sum((0, 2))
        if self.scale == "softclamp":
            log_s = self.clamp * torch.tanh(h / self.clamp)
            return torch.addcmul(t, xb, torch.exp(log_s)), log_s.sum((0, 2))
        return xb + t, xb.new_zeros(xb.shape[1])

    def _inverse(self, yb: Tensor, theta: Tensor, logdet: bool) -> tuple[Tensor, Tensor | None]:
        h, t = self._split_theta(theta)
        if self.scale == "sigmoid":
            z = h + 2.0
            return yb / torch.sigmoid(z) - t, (-F.logsigmoid(z).sum((0, 2)) if logdet else None)
        if self.scale == "softclamp":
            log_s = self.clamp * torch.tanh(h / self.clamp)
            # divide by the forward's exact factor: one rounding
            return (yb - t) / torch.exp(log_s), (-log_s.sum((0, 2)) if logdet else None)
        return yb - t, (yb.new_zeros(yb.shape[1]) if logdet else None)

    def elementwise_inverse(self, yb: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        return self._inverse(yb, theta, logdet=True)

    def elementwise_inverse_nologdet(self, yb: Tensor, theta: Tensor) -> Tensor:
        return self._inverse(yb, theta, logdet=False)[0]

    def inverse_bound_transformed(self, radius: Tensor) -> Tensor:
        if self.shift_bound is None or self.scale == "sigmoid":
            return torch.full_like(radius, math.inf)
        grow = math.exp(self.clamp) if self.scale == "softclamp" else 1.0
        return (radius + self.shift_bound) * grow


# ---------------------------------------------------------------------- registry
#: ``builder(channels, *, conditioner, cond_channels, **options) -> Coupling``
CouplingBuilder = Callable[..., ChannelMajorTransform]

COUPLINGS: dict[str, CouplingBuilder] = {}


def register_coupling(name: str, builder: CouplingBuilder) -> CouplingBuilder:
    """Make ``name`` usable as ``coupling=name`` in :class:`~flowtransfer.flows.FlowStep` and
    :class:`~flowtransfer.flows.TemporalFlow`; returns ``builder``. A builder is called as
    ``builder(channels, conditioner=factory, cond_channels=k, **options)`` (a :class:`Coupling`
    subclass is one)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a coupling name must be a non-empty string, got {name!r}")
    COUPLINGS[name] = builder
    return builder


def _additive(channels: int, *, conditioner: ConditionerFactory | None = None, cond_channels: int = 0,
              shift_bound: float | None = None) -> AffineCoupling:
    return AffineCoupling(channels, scale="additive", cond_channels=cond_channels,
                          shift_bound=shift_bound, conditioner=conditioner)


def _affine(channels: int, *, conditioner: ConditionerFactory | None = None, cond_channels: int = 0,
            scale: str = "softclamp", clamp: float = 2.0, shift_bound: float | None = None) -> AffineCoupling:
    return AffineCoupling(channels, scale=scale, cond_channels=cond_channels, clamp=clamp,
                          shift_bound=shift_bound, conditioner=conditioner)


register_coupling("affine", _affine)
register_coupling("additive", _additive)


def build_coupling(
    coupling: str | CouplingBuilder,
    channels: int,
    *,
    conditioner: ConditionerFactory | None,
    cond_channels: int = 0,
    **options: Any,
) -> ChannelMajorTransform:
    """Build a coupling layer from a registered name or a builder callable (see
    :func:`register_coupling`); ``options`` go to the builder (e.g. ``scale`` for ``"affine"``,
    ``num_bins`` for ``"spline"``)."""
    if isinstance(coupling, str):
        if coupling not in COUPLINGS:
            raise ValueError(f"unknown coupling {coupling!r}; choose one of {sorted(COUPLINGS)} or pass a callable")
        builder = COUPLINGS[coupling]
    elif callable(coupling):
        builder = coupling
    else:
        raise TypeError(f"coupling must be a name or a callable, got {type(coupling).__name__}")
    try:
        layer = builder(channels, conditioner=conditioner, cond_channels=cond_channels, **options)
    except TypeError as err:
        raise TypeError(f"coupling {coupling!r} does not take the options {sorted(options)}: {err}") from err
    if not isinstance(layer, ChannelMajorTransform):
        raise TypeError(
            f"coupling builder {coupling!r} returned {type(layer).__name__}, not a ChannelMajorTransform"
        )
    return layer
