"""DiCMoR: shapes, masking, losses, the official variant's flaw, source combination, stages, presets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowtransfer.data import from_arrays
from flowtransfer.data.dataset import Batch
from flowtransfer.methods import (
    METHODS,
    DatasetInfo,
    DiCMoR,
    DiCMoRConfig,
    build_method,
    simulate_missing,
)

# tiny architecture: everything switched on, small enough for 2 busy cores
TINY = dict(d=8, flow_layers=3, flow_hidden=16, refiner_blocks=1, refiner_hidden=8, refiner_reduction=4,
            mult={"d": 8, "heads": 2, "layers": 1, "memory_layers": 1})



def make_ds(dims: dict[str, tuple[int, int]], n: int = 12, task: str = "regression", seed: int = 0, mask=None):
    """Random NCT dataset; ``dims[m] = (C_m, T_m)``."""
    rng = np.random.default_rng(seed)
    feats = {m: rng.standard_normal((n, c, t)).astype(np.float32) for m, (c, t) in dims.items()}
    if task == "regression":
        labels = rng.uniform(-3, 3, n)
        return from_arrays(feats, labels, task, layout="NCT", mask=mask)
    labels = rng.integers(0, 3, n)
    return from_arrays(feats, labels, task, layout="NCT", mask=mask, num_classes=3)


DIMS3 = {"L": (6, 5), "A": (4, 3), "V": (3, 1)}  # different T per modality, one with T = 1
DIMS2 = {"A": (5, 4), "B": (3, 1)}


def tiny(ds, variant="paper", **kw) -> DiCMoR:
    torch.manual_seed(0)
    return build_method("dicmor", ds, preset="small", variant=variant, **{**TINY, **kw})


def with_mask(ds, mask) -> Batch:
    return ds.with_mask(np.asarray(mask)).batch(np.arange(len(ds)))


def mask3(n=12):
    m = np.ones((n, 3), dtype=bool)
    m[0:3, 0] = False            # L missing, A and V present (two sources)
    m[3:5, [0, 1]] = False       # only V
    m[5:7, [1, 2]] = False       # only L
    m[7:9, 2] = False            # V missing
    return m


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("dims", [DIMS2, DIMS3], ids=["2mod", "3mod"])
def test_shapes_end_to_end(variant, dims):
    ds = make_ds(dims)
    model = tiny(ds, variant)
    b = ds.batch(np.arange(len(ds)))
    loss, parts = model.loss(b)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    n = len(ds)
    mask = np.ones((n, len(dims)), dtype=bool)
    mask[: n // 2, 0] = False
    mask[n // 2 :, -1] = False
    bm = with_mask(ds, mask)
    model.eval()
    with torch.no_grad():
        pred = model.predict(bm)
        rec = model.recover(bm)
        enc = model.encode(bm)
    assert pred.shape == (n,) and torch.isfinite(pred).all()
    t = min(t for _, t in dims.values())  # the common-length rule: the shortest
    names = list(dims)
    assert set(rec) == {names[0], names[-1]}
    for j, m in enumerate(names):
        assert enc[m].shape == (n, 8, t)
        absent = torch.from_numpy(~mask[:, j])
        assert torch.isnan(enc[m][absent]).all() and torch.isfinite(enc[m][~absent]).all()
        if m in rec:
            assert rec[m].shape == (n, 8, t)
            assert torch.isfinite(rec[m][absent]).all() and torch.isnan(rec[m][~absent]).all()


def test_classification_logits():
    ds = make_ds(DIMS3, task="classification")
    model = tiny(ds)
    assert model.prior.num_classes == 3
    b = with_mask(ds, mask3())
    loss, _ = model.loss(b)
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        assert model.predict(b).shape == (len(ds), 3)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_predict_never_reads_absent_slots(variant):
    ds = make_ds(DIMS3)
    model = tiny(ds, variant)
    model.loss(ds.batch(np.arange(len(ds))))  # initialise ActNorm like training would
    model.eval()
    b = with_mask(ds, mask3())
    assert any(torch.isnan(x).any() for x in b.features.values())
    with torch.no_grad():
        p1 = model.predict(b)
        r1 = model.recover(b)
    assert torch.isfinite(p1).all()
    # put garbage in the absent slots: nothing may change
    feats = {}
    for j, m in enumerate(b.modalities):
        x = b.features[m].clone()
        x[~b.mask[:, j]] = 1e3 * torch.randn_like(x[~b.mask[:, j]])
        feats[m] = x
    b2 = Batch(features=feats, mask=b.mask, labels=torch.full_like(b.labels, 99.0), modalities=b.modalities)
    with torch.no_grad():
        p2 = model.predict(b2)
        r2 = model.recover(b2)
    assert torch.equal(p1, p2)
    for m in r1:
        assert torch.equal(torch.nan_to_num(r1[m], nan=7.0), torch.nan_to_num(r2[m], nan=7.0))


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_loss_decreases(variant):
    ds = make_ds(DIMS3, n=16, seed=1)
    model = tiny(ds, variant)
    b = ds.batch(np.arange(len(ds)))
    model.generator = torch.Generator().manual_seed(3)
    model.loss(b)  # ActNorm data-dependent initialisation

    def eval_loss():
        model.eval()
        model.generator.manual_seed(5)
        with torch.no_grad():
            value = model.loss(b)[0].item()
        model.train()
        return value

    before = eval_loss()
    opt = torch.optim.Adam(model.parameter_groups(), lr=5e-3)
    for _ in range(15):
        model.generator.manual_seed(5)  # same simulated mask every step
        opt.zero_grad()
        loss, _ = model.loss(b)
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < before - 0.05, (before, after)


def test_official_identity_half_flaw():
    """Released-code flaw: without channel mixing the first d/2 recovered channels are the source's."""
    ds = make_ds(DIMS2)
    n = len(ds)
    mask = np.ones((n, 2), dtype=bool)
    mask[:6, 1] = False  # B recovered from A
    b = with_mask(ds, mask)
    rows = torch.arange(6)
    for variant in ("official", "paper"):
        model = tiny(ds, variant)
        with torch.no_grad():
            for p in model.flows.parameters():  # move every layer away from the identity
                p.add_(0.1 * torch.randn_like(p))
            model.loss(ds.batch(np.arange(n)))
            model.eval()
            rec = model.recover(b, refine=False)["B"][rows]
            src = model.encode(b)["A"][rows]
        half = model.d // 2
        if variant == "official":
            assert torch.equal(rec[:, :half], src[:, :half])
            assert not torch.allclose(rec[:, half:], src[:, half:])
        else:
            assert (rec[:, :half] - src[:, :half]).abs().max() > 1e-2


