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
from torch.autograd.function import once_differentiable

from .conditioner import ConditionerFactory, resolve_conditioner
from .coupling import Coupling, register_coupling

__all__ = [
    "IMPLEMENTATIONS",
    "RationalQuadraticCoupling",
    "inverse_root",
    "rational_quadratic_spline",
    "spline_from_theta",
    "spline_knots",
]


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


#: implementations of the elementwise spline: ``"fused"`` (one autograd node with a hand-written
#: backward, the default) and ``"autograd"`` (the reference: plain tensor code differentiated by
#: autograd). Both compute the same function; the tests compare them.
IMPLEMENTATIONS = ("fused", "autograd")


def rational_quadratic_spline(
    inputs: Tensor,
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    bound: float = 5.0,
    *,
    inverse: bool = False,
    logdet: bool = True,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
    implementation: str = "fused",
) -> tuple[Tensor, Tensor | None]:
    r"""The monotone RQ spline on ``[-bound, bound]`` with identity tails, elementwise.

    Args:
        inputs: any shape ``S``.
        unnormalized_widths, unnormalized_heights: ``(K, *S)``, bins along dim 0.
        unnormalized_derivatives: ``(K - 1, *S)``, the interior knots' derivatives.
        bound: :math:`B`.
        inverse: evaluate :math:`g^{-1}` instead of :math:`g`.
        logdet: also return the log-derivative; ``False`` skips its computation (and its
            gradient) and returns ``None`` in its place. The outputs are the same either way.
        implementation: ``"fused"`` (default) or ``"autograd"`` (the reference), see
            :data:`IMPLEMENTATIONS`. Under :func:`torch.compile` the reference is traced (the
            compiler fuses it itself).

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
    theta = torch.cat([unnormalized_widths, unnormalized_heights, unnormalized_derivatives])
    return spline_from_theta(inputs, theta, k, bound, inverse=inverse, logdet=logdet, min_bin_width=min_bin_width,
                             min_bin_height=min_bin_height, min_derivative=min_derivative,
                             implementation=implementation)


def spline_from_theta(
    inputs: Tensor,
    theta: Tensor,
    num_bins: int,
    bound: float,
    *,
    inverse: bool = False,
    logdet: bool = True,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
    implementation: str = "fused",
) -> tuple[Tensor, Tensor | None]:
    """:func:`rational_quadratic_spline` with the parameters stacked as ``theta`` ``(3K - 1, *S)``
    (K widths, K heights, K - 1 derivatives; in a coupling, a view of the conditioner's output)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown spline implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
    k = int(num_bins)
    if theta.shape[0] != 3 * k - 1 or theta.shape[1:] != inputs.shape:
        raise ValueError(f"spline parameters: expected shape {(3 * k - 1, *inputs.shape)}, got {tuple(theta.shape)}")
    if k == 1:  # one bin of slope 1 with unit end derivatives: exactly the identity
        return inputs, (torch.zeros_like(inputs) if logdet else None)
    if implementation == "autograd" or torch.compiler.is_compiling():
        # under torch.compile the plain tensor code is what the compiler fuses best (and it traces
        # without graph breaks; the fused path writes into strided views)
        uwh = theta[: 2 * k].view(2, k, *inputs.shape)
        out, ld = _spline(inputs, uwh, theta[2 * k :], bound, inverse, min_bin_width, min_bin_height,
                          min_derivative)
        return out, (ld if logdet else None)
    opts = (k, float(bound), bool(inverse), bool(logdet), float(min_bin_width), float(min_bin_height),
            float(min_derivative))
    if torch.is_grad_enabled() and (inputs.requires_grad or theta.requires_grad):
        res = _FusedSpline.apply(inputs, theta, *opts)
        return (res[0], res[1]) if logdet else (res, None)
    out, ld, _ = _fused_forward(inputs, theta, *opts, save=False)
    return out, ld


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
    """The reference implementation (``implementation="autograd"``): :func:`rational_quadratic_spline`
    with widths and heights stacked as ``uwh`` ``(2, K, *S)``, written as plain tensor code."""
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


# ---------------------------------------------------------------------- the fused spline
def _column(values: list[float], like: Tensor, dims: int) -> Tensor:
    """``values`` as a ``(len(values), 1, ..., 1)`` tensor (``dims`` trailing ones) like ``like``."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(len(values), *([1] * dims))


def _fused_forward(
    v_in: Tensor,
    theta: Tensor,
    k: int,
    bound: float,
    inverse: bool,
    logdet: bool,
    min_bin_width: float,
    min_bin_height: float,
    min_derivative: float,
    save: bool,
) -> tuple[Tensor, Tensor | None, tuple | None]:
    r"""The spline's values (and log-derivative), computed without an autograd graph in few,
    large operations: the same formulas as the reference :func:`_spline`.

    ``theta`` is ``(3K-1, *S)``. There is no ``cat``, ``cumsum`` or ``gather`` (slow on small
    CPU tensors): the interior knots are running sums kept as separate contiguous ``(*S)``
    tensors, and each element's bin is selected by a chain of :func:`torch.lerp` with weights
    exactly 0 or 1, which returns exactly one of its two ends (``lerp(a, b, 0) = a``,
    ``lerp(a, b, 1) = b``), so the selected knots are the knots.

    Returns ``(outputs, log-derivative or None, saved or None)``; ``saved`` holds what
    :func:`_fused_backward` needs (only when ``save``).
    """
    shape, nd = v_in.shape, v_in.dim()
    uwh = theta[: 2 * k].view(2, k, *shape)
    p = torch.softmax(uwh, dim=1)  # (2, K, *S)
    # bin fractions and interior knots with the reference's arithmetic (min + a p, running sums,
    # * 2B - B), so that the knots are the same numbers and an input on a knot gets the same bin
    if min_bin_width == min_bin_height:
        frac = torch.mul(p, 1.0 - min_bin_width * k).add_(min_bin_width)
    else:
        mins = _column([min_bin_width, min_bin_height], p, nd + 1)
        frac = mins + (1.0 - mins * k) * p
    # interior knots j = 1..K-1 as separate contiguous (*S) tensors: ops on them are much cheaper
    # than on strided blocks of the same total size
    xs, ys = [], []
    cum_x, cum_y = frac[0, 0], frac[1, 0]
    for j in range(k - 1):
        if j:
            cum_x, cum_y = cum_x + frac[0, j], cum_y + frac[1, j]
        xs.append(torch.mul(cum_x, 2.0 * bound).sub_(bound))
        ys.append(torch.mul(cum_y, 2.0 * bound).sub_(bound))
    shift = math.log(math.expm1(1.0 - min_derivative))
    ud_shifted = theta[2 * k :] + shift
    ds = F.softplus(ud_shifted).add_(min_derivative).unbind(0)
    v = v_in.clamp(-bound, bound)
    inside = v == v_in  # NaN is outside and passes through, as in the reference
    # masks[j] = [v >= interior knot j + 1] (a knot starts its bin), exactly 0. or 1.
    masks = p.new_empty((k - 1, *shape))
    for j, knot in enumerate(ys if inverse else xs):
        torch.ge(v, knot, out=masks[j])
    lo_end, hi_end, one = v.new_tensor(-bound), v.new_tensor(bound), v.new_tensor(1.0)
    x0, y0, d0 = lo_end, lo_end, one
    x1, y1, d1 = xs[0], ys[0], ds[0]
    for j in range(1, k):
        m = masks[j - 1]
        x0, y0, d0 = torch.lerp(x0, xs[j - 1], m), torch.lerp(y0, ys[j - 1], m), torch.lerp(d0, ds[j - 1], m)
        last = j == k - 1
        x1 = torch.lerp(x1, hi_end if last else xs[j], m)
        y1 = torch.lerp(y1, hi_end if last else ys[j], m)
        d1 = torch.lerp(d1, one if last else ds[j], m)
    w, h = x1 - x0, y1 - y0
    s = h / w
    if inverse:
        xi = inverse_root(v - y0, y1 - v, h, s, d0, d1)
    else:
        xi = (v - x0) / w
    one_minus = 1.0 - xi
    mix = xi * one_minus
    den = torch.addcmul(s, torch.add(d0, d1).sub_(s, alpha=2.0), mix)
    if inverse:
        out = torch.where(inside, torch.addcmul(x0, xi, w), v_in)
    else:
        num = torch.addcmul(s * xi * xi, d0, mix).mul_(h)
        out = torch.where(inside, torch.addcdiv(y0, num, den), v_in)
    ld = None
    if logdet:
        # log g' = log(s^2 [d1 xi^2 + 2 s mix + d0 (1 - xi)^2] / den^2), one logarithm
        n = torch.addcmul(d1 * xi * xi, s, mix, value=2.0).addcmul_(d0, one_minus * one_minus)
        ld = torch.log((s * s * n).div_(den * den))
        ld = torch.where(inside, ld.neg_() if inverse else ld, 0.0)
    saved = None
    if save:
        saved = (p, masks, torch.sigmoid(ud_shifted), xi, w, h, s, d0, d1, inside)  # sigmoid: softplus'
    return out, ld, saved


def _fused_backward(
    grad_out: Tensor | None,
    grad_ld: Tensor | None,
    saved: tuple,
    k: int,
    bound: float,
    inverse: bool,
    min_bin_width: float,
    min_bin_height: float,
) -> tuple[Tensor, Tensor]:
    r"""Gradients ``(d/d inputs (*S), d/d theta (3K-1, *S))`` of ``sum(grad_out * out + grad_ld * ld)``.

    In a bin with knots :math:`(x_0, y_0), (x_1, y_1)` and derivatives :math:`d_0, d_1`, with
    :math:`w = x_1 - x_0`, :math:`h = y_1 - y_0`, :math:`s = h/w`, :math:`\xi = (x - x_0)/w`,
    :math:`m = \xi(1-\xi)`, :math:`D = s + (d_0 + d_1 - 2s)m`, :math:`A = s\xi^2 + d_0 m` and
    :math:`N = d_1\xi^2 + 2sm + d_0(1-\xi)^2`, the forward map is :math:`g = y_0 + hR`,
    :math:`R = A/D`, and :math:`\ell = \log g' = 2\log s + \log N - 2\log D`. Partial derivatives
    in :math:`(\xi, s, d_0, d_1)`:

    .. math::
        R_\xi = sN/D^2,\quad R_s = (\xi^2 D - A(1-2m))/D^2,\quad R_{d_0} = m(D - A)/D^2,\quad
        R_{d_1} = -Am/D^2,

        \ell_\xi = 2(d_1\xi + s(1-2\xi) - d_0(1-\xi))/N - 2(d_0+d_1-2s)(1-2\xi)/D,\quad
        \ell_s = 2/s + 2m/N - 2(1-2m)/D,\quad \ell_{d_0} = (1-\xi)^2/N - 2m/D,\quad
        \ell_{d_1} = \xi^2/N - 2m/D,

    chained to the knots through :math:`\xi = (x - x_0)/w`, :math:`s = h/w`, :math:`h = y_1 - y_0`.
    The inverse :math:`x = g^{-1}(y)` follows from the implicit function theorem: with upstream
    gradients :math:`\bar x` of :math:`x` and :math:`\bar\ell` of :math:`-\ell(x)`, the input gets
    :math:`q = (\bar x - \bar\ell\,\ell_\xi / w) / g'` and the parameters get the forward map's
    parameter gradient with upstream :math:`(-q, -\bar\ell)` at :math:`x`.

    Interior knot :math:`j` sits at :math:`-B + \sum_{i<j} w_i`, so bin size :math:`w_i` collects
    the gradient of the bin's left knot (index :math:`b`) where :math:`b \ge i + 1` and of its right
    knot where :math:`b + 1 \ge i + 1`; the right end knot :math:`B` is counted as
    :math:`-B + \sum_i w_i` too, a shift shared by all bins that the softmax's backward
    :math:`p \odot (g - \langle p, g\rangle)` removes (the sizes always sum to :math:`2B`). The
    derivatives go through the softplus (derivative: the sigmoid). Elements outside
    :math:`[-B, B]` pass their gradient through and give the parameters none.

    Written without in-place writes into fresh tensors, so that it runs under ``vmap`` (e.g.
    ``torch.autograd.functional.jacobian(..., vectorize=True)``).
    """
    p, masks, sig, xi, w, h, s, d0, d1, inside = saved
    shape = xi.shape
    insf = inside.to(xi.dtype)
    zeros = None
    if grad_out is None:
        zeros = grad_out = torch.zeros_like(xi)
    one_minus = 1.0 - xi
    mix = xi * one_minus
    curv = torch.add(d0, d1).sub_(s, alpha=2.0)
    inv_den = torch.addcmul(s, curv, mix).reciprocal_()
    inv_den2 = inv_den * inv_den
    xi2 = xi * xi
    n = torch.addcmul(d1 * xi2, s, mix, value=2.0).addcmul_(d0, one_minus * one_minus)
    inv_w = w.reciprocal()
    need_ld = grad_ld is not None
    if need_ld:
        inv_n = n.reciprocal()
        one_2xi = 1.0 - 2.0 * xi
        l_xi = torch.addcmul(d1 * xi, s, one_2xi).sub_(d0 * one_minus).mul_(inv_n).mul_(2.0)
        l_xi.sub_(curv.mul_(one_2xi).mul_(inv_den).mul_(2.0))
    if inverse:
        q = grad_out - grad_ld * l_xi * inv_w if need_ld else grad_out
        q = q / (s * s * n * inv_den2)  # divided by g'
        grad_in = torch.where(inside, q, grad_out)
        gy = -q * insf
        gl = -grad_ld * insf if need_ld else None
    else:
        gy = grad_out * insf if zeros is None else zeros
        gl = grad_ld * insf if need_ld else None
    a_inv_den = torch.addcmul(s * xi2, d0, mix).mul_(inv_den)  # R = A / D
    gyh = gy * h
    g_xi = gyh * s * n * inv_den2
    g_s = gyh * (xi2 - a_inv_den * (1.0 - 2.0 * mix)) * inv_den
    g_d0 = gyh * mix * (1.0 - a_inv_den) * inv_den
    g_d1 = -gyh * mix * a_inv_den * inv_den
    g_h = gy * a_inv_den
    if gl is not None:
        two_mix_over_den = 2.0 * mix * inv_den
        g_xi = g_xi + gl * l_xi
        g_s = g_s + gl * (2.0 / s + 2.0 * mix * inv_n - 2.0 * (1.0 - 2.0 * mix) * inv_den)
        g_d0 = g_d0 + gl * (one_minus * one_minus * inv_n - two_mix_over_den)
        g_d1 = g_d1 + gl * (xi2 * inv_n - two_mix_over_den)
    if not inverse:
        grad_in = torch.where(inside, g_xi * inv_w, grad_out)
    gxi_w, gs_s_w, gs_w = g_xi * inv_w, g_s * s * inv_w, g_s * inv_w
    # gradients of the bin's left and right knots, (x, y) stacked
    g_lo = torch.stack([gs_s_w - gxi_w * one_minus, gy - g_h - gs_w])
    g_hi = torch.stack([-gxi_w * xi - gs_s_w, g_h + gs_w])
    # ext = [1, masks_0, ..., masks_{K-2}, 0]: ext[i] = [bin >= i]
    ext = xi.new_empty((k + 1, *shape))
    ext[0].fill_(1.0)
    ext[k].fill_(0.0)
    ext[1:k].copy_(masks)
    g_sizes = g_lo.unsqueeze(1) * ext[1:]
    g_sizes = g_sizes.addcmul_(g_hi.unsqueeze(1), ext[:k])  # (2, K, *S)
    g_sizes = g_sizes - (g_sizes * p).sum(1, keepdim=True)
    g_u = g_sizes * p
    if min_bin_width == min_bin_height:
        g_u = g_u * (2.0 * bound * (1.0 - min_bin_width * k))
    else:
        g_u = g_u * (2.0 * bound * (1.0 - _column([min_bin_width, min_bin_height], p, len(shape) + 1) * k))
    # interior knot j (1..K-1) has the left derivative where bin == j, the right one where bin == j - 1
    onehot = ext[:k] - ext[1:]  # [bin == j], j = 0..K-1
    g_d = (onehot[1:] * g_d0).addcmul_(onehot[:-1], g_d1).mul_(sig)
    return grad_in, torch.cat([g_u.reshape(2 * k, *shape), g_d])


class _FusedSpline(torch.autograd.Function):
    """The spline as one autograd node (:func:`_fused_forward`, :func:`_fused_backward`); returns
    ``(outputs, log-derivative)``, or only the outputs when ``logdet`` is ``False``."""

    @staticmethod
    def forward(ctx, v_in, theta, k, bound, inverse, logdet, min_bin_width, min_bin_height, min_derivative):
        out, ld, saved = _fused_forward(v_in, theta, k, bound, inverse, logdet, min_bin_width, min_bin_height,
                                        min_derivative, save=True)
        ctx.save_for_backward(*saved)
        ctx.options = (k, bound, inverse, min_bin_width, min_bin_height)
        ctx.set_materialize_grads(False)
        return (out, ld) if logdet else out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_ld=None):
        none = (None,) * 7
        if grad_out is None and grad_ld is None:
            return (None, None, *none)
        k, bound, inverse, mw, mh = ctx.options
        grad_in, grad_theta = _fused_backward(grad_out, grad_ld, ctx.saved_tensors, k, bound, inverse, mw, mh)
        return grad_in, grad_theta, *none


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
        implementation: ``"fused"`` (default: one autograd node with a hand-written backward) or
            ``"autograd"`` (the reference tensor code); the same function either way.

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
        implementation: str = "fused",
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
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"unknown spline implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
        conditioner = resolve_conditioner(conditioner, hidden, kernel_size, activation)
        super().__init__(channels, conditioner, cond_channels)
        self.num_bins = int(num_bins)
        self.tail_bound = float(tail_bound)
        self.min_bin_width = float(min_bin_width)
        self.min_bin_height = float(min_bin_height)
        self.min_derivative = float(min_derivative)
        #: ``"fused"`` or ``"autograd"`` (:data:`IMPLEMENTATIONS`): how the elementwise map is
        #: computed, not what; a plain attribute, not saved with the parameters
        self.implementation = implementation
        self.num_params = 3 * self.num_bins - 1
        self.build_conditioner()

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_bins={self.num_bins}, tail_bound={self.tail_bound}, "
            f"kernel_size={self.kernel_size}, cond_channels={self.cond_channels}"
        )

    def _spline(self, v: Tensor, theta: Tensor, inverse: bool, logdet: bool = True) -> tuple[Tensor, Tensor | None]:
        out, logabsdet = spline_from_theta(
            v, theta, self.num_bins, self.tail_bound, inverse=inverse, logdet=logdet,
            min_bin_width=self.min_bin_width, min_bin_height=self.min_bin_height,
            min_derivative=self.min_derivative, implementation=self.implementation,
        )
        return out, (logabsdet.sum((0, 2)) if logdet else None)

    def elementwise(self, xb: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(xb, theta, inverse=False)

    def elementwise_inverse(self, yb: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(yb, theta, inverse=True)

    def elementwise_nologdet(self, xb: Tensor, theta: Tensor) -> Tensor:
        if type(self).elementwise is not RationalQuadraticCoupling.elementwise:  # a subclass's own map
            return self.elementwise(xb, theta)[0]
        return self._spline(xb, theta, inverse=False, logdet=False)[0]

    def elementwise_inverse_nologdet(self, yb: Tensor, theta: Tensor) -> Tensor:
        if type(self).elementwise_inverse is not RationalQuadraticCoupling.elementwise_inverse:
            return self.elementwise_inverse(yb, theta)[0]
        return self._spline(yb, theta, inverse=True, logdet=False)[0]

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
    implementation: str = "fused",
) -> RationalQuadraticCoupling:
    return RationalQuadraticCoupling(
        channels, num_bins, tail_bound, cond_channels=cond_channels, min_bin_width=min_bin_width,
        min_bin_height=min_bin_height, min_derivative=min_derivative, conditioner=conditioner,
        implementation=implementation,
    )


register_coupling("spline", _spline_builder)
