"""Pluggable couplings and conditioners, the bounded default design and its certificate, the
inverse-stability check, dtype/device, torch.compile graph breaks, sampling temperature."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowtransfer.flows import (
    ActNorm,
    Coupling,
    FlowStep,
    RationalQuadraticCoupling,
    TemporalConditioner,
    TemporalFlow,
    check_inverse_stability,
    check_invertibility,
    check_logdet,
    register_coupling,
)
from flowtransfer.flows.coupling import COUPLINGS


def perturb(module: nn.Module, noise: float, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(noise * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


# ---------------------------------------------------------------------- conditioners
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_temporal_conditioner_channel_major_path_equals_its_module(k):
    torch.manual_seed(0)
    net = perturb(TemporalConditioner(3, 7, hidden=6, kernel_size=k).double(), 0.5)
    x = torch.randn(4, 3, 9, dtype=torch.float64)
    torch.testing.assert_close(net.forward_cm(x.transpose(0, 1).contiguous()).transpose(0, 1), net(x))


def test_a_user_conditioner_with_batchnorm_is_applied_as_a_module():
    """The old Sequential interpreter applied a BatchNorm1d over the batch axis when the batch size
    equalled the hidden width; a conditioner is now always called as a whole on (B, C, T)."""
    hidden = 8

    def factory(c_in: int, c_out: int) -> nn.Module:
        last = nn.Conv1d(hidden, c_out, 1)
        nn.init.normal_(last.weight, std=0.3)
        return nn.Sequential(nn.Conv1d(c_in, hidden, 3, padding=1), nn.BatchNorm1d(hidden), nn.ReLU(), last)

    torch.manual_seed(1)
    layer = RationalQuadraticCoupling(6, num_bins=3, tail_bound=3.0, conditioner=factory).double().train()
    x = torch.randn(hidden, 6, 5, dtype=torch.float64)  # batch size == hidden width
    y, ld = layer(x)
    theta = layer.net(x[:, :3]).transpose(0, 1).reshape(layer.num_params, 3, hidden, 5)
    yb, ld_ref = layer.elementwise(x[:, 3:].transpose(0, 1), theta)
    torch.testing.assert_close(y[:, 3:], yb.transpose(0, 1))
    torch.testing.assert_close(ld, ld_ref)
    layer.eval()
    assert check_invertibility(layer, x, atol=1e-10).passed and check_logdet(layer, x[:2, :, :3]).passed


def test_conditioner_that_changes_the_length_is_a_clear_error():
    layer = RationalQuadraticCoupling(4, conditioner=lambda i, o: nn.Conv1d(i, o, 3))  # no padding
    with pytest.raises(ValueError, match="must keep the length"):
        layer(torch.randn(2, 4, 6))


def test_sizes_of_the_default_conditioner_cannot_be_combined_with_a_factory():
    with pytest.raises(ValueError, match="leave them at their defaults"):
        TemporalFlow(4, num_layers=1, hidden=8, conditioner=lambda i, o: nn.Conv1d(i, o, 1))


# ---------------------------------------------------------------------- couplings
class ShiftCoupling(Coupling):
    """A new coupling type in one small class: y = x + tanh(t) (log-det 0)."""

    num_params = 1

    def __init__(self, channels, *, conditioner=None, cond_channels=0):
        super().__init__(channels, conditioner, cond_channels)
        self.build_conditioner()

    def elementwise(self, xb, theta):
        return xb + torch.tanh(theta[0]), xb.new_zeros(xb.shape[1])

    def elementwise_inverse(self, yb, theta):
        return yb - torch.tanh(theta[0]), yb.new_zeros(yb.shape[1])

    def inverse_bound_transformed(self, radius):
        return radius + 1.0


def test_a_new_coupling_is_one_class_usable_by_name_or_as_a_callable():
    register_coupling("shift-test", ShiftCoupling)
    try:
        for coupling in ("shift-test", ShiftCoupling):
            torch.manual_seed(0)
            flow = perturb(TemporalFlow(4, num_layers=3, hidden=8, num_classes=2, coupling=coupling).double(), 0.3)
            flow.eval()
            assert all(isinstance(s.coupling, ShiftCoupling) for s in flow.steps)
            x = torch.randn(3, 4, 5, dtype=torch.float64)
            assert check_invertibility(flow, x, atol=1e-10).passed and check_logdet(flow, x[:, :, :2]).passed
            assert math.isfinite(float(flow.inverse_bound(6.0).max()))
    finally:
        COUPLINGS.pop("shift-test")


def test_coupling_options_are_checked_never_ignored():
    flow = TemporalFlow(4, num_layers=1, scale="sigmoid")  # an affine option selects the affine coupling
    assert flow.steps[0].coupling.scale == "sigmoid"
    with pytest.raises(ValueError, match="do not apply to the 'spline'"):
        TemporalFlow(4, num_layers=1, coupling="spline", scale="sigmoid")
    with pytest.raises(ValueError, match="do not apply to the 'affine'"):
        TemporalFlow(4, num_layers=1, coupling="affine", num_bins=4)
    with pytest.raises(ValueError, match="unknown coupling"):
        TemporalFlow(4, num_layers=1, coupling="glow")
    with pytest.raises(ValueError, match="unknown actnorm"):
        TemporalFlow(4, num_layers=1, actnorm="sometimes")


def test_default_flow_design_and_config_round_trip():
    flow = TemporalFlow(6, num_layers=3, hidden=8, num_classes=2, seed=0)
    assert [type(layer).__name__ for layer in flow.steps[0].layers] == ["ActNorm", "ChannelPermutation",
                                                                        "RationalQuadraticCoupling"]
    assert all(not isinstance(s.layers[0], ActNorm) for s in flow.steps[1:])
    rebuilt = TemporalFlow(**flow.config)
    rebuilt.load_state_dict(flow.state_dict())
    x = torch.randn(2, 6, 4)
    torch.testing.assert_close(rebuilt.eval().to_latent(x), flow.eval().to_latent(x))


# ---------------------------------------------------------------------- bounded inverse
def wild_default_flow(seed=0, channels=6, layers=6, everything=True):
    """A default flow with conditioners far from anything trained (and, with ``everything``, also a
    perturbed ActNorm and prior)."""
    torch.manual_seed(seed)
    flow = TemporalFlow(channels, num_layers=layers, hidden=16, num_classes=3).double()
    flow.train()
    flow(torch.randn(32, channels, 5, dtype=torch.float64) * 4 + 1)  # ActNorm init
    if everything:
        return perturb(flow, 3.0, seed).eval()
    for step in flow.steps:
        perturb(step.coupling, 3.0, seed)
    return flow.eval()


def box_latents(flow, k, n=256, t=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % flow.num_classes
    mean, log_std = flow.prior.params(y, n)
    u = torch.rand(n, flow.channels, t, generator=g, dtype=torch.float64) * 2 - 1
    u[: n // 2] = u[: n // 2].sign()  # vertices
    return mean[..., None] + k * torch.exp(log_std)[..., None] * u


def test_default_design_certificate_holds_and_is_the_stated_formula():
    flow = wild_default_flow()
    with torch.no_grad():
        x = flow.from_latent(box_latents(flow, 6.0))
    cert = flow.inverse_bound(6.0)
    assert torch.isfinite(x).all()
    assert bool((x.abs().amax((0, 2)) <= cert + 1e-9).all())
    # docstring formula: max(R, B) e^{-l} + |b| with the data-end ActNorm
    r = float(flow.prior.box_radius(6.0).max())
    act = flow.steps[0].layers[0]
    stated = max(r, 5.0) * torch.exp(-act.log_scale.detach()) + act.shift.detach().abs()
    assert bool((cert <= stated.double() + 1e-9).all())  # per channel the certificate can be tighter
    same_radius = TemporalFlow(6, num_layers=3, hidden=8, num_classes=3)  # prior at N(0, I): R = 6 everywhere
    act = same_radius.steps[0].layers[0]
    torch.testing.assert_close(same_radius.inverse_bound(6.0),
                               (6.0 * torch.exp(-act.log_scale.detach()) + act.shift.detach().abs()).double())


def test_affine_certificates_unbounded_shift_is_inf_bounded_shift_is_finite_and_holds():
    torch.manual_seed(0)
    unbounded = TemporalFlow(4, num_layers=3, hidden=8, num_classes=2, coupling="affine", scale="softclamp")
    assert float(unbounded.inverse_bound(6.0).max()) == math.inf
    bounded = perturb(TemporalFlow(4, num_layers=3, hidden=8, num_classes=2, coupling="affine", scale="softclamp",
                                   shift_bound=1.0, mixing="conv1x1").double(), 1.0).eval()
    cert = bounded.inverse_bound(6.0)
    with torch.no_grad():
        x = bounded.from_latent(box_latents(bounded, 6.0))
    assert math.isfinite(float(cert.max())) and bool((x.abs().amax((0, 2)) <= cert + 1e-9).all())


def test_stability_check_passes_the_bounded_default_and_fails_an_exploding_affine_flow():
    flow = wild_default_flow(channels=6, layers=6, everything=False).float()
    data = torch.randn(64, 6, 5) * 4 + 1
    report = check_inverse_stability(flow, data, k=6.0, starts=16, steps=5)
    assert report.passed and report.finite and report.worst_abs <= report.certificate * (1 + 1e-4)
    assert "PASSED" in str(report)
    torch.manual_seed(0)
    bad = TemporalFlow(6, num_layers=12, hidden=16, num_classes=3, coupling="affine", scale="sigmoid")
    with torch.no_grad():
        for step in bad.steps:
            step.coupling.net[-1].bias.fill_(-6.0)  # sigma(h + 2) ~ 0.018: every inverse step x55
    report = check_inverse_stability(bad, data, k=6.0, starts=16, steps=5)
    assert not report.passed and report.ratio > 10 and report.certificate == math.inf
    assert "FAILED" in str(report)


# ---------------------------------------------------------------------- hygiene
def test_builds_under_float64_default_dtype_and_takes_dtype_device():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        flow = TemporalFlow(4, num_layers=2, hidden=8, mixing="conv1x1", actnorm="every", num_classes=2)
        assert all(p.dtype == torch.float64 for p in flow.parameters())
        flow(torch.randn(3, 4, 5))
    finally:
        torch.set_default_dtype(old)
    flow = TemporalFlow(4, num_layers=2, hidden=8, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in flow.parameters())


def test_sampling_temperature():
    torch.manual_seed(0)
    flow = perturb(TemporalFlow(4, num_layers=2, hidden=8, num_classes=2), 0.2).eval()
    with torch.no_grad():
        cold = flow.sample(5, 1, length=3, temperature=0.0)
        mode = flow.from_latent(flow.prior.params(torch.ones(1, dtype=torch.long), 1)[0][..., None].expand(1, 4, 3))
        torch.testing.assert_close(cold, mode.expand(5, 4, 3))
        z_hot = flow.prior.sample(4000, 0, 1, temperature=2.0)
    std = torch.exp(flow.prior.log_std[0])
    torch.testing.assert_close(z_hot.std(0)[:, 0], 2 * std, atol=0.15, rtol=0.05)
    with pytest.raises(ValueError, match="temperature"):
        flow.sample(2, 0, length=1, temperature=-1.0)


def test_actnorm_initialisation_flag_follows_state_dict_without_reading_tensors_in_forward():
    a = ActNorm(3)
    a.train()
    a(torch.randn(4, 3, 5) * 3 + 2)
    b = ActNorm(3)
    b.load_state_dict(a.state_dict())
    assert b._initialized
    b.train()
    x = torch.randn(4, 3, 5)
    torch.testing.assert_close(b(x)[0], a(x)[0])  # not re-initialised on its first training batch


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("design", [dict(), dict(coupling="affine", actnorm="every", mixing="conv1x1")])
def test_torch_compile_traces_a_flow_with_at_most_one_graph_break(mode, design):
    import torch._dynamo as dynamo

    torch.manual_seed(0)
    flow = TemporalFlow(6, num_layers=3, hidden=8, num_classes=3, **design)
    x, y = torch.randn(4, 6, 5), torch.randint(3, (4,))
    flow.train()
    flow.log_prob(x, y)  # data-dependent ActNorm initialisation happens once, eagerly
    flow.train(mode == "train")
    for fn, args in ((lambda a, b: flow.log_prob(a, b), (x, y)), (lambda a: flow.inverse(a), (x,))):
        dynamo.reset()
        explanation = dynamo.explain(fn)(*args)
        assert explanation.graph_break_count <= 1, [str(r.reason) for r in explanation.break_reasons]