def test_shared_prior_is_one_object():
    ds = make_ds(DIMS3)
    model = tiny(ds)
    assert all(flow.prior is model.prior for flow in model.flows.values())
    ids = [id(p) for p in model.parameters()]
    assert len(ids) == len(set(ids))
    assert sum(p is model.prior.loc for p in model.parameters()) == 1


def test_nll_only_on_present_samples():
    ds = make_ds(DIMS3, seed=2)
    n = len(ds)
    mask = np.ones((n, 3), dtype=bool)
    mask[:5, 1] = False  # A absent in the data for 5 samples
    b = with_mask(ds, mask)
    model = tiny(ds, train_missing_rate=0.0)
    model.loss(ds.batch(np.arange(n)))  # ActNorm init
    model.eval()
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = inputs[0].shape[0]

        return hook

    hooks = [model.flows[m].register_forward_hook(record(m)) for m in model.modalities]
    with torch.no_grad():
        _, parts = model.loss(b)
    for h in hooks:
        h.remove()
    assert seen == {"L": n, "A": n - 5, "V": n}
    # value: mean bits/dim over the present samples only
    with torch.no_grad():
        h = model.encode(b)["A"][5:]
        y = b.classes[5:]
        expected = -(model.flows["A"].log_prob(h, y)).mean() / (model.d * h.shape[2] * math.log(2))
    assert parts["nll_A"] == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert all(math.isfinite(v) for v in parts.values())


