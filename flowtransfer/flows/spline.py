r"""Rational-quadratic spline coupling with identity tails (Durkan et al., *Neural Spline Flows*,
NeurIPS 2019), for ``(B, C, T)`` inputs.

On :math:`[-B, B]` each transformed element goes through a monotone rational-quadratic spline of
:math:`K` bins (Gregory & Delbourgo, 1982); outside it the map is the identity. Knots
:math:`(x^{(k)}, y^{(k)})_{k=0..K}` run from :math:`(-B, -B)` to :math:`(B, B)`, with derivatives
:math:`\delta^{(k)} > 0` at the knots and :math:`\delta^{(0)} = \delta^{(K)} = 1`, so the map and its
derivative are continuous at :math:`\pm B`. In bin :math:`k`, with width :math:`w`, height
:math:`h`, slope :math:`s = h / w` and :math:`\xi = (x - x^{(k)}) / w \in [0, 1]`:

.. math::
    g(x) = y^{(k)} + \frac{h\,[s\xi^2 + \delta^{(k)}\xi(1-\xi)]}
                          {s + (\delta^{(k+1)} + \delta^{(k)} - 2s)\,\xi(1-\xi)}, \qquad
    g'(x) = \frac{s^2\,[\delta^{(k+1)}\xi^2 + 2s\,\xi(1-\xi) + \delta^{(k)}(1-\xi)^2]}
                 {[s + (\delta^{(k+1)} + \delta^{(k)} - 2s)\,\xi(1-\xi)]^2}.

The inverse solves :math:`a\xi^2 + b\xi + c = 0` with :math:`\Delta = y - y^{(k)}`,
:math:`a = h(s - \delta^{(k)}) + \Delta\,(\delta^{(k+1)} + \delta^{(k)} - 2s)`,
:math:`b = h\delta^{(k)} - \Delta\,(\delta^{(k+1)} + \delta^{(k)} - 2s)`, :math:`c = -s\Delta`. The root in
:math:`[0, 1]` is :math:`\xi = (-b + \sqrt{b^2 - 4ac}) / (2a)`. Evaluated that way it cancels when
:math:`b > 0`, and the discriminant itself cancels near the right knot when :math:`\delta^{(k+1)}` is
small; :func:`inverse_root` rewrites both so that nothing subtracts nearly equal numbers.

Bins come from unconstrained network outputs: widths and heights by a softmax, floored at
``min_bin_width`` / ``min_bin_height`` (fractions of :math:`2B`), interior derivatives by a shifted
softplus floored at ``min_derivative``. A zero output gives equal bins and unit derivatives: the
identity, so a zero-initialised conditioner starts the coupling at the identity.

**Bounded inverse.** The spline maps :math:`[-B, B]` onto itself and is the identity outside, so its
inverse obeys :math:`|x| \le \max(|y|, B)` elementwise, whatever the conditioner outputs: a stack of
these couplings and permutations can never take a latent further from the origin than
:math:`\max(\lVert z\rVert_\infty, B)` (see :meth:`~flowtransfer.flows.TemporalFlow.inverse_bound`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .conditioner import ConditionerFactory, resolve_conditioner
from .coupling import Coupling, register_coupling

__all__ = ["RationalQuadraticCoupling", "inverse_root", "rational_quadratic_spline", "spline_knots"]


def spline_knots(
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    bound: float,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor, Tensor]:
    """Knots ``(x (K+1, ...), y (K+1, ...), derivatives (K+1, ...))`` from unconstrained parameters
    with bins along dim 0: widths and heights ``(K, ...)``, interior derivatives ``(K-1, ...)``.

    The end knots are exactly ``-bound`` and ``bound``; the end derivatives exactly 1."""
    k = unnormalized_widths.shape[0]

    def knots(unnormalized: Tensor, minimum: float) -> Tensor:
        frac = minimum + (1.0 - minimum * k) * torch.softmax(unnormalized, dim=0)
        inner = -bound + 2.0 * bound * torch.cumsum(frac, dim=0)[:-1]
        end = inner.new_full((1, *inner.shape[1:]), bound)
        return torch.cat([-end, inner, end], dim=0)

    # softplus(u + shift) = 1 - min_derivative at u = 0, so zero outputs give unit derivatives
    shift = math.log(math.expm1(1.0 - min_derivative))
    inner_d = min_derivative + F.softplus(unnormalized_derivatives + shift)
    one = inner_d.new_ones((1, *inner_d.shape[1:]))
    return (
        knots(unnormalized_widths, min_bin_width),
        knots(unnormalized_heights, min_bin_height),
        torch.cat([one, inner_d, one], dim=0),
    )


def inverse_root(left: Tensor, right: Tensor, h: Tensor, s: Tensor, d0: Tensor, d1: Tensor) -> Tensor:
    r"""The bin coordinate :math:`\xi \in [0, 1]` with :math:`g(\xi) = y`, free of cancellation.

    Args (broadcastable): ``left`` :math:`= y - y^{(k)}` and ``right`` :math:`= y^{(k+1)} - y` (both
    measured from the knots, so neither is a difference of nearly equal numbers), the bin's height
    ``h``, slope ``s`` and knot derivatives ``d0``, ``d1``.

    With :math:`\Delta_l, \Delta_r` = ``left``, ``right``: :math:`b = \delta^{(k)}\Delta_r +
    (2s - \delta^{(k+1)})\Delta_l`, :math:`a = hs - b`, :math:`c = -s\Delta_l` and the discriminant
    written as a sum of two non-negative terms,
    :math:`b^2 - 4ac = (\delta^{(k)}\Delta_r - \delta^{(k+1)}\Delta_l)^2 + 4s^2\Delta_l\Delta_r`
    (the textbook :math:`b^2 - 4ac` cancels near :math:`\xi = 1` when :math:`\delta^{(k+1)}` is
    small). The root is :math:`2c / (-b - \sqrt{D})` where :math:`b \ge 0` and :math:`(-b +
    \sqrt{D}) / 2a` where :math:`b < 0` (then :math:`a = hs + |b| > 0`): no subtraction anywhere.
    """
    left, right = left.clamp_min(0.0), right.clamp_min(0.0)
    b = d0 * right + (2.0 * s - d1) * left
    a = h * s - b
    c = -s * left
    root = torch.sqrt((d0 * right - d1 * left).square() + 4.0 * s * s * left * right)
    pos = b >= 0
    # the unused branch gets a harmless denominator, so no NaN reaches a gradient
    xi = torch.where(pos, 2.0 * c / torch.where(pos, -b - root, -1.0),
                     (-b + root) / torch.where(pos, 1.0, 2.0 * a))
    return xi.clamp(0.0, 1.0)


def rational_quadratic_spline(
    inputs: Tensor,
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    bound: float = 5.0,
    *,
    inverse: bool = False,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    r"""The monotone RQ spline on ``[-bound, bound]`` with identity tails, elementwise.

    Args:
        inputs: any shape ``S``.
        unnormalized_widths, unnormalized_heights: ``(K, *S)``, bins along dim 0.
        unnormalized_derivatives: ``(K - 1, *S)``, the interior knots' derivatives.
        bound: :math:`B`.
        inverse: evaluate :math:`g^{-1}` instead of :math:`g`.

    Returns:
        ``(outputs, logabsdet)``, both of shape ``S``: :math:`\log g'(x)` forward, :math:`-\log
        g'(g^{-1}(y))` inverse; 0 in the tails. No host synchronisation: out-of-range inputs are
        handled by masks, not by checks.
    """
    k = unnormalized_widths.shape[0]
    if unnormalized_heights.shape[0] != k or unnormalized_derivatives.shape[0] != k - 1:
        raise ValueError(
            f"spline parameters: expected K widths, K heights and K-1 derivatives, got "
            f"{unnormalized_widths.shape[0]}, {unnormalized_heights.shape[0]}, {unnormalized_derivatives.shape[0]}"
        )
    return _spline(inputs, torch.stack([unnormalized_widths, unnormalized_heights]), unnormalized_derivatives,
                   bound, inverse, min_bin_width, min_bin_height, min_derivative)


def _spline(
    v_in: Tensor,
    uwh: Tensor,
    ud: Tensor,
    bound: float,
    inverse: bool,
    min_bin_width: float,
    min_bin_height: float,
    min_derivative: float,
) -> tuple[Tensor, Tensor]:
    """:func:`rational_quadratic_spline` with widths and heights stacked as ``uwh`` ``(2, K, *S)`` (a
    view of the conditioner's output in the coupling: no copy)."""
    k = uwh.shape[1]
    if k == 1:  # one bin of slope 1 with unit end derivatives: exactly the identity
        return v_in, torch.zeros_like(v_in)
    if min_bin_width == min_bin_height:
        frac = min_bin_width + (1.0 - min_bin_width * k) * torch.softmax(uwh, dim=1)
    else:
        mins = torch.tensor([min_bin_width, min_bin_height], dtype=uwh.dtype, device=uwh.device)
        mins = mins.view(2, *([1] * (uwh.dim() - 1)))
        frac = mins + (1.0 - mins * k) * torch.softmax(uwh, dim=1)
    inner = torch.cumsum(frac[:, : k - 1], dim=1).mul_(2.0 * bound).sub_(bound)  # interior knots (2, K-1, *S)
    ends = inner.new_tensor(bound).expand(2, 1, *inner.shape[2:])
    knots = torch.cat([-ends, inner, ends], dim=1)  # (2, K+1, *S), the ends exactly -B and B
    shift = math.log(math.expm1(1.0 - min_derivative))
    ones = ends[0]  # any (1, *S) plane works as a shape; the values are replaced below
    derivs = torch.cat([torch.ones_like(ones), F.softplus(ud + shift).add_(min_derivative), torch.ones_like(ones)])
    inside = (v_in >= -bound) & (v_in <= bound)
    v = v_in.clamp(-bound, bound)
    # bin index: how many interior knots lie at or below v (a knot starts its bin), in [0, K-1]
    idx = (v.unsqueeze(0) >= inner[1 if inverse else 0]).sum(0)
    pair = torch.stack([idx, idx + 1])  # (2, *S): the bin's two knots
    (x0, x1), (y0, y1) = knots.gather(1, pair.unsqueeze(0).expand(2, *pair.shape)).unbind(0)
    d0, d1 = derivs.gather(0, pair).unbind(0)
    w, h = x1 - x0, y1 - y0
    s = h / w
    if inverse:
        xi = inverse_root(v - y0, y1 - v, h, s, d0, d1)
    else:
        xi = (v - x0) / w
    one_minus = 1.0 - xi
    mix = xi * one_minus
    den = s + (d0 + d1 - 2.0 * s) * mix
    # log g' = log(s^2 [d1 xi^2 + 2 s mix + d0 (1 - xi)^2] / den^2), one logarithm
    log_deriv = torch.log(s * s * (d1 * xi * xi + 2.0 * s * mix + d0 * one_minus * one_minus) / (den * den))
    if inverse:
        return torch.where(inside, x0 + xi * w, v_in), torch.where(inside, -log_deriv, 0.0)
    out = y0 + h * (s * xi * xi + d0 * mix) / den
    return torch.where(inside, out, v_in), torch.where(inside, log_deriv, 0.0)


class RationalQuadraticCoupling(Coupling):
    r"""Coupling whose elementwise map is a rational-quadratic spline with identity tails.

    Each transformed element gets its own spline of ``num_bins`` bins on ``[-tail_bound,
    tail_bound]``, parametrised by :math:`3K - 1` conditioner outputs (K widths, K heights, K - 1
    interior derivatives). Exactly the identity at initialisation (zero last conditioner layer).

    The inverse is bounded by construction: :math:`|x_b| \le \max(|y_b|, B)` elementwise
    (:meth:`inverse_bound_transformed`), whatever the conditioner outputs, because the spline maps
    :math:`[-B, B]` onto itself and the tails are the identity.

    Arguments:
        channels: number of channels :math:`C \ge 2`.
        num_bins: :math:`K \ge 1`.
        tail_bound: :math:`B > 0`.
        hidden, kernel_size, activation: sizes of the default conditioner (leave at their defaults
            when ``conditioner`` is given).
        cond_channels: see :class:`~flowtransfer.flows.coupling.Coupling`.
        min_bin_width, min_bin_height: floors of each bin's width and height as fractions of
            :math:`2B` (``num_bins * min < 1``).
        min_derivative: floor of the interior knots' derivatives (> 0).
        conditioner: a conditioner factory (see :mod:`~flowtransfer.flows.conditioner`).

    Shapes: ``(B, C, T) -> (B, C, T)``, log-det ``(B,)``.
    """

    def __init__(
        self,
        channels: int,
        num_bins: int = 4,
        tail_bound: float = 5.0,
        hidden: int = 64,
        kernel_size: int = 3,
        activation: str = "relu",
        *,
        cond_channels: int = 0,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
        conditioner: ConditionerFactory | None = None,
    ):
        if int(num_bins) != num_bins or num_bins < 1:
            raise ValueError(f"num_bins must be an integer >= 1, got {num_bins}")
        if not (math.isfinite(tail_bound) and tail_bound > 0):
            raise ValueError(f"tail_bound must be a finite number > 0, got {tail_bound}")
        for name, value in (("min_bin_width", min_bin_width), ("min_bin_height", min_bin_height)):
            if not (0 < value and value * num_bins < 1):
                raise ValueError(f"{name} must be > 0 with num_bins * {name} < 1, got {value} for {num_bins} bins")
        if not 0 < min_derivative < 1:
            raise ValueError(f"min_derivative must lie in (0, 1), got {min_derivative}")
        conditioner = resolve_conditioner(conditioner, hidden, kernel_size, activation)
        super().__init__(channels, conditioner, cond_channels)
        self.num_bins = int(num_bins)
        self.tail_bound = float(tail_bound)
        self.min_bin_width = float(min_bin_width)
        self.min_bin_height = float(min_bin_height)
        self.min_derivative = float(min_derivative)
        self.num_params = 3 * self.num_bins - 1
        self.build_conditioner()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_bins={self.num_bins}, tail_bound={self.tail_bound}, "
            f"kernel_size={self.kernel_size}, cond_channels={self.cond_channels}"
        )

    def _spline(self, v: Tensor, theta: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        k = self.num_bins
        uwh = theta[: 2 * k].view(2, k, *theta.shape[1:])  # widths, heights: a view, no copy
        out, logabsdet = _spline(v, uwh, theta[2 * k :], self.tail_bound, inverse, self.min_bin_width,
                                 self.min_bin_height, self.min_derivative)
        return out, logabsdet.sum((0, 2))

    def elementwise(self, xb: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(xb, theta, inverse=False)

    def elementwise_inverse(self, yb: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(yb, theta, inverse=True)

    def inverse_bound_transformed(self, radius: Tensor) -> Tensor:
        return radius.clamp_min(self.tail_bound)


def _spline_builder(
    channels: int,
    *,
    conditioner: ConditionerFactory | None = None,
    cond_channels: int = 0,
    num_bins: int = 4,
    tail_bound: float = 5.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> RationalQuadraticCoupling:
    return RationalQuadraticCoupling(
        channels, num_bins, tail_bound, cond_channels=cond_channels, min_bin_width=min_bin_width,
        min_bin_height=min_bin_height, min_derivative=min_derivative, conditioner=conditioner,
    )


register_coupling("spline", _spline_builder)
