"""The field's other missing protocols: time-step missing, one rate per modality, CyIN's two
protocols, the setting registry, step masks through datasets and batches, and the methods'
step-missing capability."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowtransfer.data import from_arrays
from flowtransfer.data.missing import (
    PROTOCOLS,
    STEP_RATES,
    CyINDatasetSetting,
    CyINInstanceSetting,
    MissingSetting,
    PerModalitySetting,
    StepSetting,
    cyin_dataset_mask,
    cyin_instance_mask,
    load_masks,
    parse_modality_rates,
    per_modality_missing_mask,
    protocol_settings,
    realised_missing_rate,
    realised_step_rates,
    save_masks,
    step_missing_masks,
    valid_steps,
)
from flowtransfer.io import InputError

LAV = ("L", "A", "V")
T = {"L": 12, "A": 20, "V": 16}


def _dataset(n: int = 300, seed: int = 0, lengths: bool = True, fill: float | None = None):
    """A classification dataset with per-sample valid lengths (NCT arrays)."""
    rng = np.random.default_rng(seed)
    feats = {m: rng.normal(size=(n, 3, t)).astype(np.float32) for m, t in T.items()}
    if fill is not None:
        feats = {m: np.full_like(x, fill) for m, x in feats.items()}
    lens = {m: rng.integers(1, t + 1, size=n) for m, t in T.items()} if lengths else None
    labels = rng.integers(0, 3, size=n)
    return from_arrays(feats, labels, "classification", layout="NCT", lengths=lens, num_classes=3)


# --------------------------------------------------------------------------------------------------
# intra-modality (time-step) missing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lengths", [True, False])
def test_step_rates_exact_per_modality(lengths):
    ds = _dataset(lengths=lengths)
    valid = valid_steps(ds)
    for rate in STEP_RATES:
        steps = step_missing_masks(ds, rate, seed=3)
        got = realised_step_rates(steps, ds)
        for m in LAV:
            total = int(valid[m].sum())
            removed = int((valid[m] & ~steps[m]).sum())
            assert removed == int(np.floor(rate * total + 0.5))
            assert abs(got[m] - rate) <= 0.005
            # padding (beyond the valid length) is never removed
            assert steps[m][~valid[m]].all()


def test_step_masks_respect_absent_modalities():
    ds = _dataset()
    mask = np.ones((len(ds), 3), dtype=bool)
    mask[::2, 1] = False  # A absent for half the samples: they have no A slot to remove
    ds = ds.with_mask(mask)
    steps = step_missing_masks(ds, 0.5, seed=0)
    assert steps["A"][::2].all()
    assert abs(realised_step_rates(steps, ds)["A"] - 0.5) <= 0.005


def test_step_masks_deterministic_and_nested():
    ds = _dataset()
    a = step_missing_masks(ds, 0.4, seed=7)
    b = step_missing_masks(ds, 0.4, seed=7)
    c = step_missing_masks(ds, 0.4, seed=8)
    assert all(np.array_equal(a[m], b[m]) for m in LAV)
    assert not all(np.array_equal(a[m], c[m]) for m in LAV)
    hi = step_missing_masks(ds, 0.7, seed=7)
    for m in LAV:  # removed at 0.4 -> removed at 0.7
        assert not (~a[m] & hi[m]).any()


def test_every_sample_keeps_a_step_and_emptied_modalities_become_absent():
    # very short sequences: at rate 0.9 many (sample, modality) pairs lose every valid step
    rng = np.random.default_rng(1)
    n = 400
    feats = {m: rng.normal(size=(n, 2, 5)).astype(np.float32) for m in LAV}
    lens = {m: rng.integers(3, 6, size=n) for m in LAV}
    ds = from_arrays(feats, rng.integers(0, 2, size=n), "classification", layout="NCT", lengths=lens)
    valid = valid_steps(ds)
    steps = step_missing_masks(ds, 0.9, seed=0)
    kept_any = np.stack([(valid[m] & steps[m]).any(axis=1) for m in LAV], axis=1)
    assert kept_any.any(axis=1).all()
    emptied = ~kept_any
    assert emptied.sum() > n // 2  # the case is exercised
    view = ds.with_step_mask(steps)
    assert np.array_equal(view.mask, ~emptied)
    assert view.mask.any(axis=1).all()


def test_step_missing_infeasible_and_bad_rates_raise():
    ds = _dataset(n=50)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        step_missing_masks(ds, 1.0, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        step_missing_masks(ds, -0.1, seed=0)
    with pytest.raises(ValueError, match="unknown modality"):
        step_missing_masks(ds, {"X": 0.2}, seed=0)
    # T = 1 everywhere: 0.9 of every modality cannot go while each sample keeps one step
    one = {m: np.ones((90, 1), dtype=bool) for m in LAV}
    with pytest.raises(ValueError, match="last step"):
        step_missing_masks(one, 0.9, seed=0)


def test_with_step_mask_checks_its_input():
    ds = _dataset(n=20)
    with pytest.raises(ValueError, match="unknown modality"):
        ds.with_step_mask({"X": np.ones((20, 3), bool)})
    with pytest.raises(ValueError, match="expected shape"):
        ds.with_step_mask({"L": np.ones((20, 3), bool)})
    everything = {m: np.zeros((20, t), bool) for m, t in T.items()}
    with pytest.raises(ValueError, match="at least one step"):
        ds.with_step_mask(everything)


# --------------------------------------------------------------------------------------------------
# removed steps never leak into a batch
# --------------------------------------------------------------------------------------------------

SENTINEL = 12345.0


def _removed_view(n: int = 40):
    ds = _dataset(n=n, lengths=False)
    steps = step_missing_masks(ds, 0.5, seed=2)
    for m in LAV:  # plant a sentinel at every removed step
        ds.features[m][np.broadcast_to(~steps[m][:, None, :], ds.features[m].shape)] = SENTINEL
    return ds.with_step_mask(steps), steps


def test_removed_steps_never_leak_into_batches():
    view, steps = _removed_view()
    n = len(view)
    everything, sub = np.arange(n), np.arange(5, 25)
    batches = [(view.full_batch(), everything), (view.batch(everything[::-1]), everything),
               (next(iter(view.loader(n, shuffle=True, seed=0))), everything),
               (view.collate([view[i] for i in range(n)]), everything), (view.subset(sub).full_batch(), sub),
               (view.with_mask(np.ones((n, 3), bool), intersect=True).full_batch(), everything),
               (view.full_batch().to("cpu"), everything)]
    for b, rows in batches:
        assert b.step_mask is not None
        idx = rows[b.index.numpy()]
        for m in LAV:
            x = b.features[m]
            assert not (x == SENTINEL).any()
            assert torch.equal(b.step_mask[m], torch.from_numpy(steps[m][idx]))
            removed = ~b.step_mask[m][:, None, :].expand_as(x)
            assert torch.isnan(x[removed]).all()
            assert torch.isfinite(x[~removed]).all()
        filled = b.filled(0.0)
        for m in LAV:
            x = filled.features[m]
            assert torch.isfinite(x).all() and not (x == SENTINEL).any()
            assert (x[~filled.step_mask[m][:, None, :].expand_as(x)] == 0).all()


def test_batch_without_removed_steps_has_no_step_mask():
    ds = _dataset(n=10)
    assert ds.full_batch().step_mask is None
    b = StepSetting(LAV, 0.0).apply(ds, seed=0).full_batch()
    assert b.step_mask is None


def test_batch_step_mask_shape_checked():
    b = _dataset(n=6).full_batch()
    with pytest.raises(ValueError, match="step_mask"):
        type(b)(features=b.features, mask=b.mask, labels=b.labels, modalities=b.modalities,
                step_mask={m: torch.ones(6, 2, dtype=torch.bool) for m in LAV})


# --------------------------------------------------------------------------------------------------
# imbalanced missing: one rate per modality
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [150, 301, 1000])
@pytest.mark.parametrize("rates", [{"L": 0.1, "A": 0.5, "V": 0.3}, {"L": 0.9, "A": 0.8, "V": 0.0},
                                   {"L": 1.0, "A": 0.5, "V": 0.5}, {"A": 0.7}])
def test_per_modality_exact_and_one_kept(n, rates):
    mask = per_modality_missing_mask(n, LAV, rates, seed=4)
    assert mask.any(axis=1).all()
    for j, m in enumerate(LAV):
        want = rates.get(m, 0.0)
        got = int((~mask[:, j]).sum())
        if sum(rates.values()) < 2:  # room to spare: exact rounding
            assert got == int(np.floor(want * n + 0.5))
        else:  # the rates fill every droppable slot: within 1/n, every droppable slot used
            assert abs(got - want * n) < 1
        assert abs((1 - mask[:, j].mean()) - want) <= 0.005
    assert np.array_equal(mask, per_modality_missing_mask(n, LAV, rates, seed=4))
    assert not np.array_equal(mask, per_modality_missing_mask(n, LAV, rates, seed=5)) or max(rates.values()) == 0


def test_per_modality_infeasible_raises():
    with pytest.raises(ValueError, match="at most M-1"):
        per_modality_missing_mask(100, LAV, {"L": 0.9, "A": 0.9, "V": 0.9}, seed=0)
    with pytest.raises(ValueError, match="unknown modality"):
        per_modality_missing_mask(100, LAV, {"X": 0.2}, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        per_modality_missing_mask(100, LAV, {"L": 1.2}, seed=0)
    with pytest.raises(ValueError, match="M-1"):
        PerModalitySetting(LAV, {"L": 0.9, "A": 0.9, "V": 0.9})


def test_parse_modality_rates():
    assert parse_modality_rates("L0.1+A0.5+V0.3", LAV) == {"L": 0.1, "A": 0.5, "V": 0.3}
    assert parse_modality_rates("mod=L=0.2,V0.4", LAV) == {"L": 0.2, "A": 0.0, "V": 0.4}
    s = PerModalitySetting(LAV, "L0.1+A0.5+V0.3")
    assert s.name == "mod=L0.1+A0.5+V0.3" and s.requested_rate == {"L": 0.1, "A": 0.5, "V": 0.3}
    for bad in ("L0.1+L0.2", "Q0.3", "L"):
        with pytest.raises(ValueError):
            parse_modality_rates(bad, LAV)


# --------------------------------------------------------------------------------------------------
# CyIN's protocols
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prob", [0.1, 0.3, 0.5, 0.7, 0.9, 1.0])
def test_cyin_instance(prob):
    n = 600
    mask = cyin_instance_mask(n, LAV, prob, seed=0)
    incomplete = ~mask.all(axis=1)
    assert incomplete.sum() == int(np.floor(prob * n + 0.5))
    assert mask.any(axis=1).all()
    # the six incomplete patterns, dealt in equal numbers
    _, counts = np.unique(mask[incomplete], axis=0, return_counts=True)
    assert len(counts) == 6 and counts.max() - counts.min() <= 1
    s = CyINInstanceSetting(LAV, prob)
    assert s.expected_rate == pytest.approx(prob / 2)
    assert abs(realised_missing_rate(mask) - prob / 2) <= 0.005
    d = s.describe(mask)
    assert d["realised_incomplete"] == pytest.approx(incomplete.mean()) and d["requested_rate"] == prob


@pytest.mark.parametrize("rate", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
def test_cyin_dataset(rate):
    n = 500
    mask = cyin_dataset_mask(n, LAV, rate, seed=1)
    assert mask.any(axis=1).all()
    assert abs(realised_missing_rate(mask) - min(rate, 2 / 3)) <= 0.005
    if rate >= 2 / 3:
        assert (mask.sum(axis=1) == 1).all()
    # per-batch blocks: each block of 32 (CyIN's test batch) meets the rate on its own
    blocked = cyin_dataset_mask(n, LAV, rate, seed=1, batch_size=32)
    assert CyINDatasetSetting(LAV, rate, 32).name == f"cyin_mr={rate:g}@b32"
    assert abs(realised_missing_rate(blocked) - min(rate, 2 / 3)) <= 0.005


def test_cyin_dataset_blocks_exact_per_block():
    n, b = 256, 32
    # recover the blocks: the mask is exact in each block of the permutation drawn first
    rng = np.random.default_rng(9)
    order = rng.permutation(n)
    mask = cyin_dataset_mask(n, LAV, 0.3, seed=np.random.default_rng(9), batch_size=b)
    for i in range(0, n, b):
        rows = order[i:i + b]
        assert (~mask[rows]).sum() == int(np.floor(0.3 * b * 3 + 0.5))


# --------------------------------------------------------------------------------------------------
# the registry and the setting interface
# --------------------------------------------------------------------------------------------------


def test_protocol_settings_every_protocol():
    ds = _dataset(n=300)
    assert set(PROTOCOLS) == {"random", "steps", "per_modality", "cyin_instance", "cyin_dataset"}
    for name in PROTOCOLS:
        settings = protocol_settings(name, LAV)
        assert settings and len({s.name for s in settings}) == len(settings)
        for s in settings:
            mask = s.mask(len(ds), seed=0)
            assert mask.shape == (len(ds), 3) and mask.any(axis=1).all()
            steps = s.step_masks(ds, seed=0)
            d = s.describe(mask, steps, ds)
            assert d["setting"] == s.name and d["protocol"] == name
            if isinstance(s, StepSetting):
                for m in LAV:
                    assert abs(d[f"realised_rate_{m}"] - s.rate) <= 0.005
            elif isinstance(s, PerModalitySetting):
                for m, r in s.rates:
                    assert abs(d[f"realised_rate_{m}"] - r) <= 0.005
            elif isinstance(s, MissingSetting):
                assert abs(d["realised_rate"] - s.expected_rate) <= 0.005


def test_protocol_settings_errors():
    with pytest.raises(InputError, match="unknown missing protocol"):
        protocol_settings("nope", LAV)
    with pytest.raises(InputError, match="no option 'batch_size'"):
        protocol_settings("steps", LAV, batch_size=3)
    with pytest.raises(InputError, match="both steps=0.3"):
        protocol_settings("steps", LAV, rates=[0.3, 0.30])
    with pytest.raises(InputError, match=r"\[0, 1\)"):
        protocol_settings("steps", LAV, rates=[1.5])
    assert [s.name for s in protocol_settings("random", LAV, rates=[0.2], patterns=False)] == ["mr=0.2"]
    assert [s.name for s in protocol_settings("cyin_dataset", LAV, rates=[0.2], batch_size=16)] == ["cyin_mr=0.2@b16"]


def test_step_setting_apply_gives_the_test_view():
    ds = _dataset(n=300)
    s = StepSetting(LAV, 0.3)
    view = s.apply(ds, seed=5)
    steps = s.step_masks(ds, seed=5)
    assert all(np.array_equal(view.step_mask[m], steps[m]) for m in LAV)
    assert s.describe(view.mask, steps, ds)["realised_rate"] == pytest.approx(0.3, abs=0.005)


def test_save_load_round_trip_with_step_masks(tmp_path):
    ds = _dataset(n=60)
    settings = protocol_settings("steps", LAV, rates=[0.0, 0.3]) + protocol_settings("random", LAV, rates=[0.5])
    masks = {s.name: s.mask(len(ds), 0) for s in settings}
    steps = {s.name: st for s in settings if (st := s.step_masks(ds, 0)) is not None}
    path = save_masks(tmp_path / "seed0.npz", masks, LAV, step_masks=steps)
    back, mods = load_masks(path)
    assert mods == LAV and set(back) == set(masks)
    assert all(np.array_equal(back[k], masks[k]) for k in masks)
    back2, _, back_steps = load_masks(path, steps=True)
    assert set(back_steps) == {"steps=0.3"} and set(back_steps["steps=0.3"]) == set(LAV)
    assert all(np.array_equal(back_steps["steps=0.3"][m], steps["steps=0.3"][m]) for m in LAV)


# --------------------------------------------------------------------------------------------------
# methods
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["zero_fill", "mean_fill", "modality_dropout"])
def test_fusion_output_unchanged_by_values_at_removed_steps(method):
    from flowtransfer.methods import build_method

    torch.manual_seed(0)
    a = _dataset(n=12, lengths=False, seed=0)
    b = _dataset(n=12, lengths=False, seed=0)
    steps = step_missing_masks(a, 0.5, seed=1)
    rng = np.random.default_rng(3)
    for m in LAV:  # b differs from a exactly at the removed steps
        removed = np.broadcast_to(~steps[m][:, None, :], b.features[m].shape)
        b.features[m][removed] = rng.normal(size=int(removed.sum())) * 100
    assert not all(np.array_equal(a.features[m], b.features[m]) for m in LAV)
    model = build_method(method, a, preset="small")
    assert model.supports_step_missing
    model.prepare(a.with_step_mask(steps))
    model.eval()
    with torch.no_grad():
        pa = model.predict(a.with_step_mask(steps).full_batch())
        pb = model.predict(b.with_step_mask(steps).full_batch())
        full = model.predict(b.full_batch())
    assert torch.isfinite(pa).all()
    assert torch.equal(pa, pb)
    assert not torch.allclose(pb, full)  # the removed values would have changed the output


def test_mean_fill_statistics_skip_removed_steps():
    from flowtransfer.methods import build_method

    ds = _dataset(n=30, lengths=False)
    steps = step_missing_masks(ds, 0.5, seed=0)
    model = build_method("mean_fill", ds, preset="small")
    got = model.fit_fill_statistics(ds.with_step_mask(steps))
    for m in LAV:
        x = ds.features[m]
        keep = steps[m]
        want = np.stack([x[:, c][keep].mean() for c in range(x.shape[1])])
        np.testing.assert_allclose(got[m].numpy()[:, 0], want, rtol=1e-5)


def test_methods_that_cannot_respect_steps_are_refused():
    from flowtransfer.methods import build_method
    from flowtransfer.methods.base import Method, check_supports_steps
    from flowtransfer.methods.dicmor import DiCMoR

    assert Method.supports_step_missing is False
    with pytest.raises(InputError, match="'dicmor'"):
        check_supports_steps(DiCMoR, "dicmor")
    with pytest.raises(InputError, match="'dicmor_official'"):
        check_supports_steps(DiCMoR, "dicmor_official")
    check_supports_steps(build_method("zero_fill", _dataset(n=5), preset="small"), "zero_fill")
