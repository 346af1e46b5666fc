"""The rational-quadratic spline and its coupling, in float64 at every edge: against nflows'
independent implementation, round trip, log-det against autograd, on the knots, at +-B, in the
tails, far outside, the cancellation-free inverse root, and the bounded inverse."""

from __future__ import annotations

import math

import pytest
import torch

from flowtransfer.flows import RationalQuadraticCoupling, check_logdet, rational_quadratic_spline
from flowtransfer.flows.spline import IMPLEMENTATIONS, inverse_root, spline_from_theta, spline_knots

K = 6
B = 3.0


def params(shape, scale=1.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(K, *shape, generator=g, dtype=dtype) * scale,
            torch.randn(K, *shape, generator=g, dtype=dtype) * scale,
            torch.randn(K - 1, *shape, generator=g, dtype=dtype) * scale)


def test_matches_nflows_reference_forward_and_inverse():
    from nflows.transforms.splines.rational_quadratic import unconstrained_rational_quadratic_spline

    uw, uh, ud = params((500,), scale=1.5)
    x = torch.randn(500, dtype=torch.float64) * 2.5
    y, ld = rational_quadratic_spline(x, uw, uh, ud, B)
    # nflows puts bins last and adds the softplus shift to the raw derivatives itself only at the ends
    shift = math.log(math.expm1(1 - 1e-3))
    ref_y, ref_ld = unconstrained_rational_quadratic_spline(
        x, uw.T, uh.T, (ud + shift).T, inverse=False, tails="linear", tail_bound=B)
    torch.testing.assert_close(y, ref_y, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ld, ref_ld, atol=1e-11, rtol=1e-11)
    ref_x, ref_ld_inv = unconstrained_rational_quadratic_spline(
        y, uw.T, uh.T, (ud + shift).T, inverse=True, tails="linear", tail_bound=B)
    x_back, ld_inv = rational_quadratic_spline(y, uw, uh, ud, B, inverse=True)
    torch.testing.assert_close(x_back, ref_x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ld_inv, ref_ld_inv, atol=1e-10, rtol=1e-10)


def edge_inputs(n_each=1):
    """Inputs at every edge: each interior knot, +-B exactly, just inside / outside, deep tails."""
    uw, uh, ud = params((1,), scale=1.0, seed=3)
    xk, yk, _ = spline_knots(uw, uh, ud, B)
    knots = xk[:, 0]
    special = torch.tensor([-B, B, -B + 1e-12, B - 1e-12, -B - 1e-12, B + 1e-12, 4.0, -7.5, 1e6, -1e6],
                           dtype=torch.float64)
    inner = torch.linspace(-B, B, 41, dtype=torch.float64)
    x = torch.cat([knots, special, inner])
    expand = lambda t: t.expand(t.shape[0], len(x)).clone()  # noqa: E731
    return x, expand(uw), expand(uh), expand(ud), knots, yk[:, 0]


def test_round_trip_and_logdet_at_every_edge():
    x, uw, uh, ud, knots, knot_y = edge_inputs()
    y, ld = rational_quadratic_spline(x, uw, uh, ud, B)
    x_back, ld_inv = rational_quadratic_spline(y, uw, uh, ud, B, inverse=True)
    torch.testing.assert_close(x_back, x, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ld + ld_inv, torch.zeros_like(ld), atol=1e-11, rtol=0)
    # the knots map onto the knots
    torch.testing.assert_close(y[: len(knots)], knot_y, atol=1e-13, rtol=0)
    # identity (and log-det exactly 0) on and beyond +-B
    outside = x.abs() >= B
    assert torch.equal(y[outside], x[outside]) and torch.equal(ld[x.abs() > B], torch.zeros_like(ld[x.abs() > B]))
    # log-det against the autograd derivative, elementwise, including the knots and the tails
    xr = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(rational_quadratic_spline(xr, uw, uh, ud, B)[0].sum(), xr)
    torch.testing.assert_close(ld, grad.log(), atol=1e-11, rtol=0)
    # inverse log-det against the autograd derivative of the inverse
    yr = y.clone().requires_grad_()
    (grad_inv,) = torch.autograd.grad(rational_quadratic_spline(yr, uw, uh, ud, B, inverse=True)[0].sum(), yr)
    torch.testing.assert_close(ld_inv, grad_inv.log(), atol=1e-11, rtol=0)


def test_continuous_with_unit_slope_at_the_bounds():
    uw, uh, ud = params((1,), scale=2.0, seed=5)
    x = torch.tensor([-B - 1e-9, -B + 1e-9, B - 1e-9, B + 1e-9], dtype=torch.float64)
    y, ld = rational_quadratic_spline(x, uw.expand(K, 4), uh.expand(K, 4), ud.expand(K - 1, 4), B)
    torch.testing.assert_close(y, x, atol=1e-8, rtol=0)
    torch.testing.assert_close(ld, torch.zeros(4, dtype=torch.float64), atol=1e-8, rtol=0)


