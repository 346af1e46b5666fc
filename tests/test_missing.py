"""Missing-modality protocols: realised rates, guarantees, reproducibility, DiCMoR's quirks, SMIL's eta."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from flowtransfer.data import (
    all_patterns,
    dicmor_batch_schedule,
    evaluation_settings,
    fixed_pattern_mask,
    random_missing_mask,
    realised_missing_rate,
    training_missing_mask,
)
from flowtransfer.data.missing import (
    DEFAULT_RATES,
    MissingRateCapped,
    MissingSetting,
    load_masks,
    parse_pattern,
    pattern_name,
    save_masks,
    schedule_to_mask,
)

LAV = ("L", "A", "V")
NAMES = {2: ("A", "V"), 3: LAV, 4: ("L", "A", "V", "S")}


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("n", [50, 241, 752, 1206])
def test_random_mask_realised_rate_every_mr(n, m):
    names = NAMES[m]
    cap = (m - 1) / m
    for rate in DEFAULT_RATES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mask = random_missing_mask(n, names, rate, seed=0)
        assert mask.shape == (n, m) and mask.dtype == np.bool_
        assert mask.any(axis=1).all(), "every sample keeps at least one modality"
        realised = realised_missing_rate(mask)
        if rate <= cap:
            assert abs(realised - rate) <= 0.5 / (n * m) + 1e-12
            assert abs(realised - rate) <= 0.005
            assert not [w for w in caught if issubclass(w.category, MissingRateCapped)]
        else:
            assert realised == pytest.approx(cap)
            assert (mask.sum(axis=1) == 1).all(), "above (M-1)/M every sample keeps exactly one"
            assert any(issubclass(w.category, MissingRateCapped) for w in caught)


def test_mr07_on_three_modalities_realises_two_thirds():
    with pytest.warns(MissingRateCapped, match="0.6667"):
        mask = random_missing_mask(300, LAV, 0.7, seed=1)
    assert realised_missing_rate(mask) == pytest.approx(2 / 3)


def test_random_mask_reproducible_nested_and_varied():
    a = random_missing_mask(500, LAV, 0.3, seed=4)
    b = random_missing_mask(500, LAV, 0.3, seed=4)
    c = random_missing_mask(500, LAV, 0.3, seed=5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # nested across rates for one seed
    prev = np.ones_like(a)
    for rate in DEFAULT_RATES[:-1]:
        cur = random_missing_mask(500, LAV, rate, seed=4)
        assert not (cur & ~prev).any()
        prev = cur
    # each modality is dropped about equally often, and every pattern occurs
    miss = 1 - random_missing_mask(3000, LAV, 0.4, seed=0).mean(axis=0)
    np.testing.assert_allclose(miss, 0.4, atol=0.04)
    patterns = {tuple(r) for r in random_missing_mask(3000, LAV, 0.4, seed=0)}
    assert len(patterns) == 7


def test_random_mask_errors():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        random_missing_mask(10, LAV, 1.0, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        random_missing_mask(10, LAV, -0.1, seed=0)
    with pytest.raises(ValueError, match="positive integer"):
        random_missing_mask(0, LAV, 0.1, seed=0)
    with pytest.raises(ValueError, match="seed is required"):
        random_missing_mask(10, LAV, 0.1, seed=None)
    with pytest.raises(ValueError, match="duplicate"):
        random_missing_mask(10, ("A", "A"), 0.1, seed=0)
    with pytest.raises(TypeError, match="sequence of names"):
        random_missing_mask(10, "LAV", 0.1, seed=0)
    with pytest.raises(ValueError, match=r"\(n, M\)"):
        realised_missing_rate(np.ones(3, bool))


def test_all_patterns_and_fixed_masks():
    pats = all_patterns(LAV)
    assert pats == [("L",), ("A",), ("V",), ("L", "A"), ("L", "V"), ("A", "V"), ("L", "A", "V")]
    assert len(all_patterns(NAMES[4])) == 15
    assert [pattern_name(p) for p in pats[3:]] == ["L+A", "L+V", "A+V", "L+A+V"]
    assert pattern_name(("L", "A"), style="set") == "{L,A}"
    for p in pats:
        mask = fixed_pattern_mask(7, LAV, p)
        assert mask.shape == (7, 3)
        expected = np.array([m in p for m in LAV])
        assert (mask == expected).all()
        assert realised_missing_rate(mask) == pytest.approx(1 - len(p) / 3)
    # strings in any order, braces or plus, come back in modality order
    np.testing.assert_array_equal(fixed_pattern_mask(3, LAV, "{A,L}"), fixed_pattern_mask(3, LAV, ["L", "A"]))
    assert parse_pattern("pattern=V+L", LAV) == ("L", "V")
    with pytest.raises(ValueError, match="unknown modality 'X'"):
        fixed_pattern_mask(3, LAV, "L+X")
    with pytest.raises(ValueError, match="at least one"):
        fixed_pattern_mask(3, LAV, [])


def test_dicmor_schedule_quirks():
    # realised MR (2 p2 + p1) / 3 when n_batches is a multiple of ten
    expected = {0.1: 0.1, 0.2: 0.2, 0.3: 0.3, 0.4: 0.4, 0.5: 0.5, 0.6: 0.6, 0.7: 2 / 3}
    for rate, want in expected.items():
        sched = dicmor_batch_schedule(40, LAV, rate, seed=0)
        got = 1 - np.mean([len(p) for p in sched]) / 3
        assert got == pytest.approx(want), rate
    # MR 0.0: two modalities dropped in every batch
    zero = dicmor_batch_schedule(30, LAV, 0.0, seed=0)
    assert all(len(p) == 1 for p in zero)
    # fixed order: one-kept batches first, then two-kept, then complete
    sched = dicmor_batch_schedule(20, LAV, 0.5, seed=0)
    sizes = [len(p) for p in sched]
    assert sizes == [1] * 14 + [2] * 2 + [3] * 4  # p2 = .7, p1 = .1 at MR 0.5
    # the kept modality is drawn per batch: all three appear among one-kept batches
    ones = [p[0] for p in dicmor_batch_schedule(60, LAV, 0.7, seed=3)]
    assert set(ones) == set(LAV)
    # the fractions count against round(n/10)*10, not n: 24 batches (D=20) at 0.7 -> last 4 complete
    s24 = [len(p) for p in dicmor_batch_schedule(24, LAV, 0.7, seed=0)]
    assert s24 == [1] * 20 + [3] * 4
    # truncating index: 0.35 behaves as 0.3; no entry past 0.7
    a = [len(p) for p in dicmor_batch_schedule(40, LAV, 0.35, seed=0)]
    assert a == [len(p) for p in dicmor_batch_schedule(40, LAV, 0.3, seed=0)]
    with pytest.raises(ValueError, match="no entry"):
        dicmor_batch_schedule(40, LAV, 0.8, seed=0)
    # reproducible by seed
    assert dicmor_batch_schedule(40, LAV, 0.3, seed=9) == dicmor_batch_schedule(40, LAV, 0.3, seed=9)
    # expands to a per-sample mask, constant within each batch
    mask = schedule_to_mask(sched, LAV, batch_size=4, n=78)
    assert mask.shape == (78, 3)
    assert (mask[:4] == mask[0]).all() and mask[:4].sum(axis=1).tolist() == [1] * 4 and mask[-6:].all()


def test_training_missing_mask_eta():
    for eta in (0.1, 0.2, 0.5):
        mask = training_missing_mask(1000, ("A", "V"), eta, "A", seed=0)
        assert mask[:, 0].sum() == round(eta * 1000)
        assert mask[:, 1].all()
        assert mask.any(axis=1).all()
    np.testing.assert_array_equal(
        training_missing_mask(100, LAV, 0.1, "V", seed=2), training_missing_mask(100, LAV, 0.1, "V", seed=2)
    )
    with pytest.raises(ValueError, match="unknown modality"):
        training_missing_mask(10, LAV, 0.1, "X", seed=0)
    with pytest.raises(ValueError, match="eta"):
        training_missing_mask(10, LAV, 1.5, "A", seed=0)
    with pytest.raises(ValueError, match="single modality"):
        training_missing_mask(10, ("A",), 0.5, "A", seed=0)


def test_evaluation_settings_fixed_per_seed(tmp_path):
    settings = evaluation_settings(LAV)
    names = [s.name for s in settings]
    assert names[:8] == [f"mr=0.{i}" for i in range(8)]
    assert names[8:] == ["pattern=L", "pattern=A", "pattern=V", "pattern=L+A", "pattern=L+V", "pattern=A+V"]
    masks = {}
    for s in settings:
        m1, m2 = s.mask(752, seed=1111), s.mask(752, seed=1111)
        np.testing.assert_array_equal(m1, m2)  # every method asking for this setting gets this mask
        d = s.describe(m1)
        assert d["realised_rate"] == pytest.approx(s.expected_rate, abs=0.5 / (752 * 3) + 1e-12)
        masks[s.name] = m1
    assert settings[7].expected_rate == pytest.approx(2 / 3)
    assert settings[7].describe(masks["mr=0.7"])["requested_rate"] == 0.7
    path = save_masks(tmp_path / "masks.npz", masks, LAV)
    back, mods = load_masks(path)
    assert mods == LAV and set(back) == set(masks)
    for k in masks:
        np.testing.assert_array_equal(back[k], masks[k])
    with pytest.raises(ValueError, match="unknown setting kind"):
        MissingSetting("other", LAV)
    assert MissingSetting("pattern", LAV, available=("V", "L")).name == "pattern=L+V"
