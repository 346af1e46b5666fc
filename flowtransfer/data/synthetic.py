r"""The embedded default data: a synthetic L/A/V set whose true conditionals are known exactly.

Generative model (one sample; ``K`` classes, latent width ``k``, length ``T``)

.. math::

    c &\sim \mathrm{Categorical}(\pi), \qquad \pi_c = 1/K \\
    s &= \mu_c + \eta \in \mathbb R^{k\times T}, \qquad
        \mu_c[j, t] = \alpha \sin\!\big(2\pi f_{c,j}\, t / T + \varphi_{c,j}\big) \\
    \eta[j, :] &\sim \mathcal N(0, \tau^2 R), \qquad R_{tt'} = \rho^{|t-t'|} \quad\text{(AR(1) over time, per row)} \\
    u_m &= \nu_{m,c} + \eta_m \in \mathbb R^{k_p\times T}
        \quad\text{(private latent of modality } m\text{, same form, its own frequencies and phases)} \\
    x_m &= W_m s + V_m u_m + b_m \mathbf 1_T^\top + \sigma_m \varepsilon_m, \qquad
        W_m = g_m G_m / \sqrt k,\ V_m = g_m H_m / \sqrt{k_p},\ \varepsilon_m \sim \mathcal N(0, I)

with class-specific integer frequencies ``f`` in {1, 2, 3}, phases ``phi``, Gaussian ``G_m, H_m``.
Every modality sees the same shared signal ``s`` (class structure *and* the sample's own AR noise
``eta``) through its projection ``W_m`` with strength ``g_m``; each also carries a private,
class-dependent signal ``u_m`` (amplitude ``beta``) that no other modality observes, so modalities
are complementary for classification, and a private part of ``x_dst`` can be recovered from another
modality only through the class (which is what a class-conditional prior exploits); plus its own
noise ``sigma_m``. By default text ``L`` is strong and clean, audio ``A`` middling, vision ``V`` weak
and noisy. Recovering one modality from another is therefore possible (shared ``s``) but not
trivial (private signal and noise, a weak source, class ambiguity).

Exact conditionals. Write ``vec(x_m)`` row-major over ``(C_m, T)``, so ``vec(W s) = (W \otimes I_T)
vec(s)``. Given the class everything is jointly Gaussian with class-dependent means and a shared
covariance

.. math::

    \mathbb E[\mathrm{vec}\,x_m \mid c] = \mathrm{vec}(W_m\mu_c + V_m\nu_{m,c} + b_m\mathbf 1^\top), \qquad
    \Sigma_{mn} = \tau^2\,(W_m W_n^\top) \otimes R
        + \delta_{mn}\big(\tau^2\,(V_m V_m^\top) \otimes R + \sigma_m^2 I\big).

For sources ``S`` and destination ``D``, with ``A = \Sigma_{DS}\Sigma_{SS}^{-1}`` and
``\Sigma_{D|S} = \Sigma_{DD} - A\Sigma_{SD}``:

.. math::

    p(c \mid x_S) &\propto \pi_c\, \mathcal N(x_S;\ \mu_{S|c}, \Sigma_{SS}) \\
    p(x_D \mid x_S) &= \sum_c p(c \mid x_S)\ \mathcal N\big(x_D;\ \mu_{D|c} + A(x_S - \mu_{S|c}),\ \Sigma_{D|S}\big),

a Gaussian mixture whose mean is :meth:`SyntheticLAV.true_conditional_mean`. Everything is computed
in float64, batched, with Cholesky factors cached per ``(src, dst)`` (numpy only).

Difficulty of the defaults (seed 0, test split of 1000): the Bayes-optimal classifier reaches
accuracy L 0.80, A 0.74, V 0.63, L+A 0.86, A+V 0.81, L+A+V 0.89; the exact conditional mean
explains R^2 = 0.34 of A->L, 0.24 of V->L, 0.37 of L->A, 0.14 of L->V, 0.11 of A->V.

Example::

    data = make_synthetic(seed=0)                 # {"train", "valid", "test"} -> MultimodalDataset
    gen = data["test"].generator                  # the SyntheticLAV that made it
    x_a = data["test"].features["A"][:8]          # (8, 8, 20)
    best = gen.true_conditional_mean(x_a, "A", "L")   # (8, 16, 20): the Bayes-optimal recovery
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flowtransfer.data.dataset import MultimodalDataset

__all__ = ["SyntheticLAV", "make_synthetic", "DEFAULT_DIMS", "DEFAULT_SIZES"]

#: default channel widths of the embedded data
DEFAULT_DIMS: dict[str, int] = {"L": 16, "A": 8, "V": 12}
#: default split sizes (train, valid, test)
DEFAULT_SIZES: tuple[int, int, int] = (2000, 500, 1000)

_DEFAULT_STRENGTH = {"L": 1.0, "A": 0.7, "V": 0.5}
_DEFAULT_NOISE = {"L": 0.4, "A": 0.6, "V": 1.0}

Sources = str | Sequence[str]


def _as_f64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _like(out: np.ndarray, ref: Any) -> Any:
    """Return ``out`` as a tensor of ``ref``'s dtype/device when ``ref`` is a tensor, else float64 numpy."""
    if isinstance(ref, torch.Tensor):
        return torch.from_numpy(out).to(dtype=ref.dtype if ref.is_floating_point() else torch.float32, device=ref.device)
    return out