def test_zero_parameters_are_the_identity():
    x = torch.linspace(-2 * B, 2 * B, 101, dtype=torch.float64)
    z = torch.zeros(K, 101, dtype=torch.float64)
    y, ld = rational_quadratic_spline(x, z, z, z[:-1], B)
    torch.testing.assert_close(y, x, atol=1e-14, rtol=0)
    torch.testing.assert_close(ld, torch.zeros_like(ld), atol=1e-14, rtol=0)


def test_inverse_root_has_no_cancellation():
    """The textbook root (-b + sqrt(b^2 - 4ac)) / 2a subtracts nearly equal numbers near a bin's left
    knot, and b^2 - 4ac itself cancels near the right knot when its derivative is small.
    ``inverse_root`` avoids both: in float32 it stays within a few ulps of the float64 value for
    Delta from 1e-9 h to h (from either knot), where the textbook form loses many digits."""
    u = torch.logspace(-9, 0, 40, dtype=torch.float64)
    cases = [(0.7, 1.3, 0.4, 2.5), (0.05, 0.2, 3.0, 0.01), (2.0, 0.5, 1e-3, 6.0), (1.0, 1.0, 1.0, 1.0)]
    for h, s, d0, d1 in cases:
        for left64 in (u * h, h - u * h):  # near the left knot, near the right knot
            left32 = left64.float()
            right32 = (h - left64).float()
            p32 = [torch.tensor(v, dtype=torch.float32) for v in (h, s, d0, d1)]
            exact = inverse_root(left32.double(), right32.double(), *(v.double() for v in p32))
            got = inverse_root(left32, right32, *p32).double()
            assert float(((got - exact).abs() / exact.clamp_min(1e-30)).max()) < 1e-6, (h, s, d0, d1)
    # the textbook form in float32 on the first case, near the left knot: it does fail there
    hh, ss, dd0, dd1 = (torch.tensor(v, dtype=torch.float32) for v in cases[0])
    delta = (u * cases[0][0]).float()
    curv = dd0 + dd1 - 2 * ss
    a, b, c = hh * (ss - dd0) + delta * curv, hh * dd0 - delta * curv, -ss * delta
    naive = ((-b + torch.sqrt(b * b - 4 * a * c)) / (2 * a)).double()
    exact = inverse_root(delta.double(), (hh - delta).double(), hh.double(), ss.double(), dd0.double(), dd1.double())
    assert float(((naive - exact).abs() / exact).max()) > 1e-2


def test_float32_round_trip_for_moderate_parameters():
    uw, uh, ud = params((4000,), scale=0.7, seed=2, dtype=torch.float32)
    x = torch.randn(4000, generator=torch.Generator().manual_seed(9)) * 2
    y, ld = rational_quadratic_spline(x, uw, uh, ud, B)
    x_back, ld_inv = rational_quadratic_spline(y, uw, uh, ud, B, inverse=True)
    assert float((x_back - x).abs().max()) < 2e-4  # worst over 50 input draws: 6.7e-5 (ill-conditioned bins)
    assert float((ld + ld_inv).abs().max()) < 1e-4


def test_gradients_are_finite_everywhere():
    x, uw, uh, ud, *_ = edge_inputs()
    uw, uh, ud = (t.clone().requires_grad_() for t in (uw, uh, ud))
    for inverse in (False, True):
        out, ld = rational_quadratic_spline(x, uw, uh, ud, B, inverse=inverse)
        grads = torch.autograd.grad((out.sin() + ld).sum(), (uw, uh, ud))
        assert all(torch.isfinite(g).all() for g in grads)


def test_bad_parameter_counts_and_options_are_clear_errors():
    uw, uh, ud = params((3,))
    with pytest.raises(ValueError, match="K widths, K heights and K-1 derivatives"):
        rational_quadratic_spline(torch.zeros(3, dtype=torch.float64), uw, uh, ud[:-1], B)
    with pytest.raises(ValueError, match="num_bins"):
        RationalQuadraticCoupling(4, num_bins=0)
    with pytest.raises(ValueError, match="tail_bound"):
        RationalQuadraticCoupling(4, tail_bound=-1.0)
    with pytest.raises(ValueError, match="min_bin_width"):
        RationalQuadraticCoupling(4, num_bins=10, min_bin_width=0.2)
    with pytest.raises(ValueError, match="min_derivative"):
        RationalQuadraticCoupling(4, min_derivative=0.0)


