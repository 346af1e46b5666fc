"""MMANet: uncertainty weighting, margin-aware distillation, weak-pattern mining, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flowtransfer.data.dataset import from_arrays
from flowtransfer.methods.base import DatasetInfo, build_method, simulate_missing
from flowtransfer.methods.fusion_model import FusionModel
from flowtransfer.methods.mmanet import (
    MMANet,
    histogram_kl,
    mad_loss,
    mine_weak_pattern,
    random_patterns,
    row_normalised_gram,
    uncertainty_weights,
    weak_set,
)
from flowtransfer.training.trainer import Trainer, TrainConfig

TINY = dict(preset="small", fusion="concat", d=8)



def lav(n: int = 32, task: str = "classification", seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = {"L": rng.normal(size=(n, 6, 4)).astype("float32"), "A": rng.normal(size=(n, 3, 5)).astype("float32"),
             "V": rng.normal(size=(n, 4, 4)).astype("float32")}
    score = feats["L"].mean(axis=(1, 2)) * 6
    if task == "regression":
        return from_arrays(feats, score.astype("float32"), task, layout="NCT")
    return from_arrays(feats, (score > 0).astype("int64"), task, layout="NCT", num_classes=2)


# ------------------------------------------------------------------------------------------ MAD


def test_uncertainty_weights_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [10.0, -10.0]], dtype=torch.float64)
    h1 = math.log(2.0)
    h2 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    p = 1.0 / (1.0 + math.exp(-20.0))
    h3 = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    total = h1 + h2 + h3
    w = uncertainty_weights(logits)
    assert torch.allclose(w, torch.tensor([h1, h2, h3], dtype=torch.float64) / total, atol=1e-12)
    assert float(w.sum()) == pytest.approx(1.0)
    assert w[2] < w[1] < w[0]  # the confident sample weighs least
    assert torch.equal(uncertainty_weights(torch.tensor([[1e4, -1e4]] * 2, dtype=torch.float64)),
                       torch.full((2,), 0.5, dtype=torch.float64))


def test_mad_loss_hand_computed_and_row_weighted():
    fs = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]], dtype=torch.float64)
    ft = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    gs = (fs @ fs.T).numpy()
    gt = (ft @ ft.T).numpy()
    gs = gs / np.linalg.norm(gs, axis=1, keepdims=True)
    gt = gt / np.linalg.norm(gt, axis=1, keepdims=True)
    assert np.allclose(row_normalised_gram(fs).numpy(), gs)
    w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    expected = sum(float(w[i]) * sum((gs[i, j] - gt[i, j]) ** 2 for j in range(3)) for i in range(3))
    assert float(mad_loss(fs, ft, w)) == pytest.approx(expected, abs=1e-12)
    # rows, not columns: a zero-weight row's mismatch does not count
    w0 = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
    expected0 = sum(0.5 * sum((gs[i, j] - gt[i, j]) ** 2 for j in range(3)) for i in (1, 2))
    assert float(mad_loss(fs, ft, w0)) == pytest.approx(expected0, abs=1e-12)
    assert float(mad_loss(fs, fs * 3.0, w)) == pytest.approx(0.0, abs=1e-12)  # scale-free
    with pytest.raises(ValueError, match="batch sizes differ"):
        mad_loss(fs, ft[:2], w)


# ------------------------------------------------------------------------------------------ mining


def test_histogram_kl():
    h = torch.tensor([3.0, 1.0])
    assert float(histogram_kl(h, h * 5)) == pytest.approx(0.0, abs=1e-12)
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert float(histogram_kl(h, torch.tensor([1.0, 1.0]), eps=0.0)) == pytest.approx(expected)


def test_mining_picks_the_pattern_lacking_the_strong_modality():
    ds = lav(8)
    m = MMANet(DatasetInfo.from_dataset(ds), warmup_epochs=3, mine_start=1, **TINY)
    m.set_epoch(1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # two mining epochs
        balanced = torch.randint(0, 2, (200,), generator=gen)
        m.record_predictions(("L", "A", "V"), balanced)
        m.record_predictions(("L", "A"), balanced)
        m.record_predictions(("L", "V"), torch.where(torch.rand(200, generator=gen) < 0.1, 1 - balanced, balanced))
        m.record_predictions(("A", "V"), torch.zeros(200, dtype=torch.long))  # collapses without L
        m.set_epoch(m.epoch.item() + 1)
    assert bool(m.mined) and m.distilling
    assert m.weak_patterns == [("A",), ("V",), ("A", "V")]
    div = dict(zip(m.candidates, m.divergence.tolist()))
    assert div[("A", "V")] > 10 * div[("L", "V")] > 0.0 and div[("L", "A")] < 1e-9
    # teacher frozen from now on
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert weak_set(("L", "A", "V"), "L") == [("A",), ("V",), ("A", "V")]
    assert mine_weak_pattern({("A",): 0.1, ("B",): 0.3}, ("A", "B")) == (("B",), "A")
    with pytest.raises(ValueError, match="not a pattern"):
        mine_weak_pattern({("A",): 0.1}, ("A", "B", "C"))


def test_random_patterns_cover_every_nonempty_subset():
    pats = random_patterns(torch.ones(2000, 3, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert bool(pats.any(dim=1).all())
    codes = (pats.long() * torch.tensor([1, 2, 4])).sum(1)
    counts = torch.bincount(codes, minlength=8)
    assert counts[0] == 0 and bool((counts[1:] > 200).all())


# ------------------------------------------------------------------------------------------ training


def test_mmanet_trains_through_trainer_and_distils():
    train, valid = lav(32), lav(16, seed=1)
    m = build_method("mmanet", DatasetInfo.from_dataset(train), warmup_epochs=2, mine_start=0, **TINY)
    res = Trainer(m, TrainConfig(epochs=5, batch_size=16, lr=1e-2, progress=False, monitor="acc",
                                 early_stop_patience=None)).fit(train, valid)
    assert "train/loss/teacher" in res.history[0] and "train/loss/mad" in res.history[-1]
    task = [h["train/loss/task"] for h in res.history]
    assert task[-1] < task[0]
    assert all("train/loss/mar" in h for h in res.history[2:])  # mining ended after the warm-up
    m.eval()
    b = simulate_missing(valid.full_batch(), rate=0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(m.predict(b)).all()


def test_mmanet_regression_uses_a_7way_teacher_head_and_pretrained_teacher():
    ds = lav(16, task="regression")
    info = DatasetInfo.from_dataset(ds)
    m = MMANet(info, warmup_epochs=1, **TINY)
    _, z, logits = m._teacher(ds.full_batch())
    assert logits.shape == (16, 7) and z.shape[0] == 16
    loss, parts = m.loss(ds.full_batch())
    assert "teacher" in parts
    teacher = FusionModel(info, "small", fusion="concat", d=8)
    m2 = MMANet(info, teacher=teacher, warmup_epochs=1, **TINY)
    assert not any(p.requires_grad for p in m2.teacher.parameters())
    loss, parts = m2.loss(ds.full_batch())
    assert "teacher" not in parts
    with pytest.warns(RuntimeWarning, match="no mining data"):
        m2.set_epoch(1)
    torch.manual_seed(0)
    losses = []
    opt = torch.optim.Adam([p for p in m2.parameters() if p.requires_grad], 1e-2)
    for _ in range(12):
        loss, parts = m2.loss(ds.full_batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(parts["loss"])
    assert {"mad", "mar"} <= set(parts)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


# ------------------------------------------------------------------------------------------ budget (issue 11)


def _budget(epochs, patience=None, **extra):
    """What MMANet reads from a trainer: its config (epochs, patience, optional step cap)."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(epochs=epochs, early_stop_patience=patience, **extra)
    return SimpleNamespace(config=cfg, train_dataset=extra.pop("train", None))