def test_nll_clamped_only_in_official():
    ds = make_ds(DIMS2)
    tiny_ds = from_arrays({m: 1e-3 * x for m, x in ds.features.items()}, ds.labels, "regression", layout="NCT")
    b = tiny_ds.batch(np.arange(len(ds)))
    # official: latents stay tiny (no ActNorm), a narrow prior gives them a high density;
    # paper: ActNorm rescales tiny data to unit spread, and its log-det makes the density high
    for variant, clamp, narrow in (("official", True, -3.0), ("paper", False, 0.0)):
        model = tiny(tiny_ds, variant)
        with torch.no_grad():
            model.prior.loc.zero_()
            model.prior.log_std.fill_(12.0)  # very wide prior: positive NLL per dimension
            assert model.loss(b)[1]["nll_A"] > 0
            model.prior.log_std.fill_(narrow)  # negative NLL per dimension
            nll = model.loss(b)[1]["nll_A"]
        assert (nll == 0.0) if clamp else (nll < 0.0), (variant, nll)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_two_source_combination(variant):
    ds = make_ds(DIMS3, seed=4)
    model = tiny(ds, variant)
    model.loss(ds.batch(np.arange(len(ds))))
    model.eval()
    b = with_mask(ds, mask3())
    rows = torch.arange(3)  # L missing, A and V present
    with torch.no_grad():
        rec = model.recover(b, refine=False)["L"][rows]
        h = model.encode(b)
        t_a = model.transfer(h["A"][rows], "A", "L")
        t_v = model.transfer(h["V"][rows], "V", "L")
        if variant == "paper":
            expected = (t_a + t_v) / 2
        else:
            expected = model.combiners["L"](torch.cat([t_a, t_v], dim=1))
        # single-source rows (only V present) use that transfer as is
        single = model.recover(b, refine=False)["L"][3:5]
        t_single = model.transfer(h["V"][3:5], "V", "L")
    torch.testing.assert_close(rec, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single, t_single, rtol=1e-5, atol=1e-5)


def test_one_inverse_per_target_and_no_flow_work_when_complete():
    ds = make_ds(DIMS3)
    model = tiny(ds)
    model.eval()
    calls = {m: 0 for m in model.modalities}
    fwd = {m: 0 for m in model.modalities}
    for m, flow in model.flows.items():
        inv = flow.inverse_nologdet  # what from_latent runs (a transfer needs no log-det)

        def counting(z, context=None, m=m, inv=inv):
            calls[m] += 1
            return inv(z, context)

        flow.inverse_nologdet = counting
        to_z = flow.forward_nologdet  # what to_latent runs (prediction needs no likelihood)

        def counting_fwd(x, context=None, m=m, to_z=to_z):
            fwd[m] += 1
            return to_z(x, context)

        flow.forward_nologdet = counting_fwd
        flow.register_forward_hook(lambda mod, i, o: pytest.fail("prediction computed a flow log-det"))
    with torch.no_grad():
        model.predict(ds.batch(np.arange(len(ds))))  # complete: no flow work at all
        assert sum(calls.values()) == 0 and sum(fwd.values()) == 0
        mask = np.ones((len(ds), 3), dtype=bool)
        mask[:4, 0] = False
        mask[4:6, [0, 1]] = False
        model.predict(with_mask(ds, mask))
    assert calls == {"L": 1, "A": 1, "V": 0}  # one inverse per missing target, V never missing
    assert fwd == {"L": 0, "A": 1, "V": 1}  # one forward per needed source


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return any(not torch.equal(a, p) for a, p in zip(before, module.parameters()))


def test_stage_freezing():
    ds = make_ds(DIMS3)
    b = with_mask(ds, mask3())
    model = tiny(ds)
    model.set_stage("complete")
    assert all(not p.requires_grad for p in model.flows.parameters())
    ext, flows, ref = _snapshot(model.extractors), _snapshot(model.flows), _snapshot(model.refiners)
    opt = torch.optim.SGD(model.parameter_groups(), lr=0.1)
    loss, parts = model.loss(b)
    assert set(parts) == {"loss", "task"}
    loss.backward()
    opt.step()
    assert _changed(ext, model.extractors)
    assert not _changed(flows, model.flows) and not _changed(ref, model.refiners)
    names = {g["name"] for g in model.parameter_groups()}
    assert names == {"extractors", "fusion"}

    model.set_stage("recovery")
    assert all(not p.requires_grad for p in model.extractors.parameters())
    assert {g["name"] for g in model.parameter_groups()} == {"flows", "recovery", "fusion"}
    ext, flows = _snapshot(model.extractors), _snapshot(model.flows)
    model.zero_grad(set_to_none=True)
    opt = torch.optim.SGD(model.parameter_groups(), lr=0.1)
    loss, _ = model.loss(b)
    loss.backward()
    opt.step()
    assert not _changed(ext, model.extractors)
    assert _changed(flows, model.flows)
    assert all(p.grad is None for p in model.extractors.parameters())

    model.set_stage("joint")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="unknown stage"):
        model.set_stage("warmup")