@dataclass
class _Conditional:
    """Cached factors for conditioning ``dst`` on the sources ``src``."""

    src_means: np.ndarray  # (K, Ds)
    dst_means: np.ndarray  # (K, Dd)
    white_ss: np.ndarray  # L_SS^{-1} with Sigma_SS = L_SS L_SS^T, (Ds, Ds)
    logdet_ss: float
    gain: np.ndarray  # A = Sigma_DS Sigma_SS^-1, (Dd, Ds)
    chol_cond: np.ndarray  # lower Cholesky of Sigma_{D|S}, (Dd, Dd)
    logdet_cond: float


@dataclass
class SyntheticLAV:
    """The generator of the embedded data, holding its true parameters (see the module docstring).

    Args:
        seed: seeds the parameters (frequencies, phases, projections, offsets).
        num_classes: ``K``. length: ``T``. dims: modality -> ``C_m`` (order = modality order).
        latent_dim: ``k``; private_dim: ``k_p`` (0 disables private signals). amplitude: ``alpha``;
            private_amplitude: ``beta``. ar_coef: ``rho``. latent_std: ``tau``.
        strength: modality -> ``g_m``; noise: modality -> ``sigma_m`` (defaults: L 1.0/0.4,
            A 0.7/0.6, V 0.5/1.0; other names get 0.7/0.6).
        task: ``"classification"`` (labels = class) or ``"regression"`` (labels = the class mapped
            linearly onto [-3, 3] plus ``N(0, 0.25^2)`` noise, clipped; inputs depend on the class only).
    """

    seed: int = 0
    num_classes: int = 4
    length: int = 20
    dims: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_DIMS))
    latent_dim: int = 4
    private_dim: int = 2
    amplitude: float = 0.3
    private_amplitude: float = 0.25
    ar_coef: float = 0.8
    latent_std: float = 1.0
    strength: Mapping[str, float] | None = None
    noise: Mapping[str, float] | None = None
    task: str = "classification"

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        if not self.dims:
            raise ValueError("dims must name at least one modality")
        if self.task not in ("classification", "regression"):
            raise ValueError(f"unknown task {self.task!r}; expected 'classification' or 'regression'")
        if not -1.0 < self.ar_coef < 1.0:
            raise ValueError(f"ar_coef must lie in (-1, 1), got {self.ar_coef}")
        self.dims = {str(k): int(v) for k, v in self.dims.items()}
        for m, c in self.dims.items():
            if c < 1:
                raise ValueError(f"modality {m!r}: width must be >= 1, got {c}")
        st = dict(self.strength or {})
        no = dict(self.noise or {})
        self.strength = {m: float(st.get(m, _DEFAULT_STRENGTH.get(m, 0.7))) for m in self.dims}
        self.noise = {m: float(no.get(m, _DEFAULT_NOISE.get(m, 0.6))) for m in self.dims}
        for m, s in self.noise.items():
            if s <= 0:
                raise ValueError(f"modality {m!r}: noise must be > 0 (the conditionals need it), got {s}")

        rng = np.random.default_rng(np.random.SeedSequence([int(self.seed), 7919]))
        k, t, kk = self.latent_dim, self.length, self.num_classes
        self.freqs = rng.integers(1, 4, size=(kk, k))  # f_{c,j} in {1, 2, 3}
        self.phases = rng.uniform(0.0, 2 * np.pi, size=(kk, k))
        steps = np.arange(t)
        #: class mean trajectories mu_c, (K, k, T)
        self.class_means = self.amplitude * np.sin(
            2 * np.pi * self.freqs[:, :, None] * steps / t + self.phases[:, :, None]
        )
        #: temporal correlation R, (T, T)
        self.time_corr = self.ar_coef ** np.abs(steps[:, None] - steps[None, :])
        self.weights = {m: self.strength[m] * rng.standard_normal((c, k)) / np.sqrt(k) for m, c in self.dims.items()}
        self.offsets = {m: 0.5 * rng.standard_normal(c) for m, c in self.dims.items()}
        kp = int(self.private_dim)
        #: private projections V_m, (C_m, k_p)
        self.private_weights = {
            m: self.strength[m] * rng.standard_normal((c, kp)) / np.sqrt(max(kp, 1)) for m, c in self.dims.items()
        }
        #: private class mean trajectories nu_{m,c}, (K, k_p, T)
        self.private_means = {}
        for m in self.dims:
            f = rng.integers(1, 4, size=(kk, kp))
            ph = rng.uniform(0.0, 2 * np.pi, size=(kk, kp))
            self.private_means[m] = self.private_amplitude * np.sin(2 * np.pi * f[:, :, None] * steps / t + ph[:, :, None])
        self._cache: dict[tuple[tuple[str, ...], str], _Conditional] = {}

    # ------------------------------------------------------------------ structure

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.dims)

    def _check_modality(self, m: str) -> None:
        if m not in self.dims:
            raise ValueError(f"unknown modality {m!r}; known: {list(self.dims)}")

    def mean(self, modality: str) -> np.ndarray:
        """Class-conditional means of ``vec(x_m)``, ``(K, C_m * T)``."""
        self._check_modality(modality)
        mu = np.einsum("ck,nkt->nct", self.weights[modality], self.class_means) + self.offsets[modality][None, :, None]
        mu = mu + np.einsum("ck,nkt->nct", self.private_weights[modality], self.private_means[modality])
        return mu.reshape(self.num_classes, -1)

    def cross_cov(self, m: str, n: str) -> np.ndarray:
        """``Cov(vec x_m, vec x_n)`` (shared by every class), ``(C_m T, C_n T)``."""
        self._check_modality(m)
        self._check_modality(n)
        cov = self.latent_std**2 * np.kron(self.weights[m] @ self.weights[n].T, self.time_corr)
        if m == n:
            vm = self.private_weights[m]
            cov = cov + self.latent_std**2 * np.kron(vm @ vm.T, self.time_corr)
            cov = cov + self.noise[m] ** 2 * np.eye(cov.shape[0])
        return cov

    def covariance(self, mods: Sequence[str]) -> np.ndarray:
        """Joint covariance of the concatenated ``vec(x_m)`` for ``mods`` in order."""
        return np.block([[self.cross_cov(a, b) for b in mods] for a in mods])

    # ------------------------------------------------------------------ sampling

    def sample(self, n: int, seed: int | np.random.SeedSequence = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """``n`` joint samples: (features ``{m: (n, C_m, T)}`` float64, classes ``(n,)``, latent ``(n, k, T)``).

        Classes are balanced: ``n // K`` or one more per class, in random order.
        """
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        rng = np.random.default_rng(seed)
        k, t = self.latent_dim, self.length
        classes = rng.permutation(np.arange(n) % self.num_classes)
        chol_t = np.linalg.cholesky(self.time_corr + 1e-12 * np.eye(t))
        eta = self.latent_std * np.einsum("ts,nks->nkt", chol_t, rng.standard_normal((n, k, t)))
        s = self.class_means[classes] + eta
        feats = {}
        kp = int(self.private_dim)
        for m, c in self.dims.items():
            x = np.einsum("ck,nkt->nct", self.weights[m], s) + self.offsets[m][None, :, None]
            eta_m = self.latent_std * np.einsum("ts,nks->nkt", chol_t, rng.standard_normal((n, kp, t)))
            x = x + np.einsum("ck,nkt->nct", self.private_weights[m], self.private_means[m][classes] + eta_m)
            feats[m] = x + self.noise[m] * rng.standard_normal((n, c, t))
        return feats, classes, s

    def labels_for(self, classes: np.ndarray, seed: int | np.random.SeedSequence = 0) -> np.ndarray:
        """Labels for ``classes``: the classes (classification) or noisy scores in [-3, 3] (regression)."""
        if self.task == "classification":
            return np.asarray(classes, dtype=np.int64)
        rng = np.random.default_rng(seed)
        score = -3.0 + 6.0 * np.asarray(classes) / (self.num_classes - 1)
        return np.clip(score + 0.25 * rng.standard_normal(len(classes)), -3.0, 3.0).astype(np.float32)

    def dataset(self, n: int, seed: int | np.random.SeedSequence = 0) -> MultimodalDataset:
        """A :class:`MultimodalDataset` of ``n`` samples (float32, NCT); ``ds.generator`` is ``self``."""
        ss = np.random.SeedSequence(seed) if not isinstance(seed, np.random.SeedSequence) else seed
        s_feat, s_lab = ss.spawn(2)
        feats, classes, _ = self.sample(n, s_feat)
        labels = self.labels_for(classes, s_lab)
        ds = MultimodalDataset(
            {m: x.astype(np.float32) for m, x in feats.items()},
            labels,
            self.task,
            num_classes=self.num_classes if self.task == "classification" else None,
            extras={"true_class": classes.astype(np.int64)},
        )
        ds.generator = self  # type: ignore[attr-defined]
        return ds

    # ------------------------------------------------------------------ exact conditionals

    def _sources(self, src: Sources) -> tuple[str, ...]:
        mods = (src,) if isinstance(src, str) else tuple(src)
        if not mods:
            raise ValueError("need at least one source modality")
        for m in mods:
            self._check_modality(m)
        if len(set(mods)) != len(mods):
            raise ValueError(f"duplicate source modalities {mods}")
        return mods

    def _flatten(self, x_src: Any, mods: tuple[str, ...]) -> np.ndarray:
        """Sources -> ``(B, sum C_m T)`` float64; ``x_src`` is an array (one source) or a mapping."""
        if isinstance(x_src, Mapping):
            parts = [x_src[m] if m in x_src else None for m in mods]
            missing = [m for m, p in zip(mods, parts) if p is None]
            if missing:
                raise ValueError(f"x_src lacks source modalities {missing}")
        elif len(mods) == 1:
            parts = [x_src]
        else:
            raise ValueError(f"several sources {mods}: pass x_src as a mapping modality -> array")
        flat = []
        for m, p in zip(mods, parts):
            a = _as_f64(p)
            want = (self.dims[m], self.length)
            if a.ndim == 2:
                a = a[None]
            if a.ndim != 3 or a.shape[1:] != want:
                raise ValueError(f"modality {m!r}: expected shape (B, {want[0]}, {want[1]}), got {tuple(a.shape)}")
            if not np.all(np.isfinite(a)):
                raise ValueError(f"modality {m!r}: input holds non-finite values")
            flat.append(a.reshape(a.shape[0], -1))
        if len({f.shape[0] for f in flat}) > 1:
            raise ValueError(f"sources disagree on batch size: {[f.shape[0] for f in flat]}")
        return np.concatenate(flat, axis=1)

    def _conditional(self, mods: tuple[str, ...], dst: str | None) -> _Conditional:
        key = (mods, dst or "")
        if key in self._cache:
            return self._cache[key]
        if dst is not None:
            self._check_modality(dst)
            if dst in mods:
                raise ValueError(f"dst {dst!r} is among the sources {mods}")
        src_means = np.concatenate([self.mean(m) for m in mods], axis=1)
        sigma_ss = self.covariance(mods)
        chol = np.linalg.cholesky(sigma_ss)
        white_ss = np.linalg.inv(chol)  # triangular; Sigma_SS is well conditioned (noise > 0)
        logdet_ss = 2.0 * np.log(np.diag(chol)).sum()
        if dst is None:
            dst_means = np.zeros((self.num_classes, 0))
            gain = np.zeros((0, src_means.shape[1]))
            chol_cond, logdet_cond = np.zeros((0, 0)), 0.0
        else:
            dst_means = self.mean(dst)
            sigma_ds = np.concatenate([self.cross_cov(dst, m) for m in mods], axis=1)
            gain = (sigma_ds @ white_ss.T) @ white_ss  # Sigma_DS Sigma_SS^{-1}
            cond = self.cross_cov(dst, dst) - gain @ sigma_ds.T
            cond = 0.5 * (cond + cond.T)
            chol_cond = np.linalg.cholesky(cond)
            logdet_cond = 2.0 * np.log(np.diag(chol_cond)).sum()
        out = _Conditional(src_means, dst_means, white_ss, logdet_ss, gain, chol_cond, logdet_cond)
        self._cache[key] = out
        return out

    def _log_posterior(self, flat: np.ndarray, cond: _Conditional) -> np.ndarray:
        # whiten x and the class means separately: one (B, Ds) x (Ds, Ds) product instead of K
        white = (flat @ cond.white_ss.T)[:, None, :] - (cond.src_means @ cond.white_ss.T)[None]  # (B, K, Ds)
        maha = np.einsum("bkd,bkd->bk", white, white)
        logits = -0.5 * maha - np.log(self.num_classes)
        return logits - _logsumexp(logits, axis=1, keepdims=True)

    def class_posterior(self, x_src: Any, src: Sources) -> Any:
        """``p(c | x_src)``, ``(B, K)``: exact, from the class-conditional Gaussians of the sources."""
        mods = self._sources(src)
        flat = self._flatten(x_src, mods)
        post = np.exp(self._log_posterior(flat, self._conditional(mods, None)))
        return _like(post, _first(x_src))

    def _component_means(self, flat: np.ndarray, cond: _Conditional) -> np.ndarray:
        """``mu_{D|c} + A (x_S - mu_{S|c})`` for every class, ``(B, K, Dd)``."""
        base = cond.dst_means - cond.src_means @ cond.gain.T  # (K, Dd)
        return (flat @ cond.gain.T)[:, None, :] + base[None]

    def true_conditional_mean(self, x_src: Any, src: Sources, dst: str) -> Any:
        """``E[x_dst | x_src]`` ``(B, C_dst, T)``: the posterior-weighted mean of the mixture components.

        ``x_src`` is ``(B, C_src, T)`` for one source, or a mapping ``{m: (B, C_m, T)}`` when ``src``
        names several. Numpy in -> float64 numpy out; a tensor in -> a tensor of its dtype out.
        """
        mods = self._sources(src)
        flat = self._flatten(x_src, mods)
        cond = self._conditional(mods, dst)
        post = np.exp(self._log_posterior(flat, cond))
        mean = np.einsum("bk,bkd->bd", post, self._component_means(flat, cond))
        return _like(mean.reshape(-1, self.dims[dst], self.length), _first(x_src))

    def conditional_log_prob(self, x_dst: Any, x_src: Any, src: Sources, dst: str) -> Any:
        """``log p(x_dst | x_src)`` per sample, ``(B,)``: the exact mixture log-density (nats)."""
        mods = self._sources(src)
        flat = self._flatten(x_src, mods)
        cond = self._conditional(mods, dst)
        y = self._flatten(x_dst, (dst,))
        if y.shape[0] != flat.shape[0]:
            raise ValueError(f"x_dst has {y.shape[0]} samples, x_src {flat.shape[0]}")
        logpost = self._log_posterior(flat, cond)
        diff = y[:, None, :] - self._component_means(flat, cond)  # (B, K, Dd)
        b, kk, d = diff.shape
        white = np.linalg.solve(cond.chol_cond, diff.reshape(b * kk, d).T).T.reshape(b, kk, d)
        comp = -0.5 * (white**2).sum(-1) - 0.5 * cond.logdet_cond - 0.5 * d * np.log(2 * np.pi)
        return _like(_logsumexp(logpost + comp, axis=1), _first(x_src))

    def sample_conditional(self, x_src: Any, src: Sources, dst: str, seed: int = 0) -> Any:
        """One draw of ``x_dst ~ p(x_dst | x_src)`` per input, ``(B, C_dst, T)``.

        Draws ``c ~ p(c | x_src)``, then ``x_dst = mu_{D|c} + A (x_src - mu_{S|c}) + L_{D|S} z``.
        """
        mods = self._sources(src)
        flat = self._flatten(x_src, mods)
        cond = self._conditional(mods, dst)
        rng = np.random.default_rng(seed)
        post = np.exp(self._log_posterior(flat, cond))
        cdf = np.cumsum(post, axis=1)
        u = rng.random((flat.shape[0], 1))
        cls = np.minimum((u > cdf).sum(axis=1), self.num_classes - 1)
        comp = self._component_means(flat, cond)[np.arange(flat.shape[0]), cls]
        z = rng.standard_normal(comp.shape)
        draw = comp + z @ cond.chol_cond.T
        return _like(draw.reshape(-1, self.dims[dst], self.length), _first(x_src))

    def bayes_accuracy(self, ds: MultimodalDataset, src: Sources) -> float:
        """Accuracy of the Bayes classifier ``argmax_c p(c | x_src)`` on ``ds`` (uses its true classes)."""
        mods = self._sources(src)
        post = self.class_posterior({m: ds.features[m] for m in mods}, mods)
        truth = ds.extras.get("true_class", ds.class_labels())
        return float((np.argmax(post, axis=1) == truth).mean())


def _logsumexp(a: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
    top = np.max(a, axis=axis, keepdims=True)
    out = top + np.log(np.exp(a - top).sum(axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis=axis)


def _first(x: Any) -> Any:
    if isinstance(x, Mapping):
        return next(iter(x.values()))
    return x


def make_synthetic(
    seed: int = 0,
    n_train: int = DEFAULT_SIZES[0],
    n_valid: int = DEFAULT_SIZES[1],
    n_test: int = DEFAULT_SIZES[2],
    num_classes: int = 4,
    length: int = 20,
    dims: Mapping[str, int] | None = None,
    task: str = "classification",
    **params: Any,
) -> dict[str, MultimodalDataset]:
    """The embedded default data: ``{"train", "valid", "test"}`` -> :class:`MultimodalDataset`.

    One :class:`SyntheticLAV` (parameters seeded by ``seed``) generates all three splits from
    independent child seeds, so the splits are disjoint draws of one distribution. Each dataset's
    ``.generator`` is that object (true parameters and exact conditionals); ``extras["true_class"]``
    holds the class (for regression too). Extra keyword arguments go to :class:`SyntheticLAV`.
    """
    gen = SyntheticLAV(
        seed=seed, num_classes=num_classes, length=length, dims=dict(dims or DEFAULT_DIMS), task=task, **params
    )
    seeds = np.random.SeedSequence([int(seed), 104729]).spawn(3)
    return {
        name: gen.dataset(n, s)
        for name, n, s in (("train", n_train, seeds[0]), ("valid", n_valid, seeds[1]), ("test", n_test, seeds[2]))
    }