def test_warmup_is_a_fraction_of_the_planned_budget():
    info = DatasetInfo.from_dataset(lav(8))
    m = MMANet(info, **TINY)  # default warmup_fraction 0.3
    with pytest.raises(RuntimeError, match="not known yet"):
        m.warmup_epochs
    m.on_epoch_start(0, _budget(10))
    assert (m.warmup_epochs, m.mine_start) == (3, 0)
    assert m.selection_veto() is not None and not m.distilling
    long = MMANet(info, **TINY)
    long.on_epoch_start(0, _budget(100))
    assert (long.warmup_epochs, long.mine_start) == (30, 27)  # mining: the last three warm-up epochs
    short = MMANet(info, warmup_fraction=0.5, **TINY)
    short.on_epoch_start(0, _budget(5))
    assert short.warmup_epochs == 2  # round(2.5) = 2, leaving 3 distilling epochs
    # a step cap shortens the plan: 64 samples, batch 16 -> 4 steps per epoch; 20 steps -> 5 epochs
    from flowtransfer.training.trainer import TrainConfig as TC

    class Capped:
        config = TC(epochs=100, batch_size=16, progress=False, early_stop_patience=None)
        train_dataset = lav(64)

    Capped.config.max_steps = 20
    Capped.config.steps_per_epoch = lambda n, world=1: -(-n // 16)
    capped = MMANet(info, **TINY)
    capped.on_epoch_start(0, Capped())
    assert capped.warmup_epochs == 2  # round(0.3 x 5)
    # the warm-up and its buffers survive a state-dict round trip (a resume)
    again = MMANet(info, **TINY)
    again.load_state_dict(m.state_dict())
    assert again.planned and again.warmup_epochs == 3
    again.on_epoch_start(4, None)
    assert again.distilling


def test_a_budget_that_cannot_distil_is_refused_before_training():
    info = DatasetInfo.from_dataset(lav(8))
    with pytest.raises(ValueError, match="never distil"):
        MMANet(info, **TINY).on_epoch_start(0, _budget(1))
    with pytest.raises(ValueError, match="never distil"):
        MMANet(info, warmup_epochs=5, **TINY).plan(5)
    with pytest.raises(ValueError, match="could stop before it distils"):
        MMANet(info, **TINY).plan(20, early_stop_patience=6)  # warm-up 6
    assert MMANet(info, **TINY).plan(20, early_stop_patience=7) == 6
    assert MMANet(info, **TINY).plan(20, early_stop_patience=6, exempts_warmup=True) == 6
    with pytest.raises(ValueError, match="warmup_fraction"):
        MMANet(info, warmup_fraction=1.0, **TINY)
    # through the trainer: refused at the first epoch, before any step
    train, valid = lav(32), lav(16, seed=1)
    m = build_method("mmanet", DatasetInfo.from_dataset(train), **TINY)
    before = {k: v.clone() for k, v in m.student.state_dict().items()}
    with pytest.raises(ValueError, match="never distil"):
        Trainer(m, TrainConfig(epochs=1, batch_size=16, progress=False, monitor="acc",
                               early_stop_patience=None)).fit(train, valid)
    assert all(torch.equal(before[k], v) for k, v in m.student.state_dict().items())


def test_warmup_epochs_are_never_selected():
    train, valid = lav(32), lav(16, seed=1)
    m = build_method("mmanet", DatasetInfo.from_dataset(train), warmup_fraction=0.5, **TINY)
    res = Trainer(m, TrainConfig(epochs=4, batch_size=16, lr=1e-2, progress=False, monitor="acc",
                                 early_stop_patience=None)).fit(train, valid)
    assert m.warmup_epochs == 2
    assert [("veto" in h) for h in res.history] == [True, True, False, False]
    assert res.best_epoch >= 2 and "train/loss/mad" in res.history[res.best_epoch]
    assert m.hparams["config"]["warmup_fraction"] == 0.5 and m.hparams["config"]["warmup_epochs"] is None


def test_the_trainer_exempts_the_warmup_from_patience_so_short_patience_is_accepted():
    train, valid = lav(32), lav(16, seed=1)
    info = DatasetInfo.from_dataset(train)
    # a trainer that does not say it exempts the warm-up: patience 2 <= warm-up 3 is refused
    with pytest.raises(ValueError, match="could stop before it distils"):
        MMANet(info, warmup_fraction=0.5, **TINY).on_epoch_start(0, _budget(6, patience=2))
    # flowtransfer's Trainer says so (exempts_warmup, set before the planning hook runs)
    m = build_method("mmanet", info, warmup_fraction=0.5, **TINY)
    trainer = Trainer(m, TrainConfig(epochs=6, batch_size=16, lr=1e-2, progress=False, monitor="acc",
                                     early_stop_patience=2, lr_plateau_patience=0))
    assert trainer.exempts_warmup
    res = trainer.fit(train, valid)
    assert m.warmup_epochs == 3
    h = res.history
    assert [bool(r.get("patience_exempt")) for r in h[:3]] == [True, True, True]
    assert all("veto" not in r for r in h[3:]) and len(h) >= 4  # the warm-up did not stop the run
    assert res.best_epoch >= 3 and "train/loss/mad" in h[res.best_epoch]
    # the learning-rate schedule never saw a warm-up score (patience 0 would cut at every stall)
    assert len({r["lr"] for r in h[:4]}) == 1
