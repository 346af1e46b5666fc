"""The embedded synthetic L/A/V data: determinism, shapes, and the exact conditionals against Monte Carlo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import logsumexp

from flowtransfer.data import MultimodalDataset, make_synthetic
from flowtransfer.data.synthetic import SyntheticLAV, class_codes

TINY = dict(num_classes=4, length=4, dims={"L": 3, "A": 2, "V": 2}, latent_dim=2, latent_std=0.6, ar_coef=0.5,
            class_amplitude=0.8, style_amplitude=0.7, noise={"L": 0.8, "A": 0.9, "V": 1.0})


@pytest.fixture(scope="module")
def gen() -> SyntheticLAV:
    return SyntheticLAV(seed=3, **TINY)


def test_make_synthetic_shapes_and_determinism():
    a = make_synthetic(seed=1, n_train=60, n_valid=20, n_test=30)
    b = make_synthetic(seed=1, n_train=60, n_valid=20, n_test=30)
    c = make_synthetic(seed=2, n_train=60, n_valid=20, n_test=30)
    assert set(a) == {"train", "valid", "test"}
    assert [len(a[s]) for s in ("train", "valid", "test")] == [60, 20, 30]
    ds = a["train"]
    assert isinstance(ds, MultimodalDataset)
    assert ds.modalities == ("L", "A", "V")
    assert ds.input_dims == {"L": 16, "A": 8, "V": 12}
    assert ds.seq_lens == {"L": 20, "A": 20, "V": 20}
    assert ds.task == "classification" and ds.num_classes == 4
    assert ds.labels.dtype == np.int64 and ds.features["L"].dtype == np.float32
    for m in ds.modalities:
        np.testing.assert_array_equal(a["test"].features[m], b["test"].features[m])
        assert not np.allclose(a["test"].features[m], c["test"].features[m])
    # the splits are distinct draws, and classes are balanced
    assert not np.allclose(a["train"].features["L"][:20], a["valid"].features["L"])
    assert set(np.bincount(ds.labels, minlength=4)) == {15}
    assert a["test"].generator is a["train"].generator


def test_regression_variant():
    data = make_synthetic(seed=0, n_train=40, n_valid=10, n_test=10, task="regression", num_classes=7)
    ds = data["train"]
    assert ds.task == "regression" and ds.labels.dtype == np.float32 and ds.num_classes is None
    assert ds.labels.min() >= -3 and ds.labels.max() <= 3
    # labels follow the class: rounding recovers it for most samples
    assert (ds.class_labels() == ds.extras["true_class"]).mean() > 0.9


def test_default_difficulty_each_modality_reads_its_own_part_of_the_class():
    data = make_synthetic(seed=0, n_train=10, n_valid=10, n_test=1000)
    te, g = data["test"], data["test"].generator
    acc = g.difficulty(te)
    single = [acc[m] for m in ("L", "A", "V")]
    pairs = [acc[p] for p in ("L+A", "L+V", "A+V")]
    # one modality alone reads one class code well and the others badly: far from the full set ...
    assert all(0.5 < a < 0.72 for a in single), acc
    # ... while any two identify the class (two codes of K = 4 determine it), and all three do best
    assert all(0.78 < p < 0.94 for p in pairs) and min(pairs) > max(single) + 0.1, acc
    assert 0.93 < acc["L+A+V"] <= 1.0 and acc["L+A+V"] > max(pairs), acc
    # the patterns differ: L strongest alone (least noise), V weakest
    assert acc["L"] > acc["A"] > acc["V"]


def test_class_codes_are_pairwise_independent_bits_and_their_parity():
    codes = class_codes(4)
    assert codes.shape == (4, 3)
    np.testing.assert_array_equal(codes[:, 2], codes[:, 0] * codes[:, 1])
    # balanced and pairwise uncorrelated over uniform classes: linear dependence through the class is nil
    np.testing.assert_allclose(codes.mean(0), 0.0)
    np.testing.assert_allclose(codes.T @ codes / 4, np.eye(3))
    assert class_codes(2).shape == (2, 1) and class_codes(3).shape == (3, 3)
    with pytest.raises(ValueError, match="num_classes"):
        class_codes(1)


def test_recovery_needs_the_class_a_linear_class_blind_imputation_gets_little():
    """From L and A, the best linear predictor of V misses most of V's class part (mainly the parity of
    what L and A read); the exact conditional mean, a mixture over the class, gets much more of it."""
    gen = SyntheticLAV(seed=0)
    feats, classes, _ = gen.sample(20000, seed=3)
    xs = np.concatenate([feats[m].reshape(len(classes), -1) for m in ("L", "A")], axis=1)
    y = feats["V"].reshape(len(classes), -1)
    class_part = gen.component_means("V")[classes * gen.styles].reshape(len(classes), -1)
    class_part = class_part - class_part.mean(0)
    design = np.c_[xs, np.ones(len(xs))]
    lin = design @ np.linalg.lstsq(design, y, rcond=None)[0]
    exact = gen.true_conditional_mean({"L": feats["L"], "A": feats["A"]}, ("L", "A"), "V").reshape(len(classes), -1)

    def explained(pred):  # share of the class part's variance that the prediction carries
        coef = (pred - pred.mean(0)) * class_part
        return coef.sum() / (class_part**2).sum()

    # measured at seed 0: linear 0.31, exact 0.78
    assert explained(lin) < 0.4 and explained(exact) > explained(lin) + 0.3


def test_bayes_accuracy_masked_conditions_each_sample_on_its_own_modalities():
    data = make_synthetic(seed=0, n_train=4, n_valid=4, n_test=300)
    te, g = data["test"], data["test"].generator
    mask = np.ones((300, 3), dtype=bool)
    mask[:100, 0] = False  # A+V for the first hundred
    mask[100:200, 1:] = False  # L only
    pred = g.bayes_predictions(te, mask)
    sub = te.subset(np.arange(100))
    np.testing.assert_array_equal(pred[:100], g.bayes_predictions(sub, np.tile([False, True, True], (100, 1))))
    post_l = g.class_posterior(te.features["L"][100:200], "L")
    np.testing.assert_array_equal(pred[100:200], post_l.argmax(1))
    full = g.bayes_accuracy_masked(te)
    assert full == g.bayes_accuracy(te, ("L", "A", "V"))
    assert g.bayes_accuracy_masked(te, mask) < full
    with pytest.raises(ValueError, match="mask must be"):
        g.bayes_predictions(te, mask[:, :2])


def test_sample_moments_match_model(gen):
    feats, classes, styles = gen.sample(20000, seed=0)
    comp = classes * gen.styles + styles
    mods = ("L", "A")
    flat = np.concatenate([feats[m].reshape(len(classes), -1) for m in mods], axis=1)
    means = np.concatenate([gen.mean(m) for m in mods], axis=1)
    centred = flat - means[comp]
    emp = centred.T @ centred / len(classes)
    np.testing.assert_allclose(emp, gen.covariance(mods), atol=0.08)
    for n in range(gen.num_components):
        np.testing.assert_allclose(flat[comp == n].mean(0), means[n], atol=0.1)


def _importance_estimate(gen: SyntheticLAV, x_src: np.ndarray, src: str, dst: str, n: int, seed: int):
    """Monte Carlo from the generative description only: prior draws weighted by p(x_src | latents)."""
    rng = np.random.default_rng(seed)
    k, t = gen.latent_dim, gen.length
    chol_t = np.linalg.cholesky(gen.time_corr)
    c = rng.integers(0, gen.num_classes, n)
    j = rng.integers(0, gen.styles, n)
    s = gen.latent_std * np.einsum("ts,nks->nkt", chol_t, rng.standard_normal((n, k, t)))

    def clean(m):
        cls = np.einsum("q,nq,dq,qt->ndt", gen.code_weights[m], gen.codes[c], gen.class_dirs[m], gen.class_profiles)
        sty = gen.style_values[j][:, None, None] * gen.style_dirs[m][None, :, None] * gen.style_profile[None, None]
        return (gen.class_amplitude * cls + gen.style_amplitude * sty + gen.offsets[m][None, :, None]
                + np.einsum("ck,nkt->nct", gen.weights[m], s))

    clean_src, clean_dst = clean(src), clean(dst)
    logw = -0.5 * ((x_src[None] - clean_src) ** 2).sum(axis=(1, 2)) / gen.noise[src] ** 2
    w = np.exp(logw - logsumexp(logw))
    mean = np.einsum("n,nct->ct", w, clean_dst)
    post = np.array([w[c == q].sum() for q in range(gen.num_classes)])
    ess = 1.0 / (w**2).sum()
    return mean, post, ess


def test_exact_conditional_matches_importance_sampling(gen):
    feats, _, _ = gen.sample(2, seed=11)
    for i in range(2):
        x_a = feats["A"][i]
        mean_mc, post_mc, ess = _importance_estimate(gen, x_a, "A", "L", 250_000, seed=i)
        assert ess > 1000
        exact = gen.true_conditional_mean(x_a[None], "A", "L")[0]
        post = gen.class_posterior(x_a[None], "A")[0]
        np.testing.assert_allclose(post, post_mc, atol=0.03)
        np.testing.assert_allclose(exact, mean_mc, atol=0.06)


def test_conditional_mean_is_the_regression_function(gen):
    """Joint samples: the residual x_dst - E[x_dst|x_src] has mean 0 and is orthogonal to x_src."""
    feats, classes, _ = gen.sample(30000, seed=5)
    f = gen.true_conditional_mean(feats["V"], "V", "L")
    resid = (feats["L"] - f).reshape(len(classes), -1)
    xs = feats["V"].reshape(len(classes), -1)
    xs = (xs - xs.mean(0)) / xs.std(0)
    se = resid.std(0) / np.sqrt(len(classes))
    assert np.all(np.abs(resid.mean(0)) < 5 * se)
    cross = resid.T @ xs / len(classes)
    assert np.abs(cross).max() < 5 * resid.std(0).max() / np.sqrt(len(classes))
    # and it beats the best linear predictor fitted on the same samples
    lin = np.linalg.lstsq(np.c_[xs, np.ones(len(xs))], feats["L"].reshape(len(classes), -1), rcond=None)[0]
    lin_mse = ((np.c_[xs, np.ones(len(xs))] @ lin - feats["L"].reshape(len(classes), -1)) ** 2).mean()
    assert (resid**2).mean() < lin_mse
    # posterior calibration: E[p(c|x)] = P(c) and E[p(c|x) x] = E[1{C=c} x]
    post = gen.class_posterior(feats["V"], "V")
    onehot = np.eye(gen.num_classes)[classes]
    np.testing.assert_allclose(post.mean(0), onehot.mean(0), atol=0.015)
    np.testing.assert_allclose(post.T @ xs / len(xs), onehot.T @ xs / len(xs), atol=0.02)


def test_sample_conditional_and_log_prob(gen):
    feats, _, _ = gen.sample(2, seed=2)
    x_src = {"A": feats["A"], "V": feats["V"]}
    reps = 4000
    tiled = {m: np.repeat(v, reps, axis=0) for m, v in x_src.items()}  # rows: sample 0 x reps, sample 1 x reps
    draws = gen.sample_conditional(tiled, ("A", "V"), "L", seed=0).reshape(2, reps, 3, 4)
    exact = gen.true_conditional_mean(x_src, ("A", "V"), "L")
    np.testing.assert_allclose(draws.mean(1), exact, atol=0.08)
    again = gen.sample_conditional(x_src, ("A", "V"), "L", seed=7)
    np.testing.assert_array_equal(again, gen.sample_conditional(x_src, ("A", "V"), "L", seed=7))
    # the mixture density integrates the components: compare with a brute-force evaluation
    lp = gen.conditional_log_prob(feats["L"], x_src, ("A", "V"), "L")
    cond = gen._conditional(("A", "V"), "L")
    flat = np.concatenate([feats["A"].reshape(2, -1), feats["V"].reshape(2, -1)], axis=1)
    comps = gen._component_means(flat, cond)
    cov = cond.chol_cond @ cond.chol_cond.T
    from scipy.stats import multivariate_normal

    post = np.exp(gen._log_posterior(flat, cond))  # over the components (c, j)
    np.testing.assert_allclose(post.reshape(2, gen.num_classes, gen.styles).sum(2), gen.class_posterior(x_src, ("A", "V")))
    for i in range(2):
        dens = sum(post[i, c] * multivariate_normal(comps[i, c], cov).pdf(feats["L"][i].reshape(-1))
                   for c in range(gen.num_components))
        assert lp[i] == pytest.approx(np.log(dens), abs=1e-8)


def test_conditional_api_errors_and_torch(gen):
    x = torch.randn(5, 2, 4)
    out = gen.true_conditional_mean(x, "A", "L")
    assert isinstance(out, torch.Tensor) and out.shape == (5, 3, 4) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown modality 'Q'"):
        gen.true_conditional_mean(x, "Q", "L")
    with pytest.raises(ValueError, match="expected shape"):
        gen.true_conditional_mean(torch.randn(5, 3, 4), "A", "L")
    with pytest.raises(ValueError, match="among the sources"):
        gen.true_conditional_mean(x, "A", "A")
    with pytest.raises(ValueError, match="mapping"):
        gen.true_conditional_mean(x, ("A", "V"), "L")
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        gen.class_posterior(bad, "A")
