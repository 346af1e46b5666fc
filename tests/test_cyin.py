"""CyIN: token KL, cyclic translation, cascaded residual autoencoders, recovery by sum, two stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowtransfer.data.dataset import from_arrays
from flowtransfer.methods.base import DatasetInfo, build_method, simulate_missing
from flowtransfer.methods.cyin import CascadedResidualAE, CyIN, ResidualAE, token_kl, translation_loss
from flowtransfer.training.trainer import Trainer, TrainConfig

TINY = dict(preset="small", fusion="concat", d=8, cra_widths=(8, 4))



def lav(n: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = {"L": rng.normal(size=(n, 6, 4)).astype("float32"), "A": rng.normal(size=(n, 3, 5)).astype("float32"),
             "V": rng.normal(size=(n, 4, 4)).astype("float32")}
    y = (feats["L"].mean(axis=(1, 2)) * 6 + feats["A"].mean(axis=(1, 2))).astype("float32")
    return from_arrays(feats, y, "regression", layout="NCT")


def test_token_kl_closed_form():
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    logvar = torch.randn(3, 5, 4, generator=gen, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).mean(dim=1)  # mean over channels
    got = token_kl(mu, logvar)
    assert got.shape == (3, 4)
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.equal(token_kl(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3)), torch.zeros(1, 3))


def test_cycle_loss_zero_for_identity_translator_pair():
    b = torch.randn(4, 6, 3, dtype=torch.float64)
    ident = lambda x: x  # noqa: E731
    assert torch.equal(translation_loss(b, b.clone(), ident, ident), torch.zeros(4, dtype=torch.float64))
    other = torch.randn(4, 6, 3, dtype=torch.float64)
    assert torch.allclose(translation_loss(b, other, ident, ident), (other - b).pow(2).mean(dim=(1, 2)))
    # forward / reverse roles: a doubling forward needs a halving reverse to close the cycle
    loss = translation_loss(b, 2 * b, lambda x: 2 * x, lambda x: 0.5 * x)
    assert torch.allclose(loss, torch.zeros(4, dtype=torch.float64))
    # a freshly built CRA pair is the identity, so the cycle term vanishes
    fwd, rev = CascadedResidualAE(6, 3, (4, 2)).double(), CascadedResidualAE(6, 3, (4, 2)).double()
    assert torch.equal(fwd(b), b)
    assert torch.equal(translation_loss(b, b, fwd, rev), torch.zeros(4, dtype=torch.float64))


def test_cascade_feeds_each_block_the_running_sum():
    torch.manual_seed(0)
    cra = CascadedResidualAE(5, 2, (4,)).double()
    for block in cra.blocks:
        torch.nn.init.normal_(block.net[-1].weight)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    r1 = cra.blocks[0](x)
    r2 = cra.blocks[1](x + r1)
    assert torch.allclose(cra(x), x + r1 + r2)
    assert isinstance(cra.blocks[0], ResidualAE)
    with pytest.raises(ValueError, match=">= 1"):
        CascadedResidualAE(5, 0)


@pytest.mark.parametrize("combine", ["sum", "mean"])
def test_missing_latent_is_the_sum_of_translations(combine):
    ds = lav(6)
    torch.manual_seed(0)
    m = CyIN(DatasetInfo.from_dataset(ds), combine=combine, **TINY).eval()
    for cra in m.translators.values():
        for block in cra.blocks:
            torch.nn.init.normal_(block.net[-1].weight, std=0.3)
    b = simulate_missing(ds.full_batch(), pattern=["A", "V"])  # L missing, A and V available
    with torch.no_grad():
        lat, _, _ = m._encode(b, sample=False)
        rec = m._recover(lat, b.mask)
        expected = m.translate(lat["A"], "A", "L") + m.translate(lat["V"], "V", "L")
        if combine == "mean":
            expected = expected / 2
        assert torch.allclose(rec["L"], expected, atol=1e-6)
        assert torch.equal(rec["A"], lat["A"])
        assert torch.allclose(m.recover(b)["L"], expected, atol=1e-6)
        out = m.predict(b)
    assert torch.isfinite(out).all()


def test_stages_and_loss_parts():
    ds = lav(16)
    m = CyIN(DatasetInfo.from_dataset(ds), stage1_epochs=2, **TINY)
    b = ds.full_batch()
    m.on_epoch_start(1)
    assert m.stage == 1
    _, parts = m.loss(b)
    assert parts["tran"] == 0.0 and parts["stage"] == 1.0
    m.on_epoch_start(2)
    assert m.stage == 2
    _, parts = m.loss(b)
    assert parts["tran"] > 0.0 and parts["stage"] == 2.0
    assert {"task", "tib", "lib"} <= set(parts)
    m2 = CyIN(DatasetInfo.from_dataset(ds), share_reverse=True, detach_translation=True, stage1_epochs=0, **TINY)
    assert len(m2.translators) == 3 and len(m.translators) == 6
    loss, parts = m2.loss(b)
    assert parts["tran"] > 0.0
    loss.backward()  # the translation term reaches the translators only; the task still trains all
    assert m2.translators["A_L"].blocks[0].net[-1].weight.grad is not None


def test_cyin_trains_through_trainer():
    train, valid = lav(32), lav(16, seed=1)
    m = build_method("cyin", DatasetInfo.from_dataset(train), stage1_epochs=1, **TINY)
    res = Trainer(m, TrainConfig(epochs=5, batch_size=16, lr=1e-2, progress=False, monitor="mae",
                                 early_stop_patience=None)).fit(train, valid)
    loss = [h["train/loss"] for h in res.history]
    assert loss[-1] < loss[1]  # within stage 2 (stage 1 has no translation term)
    assert [h["train/loss/stage"] for h in res.history] == [1.0, 2.0, 2.0, 2.0, 2.0]


def test_cyin_with_mult_fusion_and_other_latent_width():
    ds = lav(8)
    m = CyIN(DatasetInfo.from_dataset(ds), preset="small", d=8, latent_dim=4, mult={"heads": 2}, cra_widths=(4,))
    b = simulate_missing(ds.full_batch(), rate=0.5, generator=torch.Generator().manual_seed(0))
    loss, _ = m.loss(b)
    loss.backward()
    m.eval()
    with torch.no_grad():
        assert torch.isfinite(m.predict(b)).all()
        assert m.encode(b)["L"].shape == (8, 4, 4)
