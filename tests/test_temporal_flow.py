"""TemporalFlow and the class-conditional prior: exact log-density, normalisation, round trip at
full size, train/eval, save/load, shared prior, the official DiCMoR variant."""

from __future__ import annotations

import math

import pytest
import torch

from flowtransfer.flows import ClassConditionalGaussian, TemporalFlow, check_logdet

VARIANTS = {
    "default": dict(),
    "flip-sigmoid": dict(mixing="flip", scale="sigmoid"),
    "permutation-additive": dict(mixing="permutation", scale="additive", kernel_size=2),
    "conditional": dict(cond_channels=2),
}


def perturb(module, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def small_flow(dtype=torch.float64, official=False, **kw):
    torch.manual_seed(0)
    if official:
        flow = TemporalFlow.dicmor_official(4, num_layers=3, hidden=8, num_classes=3)
    else:
        flow = TemporalFlow(4, num_layers=3, hidden=8, num_classes=3, **kw)
    flow = flow.to(dtype)
    cond = flow.cond_channels
    x0 = torch.randn(8, 4, 6, dtype=dtype)
    flow(x0, torch.randn(8, cond, 6, dtype=dtype) if cond else None)  # ActNorm init
    return perturb(flow, 0.2).eval()


@pytest.mark.parametrize("T", [1, 3, 7])
@pytest.mark.parametrize("variant", [*VARIANTS, "official"])
def test_flow_logdet_exact_and_round_trip(variant, T):
    flow = small_flow(official=variant == "official", **VARIANTS.get(variant, {}))
    g = torch.Generator().manual_seed(T)
    x = torch.randn(2, 4, T, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 2, T, generator=g, dtype=torch.float64) if flow.cond_channels else None
    report = check_logdet(flow, x, ctx, atol=1e-9)
    assert report.passed, str(report)
    z, ld = flow(x, ctx)
    x_rec, ld_inv = flow.inverse(z, ctx)
    torch.testing.assert_close(x_rec, x, atol=1e-11, rtol=0)
    torch.testing.assert_close(ld + ld_inv, torch.zeros(2, dtype=torch.float64), atol=1e-10, rtol=0)
    # log_prob is the change of variables with the class prior
    y = torch.tensor([0, 2])
    expected = flow.prior.log_prob(z, y) + ld
    torch.testing.assert_close(flow.log_prob(x, y, ctx), expected)
    bpd = flow.bits_per_dim(x, y, ctx)
    torch.testing.assert_close(bpd, -expected / (4 * T * math.log(2)))


def test_float32_round_trip_at_full_size():
    """32 layers, 32 channels, T = 50, trained-looking weights: round trip below 1e-5."""
    torch.manual_seed(0)
    flow = TemporalFlow(32, num_layers=32, hidden=64, kernel_size=3, num_classes=7)
    x = torch.randn(4, 32, 50)
    flow(x)  # ActNorm data-dependent init, as at the start of training
    with torch.no_grad():  # coupling networks away from their zero init, ActNorms moved
        for name, p in flow.named_parameters():
            if ".net." in name or "actnorm" in name or "log_scale" in name or "shift" in name:
                p.add_(0.02 * torch.randn_like(p))
    flow.eval()
    with torch.no_grad():
        z, ld = flow(x)
        x_rec, ld_inv = flow.inverse(z)
    assert z.std() > 0.5 and not torch.allclose(z, x, atol=0.1)
    assert (x_rec - x).abs().max() < 1e-5
    assert (ld + ld_inv).abs().max() < 1e-2


def test_density_is_normalised_on_a_grid():
    """2 channels, T = 1: the integral of exp(log_prob) over a fine grid is 1 within 1e-3."""
    torch.manual_seed(0)
    flow = TemporalFlow(2, num_layers=4, hidden=16, kernel_size=3, num_classes=2).double()
    flow(torch.randn(64, 2, 1, dtype=torch.float64))
    perturb(flow, 0.1).eval()
    with torch.no_grad():
        flow.prior.loc.copy_(torch.tensor([[0.5, -0.3], [-1.0, 0.8]]))
        flow.prior.log_std.copy_(torch.tensor([[0.1, -0.1], [-0.3, 0.1]]))
    n, lim = 501, 10.0
    axis = torch.linspace(-lim, lim, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2, 1)
    h = (2 * lim / (n - 1)) ** 2
    with torch.no_grad():
        for y in (0, 1):
            total = flow.log_prob(grid, y).exp().sum() * h
            assert abs(float(total) - 1.0) < 1e-3, (y, float(total))


def test_train_and_eval_give_same_log_prob_after_init():
    torch.manual_seed(0)
    flow = TemporalFlow(6, num_layers=4, hidden=8, num_classes=3)
    x, y = torch.randn(5, 6, 9), torch.randint(3, (5,))
    first = flow.log_prob(x, y)  # initialises every ActNorm
    perturb(flow, 0.05)
    train_lp = flow.train().log_prob(x, y)
    eval_lp = flow.eval().log_prob(x, y)
    torch.testing.assert_close(train_lp, eval_lp)
    assert not torch.allclose(first, train_lp)


def test_gradients_reach_every_parameter_of_the_flow():
    torch.manual_seed(0)
    flow = TemporalFlow(6, num_layers=3, hidden=8, num_classes=3, cond_channels=2)
    x, y, c = torch.randn(5, 6, 4), torch.randint(3, (5,)), torch.randn(5, 2, 4)
    flow.log_prob(x, y, c)
    perturb(flow, 0.05)
    flow.bits_per_dim(x, y, c).mean().backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_save_load_round_trip_identical(tmp_path):
    torch.manual_seed(0)
    flow = TemporalFlow(6, num_layers=3, hidden=8, num_classes=3, mixing="permutation", seed=5)
    x, y = torch.randn(5, 6, 4), torch.randint(3, (5,))
    flow.log_prob(x, y)
    perturb(flow, 0.05)
    torch.save(flow.state_dict(), tmp_path / "flow.pt")
    torch.manual_seed(123)
    other = TemporalFlow(**flow.config)
    other.load_state_dict(torch.load(tmp_path / "flow.pt", weights_only=True))
    for mode in ("train", "eval"):  # a loaded ActNorm is not re-initialised in train mode
        getattr(flow, mode)(), getattr(other, mode)()
        assert torch.equal(flow.log_prob(x, y), other.log_prob(x, y))
        assert torch.equal(flow.from_latent(x), other.from_latent(x))


def test_class_prior_batch_equals_per_sample_definition():
    torch.manual_seed(0)
    prior = ClassConditionalGaussian(3, num_classes=4)
    perturb(prior, 0.5)
    z, y = torch.randn(6, 3, 5, dtype=torch.float32), torch.tensor([0, 3, 1, 1, 2, 3])
    batch = prior.log_prob(z, y)
    for i in range(6):  # the per-sample definition, with torch.distributions
        normal = torch.distributions.Normal(prior.loc[y[i]][:, None], prior.log_std[y[i]].exp()[:, None])
        torch.testing.assert_close(batch[i], normal.log_prob(z[i]).sum())
    # marginal: uniform mixture over classes
    per_class = torch.stack([prior.log_prob(z, torch.full((6,), k)) for k in range(4)], 1)
    torch.testing.assert_close(prior.marginal_log_prob(z), torch.logsumexp(per_class, 1) - math.log(4))


def test_prior_errors_and_unconditional_mode():
    prior = ClassConditionalGaussian(3, num_classes=4)
    z = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="labels y of shape \\(2,\\) are required"):
        prior.log_prob(z)
    with pytest.raises(ValueError, match="must lie in \\[0, 4\\)"):
        prior.log_prob(z, torch.tensor([0, 4]))
    with pytest.raises(TypeError, match="integer class indices"):
        prior.log_prob(z, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        prior.log_prob(z, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="expected latent of shape"):
        prior.log_prob(torch.randn(2, 4, 5), torch.tensor([0, 1]))
    free = ClassConditionalGaussian(3)
    torch.testing.assert_close(free.log_prob(z), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum((1, 2)))
    with pytest.raises(ValueError, match="unconditional"):
        free.log_prob(z, torch.tensor([0, 1]))
    fixed = ClassConditionalGaussian(3, learnable=False)
    assert list(fixed.parameters()) == [] and fixed.sample(4, length=2).shape == (4, 3, 2)


def test_shared_prior_is_one_object_and_gets_gradients_from_both_flows():
    prior = ClassConditionalGaussian(4, num_classes=3)
    torch.manual_seed(0)
    fa = TemporalFlow(4, num_layers=2, hidden=8, prior=prior)
    fb = TemporalFlow(4, num_layers=2, hidden=8, num_classes=3, prior=prior)
    assert fa.prior is prior and fb.prior is prior
    xa, xb, y = torch.randn(3, 4, 5), torch.randn(3, 4, 5) + 2, torch.tensor([0, 1, 2])
    fa.log_prob(xa, y).sum().backward()
    grad_a = prior.loc.grad.clone()
    prior.zero_grad()
    fb.log_prob(xb, y).sum().backward()
    grad_b = prior.loc.grad.clone()
    prior.zero_grad()
    (fa.log_prob(xa, y).sum() + fb.log_prob(xb, y).sum()).backward()
    assert grad_a.abs().sum() > 0 and grad_b.abs().sum() > 0
    torch.testing.assert_close(prior.loc.grad, grad_a + grad_b)
    # a container holding both flows sees the prior's parameters once
    both = torch.nn.ModuleList([fa, fb])
    assert sum(p is prior.loc for p in both.parameters()) == 1
    with pytest.raises(ValueError, match="num_classes=3"):
        TemporalFlow(4, num_layers=1, num_classes=5, prior=prior)
    with pytest.raises(ValueError, match="channels"):
        TemporalFlow(5, num_layers=1, prior=prior)


def test_official_variant_leaves_first_half_untouched_default_transforms_all():
    official = small_flow(official=True, dtype=torch.float32)
    default = small_flow(dtype=torch.float32)
    x = torch.randn(3, 4, 6)
    z_off, z_def = official.to_latent(x), default.to_latent(x)
    assert torch.equal(z_off[:, :2], x[:, :2])  # the released code's documented flaw
    assert not torch.allclose(z_off[:, 2:], x[:, 2:])
    assert ((z_def - x).abs().amax((0, 2)) > 1e-3).all()  # every channel transformed
    steps = official.steps
    assert all(len(s.layers) == 1 and s.coupling.kernel_size == 1 and s.coupling.scale == "sigmoid" for s in steps)


def test_sampling_shapes_and_consistency():
    flow = small_flow()
    x = flow.sample(5, torch.tensor([0, 1, 2, 0, 1]), length=7)
    assert x.shape == (5, 4, 7) and x.dtype == torch.float64
    assert flow.sample(3, 1, length=1).shape == (3, 4, 1)
    xs, lp = flow.sample_and_log_prob(4, 2, length=3)
    torch.testing.assert_close(lp, flow.log_prob(xs, 2))
    with pytest.raises(ValueError, match="length"):
        flow.sample(2, 0)
    with pytest.raises(ValueError, match="labels y"):
        flow.sample(2, length=3)
    with pytest.raises(ValueError, match="shape \\(batch, 4, time\\)"):
        flow.log_prob(torch.randn(2, 5, 3, dtype=torch.float64), torch.tensor([0, 1]))
    # latent maps are inverse to each other for several lengths
    for T in (1, 2, 11):
        x = torch.randn(2, 4, T, dtype=torch.float64)
        torch.testing.assert_close(flow.from_latent(flow.to_latent(x)), x)


@pytest.mark.parametrize("direction", ["inverse", "forward"])
@pytest.mark.parametrize("variant", [*VARIANTS, "official", "affine-glow"])
def test_latent_maps_skip_the_logdet_and_give_the_maps_bit_for_bit(variant, direction, monkeypatch):
    """``from_latent`` (transfer) runs the log-det-free inverse, ``to_latent`` the log-det-free
    forward: the same values as ``inverse(z)[0]`` / ``forward(x)[0]`` and the same gradients, and
    no spline log-derivative is computed."""
    kw = dict(coupling="affine", actnorm="every", mixing="conv1x1") if variant == "affine-glow" else VARIANTS.get(variant, {})
    flow = small_flow(official=variant == "official", **kw)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 5, generator=g, dtype=torch.float64) * 3
    ctx = torch.randn(3, 2, 5, generator=g, dtype=torch.float64) if flow.cond_channels else None
    outs = []
    full, free = ((flow.inverse, flow.from_latent) if direction == "inverse" else (flow.forward, flow.to_latent))
    for fn in (lambda v: full(v, ctx)[0], lambda v: free(v, ctx)):
        v = z.clone().requires_grad_()
        x = fn(v)
        outs.append((x.detach(), *torch.autograd.grad(x.square().sum(), [v, *flow.parameters()], allow_unused=True)))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1:], outs[1][1:]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # no log-det is asked of the spline couplings
    import flowtransfer.flows.spline as spline

    asked = []
    real = spline.spline_from_theta
    monkeypatch.setattr(spline, "spline_from_theta", lambda *a, **k: asked.append(k["logdet"]) or real(*a, **k))
    if direction == "inverse":
        flow.from_latent(z, ctx)
        flow.sample(2, 1, length=3, context=None if ctx is None else ctx[:2, :, :3])
    else:
        flow.to_latent(z, ctx)
    uses_spline = any(isinstance(m, spline.RationalQuadraticCoupling) for m in flow.modules())
    assert uses_spline == bool(asked) and not any(asked)
