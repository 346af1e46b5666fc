"""check_invertibility / check_logdet: they pass on correct flows and FAIL on broken ones."""

from __future__ import annotations

import pytest
import torch
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.transforms.base import CompositeTransform, Transform

from flowtransfer.flows import (
    ActNorm,
    AffineCoupling,
    InvertibilityReport,
    LogdetReport,
    TemporalFlow,
    check_invertibility,
    check_logdet,
)


class WrongLogdet(Transform):
    """y = 2x, but it claims log|det J| = D log 2 + 0.5."""

    def forward(self, inputs, context=None):
        d = inputs[0].numel()
        return 2 * inputs, torch.full((inputs.shape[0],), d * 0.6931471805599453 + 0.5,
                                      dtype=inputs.dtype)

    def inverse(self, inputs, context=None):
        d = inputs[0].numel()
        return inputs / 2, torch.full((inputs.shape[0],), -d * 0.6931471805599453 - 0.5,
                                      dtype=inputs.dtype)


class WrongInverse(Transform):
    """y = 2x with a correct log-det, but the inverse divides by 2.001."""

    def forward(self, inputs, context=None):
        d = inputs[0].numel()
        return 2 * inputs, inputs.new_full((inputs.shape[0],), d * 0.6931471805599453)

    def inverse(self, inputs, context=None):
        d = inputs[0].numel()
        return inputs / 2.001, inputs.new_full((inputs.shape[0],), -d * 0.6931471805599453)


class InconsistentInverseLogdet(WrongInverse):
    def inverse(self, inputs, context=None):
        d = inputs[0].numel()
        return inputs / 2, inputs.new_full((inputs.shape[0],), -d * 0.6931471805599453 + 1.0)


def trained_like_flow():
    torch.manual_seed(0)
    flow = TemporalFlow(4, num_layers=3, hidden=8, num_classes=2)
    flow(torch.randn(6, 4, 5))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow


def test_checks_pass_on_a_correct_flow_and_restore_modes():
    flow = trained_like_flow()
    flow.train()
    flow.steps[0].eval()  # mixed modes are restored one by one
    x = torch.randn(4, 4, 6)
    inv = check_invertibility(flow, x)
    assert isinstance(inv, InvertibilityReport) and inv.passed and inv.max_abs_error < 1e-5
    assert flow.training and not flow.steps[0].training and flow.steps[1].training
    before = {k: v.clone() for k, v in flow.state_dict().items()}
    ld = check_logdet(flow, x[:2, :, :3])
    assert isinstance(ld, LogdetReport) and ld.passed and ld.max_abs_error < 1e-9 and ld.dims == 12
    assert len(ld.logdet) == 2 and len(ld.reference) == 2
    assert all(torch.equal(v, flow.state_dict()[k]) for k, v in before.items())  # original untouched
    assert next(flow.parameters()).dtype == torch.float32
    assert "PASSED" in str(inv) and "PASSED" in str(ld) and "\n" not in str(inv) + str(ld)


def test_checks_detect_a_wrong_logdet():
    x = torch.randn(3, 2, 3)
    report = check_logdet(WrongLogdet(), x)
    assert not report.passed and abs(report.max_abs_error - 0.5) < 1e-9
    assert "FAILED" in str(report)


def test_checks_detect_a_wrong_inverse():
    x = torch.randn(3, 2, 3)
    report = check_invertibility(WrongInverse(), x)
    assert not report.passed and report.max_abs_error > 1e-4
    assert "FAILED" in str(report)
    assert check_logdet(WrongInverse(), x).passed  # its forward log-det is right
    # inverse maps back correctly but its log-det does not cancel the forward one
    report = check_invertibility(InconsistentInverseLogdet(), x)
    assert report.max_abs_error < 1e-6 and not report.passed and report.max_logdet_sum > 0.9


def test_checks_accept_layers_and_nflows_flows_and_context():
    x = torch.randn(3, 4, 5)
    ctx = torch.randn(3, 2, 5)
    coupling = AffineCoupling(4, 8, 3, cond_channels=2)
    with torch.no_grad():
        for p in coupling.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert check_invertibility(coupling, x, ctx).passed
    assert check_logdet(coupling, x, ctx).passed
    nflow = Flow(CompositeTransform([ActNorm(4), WrongLogdet()]), StandardNormal([4, 5]))
    assert not check_logdet(nflow, x[:, :, :2]).passed
    assert check_invertibility(nflow, x).passed


def test_check_logdet_refuses_large_inputs_and_bad_input():
    flow = trained_like_flow()
    with pytest.raises(ValueError, match="129 dimensions|132 dimensions"):
        check_logdet(flow, torch.randn(1, 4, 33), max_dims=128)
    with pytest.raises(ValueError, match="NaN or inf"):
        check_invertibility(flow, torch.full((1, 4, 3), float("nan")))
    with pytest.raises(TypeError, match="forward and inverse"):
        check_invertibility(torch.nn.Linear(2, 2), torch.randn(2, 2))
