"""FusionModel and the bounds: zero fill, mean fill, upper bound."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowtransfer.data import from_arrays
from flowtransfer.data.dataset import Batch
from flowtransfer.methods import FusionConfig, FusionModel, build_method

TINY = dict(d=8, mult={"d": 8, "heads": 2, "layers": 1, "memory_layers": 1})
DIMS = {"L": (6, 5), "A": (4, 3), "V": (3, 1)}



def make_ds(n=16, seed=0, task="regression"):
    rng = np.random.default_rng(seed)
    feats = {m: (rng.standard_normal((n, c, t)) + 2.0).astype(np.float32) for m, (c, t) in DIMS.items()}
    if task == "regression":
        return from_arrays(feats, rng.uniform(-3, 3, n), task, layout="NCT")
    return from_arrays(feats, rng.integers(0, 4, n), task, layout="NCT", num_classes=4)


def masked(ds):
    mask = np.ones((len(ds), 3), dtype=bool)
    mask[:4, 0] = False
    mask[4:8, [1, 2]] = False
    return ds.with_mask(mask).batch(np.arange(len(ds))), torch.from_numpy(mask)


@pytest.mark.parametrize("name", ["zero_fill", "mean_fill", "upper_bound"])
def test_bounds_shapes_and_absent_slots_ignored(name):
    ds = make_ds()
    torch.manual_seed(0)
    model = build_method(name, ds, preset="small", **TINY)
    assert model.name == name and model.complete_only == (name == "upper_bound")
    model.prepare(ds)
    b, mask = masked(ds)
    model.eval()
    with torch.no_grad():
        p1 = model.predict(b)
        feats = {m: torch.where(mask[:, j, None, None], b[m], 1e3 * torch.randn_like(b[m]))
                 for j, m in enumerate(b.modalities)}
        p2 = model.predict(Batch(features=feats, mask=b.mask, labels=b.labels, modalities=b.modalities))
    assert p1.shape == (len(ds),) and torch.isfinite(p1).all()
    assert torch.equal(p1, p2)


def test_zero_fill_equals_explicit_zeros_and_recover_is_zero():
    ds = make_ds()
    model = build_method("zero_fill", ds, preset="small", **TINY).eval()
    b, mask = masked(ds)
    full = Batch(features=b.filled(0.0).features, mask=torch.ones_like(mask), labels=b.labels, modalities=b.modalities)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(b), model.predict(full), rtol=0, atol=0)
        rec = model.recover(b)
    assert set(rec) == {"L", "A", "V"}
    assert torch.equal(rec["L"][:4], torch.zeros_like(rec["L"][:4]))  # bias-free extractor: zeros stay zeros
    assert torch.isnan(rec["L"][4:]).all()


def test_mean_fill_statistics_and_prediction():
    ds = make_ds(n=20, seed=3)
    mask = np.ones((20, 3), dtype=bool)
    mask[:6, 1] = False  # training statistics come from present samples only
    train = ds.with_mask(mask)
    model = build_method("mean_fill", ds, preset="small", **TINY).eval()
    b, bmask = masked(ds)
    with pytest.raises(RuntimeError, match="fit_fill_statistics"):
        model.predict(b)
    stats = model.fit_fill_statistics(train)
    expected = ds.features["A"][6:].astype(np.float64).mean(axis=(0, 2))
    np.testing.assert_allclose(stats["A"].squeeze(1).numpy(), expected, rtol=1e-6)
    assert stats["A"].shape == (4, 1)
    means = {m: stats[m] for m in ds.modalities}
    full = Batch(features=b.filled(means).features, mask=torch.ones_like(bmask), labels=b.labels,
                 modalities=b.modalities)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(b), model.predict(full), rtol=0, atol=0)
    # statistics travel with the state dict
    clone = build_method("mean_fill", ds, preset="small", **TINY).eval()
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(clone.predict(b), model.predict(b))


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_loss_decreases(task):
    ds = make_ds(task=task, seed=1)
    torch.manual_seed(0)
    model = build_method("upper_bound", ds, preset="small", **TINY)
    b = ds.batch(np.arange(len(ds)))
    model.eval()
    with torch.no_grad():
        before = model.loss(b)[0].item()
    model.train()
    opt = torch.optim.Adam(model.parameter_groups(), lr=3e-3)
    for _ in range(15):
        opt.zero_grad()
        loss, parts = model.loss(b)
        loss.backward()
        opt.step()
    assert set(parts) == {"loss", "task"}
    model.eval()
    with torch.no_grad():
        after = model.loss(b)[0].item()
        if task == "classification":
            assert model.predict(b).shape == (len(ds), 4)
    assert after < before - 0.05


def test_modality_dropout_training_and_configs():
    ds = make_ds()
    model = build_method("zero_fill", ds, preset="small", train_missing_rate=(0.2, 0.6), **TINY)
    loss, _ = model.loss(ds.batch(np.arange(len(ds))))
    assert torch.isfinite(loss)
    cfg = FusionConfig.preset("mosi")
    assert (cfg.d, cfg.extractor_kernel, cfg.mult.layers) == (32, 5, 4)
    assert FusionConfig(**cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fill"):
        FusionConfig(fill="median")
    h = model.hparams
    clone = build_method(h["name"], h["dataset_info"], **h["config"])
    assert isinstance(clone, FusionModel) and clone.config == model.config