def test_loss_parts_reported():
    ds = make_ds(DIMS3)
    model = tiny(ds)
    _, parts = model.loss(with_mask(ds, mask3()))
    assert {"loss", "task", "nll", "rec", "sim_missing_rate", "nll_L", "nll_A", "nll_V"} <= set(parts)
    # floats or detached 0-dim tensors (read by the trainer once per epoch: no sync per step)
    assert all(isinstance(v, float) or (isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad)
               for v in parts.values())
    parts = {k: float(v) for k, v in parts.items()}
    assert parts["nll"] == pytest.approx(parts["nll_L"] + parts["nll_A"] + parts["nll_V"], rel=1e-5)
    w = model.config
    assert parts["loss"] == pytest.approx(parts["task"] + w.nll_weight * parts["nll"] + w.rec_weight * parts["rec"],
                                          rel=1e-5, abs=1e-6)
    # validation: in eval mode the simulated missingness is seeded by the batch, so losses repeat
    model.eval()
    b = ds.batch(np.arange(len(ds)))
    with torch.no_grad():
        first, second = ({k: float(v) for k, v in model.loss(b)[1].items()} for _ in range(2))
    assert first == second and first["sim_missing_rate"] > 0


def test_rec_loss_uses_only_dropped_but_known_samples():
    ds = make_ds(DIMS2)
    b = ds.batch(np.arange(len(ds)))
    model = tiny(ds, train_missing_rate=0.0)
    _, parts = model.loss(b)
    assert parts["rec"] == 0.0 and parts["sim_missing_rate"] == 0.0
    # absent in the data: recovered, but no target
    mask = np.ones((len(ds), 2), dtype=bool)
    mask[:4, 1] = False
    _, parts = model.loss(with_mask(ds, mask))
    assert parts["rec"] == 0.0
    model = tiny(ds, train_missing_rate=0.6)
    model.generator = torch.Generator().manual_seed(0)
    _, parts = model.loss(b)
    assert parts["rec"] > 0.0 and parts["sim_missing_rate"] > 0.0


# --------------------------------------------------------------------------------------------------
# presets, registry, simulate_missing
# --------------------------------------------------------------------------------------------------


def test_presets():
    mosi, mosei, small = (DiCMoRConfig.preset(k) for k in ("mosi", "mosei", "small"))
    assert (mosi.extractor_kernel, mosi.d, mosi.flow_hidden, mosi.flow_layers) == (5, 32, 64, 32)
    assert (mosi.refiner_blocks, mosi.refiner_hidden) == (20, 64)
    assert (mosi.mult.d, mosi.mult.heads, mosi.mult.layers) == (32, 8, 4)
    assert (mosei.d, mosei.flow_hidden, mosei.refiner_hidden, mosei.mult.d, mosei.mult.layers) == (64, 128, 128, 64, 6)
    assert (mosi.nll_weight, mosi.rec_weight, mosi.variant) == (0.1, 0.1, "paper")
    assert small.d < mosi.d and small.flow_layers < mosi.flow_layers
    off = DiCMoRConfig.preset("mosi", variant="official").resolved()
    assert (off.flow_kernel, off.flow_scale, off.combine, off.detach_transfer, off.clamp_bpd) == (1, "sigmoid", "conv", True, True)
    pap = mosi.resolved()
    assert (pap.flow_kernel, pap.combine, pap.detach_transfer, pap.clamp_bpd) == (3, "mean", False, False)
    assert DiCMoRConfig(**mosi.to_dict()) == mosi
    with pytest.raises(KeyError, match="unknown DiCMoR preset"):
        DiCMoRConfig.preset("iemocap")
    with pytest.raises(ValueError, match="variant"):
        DiCMoRConfig.preset("mosi", variant="corrected")
    with pytest.raises(TypeError, match="unknown DiCMoRConfig fields"):
        DiCMoRConfig.preset("mosi", hidden=3)
    with pytest.raises(ValueError, match="train_missing_rate"):
        DiCMoRConfig(train_missing_rate=(0.5, 0.2))


