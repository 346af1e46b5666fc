r"""SMIL: multimodal learning with severely missing modality (Ma et al., AAAI 2021).

Setting: the training set mixes :math:`\mathcal D^f` (samples with every modality) and
:math:`\mathcal D^m` (samples lacking the *often-missing* modality :math:`m^\star`, e.g. only
:math:`\eta` = 10% / 20% of samples have it; see
:func:`flowtransfer.data.missing.training_missing_mask`). Tests may have :math:`m^\star` or not.

**Which modality is** :math:`m^\star` (``missing_modality``, default ``"paper"``): the paper's
rule, :func:`paper_missing_modality`. SMIL makes the *text* incomplete on CMU-MOSI and MM-IMDb
("we assume image modality to be complete, and the text modality to be incomplete", Sec. 4.2) and
the *audio* on AV-MNIST (Sec. 4.3): text (``L``) when the data has it, else audio (``A``), else the
last modality. Pass a modality name to choose another; the choice is recorded in ``hparams``.

**Reconstruction** (``reconstruction``): ``"paper"`` takes the weights
:math:`\omega \sim \mathcal N(\mathbf 1, \sigma(x^1))` of the paper. Their mean does not depend on
the input, so at test (:math:`\omega = \mathbf 1`) the reconstruction is the **same constant for
every sample** (the mean of the priors); it is still fed to the fusion as a present modality (that
is SMIL's design: the fusion never learns a separate absent-modality path). With ``m* = L`` on
MOSI, where text is the informative modality, that constant text makes up most of the training
signal when the training data are complete (the inner step always sees it, and half the outer
loss), which is why such a run falls far below zero filling even at MR 0 (issue 11).
``"official"`` (the released code, also registered as ``smil_official``) makes the weights
input-dependent and deterministic, :math:`w = \mathrm{softplus}(g(x^1))`, so the reconstruction
varies with the available modalities; benchmark both.

Model (:class:`SMIL`):

* **Main network** :math:`f_\theta`: the shared :class:`~flowtransfer.methods.fusion_model.FusionModel`
  (extractors to width ``d``, fusion, head).
* **Modality priors** :math:`\mathcal M = \{M_k\}_{k=1}^K`: k-means centres (:func:`kmeans`, seeded,
  ``K = num_priors``, default 10) of :math:`m^\star`'s **input** features ``(C, T)`` over the complete
  training samples (:meth:`SMIL.fit_priors`, called by :meth:`SMIL.prepare`).
* **Reconstruction network** :math:`\phi_c` (:class:`PriorReconstruction`): from the available
  modalities' pooled features it predicts :math:`\sigma`, and
  :math:`\omega \sim \mathcal N(\mathbf 1, \mathrm{diag}\,\sigma^2)`,
  :math:`\hat x^{\star} = \frac1K\langle\omega,\mathcal M\rangle = \frac1K\sum_k \omega_k M_k`
  (sampled in training, :math:`\omega = \mathbf 1` at test).
* **Regularisation network** :math:`\phi_r` (:class:`FeatureRegulariser`): from the fused
  representation :math:`h` it predicts :math:`(\mu, \sigma)`, :math:`r \sim \mathcal N(\mu, \sigma^2)`
  and :math:`h \leftarrow h + \mathrm{softplus}(r)` (or :math:`h \odot \mathrm{softplus}(r)`);
  :math:`r = \mu` at test.
* **Bayesian meta-learning** (:meth:`SMIL.loss`, Algorithm 1): per batch, an inner SGD step on
  :math:`\theta` with the task loss of :math:`\mathcal D^m` rows (their :math:`m^\star` reconstructed,
  :math:`z = \{\omega, r\}` sampled), :math:`\theta^* = \theta - \alpha\nabla_\theta\mathcal L(\mathcal D^m)`,
  computed with ``torch.func.functional_call``; then the outer loss on :math:`\mathcal D^f` rows under
  :math:`\theta^*` averaged over ``mc_samples`` draws of :math:`z`, plus the KL term
  :math:`\mathrm{KL}[q(\omega)\|\mathcal N(\mathbf 1, I)] + \mathrm{KL}[q(r)\|\mathcal N(0, I)]`
  (:func:`gaussian_kl`). The trainer's optimiser then updates :math:`\theta` and
  :math:`\psi = \{\phi_c, \phi_r\}` with the gradient of that scalar.

Departures from the paper and the released code (METHODS.md §4.3):

* **Scale of the reconstruction.** The paper writes :math:`\langle\omega,\mathcal M\rangle`
  with :math:`\omega \sim \mathcal N(\mathbf 1,\sigma)`, whose mean is the *sum* of the K priors,
  K times the scale of real features fed to the same extractor. We divide by K: at test the
  reconstruction is the mean of the priors. ``reconstruction="official"`` uses the released code's
  deterministic, input-dependent weights instead: :math:`w = \mathrm{softplus}(\mathrm{FC}(x^1))`,
  :math:`\hat x^\star = \sum_k w_k M_k / \sum_k w_k` (no sampling, no :math:`\omega` KL).
* **Priors in the input space** of :math:`m^\star`, fixed before training; the released code clusters
  a pre-trained sound network's features. The input space keeps the priors valid while the
  extractors train. ``prepare(train_dataset)`` must run before training (the trainer calls it).
* **Outer loss on** :math:`\mathcal D^f`: the mean of the task loss with the real :math:`m^\star`
  and with the reconstructed one (the paper's Eq. 7 on :math:`\mathcal D^f` leaves :math:`\phi_c`
  without a first-order gradient; the released code uses the reconstructed path plus
  ``0.01`` feature MSE, kept here as ``feature_match_weight``). With ``include_inner_loss``
  (default, as the released code) the inner loss is added to the outer one, so
  :math:`\mathcal D^m` also trains :math:`\theta` directly.
* **Second order by default** (``first_order=False``: ``create_graph=True``, the paper's MAML);
  ``first_order=True`` detaches the inner gradient (FOMAML), much cheaper. One inner step by
  default (``inner_steps``), as the released code.
* **Batches without one of the two sets.** Without :math:`\mathcal D^f` rows the loss is the
  :math:`\mathcal D^m` task loss under :math:`\theta` (no meta step); without :math:`\mathcal D^m` rows
  the inner step uses the :math:`\mathcal D^f` rows with :math:`m^\star` hidden.
* **No meta step without gradients.** Under ``torch.no_grad`` (validation loss) the loss is
  the outer objective under :math:`\theta` (no inner step).
* **More than two modalities.** :math:`m^\star` is ``missing_modality`` (default: the paper's
  rule above); the others are treated as available: where one of them is absent it is zero-filled
  and the fusion gets the mask, as in ``zero_fill``.
* **Model selection on validation** only (the released code keeps the checkpoint with the best
  *test* accuracy). KL prior :math:`p(z)` (unspecified in the paper): :math:`\mathcal N(\mathbf 1, I)`
  for :math:`\omega`, :math:`\mathcal N(0, I)` for :math:`r`; its weight ``kl_weight`` multiplies the
  per-sample KL summed over dimensions and averaged over the batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from flowtransfer.data.dataset import Batch
from flowtransfer.models.extractors import common_length

from .base import Method, register_method
from .fusion_model import FusionModel
from .simple import _fusion_config, zero_loss

__all__ = [
    "kmeans",
    "gaussian_kl",
    "PriorReconstruction",
    "FeatureRegulariser",
    "SMIL",
    "RECONSTRUCTIONS",
    "PAPER_MISSING_ORDER",
    "paper_missing_modality",
]

#: reconstruction variants: ``paper`` (omega ~ N(1, sigma), constant at test), ``official``
#: (input-dependent deterministic weights)
RECONSTRUCTIONS = ("paper", "official")

#: the paper's choice of the incomplete modality, in order of preference: text (CMU-MOSI, MM-IMDb;
#: Ma et al. 2021, Sec. 4.2), then audio (AV-MNIST, Sec. 4.3)
PAPER_MISSING_ORDER: tuple[str, ...] = ("L", "A")


def paper_missing_modality(modalities: tuple[str, ...] | list[str]) -> str:
    """SMIL's :math:`m^\\star` for a dataset with these modalities: the first of
    :data:`PAPER_MISSING_ORDER` it has (text, then audio), else its last modality."""
    mods = tuple(modalities)
    if not mods:
        raise ValueError("paper_missing_modality: no modalities")
    for m in PAPER_MISSING_ORDER:
        if m in mods:
            return m
    return mods[-1]


# --------------------------------------------------------------------------------------------------
# k-means priors
# --------------------------------------------------------------------------------------------------


def kmeans(x: Tensor | np.ndarray, k: int, iters: int = 100, seed: int = 0, tol: float = 1e-7) -> tuple[Tensor, Tensor]:
    r"""Lloyd's k-means with k-means++ seeding, deterministic given ``seed``.

    Minimises :math:`\sum_n \min_k \|x_n - c_k\|^2`. An empty cluster is re-seeded with the point
    farthest from its centre.

    Args:
        x: ``(N, D)`` points (any float dtype; computed in float64).
        k: number of centres, ``1 <= k <= N``.
        iters: maximum Lloyd iterations.
        seed: seeds the k-means++ draws.
        tol: stop when no centre moves more than this (max abs change).

    Returns:
        ``(centres (k, D), assignment (N,) int64)``, centres in ``x``'s dtype.
    """
    x = torch.as_tensor(x)
    if x.dim() != 2:
        raise ValueError(f"kmeans expects (N, D) points, got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= int(k) <= n:
        raise ValueError(f"kmeans: k must be in [1, N={n}], got {k}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("kmeans: points contain NaN or inf")
    dtype = x.dtype if x.is_floating_point() else torch.float32
    xd = x.double()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    # k-means++ seeding
    first = int(torch.randint(n, (1,), generator=gen))
    centres = [xd[first]]
    d2 = ((xd - centres[0]) ** 2).sum(1)
    for _ in range(1, int(k)):
        total = float(d2.sum())
        if total <= 0.0:  # fewer distinct points than k: pick any remaining index
            idx = int(torch.randint(n, (1,), generator=gen))
        else:
            idx = int(torch.multinomial((d2 / total).float().cpu(), 1, generator=gen))
        centres.append(xd[idx])
        d2 = torch.minimum(d2, ((xd - xd[idx]) ** 2).sum(1))
    c = torch.stack(centres)
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(int(iters)):
        dist = torch.cdist(xd, c) ** 2
        assign = dist.argmin(1)
        new = torch.zeros_like(c).index_add_(0, assign, xd)
        counts = torch.bincount(assign, minlength=int(k)).double()
        empty = counts == 0
        new = new / counts.clamp_min(1.0)[:, None]
        if bool(empty.any()):
            far = dist.gather(1, assign[:, None]).squeeze(1)
            order = far.argsort(descending=True)
            for j, e in enumerate(torch.nonzero(empty).flatten().tolist()):
                new[e] = xd[order[j]]
        shift = float((new - c).abs().max())
        c = new
        if shift <= tol:
            break
    assign = (torch.cdist(xd, c) ** 2).argmin(1)
    return c.to(dtype), assign


def gaussian_kl(mu: Tensor, logvar: Tensor, prior_mu: float | Tensor = 0.0,
                prior_logvar: float | Tensor = 0.0) -> Tensor:
    r"""Elementwise :math:`\mathrm{KL}[\mathcal N(\mu, e^{v}) \,\|\, \mathcal N(\mu_0, e^{v_0})]`.

    .. math:: \tfrac12\Big(v_0 - v + \frac{e^{v} + (\mu - \mu_0)^2}{e^{v_0}} - 1\Big)

    Same shape as ``mu``; sum over the dimensions for a diagonal Gaussian.
    """
    prior_mu = torch.as_tensor(prior_mu, dtype=mu.dtype, device=mu.device)
    prior_logvar = torch.as_tensor(prior_logvar, dtype=mu.dtype, device=mu.device)
    return 0.5 * (prior_logvar - logvar + (logvar.exp() + (mu - prior_mu) ** 2) / prior_logvar.exp() - 1.0)


# --------------------------------------------------------------------------------------------------
# reconstruction and regularisation networks (psi)
# --------------------------------------------------------------------------------------------------


class PriorReconstruction(nn.Module):
    r"""SMIL's reconstruction network :math:`\phi_c` over ``K`` modality priors.

    ``paper``: :math:`\sigma = \mathrm{softplus}(g(c)) + 10^{-4}`, :math:`\omega = \mathbf 1 + \sigma \odot
    \epsilon` (sampled) or :math:`\mathbf 1` (mean), :math:`\hat x = \frac1K\sum_k \omega_k M_k`.
    ``official``: :math:`w = \mathrm{softplus}(g(c)) + 10^{-6}`, :math:`\hat x = \sum_k w_k M_k / \sum_k w_k`.
    :math:`g` is ``Linear(context_dim, hidden) -> ReLU -> Linear(hidden, K)``.

    Buffers: ``priors`` ``(K, C, T)`` (set with :meth:`set_priors`), ``fitted``.

    Shapes: ``forward(context (B, context_dim), sample) -> (x_hat (B, C, T), omega (B, K), logvar (B, K) or None)``.
    """

    def __init__(self, context_dim: int, num_priors: int, prior_shape: tuple[int, int], hidden: int = 64,
                 mode: str = "paper") -> None:
        super().__init__()
        if mode not in RECONSTRUCTIONS:
            raise ValueError(f"unknown reconstruction {mode!r}; expected one of {RECONSTRUCTIONS}")
        if num_priors < 1:
            raise ValueError(f"num_priors must be >= 1, got {num_priors}")
        self.mode = mode
        self.num_priors = int(num_priors)
        self.net = nn.Sequential(nn.Linear(context_dim, hidden), nn.ReLU(), nn.Linear(hidden, num_priors))
        self.register_buffer("priors", torch.zeros(num_priors, *prior_shape))
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def set_priors(self, priors: Tensor) -> None:
        """Store ``(K, C, T)`` priors."""
        priors = torch.as_tensor(priors)
        if tuple(priors.shape) != tuple(self.priors.shape):
            raise ValueError(f"priors: expected shape {tuple(self.priors.shape)}, got {tuple(priors.shape)}")
        self.priors.copy_(priors.to(self.priors))
        self.fitted.fill_(True)

    def forward(self, context: Tensor, sample: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        if not bool(self.fitted):
            raise RuntimeError("SMIL priors are not fitted: call prepare(train_dataset) / fit_priors first")
        out = self.net(context)
        if self.mode == "official":
            w = F.softplus(out) + 1e-6
            x_hat = torch.einsum("bk,kct->bct", w / w.sum(1, keepdim=True), self.priors)
            return x_hat, w, None
        sigma = F.softplus(out) + 1e-4
        omega = 1.0 + sigma * torch.randn_like(sigma) if sample else torch.ones_like(sigma)
        x_hat = torch.einsum("bk,kct->bct", omega, self.priors) / self.num_priors
        return x_hat, omega, 2.0 * sigma.log()


class FeatureRegulariser(nn.Module):
    r"""SMIL's uncertainty-guided feature regularisation :math:`\phi_r`.

    :math:`(\mu, \log\sigma^2) = \phi_r(h)`, :math:`r = \mu + \sigma\odot\epsilon` (sampled) or
    :math:`\mu`; ``op="add"``: :math:`h + \mathrm{softplus}(r)`, ``op="mul"``: :math:`h \odot \mathrm{softplus}(r)`.
    The last layer starts at zero (:math:`\mu = 0, \sigma = 1`).

    Shapes: ``forward(h (B, D), sample) -> (h' (B, D), mu (B, D), logvar (B, D))``.
    """

    def __init__(self, dim: int, hidden: int = 64, op: str = "add") -> None:
        super().__init__()
        if op not in ("add", "mul"):
            raise ValueError(f"op must be 'add' or 'mul', got {op!r}")
        self.op = op
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * dim))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, h: Tensor, sample: bool) -> tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.net(h).chunk(2, dim=-1)
        logvar = logvar.clamp(-10.0, 10.0)
        r = mu + (0.5 * logvar).exp() * torch.randn_like(mu) if sample else mu
        s = F.softplus(r)
        return (h + s if self.op == "add" else h * s), mu, logvar


# --------------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------------


class _MainNetwork(FusionModel):
    """:math:`f_\\theta` with a ``forward`` for ``functional_call``: extract, fuse, regularise, predict."""

    def forward(self, features: Mapping[str, Tensor], present: Tensor, regulariser: FeatureRegulariser,
                sample: bool) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        length = common_length({m: x.shape[-1] for m, x in features.items()}, self.config.target_length)
        h = {m: self.extractors[m](features[m], length) for m in self.modalities}
        z, mu, logvar = regulariser(self.fusion(h, present), sample)
        return self.head(z), mu, logvar, h


class SMIL(Method):
    r"""SMIL (Ma et al., AAAI 2021) in the common framework; see the module docstring.

    Args:
        info: dataset description.
        config, preset, **overrides: the main network's :class:`~flowtransfer.methods.presets.FusionConfig`.
        missing_modality: :math:`m^\star`: a modality name, or ``"paper"`` (default) for the
            paper's rule (:func:`paper_missing_modality`: text, else audio, else the last).
        num_priors: K (k-means centres).
        reconstruction: ``"paper"`` (:math:`\omega\sim\mathcal N(1,\sigma)`: the mean of the
            priors at test, the same for every sample) or ``"official"`` (input-dependent weights).
        regularisation: ``"add"`` or ``"mul"``.
        inner_lr: :math:`\alpha`; inner_steps: K of Algorithm 1; first_order: FOMAML.
        mc_samples: L Monte-Carlo draws of :math:`z` in the outer loss.
        kl_weight: weight of the KL term.
        feature_match_weight: MSE between extracted real and reconstructed :math:`m^\star` on
            :math:`\mathcal D^f` (released code: 0.01).
        include_inner_loss: add the inner loss to the returned loss.
        hidden: width of :math:`\phi_c` and :math:`\phi_r`.
        kmeans_iters, seed: k-means settings.
    """

    name = "smil"

    def __init__(self, info: Any, config: Any = None, *, preset: str | None = None,
                 missing_modality: str | None = "paper", num_priors: int = 10, reconstruction: str = "paper",
                 regularisation: str = "add", inner_lr: float = 1e-3, inner_steps: int = 1,
                 first_order: bool = False, mc_samples: int = 1, kl_weight: float = 1e-3,
                 feature_match_weight: float = 0.01, include_inner_loss: bool = True, hidden: int = 64,
                 kmeans_iters: int = 100, seed: int = 0, **overrides: Any) -> None:
        super().__init__(info)
        if len(self.modalities) < 2:
            raise ValueError("SMIL needs two or more modalities")
        if reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"unknown reconstruction {reconstruction!r}; expected one of {RECONSTRUCTIONS}")
        star = paper_missing_modality(self.modalities) if missing_modality in (None, "paper") else missing_modality
        if star not in self.modalities:
            raise KeyError(f"SMIL: unknown missing_modality {star!r}; known: {list(self.modalities)}")
        if inner_steps < 1 or mc_samples < 1:
            raise ValueError(f"inner_steps and mc_samples must be >= 1, got {inner_steps}, {mc_samples}")
        self.missing_modality = star
        self.star = self.modalities.index(star)
        self.backbone_config = _fusion_config(config, preset, overrides)
        self.main = _MainNetwork(self.info, self.backbone_config, name="smil_main")
        d = self.backbone_config.d
        others = len(self.modalities) - 1
        self.reconstructor = PriorReconstruction(others * d + others, num_priors,
                                                 (self.info.input_dims[star], self.info.seq_lens[star]),
                                                 hidden, reconstruction)
        self.regulariser = FeatureRegulariser(self.main.fusion.out_dim, hidden, regularisation)
        self.options = {
            "missing_modality": star, "num_priors": int(num_priors), "reconstruction": reconstruction,
            "regularisation": regularisation, "inner_lr": float(inner_lr), "inner_steps": int(inner_steps),
            "first_order": bool(first_order), "mc_samples": int(mc_samples), "kl_weight": float(kl_weight),
            "feature_match_weight": float(feature_match_weight), "include_inner_loss": bool(include_inner_loss),
            "hidden": int(hidden), "kmeans_iters": int(kmeans_iters), "seed": int(seed),
        }

    @property
    def hparams(self) -> dict[str, Any]:
        return {"name": self.name, "dataset_info": self.info.to_dict(),
                "config": {"config": self.backbone_config.to_dict(), **self.options}}

    # ------------------------------------------------------------------ priors
    @torch.no_grad()
    def fit_priors(self, dataset: Any) -> Tensor:
        """k-means priors of :math:`m^\\star`'s input features over the training samples that have it.

        Returns the ``(K, C, T)`` priors (also stored in ``reconstructor.priors``).
        """
        names = tuple(dataset.modalities)
        if names != self.modalities:
            raise ValueError(f"dataset modalities {list(names)} differ from the model's {list(self.modalities)}")
        rows = np.asarray(dataset.mask, dtype=bool)[:, self.star]
        k = self.options["num_priors"]
        if int(rows.sum()) < k:
            raise ValueError(
                f"SMIL needs at least num_priors={k} training samples with {self.missing_modality!r}, "
                f"got {int(rows.sum())}"
            )
        x = torch.as_tensor(np.asarray(dataset.features[self.missing_modality])[rows])
        centres, _ = kmeans(x.reshape(x.shape[0], -1), k, self.options["kmeans_iters"], self.options["seed"])
        priors = centres.reshape(k, *x.shape[1:])
        self.reconstructor.set_priors(priors)
        return priors

    def prepare(self, dataset: Any) -> None:
        """Called once with the training set before training: fits the modality priors."""
        self.fit_priors(dataset)

    # ------------------------------------------------------------------ forward pieces
    def _context(self, params: dict[str, Tensor] | None, batch: Batch, present: Tensor) -> Tensor:
        """Time-pooled extracted features of the other modalities (zeros where absent) and their
        presence bits, ``(B, (M-1) d + M - 1)``; the extractors run under ``params`` when given."""
        parts, bits = [], []
        for j, m in enumerate(self.modalities):
            if j == self.star:
                continue
            x = torch.where(present[:, j, None, None], batch.features[m],
                            torch.zeros((), dtype=batch.features[m].dtype, device=present.device))
            extractor = self.main.extractors[m]
            if params is None:
                h = extractor(x)
            else:
                prefix = f"extractors.{m}."
                h = functional_call(extractor, {k[len(prefix):]: v for k, v in params.items()
                                                if k.startswith(prefix)}, (x,))
            parts.append(h.mean(dim=-1))
            bits.append(present[:, j:j + 1].to(h.dtype))
        return torch.cat(parts + bits, dim=1)

    def _run(self, params: dict[str, Tensor] | None, batch: Batch, reconstruct: Tensor, sample: bool
             ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Predictions of :math:`f_\\theta` (``params`` None: the module's own) with :math:`m^\\star`
        reconstructed in the rows ``reconstruct``; returns ``(pred, kl (B,), extras)``."""
        present = batch.mask
        feats = {}
        for j, m in enumerate(self.modalities):
            x = batch.features[m]
            feats[m] = torch.where(present[:, j, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        kl = present.new_zeros(len(batch), dtype=feats[self.modalities[0]].dtype)
        extras: dict[str, Tensor] = {}
        if bool(reconstruct.any()):
            ctx = self._context(params, batch, present)
            x_hat, omega, logvar = self.reconstructor(ctx, sample)
            star = self.missing_modality
            feats[star] = torch.where(reconstruct[:, None, None], x_hat, feats[star])
            present = present.clone()
            present[:, self.star] = present[:, self.star] | reconstruct
            if logvar is not None:
                kl = kl + torch.where(reconstruct, gaussian_kl(torch.ones_like(logvar), logvar, 1.0, 0.0).sum(1),
                                      torch.zeros_like(kl))
            extras["x_hat"] = x_hat
        args = (feats, present, self.regulariser, sample)
        if params is None:
            pred, mu, logvar_r, h = self.main(*args)
        else:
            pred, mu, logvar_r, h = functional_call(self.main, params, args)
        kl = kl + gaussian_kl(mu, logvar_r).sum(1)
        extras["h_star"] = h[self.missing_modality]
        return pred, kl, extras

    def _task(self, pred: Tensor, labels: Tensor) -> Tensor:
        return self.main._task_loss(pred, labels)

    # ------------------------------------------------------------------ interface
    def predict(self, batch: Batch) -> Tensor:
        """:math:`m^\\star` reconstructed with :math:`\\omega = 1` where absent, :math:`r = \\mu`."""
        self._check_batch(batch)
        pred, _, _ = self._run(None, batch, ~batch.present(self.missing_modality), sample=False)
        return pred

    def recover(self, batch: Batch) -> dict[str, Tensor]:
        """The reconstructed :math:`m^\\star` in the extracted feature space (NaN where present)."""
        self._check_batch(batch)
        absent = ~batch.present(self.missing_modality)
        _, _, extras = self._run(None, batch, absent, sample=False)
        h = extras["h_star"]
        return {self.missing_modality: torch.where(absent[:, None, None], h, torch.full_like(h, float("nan")))}

    def encode(self, batch: Batch) -> dict[str, Tensor]:
        return self.main.encode(batch)

    def _sub(self, batch: Batch, rows: Tensor, hide_star: bool = False) -> Batch:
        mask = batch.mask[rows].clone()
        feats = {m: x[rows] for m, x in batch.features.items()}
        if hide_star:
            mask[:, self.star] = False
            x = feats[self.missing_modality]
            feats[self.missing_modality] = torch.full_like(x, float("nan"))
        return Batch(features=feats, mask=mask, labels=batch.labels[rows], modalities=batch.modalities)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Algorithm 1 on one batch: inner step on :math:`\\mathcal D^m`, outer loss on :math:`\\mathcal D^f`."""
        self._check_batch(batch)
        opt = self.options
        has = batch.present(self.missing_modality)
        complete, incomplete = has, ~has
        sample = self.training
        parts: dict[str, float] = {}
        if not bool(complete.any()):
            # no D^f rows: plain task loss on D^m under theta
            d_m = self._sub(batch, incomplete)
            pred, kl, _ = self._run(None, d_m, torch.ones(len(d_m), dtype=torch.bool, device=has.device), sample)
            task = self._task(pred, d_m.labels)
            total = task + opt["kl_weight"] * kl.mean()
            parts.update(inner=task.detach(), kl=kl.mean().detach())
            parts["loss"] = total.detach()
            return total, parts
        d_f = self._sub(batch, complete)
        d_m = self._sub(batch, incomplete) if bool(incomplete.any()) else self._sub(batch, complete, hide_star=True)
        all_m = torch.ones(len(d_m), dtype=torch.bool, device=has.device)
        # meta-train: inner SGD steps on theta with D^m
        theta = {k: p for k, p in self.main.named_parameters() if p.requires_grad}
        meta = self.training and torch.is_grad_enabled()
        inner_total = None
        params: dict[str, Tensor] | None = None
        if meta:
            params = dict(theta)
            for _ in range(opt["inner_steps"]):
                pred, kl_m, _ = self._run(params, d_m, all_m, sample)
                inner = self._task(pred, d_m.labels)
                inner_total = inner if inner_total is None else inner_total
                names = list(params)
                grads = torch.autograd.grad(inner, [params[k] for k in names], create_graph=not opt["first_order"],
                                            retain_graph=True, allow_unused=True)
                params = {k: (params[k] if g is None else
                              params[k] - opt["inner_lr"] * (g.detach() if opt["first_order"] else g))
                          for k, g in zip(names, grads)}
        else:
            pred, kl_m, _ = self._run(None, d_m, all_m, sample)
            inner_total = self._task(pred, d_m.labels)
        # meta-test: outer loss on D^f under theta*, L Monte-Carlo draws of z
        no_rec = torch.zeros(len(d_f), dtype=torch.bool, device=has.device)
        yes_rec = ~no_rec
        outer = d_f.labels.new_zeros((), dtype=torch.float32)
        kl_f = outer
        match = outer
        for _ in range(opt["mc_samples"]):
            pred_real, kl_real, ex_real = self._run(params, d_f, no_rec, sample)
            pred_rec, kl_rec, ex_rec = self._run(params, d_f, yes_rec, sample)
            outer = outer + 0.5 * (self._task(pred_real, d_f.labels) + self._task(pred_rec, d_f.labels))
            kl_f = kl_f + 0.5 * (kl_real.mean() + kl_rec.mean())
            match = match + F.mse_loss(ex_rec["h_star"], ex_real["h_star"].detach())
        outer, kl_f, match = (v / opt["mc_samples"] for v in (outer, kl_f, match))
        kl = 0.5 * (kl_f + kl_m.mean())
        total = outer + opt["kl_weight"] * kl + opt["feature_match_weight"] * match
        if opt["include_inner_loss"]:
            total = total + inner_total
        if meta and not total.requires_grad:  # pragma: no cover - defensive
            total = total + zero_loss(self)
        parts.update(inner=inner_total.detach(), outer=outer.detach(), kl=kl.detach(),
                     feature_match=match.detach(), loss=total.detach())
        return total, parts


@register_method("smil")
def smil(info: Any, config: Any = None, *, preset: str | None = None, **kwargs: Any) -> SMIL:
    """SMIL (Ma et al., AAAI 2021); call ``prepare(train_dataset)`` before training (fits the priors)."""
    return SMIL(info, config, preset=preset, **kwargs)


@register_method("smil_official")
def smil_official(info: Any, config: Any = None, *, preset: str | None = None, **kwargs: Any) -> SMIL:
    """SMIL with the released code's input-dependent reconstruction (``reconstruction="official"``)."""
    if kwargs.setdefault("reconstruction", "official") != "official":
        raise ValueError(f"smil_official uses reconstruction='official', got {kwargs['reconstruction']!r}")
    return SMIL(info, config, preset=preset, **kwargs)
