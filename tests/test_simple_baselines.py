"""Simple baselines: unimodal, specialists, modality dropout, AE imputation (and NaN-safety of every baseline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowtransfer.data.dataset import from_arrays
from flowtransfer.methods.base import DatasetInfo, build_method, simulate_missing
from flowtransfer.methods.simple import (
    AEImpute,
    ModalityDropout,
    Specialists,
    Unimodal,
    nonempty_patterns,
    pattern_codes,
    restrict_batch,
)
from flowtransfer.training.trainer import Trainer, TrainConfig

# registers smil / mmanet / cyin as well (for the NaN-safety test over every baseline)
import flowtransfer.methods.cyin  # noqa: F401
import flowtransfer.methods.mmanet  # noqa: F401
import flowtransfer.methods.smil  # noqa: F401

TINY = dict(preset="small", fusion="concat", d=8)



def tiny_dataset(n: int = 32, task: str = "regression", seed: int = 0):
    rng = np.random.default_rng(seed)
    feats = {
        "L": rng.normal(size=(n, 6, 4)).astype("float32"),
        "A": rng.normal(size=(n, 3, 5)).astype("float32"),
        "V": rng.normal(size=(n, 4, 4)).astype("float32"),
    }
    score = feats["L"].mean(axis=(1, 2)) * 6 + 0.5 * feats["A"].mean(axis=(1, 2))
    if task == "regression":
        return from_arrays(feats, score.astype("float32"), task, layout="NCT")
    return from_arrays(feats, (score > 0).astype("int64"), task, layout="NCT", num_classes=2)


def steps(method, batch, n: int = 15, lr: float = 1e-2) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr)
    losses = []
    method.train()
    for _ in range(n):
        loss, parts = method.loss(batch)
        assert np.isfinite(float(parts["loss"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


# ------------------------------------------------------------------------------------------ helpers


def test_patterns_and_codes():
    pats = nonempty_patterns(("L", "A", "V"))
    assert len(pats) == 7 and pats[0] == ("L",) and pats[2] == ("L", "A") and pats[6] == ("L", "A", "V")
    mask = torch.tensor([[True, False, False], [True, True, False], [False, True, True], [True, True, True]])
    codes = pattern_codes(mask)
    assert codes.tolist() == [1, 3, 6, 7]
    assert [pats[c - 1] for c in codes.tolist()] == [("L",), ("L", "A"), ("A", "V"), ("L", "A", "V")]


def test_restrict_batch_keeps_rows_and_columns():
    ds = tiny_dataset(8)
    b = simulate_missing(ds.full_batch(), rate=0.5, generator=torch.Generator().manual_seed(1))
    rows = b.mask[:, 0]
    sub = restrict_batch(b, ("V", "L"), rows)
    assert sub.modalities == ("V", "L")
    assert torch.equal(sub.mask, b.mask[rows][:, [2, 0]])
    assert torch.equal(sub.labels, b.labels[rows])
    with pytest.raises(KeyError, match="unknown modalities"):
        restrict_batch(b, ("X",))


# ------------------------------------------------------------------------------------------ unimodal


def test_unimodal_prior_where_absent_regression():
    ds = tiny_dataset(16)
    m = Unimodal(DatasetInfo.from_dataset(ds), modality="A", **TINY)
    m.prepare(ds)
    b = simulate_missing(ds.full_batch(), pattern=["L", "V"])  # A absent everywhere
    m.eval()
    out = m.predict(b)
    assert torch.allclose(out, torch.full((16,), float(np.mean(ds.labels, dtype=np.float64))), atol=1e-6)
    b2 = ds.full_batch()
    with torch.no_grad():
        assert not torch.allclose(m.predict(b2), out)  # present rows use the model


def test_unimodal_prior_classification_is_log_frequency():
    ds = tiny_dataset(20, task="classification")
    m = Unimodal(DatasetInfo.from_dataset(ds), modality="V", **TINY)
    m.prepare(ds)
    counts = np.bincount(ds.labels, minlength=2)
    expected = np.log((counts + 1.0) / (20 + 2))
    got = m.prior_prediction(3)
    assert got.shape == (3, 2)
    assert np.allclose(got.numpy(), expected[None].repeat(3, 0), atol=1e-6)


def test_unimodal_accumulates_prior_without_prepare_and_trains():
    ds = tiny_dataset(24)
    m = Unimodal(DatasetInfo.from_dataset(ds), modality="L", **TINY)
    b = ds.full_batch()
    losses = steps(m, b, 15)
    assert losses[-1] < losses[0]
    # the running prior saw every step's labels: mean unchanged
    assert abs(float(m.prior_prediction(1)[0]) - float(b.labels.double().mean())) < 1e-5


def test_unimodal_unknown_modality():
    with pytest.raises(KeyError, match="unknown modality"):
        Unimodal(DatasetInfo.from_dataset(tiny_dataset(4)), modality="X", **TINY)


# ------------------------------------------------------------------------------------------ specialists


def test_specialists_route_each_pattern_to_its_own_model():
    ds = tiny_dataset(21)
    m = Specialists(DatasetInfo.from_dataset(ds), **TINY)
    assert len(m.models) == 7
    # make specialist P output its own bit code, whatever the input
    for code, p in enumerate(m.patterns, start=1):
        head = m.specialist(p).head
        for lin in (head.proj1, head.proj2, head.out):
            torch.nn.init.zeros_(lin.weight)
            torch.nn.init.zeros_(lin.bias)
        head.out.bias.data.fill_(float(code))
    # three rows of each pattern, in shuffled order
    order = torch.randperm(21, generator=torch.Generator().manual_seed(0))
    codes = torch.tensor([c for c in range(1, 8) for _ in range(3)])[order]
    mask = (codes[:, None] & (2 ** torch.arange(3))) > 0
    b = simulate_missing(ds.full_batch(), pattern=mask)
    m.eval()
    with torch.no_grad():
        out = m.predict(b)
    assert torch.equal(out, codes.float())


def test_each_specialist_is_selected_on_its_own_pattern():
    """Epoch 0: the A specialist is broken, the full-pattern one fine; epoch 1: the reverse. One
    score on complete validation data (the full-pattern model's) would keep epoch 0 for all; the
    per-pattern selection keeps epoch 1 for A and epoch 0 for L_A_V."""
    train, valid = tiny_dataset(24), tiny_dataset(16, seed=3)
    m = Specialists(DatasetInfo.from_dataset(train), **TINY)
    a, full = m.specialist(["A"]), m.specialist(["L", "A", "V"])
    good_a = {k: v.clone() for k, v in a.state_dict().items()}
    good_full = {k: v.clone() for k, v in full.state_dict().items()}
    with torch.no_grad():
        a.head.out.bias += 50.0  # epoch 0: A broken
    m.update_selection(valid, epoch=0)
    i_a, i_full = m.patterns.index(("A",)), m.patterns.index(("L", "A", "V"))
    assert m.selection_epoch.tolist() == [0] * 7
    # the A score is A's own on A-only inputs of every validation sample (all have A here)
    vb = valid.full_batch()
    with torch.no_grad():
        a.eval()
        expected = (a.predict(restrict_batch(vb, ("A",))) - vb.labels).abs().mean()
    assert float(m.selection_score[i_a]) == pytest.approx(float(expected), rel=1e-5)
    with torch.no_grad():
        a.load_state_dict(good_a)
        full.head.out.bias += 50.0  # epoch 1: full-pattern model broken, A fine
    changed = m.update_selection(valid, epoch=1)
    assert changed[("A",)] and not changed[("L", "A", "V")]
    assert int(m.selection_epoch[i_a]) == 1 and int(m.selection_epoch[i_full]) == 0
    assert float(m.selection_score[i_a]) < 10.0 < float(m.selection_score[i_full]) + 50.0
    # predict uses the selected copies: A-only rows get the good A, complete rows the good full model
    only_a = simulate_missing(vb, pattern=["A"])
    m.eval()
    with torch.no_grad():
        a.load_state_dict(good_a)
        np.testing.assert_allclose(m.predict(only_a).numpy(), a.predict(restrict_batch(vb, ("A",))).numpy(), rtol=1e-6)
        full.load_state_dict(good_full)
        np.testing.assert_allclose(m.predict(vb).numpy(), full.predict(vb).numpy(), rtol=1e-6)
    # a pattern that no validation sample has keeps following the training (score NaN)
    m2 = Specialists(DatasetInfo.from_dataset(train), **TINY)
    no_l = valid.with_mask(np.tile([False, True, True], (len(valid), 1)))
    m2.update_selection(no_l, epoch=0)
    assert np.isnan(float(m2.selection_score[m2.patterns.index(("L",))]))
    assert not np.isnan(float(m2.selection_score[m2.patterns.index(("A", "V"))]))
    with pytest.raises(ValueError, match="select_metric"):
        Specialists(DatasetInfo.from_dataset(train), select_metric="acc", **TINY)


def test_specialists_selection_through_the_trainer_survives_the_best_epoch_reload():
    train, valid = tiny_dataset(32), tiny_dataset(16, seed=1)
    m = build_method("specialists", DatasetInfo.from_dataset(train), **TINY)
    Trainer(m, TrainConfig(epochs=4, batch_size=16, lr=1e-2, progress=False, monitor="mae",
                           early_stop_patience=None)).fit(train, valid)
    assert m.has_selection and bool((m.selection_epoch >= 0).all())
    latest = {k: v.clone() for k, v in m.state_dict().items() if k.startswith("selected.") or k.startswith("selection")}
    # the trainer reloads its best epoch's state (one score for the method): on_fit_end puts the
    # newest per-pattern selection back
    stale = {k: (v.clone() if not k.startswith("selection_epoch") else torch.zeros_like(v)) for k, v in m.state_dict().items()}
    m.load_state_dict(stale)
    m.on_fit_end(None)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in latest.items())
    # the selected copies are never trained
    assert not any(p.requires_grad for p in m.selected.parameters())
    assert {id(p) for g in m.parameter_groups() for p in g["params"]} == {id(p) for p in m.models.parameters()}


def test_specialists_train_each_on_rows_having_its_pattern():
    ds = tiny_dataset(24)
    m = Specialists(DatasetInfo.from_dataset(ds), **TINY)
    b = simulate_missing(ds.full_batch(), pattern=["L", "A"])  # V absent in the data
    loss, parts = m.loss(b)
    assert set(parts) == {"loss", "task_L", "task_A", "task_L_A"}
    loss.backward()
    assert m.specialist(["A", "V"]).head.out.weight.grad is None
    assert m.specialist(["L", "A"]).head.out.weight.grad is not None
    losses = steps(m, ds.full_batch(), 10)
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------ dropout, AE


def test_modality_dropout_trains_through_trainer():
    train, valid = tiny_dataset(32), tiny_dataset(16, seed=1)
    m = build_method("modality_dropout", DatasetInfo.from_dataset(train), **TINY)
    assert isinstance(m, ModalityDropout) and m.config.train_missing_rate == (0.0, 0.7)
    res = Trainer(m, TrainConfig(epochs=4, batch_size=16, lr=1e-2, progress=False, monitor="mae",
                                 early_stop_patience=None)).fit(train, valid)
    hist = [h["train/loss"] for h in res.history]
    assert hist[-1] < hist[0]
    # the mask reaches the fusion: a modality's values do not matter where the mask says absent
    b = simulate_missing(valid.full_batch(), pattern=["L", "V"])
    b2 = simulate_missing(valid.full_batch(), pattern=["L", "V"])
    b2.features["A"] = torch.randn_like(b2.features["A"])
    m.eval()
    with torch.no_grad():
        assert torch.equal(m.predict(b), m.predict(b2))


def test_ae_impute_loss_decreases_and_recovers():
    ds = tiny_dataset(32)
    m = AEImpute(DatasetInfo.from_dataset(ds), **TINY)
    b = ds.full_batch()
    losses = steps(m, b, 15)
    assert losses[-1] < losses[0]
    m.eval()
    bm = simulate_missing(b, pattern=["L"])
    rec = m.recover(bm)
    assert set(rec) == {"A", "V"} and rec["A"].shape == (32, 8, 4)
    assert torch.isfinite(rec["A"]).all()
    _, parts = m.loss(b)  # eval: nothing dropped, no reconstruction term
    assert parts["recon"] == 0.0


# ------------------------------------------------------------------------------------------ every baseline


@pytest.mark.parametrize("name", ["unimodal", "specialists", "modality_dropout", "ae_impute", "smil", "mmanet", "cyin"])
@pytest.mark.parametrize("task", ["regression", "classification"])
def test_predict_never_reads_absent_modalities(name, task):
    ds = tiny_dataset(16, task=task)
    extra = {"num_priors": 2} if name == "smil" else {}
    m = build_method(name, DatasetInfo.from_dataset(ds), **TINY, **extra)
    if hasattr(m, "prepare"):
        m.prepare(ds)
    b = simulate_missing(ds.full_batch(), rate=0.6, generator=torch.Generator().manual_seed(3))
    assert (~b.mask).any() and torch.isnan(b.features["A"]).any()
    m.eval()
    with torch.no_grad():
        out = m.predict(b)
    assert out.shape == ((16,) if task == "regression" else (16, 2))
    assert torch.isfinite(out).all()
    # and the training loss never reads them either
    m.train()
    loss, _ = m.loss(b)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["unimodal", "specialists", "modality_dropout", "ae_impute", "smil", "mmanet", "cyin"])
def test_hparams_rebuild_the_method(name):
    ds = tiny_dataset(12)
    extra = {"num_priors": 2} if name == "smil" else {}
    m = build_method(name, DatasetInfo.from_dataset(ds), **TINY, **extra)
    if hasattr(m, "prepare"):
        m.prepare(ds)
    h = m.hparams
    assert h["name"] == name
    again = build_method(h["name"], h["dataset_info"], **h["config"])
    again.load_state_dict(m.state_dict())  # same architecture, strict
    b = simulate_missing(ds.full_batch(), rate=0.4, generator=torch.Generator().manual_seed(0))
    m.eval()
    again.eval()
    with torch.no_grad():
        assert torch.equal(m.predict(b), again.predict(b))


def test_single_modality_models_follow_the_backbone_fusion():
    ds = tiny_dataset(10)
    info = DatasetInfo.from_dataset(ds)
    temporal = Unimodal(info, modality="A", preset="small", d=8, mult={"heads": 2, "layers": 1})
    assert temporal.model.fusion.temporal and not Unimodal(info, modality="A", **TINY).model.fusion.temporal
    b = simulate_missing(ds.full_batch(), rate=0.5, generator=torch.Generator().manual_seed(2))
    loss, _ = temporal.loss(b)
    loss.backward()
    temporal.eval()
    with torch.no_grad():
        out = temporal.predict(b)
        # the order of time steps matters to the temporal encoder, not to the time mean
        flipped = restrict_batch(b, b.modalities)
        flipped.features["A"] = b.features["A"].flip(-1)
        rows = b.mask[:, 1]
        assert not torch.allclose(temporal.predict(flipped)[rows], out[rows])
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------ issue 11 wiring


def test_specialists_are_selected_before_the_trainer_validates_and_each_keeps_its_best_epoch():
    from flowtransfer.training import evaluate

    train, valid = tiny_dataset(32), tiny_dataset(21, seed=1)
    codes = torch.arange(21) % 7 + 1  # every pattern among the validation samples
    valid = valid.with_mask(((codes[:, None] & (2 ** torch.arange(3))) > 0).numpy())
    m = build_method("specialists", DatasetInfo.from_dataset(train), **TINY)
    scores: list[dict] = []
    score_fn = m.pattern_scores
    m.pattern_scores = lambda ds, models=None: scores.append(score_fn(ds, models)) or scores[-1]
    seen: list[tuple[float, float]] = []

    def check(trainer, record):  # the state scored is the state after the epoch's selection
        seen.append((record["valid/mae"], evaluate(trainer.method, valid, 64, "cpu")["mae"]))

    result = Trainer(m, TrainConfig(epochs=5, batch_size=16, lr=2e-2, progress=False, monitor="mae",
                                    early_stop_patience=None), on_epoch_end=check).fit(train, valid)
    assert len(scores) == 5  # one selection pass per epoch (after_train_epoch; the veto hook did not repeat it)
    assert all(a == pytest.approx(b, rel=1e-6) for a, b in seen)
    # each specialist holds the first epoch of its best score on its own pattern, whatever the
    # trainer's best epoch
    for i, p in enumerate(m.patterns):
        history = [s[p] for s in scores]
        assert int(m.selection_epoch[i]) == int(np.argmin(history)), p
        assert float(m.selection_score[i]) == pytest.approx(min(history))
    assert result.best_epoch <= int(m.selection_epoch.max())


@pytest.mark.parametrize("name", ["unimodal", "specialists"])
def test_outputs_do_not_depend_on_values_at_removed_steps(name):
    from flowtransfer.data.missing import step_missing_masks
    from flowtransfer.methods.base import check_supports_steps

    a, b = tiny_dataset(24, seed=0), tiny_dataset(24, seed=0)
    steps = step_missing_masks(a, 0.5, seed=1)
    rng = np.random.default_rng(3)
    for mod in a.modalities:  # b differs from a exactly at the removed steps
        removed = np.broadcast_to(~steps[mod][:, None, :], b.features[mod].shape)
        b.features[mod][removed] = rng.normal(size=int(removed.sum())) * 100
    extra = {"modality": "A"} if name == "unimodal" else {}
    m = build_method(name, DatasetInfo.from_dataset(a), **TINY, **extra)
    check_supports_steps(m, name)
    if hasattr(m, "prepare"):
        m.prepare(a.with_step_mask(steps))
    ba, bb = a.with_step_mask(steps).full_batch(), b.with_step_mask(steps).full_batch()
    assert torch.isnan(ba.features["A"]).any()  # removed steps hold NaN
    sub = restrict_batch(ba, ("A", "V"), ba.mask[:, 1])
    assert set(sub.step_mask) == {"A", "V"} and torch.equal(sub.step_mask["A"], ba.step_mask["A"][ba.mask[:, 1]])
    m.eval()
    with torch.no_grad():
        pa, pb, full = m.predict(ba), m.predict(bb), m.predict(b.full_batch())
    assert torch.isfinite(pa).all() and torch.equal(pa, pb)
    assert not torch.allclose(pb, full)  # the removed values would have changed the output
    m.train()
    loss_a, _ = m.loss(ba)
    assert torch.isfinite(loss_a)
    if name == "specialists":
        scores = m.pattern_scores(a.with_step_mask(steps))
        assert scores == m.pattern_scores(b.with_step_mask(steps)) and all(np.isfinite(list(scores.values())))