@pytest.mark.parametrize("preset", ["mosi", "mosei", "small"])
def test_presets_build(preset):
    info = DatasetInfo(("L", "A", "V"), {"L": 12, "A": 5, "V": 7}, {"L": 6, "A": 6, "V": 6}, "regression")
    model = DiCMoR(info, preset=preset)
    cfg = DiCMoRConfig.preset(preset)
    assert len(model.flows["L"].steps) == cfg.flow_layers
    assert model.d == cfg.d and model.prior.num_classes == 7


def test_official_flows_are_couplings_only():
    ds = make_ds(DIMS2)
    off = tiny(ds, "official")
    assert off.name == "dicmor_official"
    for step in off.flows["A"].steps:
        assert len(step.layers) == 1 and step.coupling.kernel_size == 1 and step.coupling.scale == "sigmoid"
    pap = tiny(ds, "paper")
    assert len(pap.flows["A"].steps[0].layers) == 3 and pap.flows["A"].steps[0].coupling.kernel_size == 3


def test_registry_and_rebuild_from_hparams():
    assert {"dicmor", "dicmor_official", "zero_fill", "mean_fill", "upper_bound"} <= set(METHODS)
    ds = make_ds(DIMS3)
    model = build_method("dicmor_official", ds, preset="small", **TINY)
    assert model.variant == "official"
    model.loss(ds.batch(np.arange(len(ds))))
    h = model.hparams
    clone = build_method(h["name"], h["dataset_info"], **h["config"])
    clone.load_state_dict(model.state_dict())
    model.eval()
    clone.eval()
    b = with_mask(ds, mask3())
    with torch.no_grad():
        assert torch.equal(model.predict(b), clone.predict(b))
    with pytest.raises(KeyError, match="unknown method"):
        build_method("imder", ds)


def test_bad_batches_raise():
    ds = make_ds(DIMS3)
    model = tiny(ds)
    b = ds.batch(np.arange(4))
    bad = Batch(features={**b.features, "A": b.features["A"][:, :2]}, mask=b.mask, labels=b.labels, modalities=b.modalities)
    with pytest.raises(ValueError, match="modality 'A'"):
        model.predict(bad)
    other = Batch(features=b.features, mask=b.mask, labels=b.labels, modalities=("A", "L", "V"))
    with pytest.raises(ValueError, match="modalities"):
        model.predict(other)
    with pytest.raises(ValueError, match="at least two"):
        DiCMoR(DatasetInfo(("A",), {"A": 3}, {"A": 2}, "regression"), preset="small")