def perturbed_coupling(noise=0.5, seed=0, **kw):
    torch.manual_seed(seed)
    layer = RationalQuadraticCoupling(5, num_bins=5, tail_bound=2.0, hidden=8, **kw).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(noise * torch.randn_like(p))
    return layer.eval()


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_coupling_logdet_and_round_trip_with_inputs_in_the_tails(kernel_size):
    layer = perturbed_coupling(kernel_size=kernel_size)
    x = torch.randn(3, 5, 4, dtype=torch.float64) * 2.5  # tail_bound 2: many inputs in the tails
    x[0, 3, 0], x[1, 4, 1], x[2, 2, 2] = 2.0, -2.0, 1e5
    assert check_logdet(layer, x).passed
    with torch.no_grad():
        z, ld = layer(x)
        x_back, ld_inv = layer.inverse(z)
    torch.testing.assert_close(x_back, x, atol=1e-10, rtol=1e-12)
    torch.testing.assert_close(ld + ld_inv, torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    assert torch.equal(z[:, :2], x[:, :2])  # identity half
    assert float(z[2, 2, 2]) == 1e5  # far outside: untouched


def test_coupling_is_identity_at_initialisation():
    layer = RationalQuadraticCoupling(4, hidden=8).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64) * 3
    z, ld = layer(x)
    torch.testing.assert_close(z, x, atol=1e-13, rtol=0)
    torch.testing.assert_close(ld, torch.zeros(2, dtype=torch.float64), atol=1e-12, rtol=0)


def test_inverse_is_bounded_whatever_the_conditioner_outputs():
    """|x| <= max(|y|, B) elementwise, even with a wildly perturbed conditioner."""
    layer = perturbed_coupling(noise=5.0, seed=4)
    y = (torch.rand(64, 5, 7, dtype=torch.float64) * 2 - 1) * torch.tensor([0.5, 1.0, 2.0, 3.0, 50.0],
                                                                              dtype=torch.float64)[None, :, None]
    x, _ = layer.inverse(y)
    bound = torch.maximum(y.abs(), torch.tensor(2.0, dtype=torch.float64))
    assert bool((x.abs() <= bound + 1e-12).all())
    radius = y.abs().amax((0, 2))
    cert = layer.inverse_bound(radius)
    assert bool((x.abs().amax((0, 2)) <= cert + 1e-12).all())
    torch.testing.assert_close(cert[2:], radius[2:].clamp_min(2.0))


