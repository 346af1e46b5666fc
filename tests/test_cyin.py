"""CyIN: token KL, cyclic translation, cascaded residual autoencoders, recovery by sum, two stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowtransfer.data.dataset import from_arrays
from flowtransfer.methods.base import DatasetInfo, build_method, simulate_missing
from flowtransfer.methods.cyin import CYIN_PRESETS, CascadedResidualAE, CyIN, ResidualAE, token_kl, translation_loss
from flowtransfer.training.trainer import Trainer, TrainConfig

TINY = dict(preset="small", fusion="concat", d=8, cra_widths=(8, 4), cra_blocks=2)



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
    m3 = CyIN(DatasetInfo.from_dataset(ds), share_reverse=False, stage1_epochs=0, **TINY)
    assert len(m2.translators) == 3 and len(m.translators) == 3 and len(m3.translators) == 6
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


# ------------------------------------------------------------------ sizes and budget (issue 11)


class _Budget:
    """The two things CyIN/MMANet read from a trainer to learn the budget."""

    def __init__(self, epochs: int, patience: int | None = None) -> None:
        self.config = TrainConfig(epochs=epochs, early_stop_patience=patience, progress=False)
        self.train_dataset = None


def test_sizes_follow_the_released_code_per_preset():
    info = DatasetInfo.from_dataset(lav(4))
    m = CyIN(info, preset="mosi", fusion="concat")
    o = m.options
    # RH-Lin/CyIN @ da04a3d config/config_regression.json, MOSI: RAE_n_blocks 8, RAE_layers [64,32,16],
    # p_eta 16, w_imgaine 10, stage_divide 0.1; one translator per unordered pair, kernel 3
    assert (o["cra_blocks"], o["cra_widths"], o["cra_kernel"]) == (8, [64, 32, 16], 3)
    assert (o["beta"], o["gamma"], o["stage1_fraction"], o["share_reverse"]) == (16.0, 10.0, 0.1, True)
    assert sorted(m.translators) == ["A_L", "A_V", "L_V"] and len(m.translators["A_L"].blocks) == 8
    assert m.translators["A_L"].blocks[0].net[0].kernel_size == (3,)
    assert m.translators["A_L"].transition is not None
    mosei = CyIN(info, preset="mosei", fusion="concat").options
    assert (mosei["cra_blocks"], mosei["cra_widths"], mosei["beta"], mosei["gamma"], mosei["stage1_fraction"]) == (
        4, [128, 64, 32], 32.0, 5.0, 0.3)
    assert CYIN_PRESETS["small"] == CYIN_PRESETS["mosi"]
    # an explicit option wins over the preset, and the hparams rebuild the same model
    m2 = CyIN(info, preset="mosi", fusion="concat", cra_blocks=3, cra_kernel=1)
    assert m2.options["cra_blocks"] == 3 and len(m2.translators["A_L"].blocks) == 3
    rebuilt = build_method("cyin", info, **m2.hparams["config"])
    assert rebuilt.options == m2.options
    # the cascade with its transition is the identity at initialisation
    x = torch.randn(2, 8, 5)
    cra = CascadedResidualAE(8, 3, (4, 2), kernel_size=3, transition=True)
    assert torch.equal(cra(x), x)
    with pytest.raises(ValueError, match="odd"):
        ResidualAE(8, (4,), kernel_size=2)


def test_stage1_is_a_fraction_of_the_planned_budget():
    info = DatasetInfo.from_dataset(lav(4))
    m = CyIN(info, **{**TINY, "stage1_fraction": 0.1})
    assert m.stage == 1  # unplanned: stage 1
    m.on_epoch_start(0, _Budget(30))
    assert int(m.stage1) == 3
    m.on_epoch_start(3, _Budget(30))
    assert m.stage == 2
    short = CyIN(info, **TINY)  # small preset: MOSI's 0.1 -> round(0.5) = 0 -> at least 1 epoch
    short.on_epoch_start(0, _Budget(5))
    assert int(short.stage1) == 1
    mosei_like = CyIN(info, **{**TINY, "stage1_fraction": 0.3})
    assert mosei_like.plan(10) == 3
    with pytest.raises(ValueError, match="never reach stage 2"):
        CyIN(info, stage1_epochs=5, **TINY).on_epoch_start(0, _Budget(5))
    with pytest.raises(ValueError, match="stage1_fraction"):
        CyIN(info, stage1_fraction=1.0, **TINY)
