"""Plots: every function returns a Figure with labelled axes and the expected artists (tiny inputs)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PathCollection, PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import Ellipse, Rectangle  # noqa: E402

from flowtransfer import plots  # noqa: E402
from flowtransfer.flows import ClassConditionalGaussian  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def data(n=40, c=4, t=3, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    real = rng.standard_normal((n, c, t)) + y[:, None, None]
    rec = real + 0.3 * rng.standard_normal(real.shape)
    return real, rec, y


def visible_axes(fig: Figure):
    return [ax for ax in fig.axes if ax.get_visible()]


def scatters(ax):
    return [c for c in ax.collections if isinstance(c, PathCollection)]


# --------------------------------------------------------------------------------------------------


def _rows():
    rows = []
    for method, base in (("dicmor", 0.8), ("zero_fill", 0.6)):
        for seed in (0, 1):
            for rate in (0.0, 0.3, 0.6):
                rows.append({"method": method, "setting": f"mr={rate}", "seed": seed,
                             "acc": base - 0.2 * rate + 0.01 * seed})
    rows += [{"method": "upper_bound", "setting": "complete", "seed": s, "acc": 0.9} for s in (0, 1)]
    return rows


def test_missing_rate_curves_lines_bands_and_values():
    fig = plots.plot_missing_rate_curves(_rows(), "acc", title="t")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("missing rate") and ax.get_ylabel() == "accuracy (%)"
    lines = ax.get_lines()
    assert len(lines) == 3  # two curves and one bound
    assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2  # seed bands
    np.testing.assert_allclose(lines[0].get_xdata(), [0.0, 0.3, 0.6])
    np.testing.assert_allclose(lines[0].get_ydata(), [80.5, 74.5, 68.5])  # mean over seeds, in percent
    np.testing.assert_allclose(lines[2].get_ydata(), [90.0, 90.0])
    assert len(ax.get_legend().get_texts()) == 3


def test_projection_panels_artists_and_pca_coordinates():
    real, rec, y = data()
    fig = plots.plot_recovery_projection(real, rec, y, zero_filled=np.zeros_like(real), modality="L")
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["real", "recovered", "zero-filled"]
    assert all(ax.get_xlabel().startswith("PC 1") for ax in axes) and axes[0].get_ylabel().startswith("PC 2")
    assert len(scatters(axes[0])) == 3  # one per class
    assert len(scatters(axes[1])) == 4 and len(scatters(axes[2])) == 4  # + the grey real reference
    assert "modality L" in fig._suptitle.get_text()
    # the real panel's points are the PCA scores of the real features (up to each axis' sign)
    flat = real.reshape(len(real), -1)
    centred = flat - flat.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    scores = centred @ vt[:2].T
    got = np.concatenate([c.get_offsets() for c in scatters(axes[0])])
    order = np.concatenate([np.flatnonzero(y == k) for k in range(3)])
    expect = scores[order]
    sign = np.sign(np.sum(got * expect, axis=0))
    np.testing.assert_allclose(got * sign, expect, atol=1e-9)
    # zero filling collapses onto one point: the projection of the zero vector
    zero_pts = np.concatenate([c.get_offsets() for c in scatters(axes[2])[1:]])
    np.testing.assert_allclose(zero_pts, np.repeat(zero_pts[:1], len(zero_pts), 0))


def test_projection_others_mean_time_and_tensors():
    real, rec, y = data()
    fig = plots.plot_recovery_projection(torch.from_numpy(real), torch.from_numpy(rec), torch.from_numpy(y),
                                         others={"mean-filled": np.broadcast_to(real.mean(0), real.shape)},
                                         reduce="mean_time", max_points=10)
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["real", "recovered", "mean-filled"]
    assert sum(len(c.get_offsets()) for c in scatters(axes[0])) == 10


@pytest.mark.slow
def test_projection_tsne():
    pytest.importorskip("sklearn")
    real, rec, y = data(n=20)
    fig = plots.plot_recovery_projection(real, rec, y, method="tsne")
    axes = visible_axes(fig)
    assert len(axes) == 2 and axes[0].get_xlabel() == "t-SNE 1" and axes[0].get_ylabel() == "t-SNE 2"


def test_projection_lda_separates_the_classes():
    pytest.importorskip("sklearn")
    real, rec, y = data(n=60, c=4, t=3, k=3)
    fig = plots.plot_recovery_projection(real, rec, y, method="lda")
    axes = visible_axes(fig)
    assert axes[0].get_xlabel() == "discriminant axis 1" and axes[0].get_ylabel() == "discriminant axis 2"
    assert len(scatters(axes[0])) == 3 and len(scatters(axes[1])) == 4
    centres = np.array([c.get_offsets().mean(0) for c in scatters(axes[0])])
    assert np.linalg.norm(centres[0] - centres[2]) > 1.0  # the class means sit apart on the discriminant axes
    with pytest.raises(ValueError, match="at least 3 classes"):
        plots.plot_recovery_projection(real, rec, y % 2, method="lda")


def test_projection_errors():
    real, rec, y = data()
    with pytest.raises(ValueError, match="shape of the real features"):
        plots.plot_recovery_projection(real, rec[:, :2], y)
    bad = rec.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="recovered contains NaN"):
        plots.plot_recovery_projection(real, bad, y)
    with pytest.raises(ValueError, match="unknown projection"):
        plots.plot_recovery_projection(real, rec, y, method="umap")
    with pytest.raises(ValueError, match=r"labels: expected shape \(40,\)"):
        plots.plot_recovery_projection(real, rec, y[:5])
    with pytest.raises(ValueError, match="integer class ids"):
        plots.plot_recovery_projection(real, rec, y + 0.5)


def test_channel_densities_grid_and_lines():
    real, rec, _ = data(c=5)
    fig = plots.plot_channel_densities(real, rec, channels=[0, 2, 4, 1], zero_filled=True, ncols=3,
                                       others={"mean-filled": rec * 0.5}, modality="A")
    axes = visible_axes(fig)
    assert len(axes) == 4
    for ax, c in zip(axes, [0, 2, 4, 1]):
        assert ax.get_title() == f"channel {c}"
        assert ax.get_xlabel() == "feature value" and ax.get_ylabel() == "density"
        assert len(ax.get_lines()) == 3  # recovered, mean-filled, the zero-filled marker
        assert [t.get_text().split()[0] for t in ax.texts] == ["W1", "W1"]  # one distance per line
        assert len([p for p in ax.collections if isinstance(p, PolyCollection)]) == 1  # the real density
        area = np.trapezoid(ax.get_lines()[0].get_ydata(), ax.get_lines()[0].get_xdata())
        assert 0.9 < area <= 1.0 + 1e-6  # a density over the shown range
    # default channels: the largest real variance first
    real2 = np.random.default_rng(1).standard_normal((30, 3, 2)) * np.array([1.0, 3.0, 2.0])[None, :, None]
    fig2 = plots.plot_channel_densities(real2, real2, n_channels=2)
    assert [ax.get_title() for ax in visible_axes(fig2)] == ["channel 1", "channel 2"]
    from scipy.stats import wasserstein_distance

    shift = plots.plot_channel_densities(real2, real2 + 0.5, channels=[0])
    assert visible_axes(shift)[0].texts[0].get_text() == f"W1 {wasserstein_distance(real2[:, 0].ravel(), real2[:, 0].ravel() + 0.5):.2f}"
    with pytest.raises(ValueError, match="channels must be"):
        plots.plot_channel_densities(real, rec, channels=[9])
    with pytest.raises(ValueError, match="recovered: expected"):
        plots.plot_channel_densities(real, rec[:, :3])


def test_latent_space_panels_ellipses_and_auto_dims():
    rng = np.random.default_rng(0)
    k, c = 3, 4
    means = np.zeros((k, c))
    means[:, 2] = [-2.0, 0.0, 2.0]  # channels 2 and 0 separate the classes most
    means[:, 0] = [1.0, -1.0, 0.0]
    stds = np.full((k, c), 0.5)
    y = np.arange(30) % k
    z = {m: means[y][:, :, None] + 0.5 * rng.standard_normal((30, c, 2)) for m in ("L", "A")}
    fig = plots.plot_latent_space(z, y, (means, stds))
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["modality L", "modality A"]
    assert axes[0].get_xlabel() == "latent channel 2" and axes[0].get_ylabel() == "latent channel 0"
    for ax in axes:
        assert len(scatters(ax)) == k + 1  # classes + the prior means
        ellipses = [p for p in ax.patches if isinstance(p, Ellipse)]
        assert len(ellipses) == 2 * k
        assert ellipses[0].center == pytest.approx((means[0, 2], means[0, 0]))
        assert ellipses[0].width == pytest.approx(1.0) and ellipses[1].width == pytest.approx(2.0)


def test_latent_space_accepts_the_prior_module_and_checks_shapes():
    prior = ClassConditionalGaussian(4, num_classes=2)
    z = {"L": torch.randn(6, 4, 3)}
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    fig = plots.plot_latent_space(z, {"L": y}, prior, dims=(1, 3))
    assert visible_axes(fig)[0].get_xlabel() == "latent channel 1"
    with pytest.raises(ValueError, match="prior's 4 channels"):
        plots.plot_latent_space({"L": torch.randn(6, 3, 3)}, y, prior)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        plots.plot_latent_space(z, y + 1, prior)
    with pytest.raises(ValueError, match="dims must index"):
        plots.plot_latent_space(z, y, prior, dims=(0, 7))


def test_frechet_per_class_bars():
    d = {"recovered": {0: 1.0, 1: 2.0, 2: math.nan}, "zero-filled": {0: 5.0, 1: 6.0, 2: 7.0}}
    fig = plots.plot_frechet_per_class(d, modality="L", log=True)
    ax = fig.axes[0]
    bars = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(bars) == 6
    assert ax.get_xlabel() == "class" and "Fréchet" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["class 0", "class 1", "class 2"]
    assert bars[3].get_height() == 5.0
    assert ax.get_yscale() == "log"
    assert plots.plot_frechet_per_class({"a": {0: 1.0}, "b": {0: 100.0}}).axes[0].get_yscale() == "log"  # auto
    assert plots.plot_frechet_per_class({"a": {0: 1.0}, "b": {0: 3.0}}).axes[0].get_yscale() == "linear"
    with pytest.raises(ValueError, match="at least one"):
        plots.plot_frechet_per_class({})


def test_recovered_images_grid():
    rng = np.random.default_rng(0)
    seq = rng.random((5, 28, 28))  # (N, columns, rows) as AV-MNIST stores images
    img = plots.sequence_to_image(seq)
    assert img[2, 3, 7] == seq[2, 7, 3]
    fig = plots.plot_recovered_images(img, img * 0.5, labels=[3, 1, 4, 1, 5], n=4,
                                      extra_rows={"clean MNIST": img})
    axes = visible_axes(fig)
    assert len(axes) == 12
    assert all(len([a for a in ax.get_children() if isinstance(a, AxesImage)]) == 1 for ax in axes)
    assert [axes[i].get_ylabel() for i in (0, 4, 8)] == ["real image", "recovered from audio", "clean MNIST"]
    assert [ax.get_title() for ax in axes[:4]] == ["digit 3", "digit 1", "digit 4", "digit 1"]
    with pytest.raises(ValueError, match="expected 5 images"):
        plots.plot_recovered_images(img, img[:3])
    with pytest.raises(ValueError, match="image sequences"):
        plots.sequence_to_image(img[0])


def test_recovered_features_from_a_tiny_dicmor():
    from flowtransfer.data import from_arrays
    from flowtransfer.methods import build_method

    rng = np.random.default_rng(0)
    n = 12
    feats = {"L": rng.standard_normal((n, 6, 4)).astype(np.float32),
             "A": rng.standard_normal((n, 3, 4)).astype(np.float32)}
    ds = from_arrays(feats, rng.uniform(-3, 3, n), "regression", layout="NCT")
    torch.manual_seed(0)
    model = build_method("dicmor", ds, preset="small", d=4, flow_layers=2, flow_hidden=8, refiner_blocks=1,
                         refiner_hidden=8, refiner_reduction=4, mult={"d": 4, "heads": 2, "layers": 1, "memory_layers": 1})
    out = plots.recovered_features(model, ds, "L", max_samples=10, batch_size=4)
    assert set(out) == {"real", "recovered", "zero_filled", "labels"}
    for key in ("real", "recovered", "zero_filled"):
        assert out[key].shape == (10, 4, 4) and np.isfinite(out[key]).all()
    assert np.all(out["zero_filled"] == 0.0)  # the extractors have no bias
    assert out["labels"].dtype == np.int64 and out["labels"].min() >= 0 and out["labels"].max() <= 6
    with pytest.raises(KeyError, match="unknown modality 'V'"):
        plots.recovered_features(model, ds, "V")
    with pytest.raises(ValueError, match="sources must be"):
        plots.recovered_features(model, ds, "L", sources=["L"])
