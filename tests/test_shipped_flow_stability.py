"""Every shipped flow's inverse stays bounded over the prior's 6-sigma box: the default transfer model
(against the data it was trained on) and the flows DiCMoR builds for each preset (their certificate)."""

from __future__ import annotations

import math

import pytest
import torch

from flowtransfer import check_inverse_stability, load
from flowtransfer.data import make_synthetic
from flowtransfer.methods import build_method
from flowtransfer.methods.presets import PRESETS


def test_default_transfer_model_inverse_is_stable_over_the_prior_box():
    model = load()
    train = make_synthetic(seed=0)["train"]
    for m in model.modalities:
        x = torch.from_numpy(train.features[m][:256])
        padded = torch.cat([x, torch.zeros(len(x), model.width - x.shape[1], x.shape[2])], dim=1)
        report = check_inverse_stability(model.flows[m], padded, k=6.0, starts=16, steps=10)
        assert report.passed, str(report)
        assert report.ratio < 2.0 and math.isfinite(report.certificate)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_dicmor_paper_flows_have_a_finite_certificate_for_every_preset(preset):
    ds = make_synthetic(seed=0, n_train=8, n_valid=4, n_test=4)["train"]
    method = build_method("dicmor", ds, preset=preset)
    official = build_method("dicmor", ds, preset=preset, variant="official")
    for flow in method.flows.values():
        assert math.isfinite(float(flow.inverse_bound(6.0).max()))
    for flow in official.flows.values():
        assert float(flow.inverse_bound(6.0).max()) == math.inf  # the released design gives no bound