# ---------------------------------------------------------------------- the fused implementation
def theta_and_inputs(k=K, n=40, scale=1.5, seed=11):
    """Stacked parameters ``(3K-1, n)`` and inputs at random points, in the tails, on every knot
    (x and y knots, for the forward and the inverse), at +-B, just inside and far outside."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(3 * k - 1, 1, generator=g, dtype=torch.float64) * scale
    xk, yk, _ = spline_knots(theta[:k], theta[k : 2 * k], theta[2 * k :], B)
    special = torch.tensor([-B, B, -B + 1e-9, B - 1e-9, 4.0, -7.5, 1e6, -1e6], dtype=torch.float64)
    x = torch.cat([torch.randn(n, generator=g, dtype=torch.float64) * 2.0, special, xk[:, 0], yk[:, 0]])
    return theta.expand(3 * k - 1, len(x)).clone(), x


def both(x, theta, k=K, **kw):
    return {impl: spline_from_theta(x, theta, k, B, implementation=impl, **kw) for impl in IMPLEMENTATIONS}


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("k", [2, 3, K])
def test_fused_matches_the_autograd_reference_values_logdets_and_gradients(inverse, k):
    theta, x = theta_and_inputs(k)
    grads = {}
    for impl in IMPLEMENTATIONS:
        xr, tr = x.clone().requires_grad_(), theta.clone().requires_grad_()
        y, ld = spline_from_theta(xr, tr, k, B, inverse=inverse, implementation=impl)
        g = torch.Generator().manual_seed(5)
        wy, wl = (torch.randn(len(x), generator=g, dtype=torch.float64) for _ in range(2))
        grads[impl] = (y.detach(), ld.detach(), *torch.autograd.grad((wy * y).sum() + (wl * ld).sum(), (xr, tr)))
    for a, b in zip(grads["fused"], grads["autograd"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_fused_with_different_bin_width_and_height_floors():
    theta, x = theta_and_inputs()
    kw = dict(min_bin_width=0.02, min_bin_height=0.07, min_derivative=0.01)
    res = {}
    for impl in IMPLEMENTATIONS:
        tr = theta.clone().requires_grad_()
        y, ld = spline_from_theta(x, tr, K, B, implementation=impl, **kw)
        res[impl] = (y.detach(), ld.detach(), *torch.autograd.grad((y.sin() + ld).sum(), tr))
    for a, b in zip(res["fused"], res["autograd"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("inverse", [False, True])
def test_fused_gradcheck_random_points_tails_and_far_outside(inverse):
    """Hand-written backward against finite differences, for the outputs and the log-det."""
    theta, x = theta_and_inputs(n=12)
    x = x[:20]  # random points, +-B -+ 1e-9 (just inside), the tails and far outside
    x = x[(x.abs() - B).abs() > 1e-3]  # the log-det is only piecewise differentiable at exactly +-B
    fn = lambda v, t: spline_from_theta(v, t, K, B, inverse=inverse)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x.clone().requires_grad_(), theta[:, : len(x)].clone().requires_grad_()))
    out_only = lambda v, t: spline_from_theta(v, t, K, B, inverse=inverse, logdet=False)[0]  # noqa: E731
    assert torch.autograd.gradcheck(out_only, (x.clone().requires_grad_(), theta[:, : len(x)].clone().requires_grad_()))


@pytest.mark.parametrize("inverse", [False, True])
def test_fused_gradcheck_on_the_knots_and_at_the_bounds(inverse):
    """On a knot and at +-B the map is C1 (in the input and the parameters), so finite differences
    of the outputs apply; its log-derivative has a kink there (the spline is only C1), so the
    log-det's one-sided gradient is checked against the reference instead, which takes the same
    side (a knot starts its bin)."""
    theta, x = theta_and_inputs(n=0)
    t = theta.clone().requires_grad_()
    v = x.clone()  # the knots move with theta: gradcheck perturbs theta around the knot
    # a narrow bin next to a knot curves the inverse strongly: a small step keeps the finite
    # differences accurate (one-sided differences at 1e-4 / 1e-6 / 1e-8 converge to the same value)
    out_only = lambda t_: spline_from_theta(v, t_, K, B, inverse=inverse)[0]  # noqa: E731
    assert torch.autograd.gradcheck(out_only, (t,), eps=1e-8, atol=1e-5)
    near = v.abs() < 100  # a step of 1e-8 is below the resolution at 1e6 (checked above)
    assert torch.autograd.gradcheck(lambda v_: spline_from_theta(v_, theta[:, near], K, B, inverse=inverse)[0],
                                    (v[near].clone().requires_grad_(),), eps=1e-8, atol=1e-5)
    res = {}
    for impl in IMPLEMENTATIONS:
        vr, tr = v.clone().requires_grad_(), theta.clone().requires_grad_()
        ld = spline_from_theta(vr, tr, K, B, inverse=inverse, implementation=impl)[1]
        res[impl] = torch.autograd.grad(ld.sum(), (vr, tr))
    for a, b in zip(res["fused"], res["autograd"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("inverse", [False, True])
def test_logdet_free_path_gives_the_same_outputs_and_gradients(implementation, inverse):
    theta, x = theta_and_inputs()
    y, ld = spline_from_theta(x, theta, K, B, inverse=inverse, implementation=implementation)
    y2, none = spline_from_theta(x, theta, K, B, inverse=inverse, logdet=False, implementation=implementation)
    assert none is None and torch.equal(y, y2)
    grads = []
    for logdet in (True, False):
        xr, tr = x.clone().requires_grad_(), theta.clone().requires_grad_()
        out = spline_from_theta(xr, tr, K, B, inverse=inverse, logdet=logdet, implementation=implementation)[0]
        grads.append(torch.autograd.grad(out.sin().sum(), (xr, tr)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_fused_identity_tails_are_exact_and_nan_passes_through():
    theta, x = theta_and_inputs()
    x = torch.cat([x, torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)])
    theta = theta[:, :1].expand(3 * K - 1, len(x)).clone()
    for inverse in (False, True):
        y, ld = spline_from_theta(x, theta, K, B, inverse=inverse)
        outside = ~(x.abs() <= B)
        assert torch.equal(y[outside].nan_to_num(), x[outside].nan_to_num())
        assert torch.equal(ld[outside], torch.zeros_like(ld[outside]))


def test_coupling_implementations_agree_and_unknown_one_is_an_error():
    fused = perturbed_coupling()
    ref = perturbed_coupling()
    ref.implementation = "autograd"
    x = torch.randn(3, 5, 4, dtype=torch.float64) * 2.5
    for a, b in zip((*fused(x), *fused.inverse(x)), (*ref(x), *ref.inverse(x))):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=1e-11)
    with pytest.raises(ValueError, match="implementation"):
        RationalQuadraticCoupling(4, implementation="cuda")
    with pytest.raises(ValueError, match="implementation"):
        spline_from_theta(x[0, 0], torch.zeros(11, 4, dtype=torch.float64), 4, B, implementation="nope")
