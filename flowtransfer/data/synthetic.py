r"""The embedded default data: a synthetic L/A/V set whose true conditionals are known exactly.

It is made for showing incomplete multimodal learning: every modality carries a *different part* of
the class, the modalities depend on each other through the class and nonlinearly, and the class is
easy to read off for a model that pools over time, so trained models get close to the Bayes
accuracy and the gaps between missing-modality settings are the data's, not the optimiser's.

Generative model (one sample; ``K`` classes, ``J`` styles, length ``T``)

.. math::

    c &\sim \mathrm{Uniform}\{0..K-1\}, \qquad j \sim \mathrm{Uniform}\{0..J-1\}
        \quad\text{(class and style, independent; the pair } (c, j) \text{ is the mixture component)} \\
    s_t &\sim \mathcal N(0, \tau^2 I_k) \ \text{i.i.d. over } t
        \quad\text{(a shared per-time-step latent, } \rho = 0 \text{; AR(1) over time with } \rho \ne 0) \\
    x_m[:, t] &= \mu_{m,c,j}[:, t] + W_m s_t + \sigma_m \varepsilon_{m,t}, \qquad
        \varepsilon_{m,t} \sim \mathcal N(0, I_{C_m}) \\
    \mu_{m,c,j}[:, t] &= b_m + a\,\textstyle\sum_q w_{m,q}\, \kappa_q(c)\, D_{m,q}\, \phi_q(t)
        + \beta\, \lambda_j\, E_m\, \psi(t)

- **Class codes** ``kappa_q(c) in {-1, +1}``: the bits of ``c`` and, with two bits or more, their
  parity (for ``K = 4``: ``b1``, ``b2`` and ``b1 b2``). Any two codes of ``K = 4`` determine the class.
- **Each modality sees its own part of the class**: ``w_m`` puts weight 1 on one code and a small
  weight on the others (defaults: ``L`` reads ``b1``, ``A`` reads ``b2``, ``V`` reads the parity
  ``b1 b2``, each with 0.15 on the other codes). One modality alone tells little about the codes it
  does not read, so each pattern of available modalities has its own Bayes accuracy, and a pair
  already identifies the class.
- **Nonlinear dependence through the class and the style**: the codes are pairwise independent, so
  the modalities are linearly uncorrelated through the class (the parity read by ``V`` is the XOR of
  what ``L`` and ``A`` read), and the style ``lambda_j`` (``+-1`` for ``J = 2``) shows in every
  modality along ``E_m`` with the zero-mean profile ``psi(t) = sin(2 pi t / T)``. The best recovery
  ``E[x_dst | x_src]`` is a posterior-weighted mixture over ``(c, j)``: nonlinear in ``x_src``; a
  class-blind linear imputation misses the class part entirely.
- **Learnable**: the class profiles ``phi_q(t) = 1 + 0.5 cos(2 pi q t / T)`` have a non-zero mean, so
  the class shows in the time average; noise is white over time (``rho = 0``) and channels.
- ``D_{m,q}, E_m`` are random unit vectors in ``R^{C_m}``; ``W_m`` has ``N(0, g^2 / k)`` entries;
  offsets ``b_m ~ N(0, 0.5^2)``.

Exact conditionals. Write ``vec(x_m)`` row-major over ``(C_m, T)``. Given the component everything is
jointly Gaussian with component-dependent means and one shared covariance

.. math::

    \Sigma_{mn} = \tau^2\,(W_m W_n^\top) \otimes R + \delta_{mn}\,\sigma_m^2 I, \qquad R_{tt'} = \rho^{|t-t'|}.

For sources ``S`` and destination ``D``, with ``A = \Sigma_{DS}\Sigma_{SS}^{-1}`` and
``\Sigma_{D|S} = \Sigma_{DD} - A\Sigma_{SD}``:

.. math::

    p(c, j \mid x_S) &\propto \mathcal N(x_S;\ \mu_{S|cj}, \Sigma_{SS}), \qquad
        p(c \mid x_S) = \textstyle\sum_j p(c, j \mid x_S) \\
    p(x_D \mid x_S) &= \sum_{c,j} p(c, j \mid x_S)\ \mathcal N\big(x_D;\ \mu_{D|cj} + A(x_S - \mu_{S|cj}),\ \Sigma_{D|S}\big),

whose mean is :meth:`SyntheticLAV.true_conditional_mean`. Everything is float64 and batched, with
Cholesky factors cached per ``(sources, dst)`` (numpy only). :meth:`SyntheticLAV.bayes_accuracy`
is the accuracy of ``argmax_c p(c | x_S)``; :meth:`SyntheticLAV.bayes_accuracy_masked` takes a
presence mask (each sample conditioned on its own available modalities): the exact reference of
every missing-modality setting.

Difficulty of the defaults: see :data:`DEFAULT_DIFFICULTY` (Bayes accuracy per pattern, test split
of seed 0) and ``python -m flowtransfer.data.synthetic``.

Example::

    data = make_synthetic(seed=0)                 # {"train", "valid", "test"} -> MultimodalDataset
    gen = data["test"].generator                  # the SyntheticLAV that made it
    x_a = data["test"].features["A"][:8]          # (8, 8, 20)
    best = gen.true_conditional_mean(x_a, "A", "L")   # (8, 16, 20): the Bayes-optimal recovery
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flowtransfer.data.dataset import MultimodalDataset

__all__ = ["SyntheticLAV", "make_synthetic", "class_codes", "DEFAULT_DIMS", "DEFAULT_SIZES"]

#: default channel widths of the embedded data
DEFAULT_DIMS: dict[str, int] = {"L": 16, "A": 8, "V": 12}
#: default split sizes (train, valid, test)
DEFAULT_SIZES: tuple[int, int, int] = (2000, 500, 1000)
#: default noise level sigma_m per modality (others get 0.8)
_DEFAULT_NOISE = {"L": 0.8, "A": 0.9, "V": 1.0}

Sources = str | Sequence[str]


def class_codes(num_classes: int) -> np.ndarray:
    r"""The class codes ``kappa_q(c)``, ``(K, Q)`` in ``{-1, +1}``: the ``ceil(log2 K)`` bits of ``c``
    and, with two bits or more, the parity of the first two (for ``K = 4``: ``b1, b2, b1 b2``)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    nbits = max(1, math.ceil(math.log2(num_classes)))
    c = np.arange(num_classes)[:, None]
    bits = 2.0 * ((c >> np.arange(nbits)[None, :]) & 1) - 1.0
    if nbits >= 2:
        bits = np.concatenate([bits, bits[:, :1] * bits[:, 1:2]], axis=1)
    return bits


