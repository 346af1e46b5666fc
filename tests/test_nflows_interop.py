"""flowtransfer layers inside an nflows Flow, next to nflows' own transforms."""

from __future__ import annotations

import math

import torch
from nflows.distributions.normal import StandardNormal
from nflows.flows.base import Flow
from nflows.transforms.base import CompositeTransform
from nflows.transforms.permutations import RandomPermutation
from nflows.transforms.standard import PointwiseAffineTransform

from flowtransfer.flows import ActNorm, AffineCoupling, InvertibleConv1x1, check_invertibility


def test_flowtransfer_layers_compose_with_nflows_transforms():
    torch.manual_seed(0)
    C, T = 4, 6
    actnorm, conv, coupling = ActNorm(C), InvertibleConv1x1(C), AffineCoupling(C, 8, 3, scale="sigmoid")
    permutation = RandomPermutation(C, dim=1)  # nflows' own, along the channel axis of (B, C, T)
    affine = PointwiseAffineTransform(shift=0.3, scale=1.7)  # nflows' own, elementwise
    flow = Flow(CompositeTransform([actnorm, permutation, conv, coupling, affine]), StandardNormal([C, T]))
    x = torch.randn(5, C, T, dtype=torch.float32) * 2 + 1
    flow.log_prob(x)  # ActNorm init inside the nflows Flow (training mode)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    flow.eval()
    log_prob = flow.log_prob(x)

    # the same density by hand: change of variables, one formula per layer
    with torch.no_grad():
        h = (x - actnorm.shift[:, None]) * actnorm.log_scale.exp()[:, None]
        ld = T * actnorm.log_scale.sum()
        h = h[:, permutation._permutation]
        w = conv.weight()
        h = torch.einsum("ij,bjt->bit", w, h)
        ld = ld + T * torch.linalg.slogdet(w)[1]
        out = coupling.net(h[:, :2])
        s = torch.sigmoid(out[:, :2] + 2)
        h = torch.cat([h[:, :2], (h[:, 2:] + out[:, 2:]) * s], 1)
        ld = ld + s.log().sum((1, 2))
        z = h * 1.7 + 0.3
        ld = ld + C * T * math.log(1.7)
        manual = -0.5 * z.square().sum((1, 2)) - 0.5 * C * T * math.log(2 * math.pi) + ld
    torch.testing.assert_close(log_prob, manual, atol=1e-4, rtol=1e-5)
    assert check_invertibility(flow, x).passed
    samples = flow.sample(3)
    assert samples.shape == (3, C, T) and torch.isfinite(samples).all()
    # gradients flow through both libraries' parameters
    flow.train()
    flow.log_prob(x).mean().backward()
    assert coupling.net[-1].weight.grad.abs().sum() > 0 and actnorm.log_scale.grad.abs().sum() > 0
