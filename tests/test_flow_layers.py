"""Every flow layer: exact log-det (float64, autograd Jacobian), round trip, log-dets cancelling,
gradients, shape errors. Layers are perturbed away from their trivial initialisation first."""

from __future__ import annotations

import pytest
import torch

from flowtransfer.flows import (
    ActNorm,
    AffineCoupling,
    RationalQuadraticCoupling,
    ChannelFlip,
    ChannelPermutation,
    FlowStep,
    InvertibleConv1x1,
    TemporalFlow,
)

C = 4
COND = 2

# name -> (factory, channels, takes_context)
LAYERS = {
    "actnorm": (lambda: ActNorm(C), C, False),
    "conv1x1": (lambda: InvertibleConv1x1(C), C, False),
    "permutation": (lambda: ChannelPermutation(C, seed=0), C, False),
    "flip": (lambda: ChannelFlip(C), C, False),
    "coupling-sigmoid-k1": (lambda: AffineCoupling(C, 8, 1, scale="sigmoid"), C, False),
    "coupling-sigmoid-k3": (lambda: AffineCoupling(C, 8, 3, scale="sigmoid"), C, False),
    "coupling-softclamp-k3": (lambda: AffineCoupling(C, 8, 3, scale="softclamp"), C, False),
    "coupling-additive-k3": (lambda: AffineCoupling(C, 8, 3, scale="additive"), C, False),
    "coupling-odd-k2": (lambda: AffineCoupling(5, 8, 2, scale="softclamp"), 5, False),
    "coupling-cond": (lambda: AffineCoupling(C, 8, 3, scale="softclamp", cond_channels=COND), C, True),
    "coupling-affine-bounded-shift": (lambda: AffineCoupling(C, 8, 3, shift_bound=1.5), C, False),
    "spline-k3": (lambda: RationalQuadraticCoupling(C, 4, 1.5, 8, 3), C, False),
    "spline-odd-k1": (lambda: RationalQuadraticCoupling(5, 3, 2.0, 8, 1), 5, False),
    "spline-cond": (lambda: RationalQuadraticCoupling(C, 4, 1.5, 8, 3, cond_channels=COND), C, True),
    "step": (lambda: FlowStep(C, 8, 3), C, False),
    "step-affine-conv1x1": (lambda: FlowStep(C, 8, 3, coupling="affine", mixing="conv1x1"), C, False),
    "step-cond-sigmoid": (lambda: FlowStep(C, 8, 3, scale="sigmoid", mixing="flip", cond_channels=COND), C, True),
}
TS = [1, 3, 7]


def perturbed(name: str, dtype=torch.float64, seed: int = 0, noise: float = 0.2):
    """Build layer ``name``, initialise ActNorms on data, then add noise to every parameter."""
    factory, channels, cond = LAYERS[name]
    torch.manual_seed(seed)
    layer = factory().to(dtype)
    x0 = torch.randn(6, channels, 5, dtype=dtype) * 2 + 0.5
    ctx0 = torch.randn(6, COND, 5, dtype=dtype) if cond else None
    layer.train()
    layer(x0, ctx0)  # data-dependent init of any ActNorm
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(noise * torch.randn_like(p))
    return layer, channels, cond


def inputs(channels, cond, T, dtype=torch.float64, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, T, generator=g, dtype=dtype)
    ctx = torch.randn(batch, COND, T, generator=g, dtype=dtype) if cond else None
    return x, ctx


