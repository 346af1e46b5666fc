"""SMIL: k-means priors, omega ~ N(1, sigma) reconstruction, KL closed form, meta-learning, eta setting."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowtransfer.data.dataset import from_arrays
from flowtransfer.data.missing import training_missing_mask
from flowtransfer.methods.base import DatasetInfo, build_method, simulate_missing
from flowtransfer.methods.smil import SMIL, FeatureRegulariser, PriorReconstruction, gaussian_kl, kmeans
from flowtransfer.training.evaluation import evaluate_loss
from flowtransfer.training.trainer import Trainer, TrainConfig

TINY = dict(preset="small", fusion="concat", d=8)



def image_sound(n: int = 40, eta: float = 0.25, seed: int = 0):
    """Two modalities, 'I' always present, 'S' present in round(eta n) samples."""
    rng = np.random.default_rng(seed)
    feats = {"I": rng.normal(size=(n, 6, 4)).astype("float32"), "S": rng.normal(size=(n, 3, 5)).astype("float32")}
    y = (feats["I"].mean(axis=(1, 2)) + feats["S"].mean(axis=(1, 2)) > 0).astype("int64")
    ds = from_arrays(feats, y, "classification", layout="NCT", num_classes=2)
    return ds.with_mask(training_missing_mask(n, ds.modalities, eta, "S", seed))


# ------------------------------------------------------------------------------------------ k-means


def test_kmeans_recovers_a_known_clustering():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 5.0], [0.0, 10.0, -5.0]], dtype=torch.float64)
    labels = torch.arange(3).repeat_interleave(20)
    x = centres[labels] + 0.3 * torch.randn(60, 3, generator=gen, dtype=torch.float64)
    got, assign = kmeans(x, 3, seed=1)
    assert got.dtype == torch.float64
    # same partition up to a relabelling, centres = the blob means
    perm = [int(assign[labels == k].mode().values) for k in range(3)]
    assert sorted(perm) == [0, 1, 2]
    for k in range(3):
        assert bool((assign[labels == k] == perm[k]).all())
        assert torch.allclose(got[perm[k]], x[labels == k].mean(0), atol=1e-12)
    again, _ = kmeans(x, 3, seed=1)
    assert torch.equal(got, again)  # seeded: deterministic


def test_kmeans_errors():
    with pytest.raises(ValueError, match="k must be"):
        kmeans(torch.randn(3, 2), 4)
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), 1)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        kmeans(torch.randn(3), 1)


def test_fit_priors_uses_only_samples_with_the_missing_modality():
    ds = image_sound(40, eta=0.5)
    m = SMIL(DatasetInfo.from_dataset(ds), num_priors=3, missing_modality="S", **TINY)
    priors = m.fit_priors(ds)
    rows = ds.mask[:, 1]
    x = torch.as_tensor(ds.features["S"][rows]).reshape(int(rows.sum()), -1)
    centres, _ = kmeans(x, 3, seed=0)
    assert priors.shape == (3, 3, 5)
    assert torch.allclose(priors.reshape(3, -1), centres)
    assert torch.equal(m.reconstructor.priors, priors)


def test_unfitted_priors_raise():
    ds = image_sound(16)
    m = SMIL(DatasetInfo.from_dataset(ds), num_priors=2, **TINY)
    with pytest.raises(RuntimeError, match="priors are not fitted"):
        m.predict(ds.full_batch())


# ------------------------------------------------------------------------------------------ reconstruction


def test_reconstruction_mean_is_priors_weighted_by_one():
    torch.manual_seed(0)
    rec = PriorReconstruction(context_dim=5, num_priors=4, prior_shape=(3, 2)).double()
    priors = torch.randn(4, 3, 2, dtype=torch.float64)
    rec.set_priors(priors)
    ctx = torch.randn(6, 5, dtype=torch.float64)
    x_hat, omega, logvar = rec(ctx, sample=False)
    assert torch.equal(omega, torch.ones(6, 4, dtype=torch.float64))
    expected = (1.0 * priors).sum(0) / 4  # omega = 1 for every prior, scaled by 1/K
    assert torch.allclose(x_hat, expected.expand(6, 3, 2), atol=1e-14)
    # sampled: omega ~ N(1, sigma^2) with sigma = exp(logvar / 2), reconstruction linear in omega
    xs, om, lv = rec(ctx, sample=True)
    assert not torch.allclose(om, torch.ones_like(om))
    assert torch.allclose(xs, torch.einsum("bk,kct->bct", om, priors) / 4, atol=1e-12)
    big = ctx[:1].expand(20000, 5)
    _, om, lv = rec(big, sample=True)
    sigma = (0.5 * lv[0]).exp()
    assert torch.allclose(om.mean(0), torch.ones(4, dtype=torch.float64), atol=4 * float(sigma.max().detach()) / 141)
    assert torch.allclose(om.std(0), sigma, rtol=0.05)


def test_official_reconstruction_is_a_convex_combination():
    torch.manual_seed(1)
    rec = PriorReconstruction(5, 3, (2, 2), mode="official").double()
    priors = torch.randn(3, 2, 2, dtype=torch.float64)
    rec.set_priors(priors)
    x_hat, w, lv = rec(torch.randn(4, 5, dtype=torch.float64), sample=True)
    assert lv is None and bool((w > 0).all())
    assert torch.allclose(x_hat, torch.einsum("bk,kct->bct", w / w.sum(1, keepdim=True), priors))
    with pytest.raises(ValueError, match="unknown reconstruction"):
        PriorReconstruction(5, 3, (2, 2), mode="gan")


def test_feature_regulariser_softplus_of_mu_at_test():
    torch.manual_seed(0)
    reg = FeatureRegulariser(4, hidden=8, op="add").double()
    torch.nn.init.normal_(reg.net[-1].weight)
    h = torch.randn(5, 4, dtype=torch.float64)
    out, mu, logvar = reg(h, sample=False)
    assert torch.allclose(out, h + torch.nn.functional.softplus(mu))
    mul = FeatureRegulariser(4, hidden=8, op="mul").double()
    out, mu, _ = mul(h, sample=False)
    assert torch.allclose(out, h * torch.nn.functional.softplus(mu))  # zero-initialised: mu = 0
    assert torch.allclose(out, h * np.log(2.0))


def test_gaussian_kl_closed_form():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    logvar = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    for m0, lv0 in [(0.0, 0.0), (1.0, 0.0), (0.5, -1.3)]:
        p = torch.distributions.Normal(torch.full_like(mu, m0), torch.full_like(mu, np.exp(0.5 * lv0)))
        expected = torch.distributions.kl_divergence(q, p)
        assert torch.allclose(gaussian_kl(mu, logvar, m0, lv0), expected, atol=1e-12)
    assert torch.equal(gaussian_kl(torch.zeros(2), torch.zeros(2)), torch.zeros(2))


# ------------------------------------------------------------------------------------------ meta-learning


def _psi_grad(first_order: bool) -> torch.Tensor:
    ds = image_sound(24, eta=0.5)
    torch.manual_seed(0)
    m = SMIL(DatasetInfo.from_dataset(ds), num_priors=2, first_order=first_order, inner_lr=0.5,
             feature_match_weight=0.0, kl_weight=0.0, include_inner_loss=False, reconstruction="official", **TINY)
    m.prepare(ds)
    m.train()
    torch.manual_seed(1)
    loss, parts = m.loss(ds.full_batch())
    assert {"inner", "outer", "kl", "feature_match", "loss"} <= set(parts)
    loss.backward()
    return m.reconstructor.net[0].weight.grad.clone()


def test_second_order_meta_gradient_differs_from_first_order():
    g1, g2 = _psi_grad(True), _psi_grad(False)
    assert torch.isfinite(g1).all() and torch.isfinite(g2).all()
    assert not torch.allclose(g1, g2)  # create_graph: psi also gets gradient through theta*


def test_smil_eta_setting_through_trainer():
    train, valid = image_sound(48, eta=0.25, seed=0), image_sound(24, eta=1.0, seed=1)
    m = build_method("smil", DatasetInfo.from_dataset(train), num_priors=3, first_order=True, **TINY)
    assert isinstance(m, SMIL) and m.missing_modality == "S"
    res = Trainer(m, TrainConfig(epochs=4, batch_size=16, lr=1e-2, progress=False, monitor="loss",
                                 early_stop_patience=None)).fit(train, valid)
    hist = [h["train/loss"] for h in res.history]
    assert hist[-1] < hist[0]
    assert bool(m.reconstructor.fitted)  # the trainer called prepare
    m.eval()
    full = valid.full_batch()
    image_only = simulate_missing(full, pattern=["I"])
    with torch.no_grad():
        for b in (full, image_only):
            out = m.predict(b)
            assert out.shape == (24, 2) and torch.isfinite(out).all()
    rec = m.recover(image_only)
    assert set(rec) == {"S"} and torch.isfinite(rec["S"]).all()
    assert np.isfinite(evaluate_loss(m, valid)["loss"])  # the loss runs without gradients too


def test_smil_three_modalities_and_batches_without_complete_rows():
    rng = np.random.default_rng(0)
    feats = {k: rng.normal(size=(12, c, 4)).astype("float32") for k, c in (("L", 5), ("A", 3), ("V", 2))}
    ds = from_arrays(feats, rng.normal(size=12).astype("float32"), "regression", layout="NCT")
    m = SMIL(DatasetInfo.from_dataset(ds), num_priors=2, missing_modality="A", **TINY)
    m.prepare(ds)
    b = simulate_missing(ds.full_batch(), pattern=["L", "V"])  # no sample has A: no D^f rows
    loss, parts = m.loss(b)
    assert torch.isfinite(loss) and "outer" not in parts
    loss.backward()
    b2 = simulate_missing(ds.full_batch(), rate=0.4, generator=torch.Generator().manual_seed(0))
    loss, parts = m.loss(b2)
    assert torch.isfinite(loss) and "outer" in parts


# ------------------------------------------------------------------------------------------ m* and reconstruction (issue 11)


def _lav(n: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = {"L": rng.normal(size=(n, 6, 1)).astype("float32"), "A": rng.normal(size=(n, 3, 1)).astype("float32"),
             "V": rng.normal(size=(n, 4, 1)).astype("float32")}
    return from_arrays(feats, feats["L"].mean(axis=(1, 2)).astype("float32"), "regression", layout="NCT")


def test_missing_modality_follows_the_papers_rule():
    from flowtransfer.methods.smil import paper_missing_modality

    # text on CMU-MOSI / MM-IMDb, audio on AV-MNIST (Ma et al. 2021, Sec. 4.2-4.3), else the last one
    assert paper_missing_modality(("L", "A", "V")) == "L"
    assert paper_missing_modality(("V", "A")) == "A"
    assert paper_missing_modality(("I", "S")) == "S"
    info = DatasetInfo.from_dataset(_lav())
    m = SMIL(info, **TINY)
    assert m.missing_modality == "L" and m.hparams["config"]["missing_modality"] == "L"
    assert SMIL(info, missing_modality="A", **TINY).missing_modality == "A"
    with pytest.raises(KeyError, match="unknown missing_modality"):
        SMIL(info, missing_modality="X", **TINY)
    with pytest.raises(ValueError, match="unknown reconstruction"):
        SMIL(info, reconstruction="gan", **TINY)


@pytest.mark.parametrize("name", ["smil", "smil_official"])
def test_paper_reconstruction_is_constant_official_is_input_dependent(name):
    ds = _lav(24)
    m = build_method(name, DatasetInfo.from_dataset(ds), **TINY)
    m.prepare(ds)
    assert m.options["reconstruction"] == ("paper" if name == "smil" else "official")
    b = simulate_missing(ds.full_batch(), pattern=["A", "V"])  # m* = L absent everywhere
    m.eval()
    with torch.no_grad():
        ctx = m._context(None, b, b.mask)
        x_hat, _, _ = m.reconstructor(ctx, sample=False)
        pred = m.predict(b)
    priors = m.reconstructor.priors
    spread = float((x_hat - x_hat.mean(0, keepdim=True)).abs().max())
    if name == "smil":
        # omega's mean is 1 whatever the input: every sample gets the mean of the priors
        assert torch.allclose(x_hat, priors.mean(0).expand_as(x_hat), atol=1e-6) and spread < 1e-6
    else:
        assert spread > 1e-4  # depends on the available modalities
        lo, hi = priors.min(0).values, priors.max(0).values
        assert bool(((x_hat >= lo - 1e-6) & (x_hat <= hi + 1e-6)).all())  # a convex combination of the priors
    assert torch.isfinite(pred).all()
    with pytest.raises(ValueError, match="smil_official uses"):
        build_method("smil_official", DatasetInfo.from_dataset(ds), reconstruction="paper", **TINY)