def test_simulate_missing_per_sample():
    ds = make_ds(DIMS3, n=400)
    b = ds.batch(np.arange(400))
    g = torch.Generator().manual_seed(0)
    s = simulate_missing(b, rate=0.4, generator=g)
    assert s.mask.any(dim=1).all()  # every sample keeps one
    assert len({tuple(r) for r in s.mask.tolist()}) > 3  # drawn per sample, not per batch
    assert 0.33 < 1 - s.mask.float().mean() < 0.42
    for j, m in enumerate(b.modalities):
        dropped = ~s.mask[:, j]
        assert torch.isnan(s.features[m][dropped]).all() and torch.isfinite(s.features[m][~dropped]).all()
        assert torch.isfinite(b.features[m]).all()  # the original is untouched: targets stay available
    # never marks present what the data lacks; range rates; patterns
    data_mask = torch.from_numpy(mask3())
    small = with_mask(make_ds(DIMS3), data_mask.numpy())
    s2 = simulate_missing(small, rate=(0.0, 1.0), generator=g)
    assert not (s2.mask & ~small.mask).any() and s2.mask.any(dim=1).all()
    s3 = simulate_missing(small, pattern=["L"], generator=g)
    expected = small.mask.clone()
    expected[:, 1:] = False
    lost = ~expected.any(dim=1)
    assert torch.equal(s3.mask[~lost], expected[~lost])
    assert s3.mask[lost].sum(dim=1).eq(1).all() and not (s3.mask & ~small.mask).any()
    with pytest.raises(ValueError, match="exactly one"):
        simulate_missing(b)
    with pytest.raises(KeyError, match="unknown modalities"):
        simulate_missing(b, pattern=["X"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        simulate_missing(b, rate=1.5)


def test_latent_clamp_option_clamps_to_the_prior_range_before_the_inverse() -> None:
    """With ``latent_clamp=k`` a source latent far outside the prior is clamped to k prior-sigmas
    before the target's inverse flow; off by default in both variants (the paper's spline flows are
    bounded by construction; the official variant, as released, does not clamp)."""
    ds = make_ds({"A": (3, 4), "B": (5, 4)}, n=8)
    assert DiCMoR(DatasetInfo.from_dataset(ds), preset="small", **TINY)._r.latent_clamp == 0.0
    paper = DiCMoR(DatasetInfo.from_dataset(ds), preset="small", latent_clamp=6.0, **TINY)
    assert paper._r.latent_clamp == 6.0
    z = torch.full((2, paper.d, 4), 1e4)
    clamped = paper._clamp_latent(z)
    std = torch.exp(paper.prior.log_std)
    torch.testing.assert_close(clamped[0, :, 0], (paper.prior.loc + 6 * std).amax(0))
    inside = torch.zeros(2, paper.d, 4)
    torch.testing.assert_close(paper._clamp_latent(inside), inside)
    official = DiCMoR(DatasetInfo.from_dataset(ds), preset="small", variant="official", **TINY)
    assert official._clamp_latent(z) is z


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_flow_designs_of_the_variants(variant) -> None:
    """paper: bounded spline flows (data-end ActNorm, permutations) with a finite certificate;
    official: the released affine couplings with Glow's sigmoid, no mixing, no bound."""
    from flowtransfer.flows import AffineCoupling, RationalQuadraticCoupling

    ds = make_ds({"A": (3, 4), "B": (5, 4)}, n=8)
    model = DiCMoR(DatasetInfo.from_dataset(ds), preset="small", variant=variant, **TINY)
    for flow in model.flows.values():
        couplings = [s.coupling for s in flow.steps]
        cert = float(flow.inverse_bound(6.0).max())
        if variant == "paper":
            assert all(isinstance(c, RationalQuadraticCoupling) for c in couplings)
            assert flow.config["mixing"] == "permutation" and flow.config["actnorm"] == "input"
            assert math.isfinite(cert)
        else:
            assert all(isinstance(c, AffineCoupling) and c.scale == "sigmoid" and c.kernel_size == 1 for c in couplings)
            assert all(len(s.layers) == 1 for s in flow.steps) and cert == math.inf
    with pytest.raises(ValueError, match="flow_coupling='affine'"):
        DiCMoR(DatasetInfo.from_dataset(ds), preset="small", flow_scale="sigmoid", **TINY)


def test_selection_veto_refuses_exploding_recoveries_and_the_trainer_never_selects_them() -> None:
    from flowtransfer.training import TrainConfig, Trainer

    ds = make_ds({"A": (3, 4), "B": (5, 4)}, n=16)
    model = DiCMoR(DatasetInfo.from_dataset(ds), preset="small", variant="official", **TINY)
    assert model.selection_veto(ds) is None
    # sabotage the target flows' inverse: Glow's sigmoid scale driven to ~0 divides by ~1e-30
    with torch.no_grad():
        for flow in model.flows.values():
            for step in flow.steps:
                step.coupling.net[-1].bias.fill_(-70.0)
    reason = model.selection_veto(ds)
    assert reason is not None and ("non-finite" in reason or "x the real" in reason)
    # the trainer consults the hook after every validation pass and never selects a vetoed epoch
    model = DiCMoR(DatasetInfo.from_dataset(ds), preset="small", variant="official", **TINY)
    model.selection_veto = lambda dataset: "recovered validation features reach 1e18"
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=8, lr=1e-12, monitor="mae", progress=False))
    with pytest.raises(RuntimeError, match="vetoed every one"):
        trainer.fit(ds, make_ds({"A": (3, 4), "B": (5, 4)}, n=8, seed=1))