def jacobian_logdet(layer, x, ctx):
    """Per-sample log|det J| from the autograd Jacobian of the whole flattened batch map.

    In eval mode samples do not interact, so the Jacobian is block diagonal; each block is a
    sample's Jacobian (and the off-diagonal blocks are checked to be zero).
    """
    b, d = x.shape[0], x[0].numel()
    f = lambda v: layer(v.reshape(x.shape), ctx)[0].reshape(b, d)  # noqa: E731
    jac = torch.autograd.functional.jacobian(f, x.reshape(b, d), vectorize=True)  # (b, d, b, d)
    blocks = torch.stack([jac[i, :, i] for i in range(b)])
    off = jac.clone()
    for i in range(b):
        off[i, :, i] = 0
    assert off.abs().max() == 0
    return torch.linalg.slogdet(blocks)[1]


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_logdet_matches_autograd_jacobian(name, T):
    layer, channels, cond = perturbed(name)
    layer.eval()
    x, ctx = inputs(channels, cond, T)
    y, logdet = layer(x, ctx)
    assert y.shape == x.shape and logdet.shape == (x.shape[0],)
    torch.testing.assert_close(logdet, jacobian_logdet(layer, x, ctx), atol=1e-9, rtol=0)


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_round_trip_and_logdets_cancel(name, T):
    layer, channels, cond = perturbed(name)
    layer.eval()
    x, ctx = inputs(channels, cond, T)
    y, ld_fwd = layer(x, ctx)
    x_rec, ld_inv = layer.inverse(y, ctx)
    torch.testing.assert_close(x_rec, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld_fwd + ld_inv, torch.zeros_like(ld_fwd), atol=1e-12, rtol=0)
    # the inverse of the inverse is the forward
    y2, _ = layer(x_rec, ctx)
    torch.testing.assert_close(y2, y, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_is_not_trivial_after_perturbation(name):
    """Guards the other tests: a perturbed layer (other than the fixed ones) changes its input."""
    layer, channels, cond = perturbed(name)
    x, ctx = inputs(channels, cond, 3)
    y, ld = layer.eval()(x, ctx)
    assert not torch.allclose(y, x)
    if name not in ("permutation", "flip", "coupling-additive-k3"):
        assert ld.abs().min() > 1e-3


@pytest.mark.parametrize("name", list(LAYERS))
def test_gradients_reach_every_parameter(name):
    layer, channels, cond = perturbed(name, dtype=torch.float32)
    if not list(layer.parameters()):
        assert name in ("permutation", "flip")
        return
    x, ctx = inputs(channels, cond, 7, dtype=torch.float32, batch=4)
    y, ld = layer(x, ctx)
    (y.square().sum() - ld.sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.abs().sum() > 0, pname
    # and through the inverse
    layer.zero_grad()
    xr, ld_inv = layer.inverse(x, ctx)
    (xr.square().sum() + ld_inv.sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", list(LAYERS))
def test_wrong_channel_count_is_a_clear_error(name):
    layer, channels, cond = perturbed(name, dtype=torch.float32)
    x = torch.randn(2, channels + 1, 3)
    ctx = torch.randn(2, COND, 3) if cond else None
    with pytest.raises(ValueError, match=f"expected input of shape \\(batch, {channels}, time\\)"):
        layer(x, ctx)
    with pytest.raises(ValueError, match="expected input of shape"):
        layer.inverse(x, ctx)


def test_actnorm_initialises_to_zero_mean_unit_std_once():
    torch.manual_seed(0)
    layer = ActNorm(3)
    x = torch.randn(16, 3, 20) * torch.tensor([1.0, 5.0, 0.1])[:, None] + torch.tensor([2.0, -1.0, 0.0])[:, None]
    y, _ = layer(x)
    torch.testing.assert_close(y.mean((0, 2)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std((0, 2), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    assert bool(layer.initialized)
    # a second batch does not re-initialise
    y2, _ = layer(x * 3)
    torch.testing.assert_close(y2, (x * 3 - layer.shift[:, None]) * layer.log_scale.exp()[:, None])
    # the flag survives save/load
    fresh = ActNorm(3)
    fresh.load_state_dict(layer.state_dict())
    assert bool(fresh.initialized)
    torch.testing.assert_close(fresh(x)[0], y)


def test_actnorm_not_initialised_in_eval_mode_and_single_value_batch():
    layer = ActNorm(2).eval()
    x = torch.randn(1, 2, 1)
    y, ld = layer(x)
    torch.testing.assert_close(y, x)
    assert not bool(layer.initialized)
    layer.train()
    y, ld = layer(x)  # one value per channel: only the mean is set, no division by a zero std
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    torch.testing.assert_close(y, torch.zeros_like(y))


def test_coupling_leaves_first_half_and_is_identity_at_init_for_softclamp():
    layer = AffineCoupling(5, 8, 3, scale="softclamp")
    x = torch.randn(2, 5, 4)
    y, ld = layer(x)
    torch.testing.assert_close(y, x)  # zero-initialised last layer: identity
    torch.testing.assert_close(ld, torch.zeros(2))
    sig = AffineCoupling(5, 8, 3, scale="sigmoid")
    y, _ = sig(x)
    torch.testing.assert_close(y[:, :2], x[:, :2])
    torch.testing.assert_close(y[:, 2:], x[:, 2:] * torch.sigmoid(torch.tensor(2.0)))


def test_coupling_context_changes_output_and_is_checked():
    layer, _, _ = perturbed("coupling-cond", dtype=torch.float32)
    x = torch.randn(2, C, 5)
    c1, c2 = torch.randn(2, COND, 5), torch.randn(2, COND, 5)
    assert not torch.allclose(layer(x, c1)[0], layer(x, c2)[0])
    # (B, cond) is broadcast over time
    c_static = torch.randn(2, COND)
    torch.testing.assert_close(layer(x, c_static)[0], layer(x, c_static[:, :, None].expand(-1, -1, 5))[0])
    with pytest.raises(ValueError, match="context .* is required"):
        layer(x)
    with pytest.raises(ValueError, match="context must have shape"):
        layer(x, torch.randn(2, COND + 1, 5))
    with pytest.raises(ValueError, match="takes no context"):
        AffineCoupling(C, 8)(x, c1)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="unknown scale"):
        AffineCoupling(4, scale="exp")
    with pytest.raises(ValueError, match="channels >= 2"):
        AffineCoupling(1)
    with pytest.raises(ValueError, match="unknown mixing"):
        FlowStep(4, mixing="shuffle")


def test_permutation_is_seeded_and_1x1_weight_inverse_is_accurate():
    assert torch.equal(ChannelPermutation(16, seed=3).perm, ChannelPermutation(16, seed=3).perm)
    assert not torch.equal(ChannelPermutation(16, seed=3).perm, ChannelPermutation(16, seed=4).perm)
    conv = InvertibleConv1x1(32)
    w, w_inv = conv.weight(), conv.weight_inverse()
    torch.testing.assert_close(w @ w_inv, torch.eye(32), atol=2e-6, rtol=0)
    sign, logabs = torch.linalg.slogdet(w.double())
    torch.testing.assert_close(logabs.float(), conv.log_diag.sum(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("k, pad", [(1, (0, 0)), (2, (0, 1)), (3, (1, 1)), (5, (2, 2)), (3, (0, 0))])
def test_channel_major_conv_matches_conv1d(k, pad):
    import torch.nn.functional as F

    from flowtransfer.flows.layout import conv1d_channel_major

    torch.manual_seed(20)
    x = torch.randn(4, 6, 9, dtype=torch.float64)  # (B, C, T)
    w, b = torch.randn(5, 6, k, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    want = F.conv1d(F.pad(x, pad), w, b)
    got = conv1d_channel_major(x.transpose(0, 1).contiguous(), w, b, pad).transpose(0, 1)
    torch.testing.assert_close(got, want)
    got_nobias = conv1d_channel_major(x.transpose(0, 1).contiguous(), w, None, pad).transpose(0, 1)
    torch.testing.assert_close(got_nobias, F.conv1d(F.pad(x, pad), w))


def test_coupling_channel_major_path_matches_its_network_module():
    # the coupling computes its network channel-major from the nn.Sequential's parameters; the
    # module called on (B, C, T) must give the same scale and shift
    torch.manual_seed(21)
    for k in (1, 2, 3):
        layer = AffineCoupling(6, hidden=8, kernel_size=k, scale="additive").double()
        torch.nn.init.normal_(layer.net[-1].weight)
        x = torch.randn(3, 6, 7, dtype=torch.float64)
        y, _ = layer(x)
        torch.testing.assert_close(y[:, 3:], x[:, 3:] + layer.net(x[:, :3]))


def test_1x1_matrices_follow_a_fused_optimiser_step_between_no_grad_passes():
    # regression: a cache keyed on the parameters' version counters went stale after fused Adam
    # (which updates in place without bumping them), so evaluation used old matrices
    from flowtransfer.training import TrainConfig, build_optimizer

    torch.manual_seed(22)
    flow = TemporalFlow(6, num_layers=3, hidden=8, num_classes=2, mixing="conv1x1", actnorm="every")
    x, y = torch.randn(4, 6, 5), torch.randint(2, (4,))
    opt = build_optimizer([{"params": list(flow.parameters())}], TrainConfig(lr=0.1))
    assert opt.defaults["fused"] is True
    for _ in range(2):
        with torch.no_grad():
            before = flow.to_latent(x)
        opt.zero_grad()
        (-flow.log_prob(x, y).mean()).backward()
        opt.step()
        with torch.no_grad():
            after = flow.to_latent(x)
            mix = flow.steps[0].layers[1]
            w = mix.permutation.double() @ (mix._factors()[0].double() @ mix._factors()[1].double())
            torch.testing.assert_close(mix.weight(), w.float())
        assert not torch.allclose(before, after)
        with torch.inference_mode():
            torch.testing.assert_close(flow.to_latent(x), after)



@pytest.mark.parametrize("direction", ["forward", "inverse"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_logdet_free_maps_give_the_same_output_and_gradients(name, direction):
    """``inverse_cm_nologdet`` is ``inverse_cm(...)[0]`` bit for bit, ``forward_cm_nologdet`` is
    ``forward_cm(...)[0]``, and so are their gradients (for the input and every parameter)."""
    layer, channels, cond = perturbed(name)
    layer.eval()
    x, ctx = inputs(channels, cond, 5)
    x_cm = x.transpose(0, 1).contiguous()
    ctx_cm = layer.context_cm(ctx, x.shape[0], x.shape[2])
    grads = []
    full, free = ((layer.inverse_cm, layer.inverse_cm_nologdet) if direction == "inverse"
                  else (layer.forward_cm, layer.forward_cm_nologdet))
    for fn in (lambda v: full(v, ctx_cm)[0], lambda v: free(v, ctx_cm)):
        v = x_cm.clone().requires_grad_()
        out = fn(v)
        params = [p for p in layer.parameters()]
        grads.append((out.detach(), *torch.autograd.grad(out.sin().sum(), [v, *params], allow_unused=True)))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1:], grads[1][1:]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_logdet_free_maps_follow_a_subclass_that_changes_the_map():
    """A coupling subclass that overrides ``forward_cm``/``inverse_cm`` (or a spline subclass that
    overrides ``elementwise``/``elementwise_inverse``) gets log-det-free maps that follow it."""
    import math

    from flowtransfer.flows.coupling import AffineCoupling
    from flowtransfer.flows.spline import RationalQuadraticCoupling

    class Shifted(AffineCoupling):
        def forward_cm(self, x, context=None):
            y, ld = super().forward_cm(x, context)
            return y + 1.0, ld

        def inverse_cm(self, y, context=None):
            return super().inverse_cm(y - 1.0, context)

    class Doubled(RationalQuadraticCoupling):
        def elementwise(self, xb, theta):
            yb, ld = super().elementwise(xb, theta)
            return 2.0 * yb, ld + xb.shape[0] * xb.shape[2] * math.log(2.0)

        def elementwise_inverse(self, yb, theta):
            return super().elementwise_inverse(yb / 2.0, theta)

    x = torch.randn(3, 4, 5, dtype=torch.float64)  # (B, C, T)
    for layer in (Shifted(4).double(), Doubled(4).double()):
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.1 * torch.randn_like(p))
        x_cm = x.transpose(0, 1).contiguous()
        assert torch.equal(layer.forward_cm_nologdet(x_cm), layer.forward_cm(x_cm)[0])
        assert torch.equal(layer.inverse_cm_nologdet(x_cm), layer.inverse_cm(x_cm)[0])