def _as_f64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _like(out: np.ndarray, ref: Any) -> Any:
    """Return ``out`` as a tensor of ``ref``'s dtype/device when ``ref`` is a tensor, else float64 numpy."""
    if isinstance(ref, torch.Tensor):
        return torch.from_numpy(out).to(dtype=ref.dtype if ref.is_floating_point() else torch.float32, device=ref.device)
    return out


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal(n)
    return v / np.linalg.norm(v)


@dataclass
class _Conditional:
    """Cached factors for conditioning ``dst`` on the sources ``src`` (per mixture component)."""

    src_means: np.ndarray  # (N_comp, Ds)
    dst_means: np.ndarray  # (N_comp, Dd)
    white_ss: np.ndarray  # L_SS^{-1} with Sigma_SS = L_SS L_SS^T, (Ds, Ds)
    logdet_ss: float
    gain: np.ndarray  # A = Sigma_DS Sigma_SS^-1, (Dd, Ds)
    chol_cond: np.ndarray  # lower Cholesky of Sigma_{D|S}, (Dd, Dd)
    logdet_cond: float


@dataclass
class SyntheticLAV:
    """The generator of the embedded data, holding its true parameters (see the module docstring).

    Args:
        seed: seeds the parameters (directions, projections, offsets).
        num_classes: ``K``. length: ``T``. dims: modality -> ``C_m`` (order = modality order).
        styles: ``J``, the number of styles shared by every modality (1 disables them).
        class_amplitude: ``a``. style_amplitude: ``beta``. weak_weight: the weight ``w_{m,q}`` of the
            codes a modality does not mainly read.
        reads: modality -> index of the class code it mainly reads (default: modality ``i`` reads
            code ``i mod Q``, so ``L, A, V`` read ``b1, b2, b1 b2`` when ``K = 4``).
        latent_dim: ``k`` (0 disables the shared latent). latent_std: ``tau``. latent_gain: ``g``.
        ar_coef: ``rho`` (temporal correlation of the shared latent; 0 = white).
        noise: modality -> ``sigma_m`` (defaults L 0.8, A 0.8, V 0.9; other names 0.8).
        task: ``"classification"`` (labels = class) or ``"regression"`` (labels = the class mapped
            linearly onto [-3, 3] plus ``N(0, 0.25^2)`` noise, clipped; inputs depend on the class only).
    """

    seed: int = 0
    num_classes: int = 4
    length: int = 20
    dims: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_DIMS))
    styles: int = 2
    class_amplitude: float = 0.25
    style_amplitude: float = 1.0
    weak_weight: float = 0.25
    reads: Mapping[str, int] | None = None
    latent_dim: int = 2
    latent_std: float = 0.5
    latent_gain: float = 1.0
    ar_coef: float = 0.0
    noise: Mapping[str, float] | None = None
    task: str = "classification"

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {self.length}")
        if self.styles < 1:
            raise ValueError(f"styles must be >= 1, got {self.styles}")
        if self.latent_dim < 0:
            raise ValueError(f"latent_dim must be >= 0, got {self.latent_dim}")
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
        no = dict(self.noise or {})
        self.noise = {m: float(no.get(m, _DEFAULT_NOISE.get(m, 0.8))) for m in self.dims}
        for m, s in self.noise.items():
            if s <= 0:
                raise ValueError(f"modality {m!r}: noise must be > 0 (the conditionals need it), got {s}")
        #: class codes kappa, (K, Q)
        self.codes = class_codes(self.num_classes)
        q = self.codes.shape[1]
        reads = dict(self.reads or {})
        self.reads = {m: int(reads.get(m, i % q)) for i, m in enumerate(self.dims)}
        for m, r in self.reads.items():
            if not 0 <= r < q:
                raise ValueError(f"modality {m!r} reads code {r}; there are {q} codes (0..{q - 1})")

        rng = np.random.default_rng(np.random.SeedSequence([int(self.seed), 7919]))
        t, kk, jj, k = self.length, self.num_classes, self.styles, self.latent_dim
        steps = np.arange(t)
        #: class profiles phi_q(t), (Q, T); style profile psi(t), (T,)
        self.class_profiles = 1.0 + 0.5 * np.cos(2 * np.pi * np.arange(q)[:, None] * steps[None] / t)
        self.style_profile = np.sin(2 * np.pi * steps / t) if t > 1 else np.ones(1)
        #: style values lambda_j, (J,): +-1 for J = 2, evenly spread in [-1, 1] otherwise
        self.style_values = np.linspace(-1.0, 1.0, jj) if jj > 1 else np.zeros(1)
        #: time correlation R of the shared latent, (T, T)
        self.time_corr = self.ar_coef ** np.abs(steps[:, None] - steps[None, :])
        self.code_weights: dict[str, np.ndarray] = {}
        self.class_dirs: dict[str, np.ndarray] = {}
        self.style_dirs: dict[str, np.ndarray] = {}
        self.weights: dict[str, np.ndarray] = {}
        self.offsets: dict[str, np.ndarray] = {}
        for m, c in self.dims.items():
            w = np.full(q, float(self.weak_weight))
            w[self.reads[m]] = 1.0
            self.code_weights[m] = w  # w_{m,q}, (Q,)
            self.class_dirs[m] = np.stack([_unit(rng, c) for _ in range(q)], axis=1)  # D_{m,q}, (C_m, Q)
            self.style_dirs[m] = _unit(rng, c)  # E_m, (C_m,)
            self.weights[m] = self.latent_gain * rng.standard_normal((c, k)) / np.sqrt(max(k, 1))  # W_m
            self.offsets[m] = 0.5 * rng.standard_normal(c)  # b_m
        self._cache: dict[tuple[tuple[str, ...], str], _Conditional] = {}

    # ------------------------------------------------------------------ structure

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.dims)

    @property
    def num_components(self) -> int:
        """``K * J``: component ``n = c * J + j``."""
        return self.num_classes * self.styles

    @property
    def component_class(self) -> np.ndarray:
        """The class of each component, ``(K J,)``."""
        return np.repeat(np.arange(self.num_classes), self.styles)

    def _check_modality(self, m: str) -> None:
        if m not in self.dims:
            raise ValueError(f"unknown modality {m!r}; known: {list(self.dims)}")

    def component_means(self, modality: str) -> np.ndarray:
        """``mu_{m,c,j}`` for every component ``n = c J + j``, ``(K J, C_m, T)``."""
        self._check_modality(modality)
        m = modality
        cls = np.einsum("q,cq,dq,qt->cdt", self.code_weights[m], self.codes, self.class_dirs[m], self.class_profiles)
        sty = np.einsum("j,d,t->jdt", self.style_values, self.style_dirs[m], self.style_profile)
        mu = (self.class_amplitude * cls[:, None] + self.style_amplitude * sty[None]
              + self.offsets[m][None, None, :, None])
        return mu.reshape(self.num_components, self.dims[m], self.length)

    def mean(self, modality: str) -> np.ndarray:
        """Component means of ``vec(x_m)``, ``(K J, C_m * T)``."""
        return self.component_means(modality).reshape(self.num_components, -1)

    def cross_cov(self, m: str, n: str) -> np.ndarray:
        """``Cov(vec x_m, vec x_n)`` within a component (the same for all), ``(C_m T, C_n T)``."""
        self._check_modality(m)
        self._check_modality(n)
        cov = self.latent_std**2 * np.kron(self.weights[m] @ self.weights[n].T, self.time_corr)
        if m == n:
            cov = cov + self.noise[m] ** 2 * np.eye(cov.shape[0])
        return cov

    def covariance(self, mods: Sequence[str]) -> np.ndarray:
        """Joint within-component covariance of the concatenated ``vec(x_m)`` for ``mods`` in order."""
        return np.block([[self.cross_cov(a, b) for b in mods] for a in mods])

    # ------------------------------------------------------------------ sampling

    def sample(self, n: int, seed: int | np.random.SeedSequence = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """``n`` joint samples: (features ``{m: (n, C_m, T)}`` float64, classes ``(n,)``, styles ``(n,)``).

        Classes are balanced (``n // K`` or one more per class, in random order); styles uniform.
        """
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        rng = np.random.default_rng(seed)
        k, t = self.latent_dim, self.length
        classes = rng.permutation(np.arange(n) % self.num_classes)
        styles = rng.integers(0, self.styles, size=n)
        comp = classes * self.styles + styles
        chol_t = np.linalg.cholesky(self.time_corr + 1e-12 * np.eye(t))
        s = self.latent_std * np.einsum("ts,nks->nkt", chol_t, rng.standard_normal((n, k, t)))
        feats = {}
        for m, c in self.dims.items():
            x = self.component_means(m)[comp] + np.einsum("ck,nkt->nct", self.weights[m], s)
            feats[m] = x + self.noise[m] * rng.standard_normal((n, c, t))
        return feats, classes, styles

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
        feats, classes, styles = self.sample(n, s_feat)
        labels = self.labels_for(classes, s_lab)
        ds = MultimodalDataset(
            {m: x.astype(np.float32) for m, x in feats.items()},
            labels,
            self.task,
            num_classes=self.num_classes if self.task == "classification" else None,
            extras={"true_class": classes.astype(np.int64), "style": styles.astype(np.int64)},
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
            dst_means = np.zeros((self.num_components, 0))
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
        """``log p(c, j | x_S)`` per component, ``(B, K J)`` (uniform component prior)."""
        # whiten x and the means separately: one (B, Ds) x (Ds, Ds) product instead of K J
        white = (flat @ cond.white_ss.T)[:, None, :] - (cond.src_means @ cond.white_ss.T)[None]  # (B, KJ, Ds)
        maha = np.einsum("bkd,bkd->bk", white, white)
        logits = -0.5 * maha
        return logits - _logsumexp(logits, axis=1, keepdims=True)

    def _class_posterior(self, flat: np.ndarray, cond: _Conditional) -> np.ndarray:
        comp = np.exp(self._log_posterior(flat, cond))
        return comp.reshape(len(flat), self.num_classes, self.styles).sum(axis=2)

    def class_posterior(self, x_src: Any, src: Sources) -> Any:
        """``p(c | x_src)``, ``(B, K)``: exact, summing the Gaussian components over styles."""
        mods = self._sources(src)
        flat = self._flatten(x_src, mods)
        return _like(self._class_posterior(flat, self._conditional(mods, None)), _first(x_src))

    def _component_means(self, flat: np.ndarray, cond: _Conditional) -> np.ndarray:
        """``mu_{D|cj} + A (x_S - mu_{S|cj})`` for every component, ``(B, K J, Dd)``."""
        base = cond.dst_means - cond.src_means @ cond.gain.T  # (KJ, Dd)
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
        diff = y[:, None, :] - self._component_means(flat, cond)  # (B, KJ, Dd)
        b, kk, d = diff.shape
        white = np.linalg.solve(cond.chol_cond, diff.reshape(b * kk, d).T).T.reshape(b, kk, d)
        comp = -0.5 * (white**2).sum(-1) - 0.5 * cond.logdet_cond - 0.5 * d * np.log(2 * np.pi)
        return _like(_logsumexp(logpost + comp, axis=1), _first(x_src))

    def sample_conditional(self, x_src: Any, src: Sources, dst: str, seed: int = 0) -> Any:
        """One draw of ``x_dst ~ p(x_dst | x_src)`` per input, ``(B, C_dst, T)``.

        Draws a component ``(c, j) ~ p(c, j | x_src)``, then
        ``x_dst = mu_{D|cj} + A (x_src - mu_{S|cj}) + L_{D|S} z``.
        """
        mods = self._sources(src)
        flat = self._flatten(x_src, mods)
        cond = self._conditional(mods, dst)
        rng = np.random.default_rng(seed)
        post = np.exp(self._log_posterior(flat, cond))
        cdf = np.cumsum(post, axis=1)
        u = rng.random((flat.shape[0], 1))
        comp_id = np.minimum((u > cdf).sum(axis=1), self.num_components - 1)
        comp = self._component_means(flat, cond)[np.arange(flat.shape[0]), comp_id]
        z = rng.standard_normal(comp.shape)
        draw = comp + z @ cond.chol_cond.T
        return _like(draw.reshape(-1, self.dims[dst], self.length), _first(x_src))

    # ------------------------------------------------------------------ exact references

    def bayes_predictions(self, ds: MultimodalDataset, mask: np.ndarray | None = None) -> np.ndarray:
        """``argmax_c p(c | x_S(i))`` for every sample ``i`` of ``ds``, ``(N,)``, where ``S(i)`` is the
        set of modalities ``mask[i]`` marks present (``mask`` ``(N, M)``, columns in ``ds.modalities``
        order; None = every modality). A sample with no modality gets the prior's guess (class 0:
        the classes are equally likely)."""
        mods = tuple(ds.modalities)
        for m in mods:
            self._check_modality(m)
        mask = np.ones((len(ds), len(mods)), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if mask.shape != (len(ds), len(mods)):
            raise ValueError(f"mask must be (N, M) = {(len(ds), len(mods))}, got {mask.shape}")
        pred = np.zeros(len(ds), dtype=np.int64)
        for pattern in {tuple(row) for row in mask.tolist()}:
            rows = np.flatnonzero((mask == np.asarray(pattern)).all(axis=1))
            src = tuple(m for m, keep in zip(mods, pattern) if keep)
            if not src:
                continue
            post = self.class_posterior({m: ds.features[m][rows] for m in src}, src)
            pred[rows] = np.argmax(post, axis=1)
        return pred

    def bayes_accuracy(self, ds: MultimodalDataset, src: Sources) -> float:
        """Accuracy of the Bayes classifier ``argmax_c p(c | x_src)`` on ``ds`` (uses its true classes)."""
        mods = self._sources(src)
        mask = np.array([[m in mods for m in ds.modalities]] * len(ds), dtype=bool)
        return self.bayes_accuracy_masked(ds, mask)

    def bayes_accuracy_masked(self, ds: MultimodalDataset, mask: np.ndarray | None = None) -> float:
        """Accuracy of :meth:`bayes_predictions` under a presence ``mask`` (see there): the exact
        reference of a missing-modality setting on that test split."""
        truth = ds.extras.get("true_class", ds.class_labels())
        return float((self.bayes_predictions(ds, mask) == truth).mean())

    def difficulty(self, ds: MultimodalDataset) -> dict[str, float]:
        """Bayes accuracy of every non-empty pattern of available modalities on ``ds``
        (``{"L": ..., "L+A": ..., "L+A+V": ...}``)."""
        mods = tuple(ds.modalities)
        out = {}
        for r in range(1, len(mods) + 1):
            for sub in itertools.combinations(mods, r):
                out["+".join(sub)] = self.bayes_accuracy(ds, sub)
        return out


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
    holds the class (for regression too) and ``extras["style"]`` the style. Extra keyword arguments
    go to :class:`SyntheticLAV`.
    """
    gen = SyntheticLAV(
        seed=seed, num_classes=num_classes, length=length, dims=dict(dims or DEFAULT_DIMS), task=task, **params
    )
    seeds = np.random.SeedSequence([int(seed), 104729]).spawn(3)
    return {
        name: gen.dataset(n, s)
        for name, n, s in (("train", n_train, seeds[0]), ("valid", n_valid, seeds[1]), ("test", n_test, seeds[2]))
    }


if __name__ == "__main__":  # python -m flowtransfer.data.synthetic: the defaults' difficulty
    _test = make_synthetic(seed=0)["test"]
    for _name, _acc in _test.generator.difficulty(_test).items():
        print(f"Bayes accuracy {_name:7s} {_acc:.3f}")
