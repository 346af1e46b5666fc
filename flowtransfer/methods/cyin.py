r"""CyIN: cyclic informative latent space for incomplete multimodal learning (Lin et al., NeurIPS 2025).

Written from the paper and checked against the released code (RH-Lin/CyIN at commit da04a3d, read
only: it has no licence). Sizes follow the code per preset (:data:`CYIN_PRESETS`); every remaining
departure is listed below and, with the code's file and line, in ``docs/CYIN_DEPARTURES.md``.
Per modality :math:`S`:

* **Tokens** :math:`F_S`: the shared extractors bring each modality to width ``d`` and one length
  ``T`` (``(B, d, T)``, as every method here).
* **Token-level IB encoder** :math:`E_S` (``Conv1d(d, 2c, 1)``): a Gaussian per token,
  :math:`B_S = \mu + \sigma\odot\epsilon` in training, :math:`\mu` at test; width ``c = latent_dim``.
* **IB decoders** :math:`D_T` (``Conv1d(c, C_T, 1)``, one per target, shared over sources):
  reconstruct target tokens :math:`f_T` from any latent. With :func:`token_kl` the mean over channels
  of :math:`\mathrm{KL}(\mathcal N(\mu,\sigma^2)\|\mathcal N(0,I))`,

  .. math:: \mathcal L^{S\to T}_{tib} = \frac1L\sum_i \big[\mathrm{KL}_i(S)
            + \beta\,\overline{(f_T^i - D_T(b_S^i))^2}\big],\qquad
            \mathcal L_{tib} = \mathbb E_S\,\mathcal L^{S\to S} + \mathbb E_{S\ne T}\,\mathcal L^{S\to T}

  (the paper's :math:`\mathbb E_{S,T}[\mathcal L^{S\to S} + \frac12(\mathcal L^{S\to T} + \mathcal L^{T\to S})]` over
  ordered pairs).
* **Label-level IB predictors** :math:`P_S` (a head on the time mean of :math:`B_S`):
  :math:`\mathcal L_{lib} = \mathbb E_S[\mathrm{KL}(S) + \beta\,\ell(y, P_S(B_S))]`.
* **Cyclic translation** (:class:`CascadedResidualAE`, one per unordered pair used both ways, as
  the code; ``share_reverse=False``: one per ordered pair):
  :math:`\mathcal L_{tran} = \|B_T - \Gamma_{S\to T}(B_S)\|^2 + \|B_S - \Gamma_{T\to S}(\Gamma_{S\to T}(B_S))\|^2`
  (:func:`translation_loss`, mean over elements, averaged over ordered pairs).
* **Recovery**: a missing latent is the **sum** of the translations from the available modalities,
  :math:`B_i = \sum_{j\,\text{avail}} \Gamma_{j\to i}(B_j)` (``combine="mean"`` averages instead).
* **Fusion** on the latents (``build_fusion``, MulT by default, all slots filled), then the head.
* **Total**: :math:`\mathcal L_{task} + \frac1\beta(\mathcal L_{tib} + \mathcal L_{lib}) + \gamma\,\mathcal L_{tran}`;
  ``kl_weight`` multiplies every KL term.
* **Training** (one model for complete and incomplete inputs): stage 1 (the first
  ``stage1_fraction`` of the planned epochs, fixed by :meth:`CyIN.plan` when training starts, or
  ``stage1_epochs``) uses :math:`\gamma = 0` and the data as given; stage 2 uses :math:`\gamma` and drops modalities per
  sample (each sample its own rate uniform in ``[0, max_rate]``, at least one kept), the dropped
  latents replaced by their recovery. The trainer's ``on_epoch_start`` hook switches stages.

Sizes per preset (from the released code's ``config/config_regression.json``): MOSI (and
``small``) 8 residual autoencoders per translator of widths ``(64, 32, 16)``, :math:`\beta = 16`,
:math:`\gamma = 10`, stage 1 = 10% of the epochs; MOSEI 4 of ``(128, 64, 32)``, :math:`\beta = 32`,
:math:`\gamma = 5`, 30%. Kernel-3 convolutions, one translator per unordered pair used in both
directions, a transition convolution after the cascade, as the code.

Departures from the released code (table with file:line in ``docs/CYIN_DEPARTURES.md``):

* **Features and widths**: the shared shallow extractors and the shared backbone preset (its
  ``d`` is the latent width and the fusion's width) instead of BERT / ImageBind tokens, a 256-wide
  IB encoder hidden layer, a 128 (MOSI) / 256 (MOSEI) bottleneck and a 256 / 16 fusion width: every
  method here shares one backbone so that scores compare handling of missing data, not capacity.
  The IB encoder is one 1x1 convolution (code: two, with a ReLU); the IB decoders are one 1x1
  convolution without the code's sigmoid (targets are standardised features, not in [0, 1]).
* **Reconstruction targets** :math:`f_T` are the raw input features resampled to the common
  length (fixed, like the paper's frozen tokens), because our extractors train.
* **Loss weights**: the token-level IB is the mean of the self terms plus the mean of the cross
  terms (code: one mean over all nine ordered pairs, i.e. weights 1/3 : 2/3); the label-level IB
  is the mean over modalities of ``KL + beta x task`` divided by :math:`\beta` (code: the sum over
  modalities of the task loss, weight 1, no separate KL); the translation loss covers single-source
  translations and their cycles (code: also the two-source sums, /9 each).
* **Means over channels** in the squared errors (so modalities of different widths weigh alike).
* **Identity at initialisation**: each residual autoencoder's last layer and the transition's last
  convolution start at zero, and the transition is residual (code: a plain two-layer transition,
  default initialisation); biases are kept (code: none).
* **Stage-2 missingness**: per sample, rate uniform in ``[0, max_rate]``, dropped latents replaced by
  their recovery (code: per batch, each modality replaced by one of its three translations or kept,
  uniformly).
* **Test time**: latents are the means :math:`\mu` (code: sampled at test as in training).
* **Selection on validation** by the trainer (code: the last epoch's weights; validation is commented
  out). Optimiser, learning rate, clipping and batch size are the benchmark's, shared by every method
  (code: AdamW 5e-4, weight decay 1e-3, clip by value 5, batch 128, 30 epochs on MOSI).
* The encoders' log-variance bias starts at ``init_logvar = -6`` (:math:`\sigma \approx 0.05`): with
  the default :math:`\sigma = 1` the sampled latents of trainable shallow extractors are mostly
  noise at first and the task barely trains (measured on the embedded data).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowtransfer.data.dataset import Batch
from flowtransfer.models.extractors import ModalityExtractors, resample_time
from flowtransfer.models.heads import build_head

from .base import Method, register_method, simulate_missing
from .fusion_model import build_fusion_for, build_head_for, task_loss_for
from .simple import _fusion_config, epochs_from_fraction, planned_epochs

__all__ = [
    "CYIN_PRESETS",
    "token_kl",
    "translation_loss",
    "ResidualAE",
    "CascadedResidualAE",
    "CyIN",
]


def token_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    r"""Per-token :math:`\mathrm{KL}(\mathcal N(\mu,\sigma^2)\|\mathcal N(0, I))` averaged over channels.

    .. math:: -\tfrac12\,\mathbb E_C\big[\log\sigma^2 + 1 - \mu^2 - \sigma^2\big]

    Shapes: ``(B, C, T) -> (B, T)``.
    """
    return -0.5 * (logvar + 1.0 - mu.pow(2) - logvar.exp()).mean(dim=1)


def translation_loss(b_s: Tensor, b_t: Tensor, forward: Callable[[Tensor], Tensor],
                     reverse: Callable[[Tensor], Tensor]) -> Tensor:
    r"""Cyclic translation loss, per sample: ``(B, C, T) -> (B,)``.

    .. math:: \overline{(B_T - \Gamma_{S\to T}(B_S))^2} + \overline{(B_S - \Gamma_{T\to S}(\Gamma_{S\to T}(B_S)))^2}

    (bars: means over channels and tokens).
    """
    fwd = forward(b_s)
    back = reverse(fwd)
    return (b_t - fwd).pow(2).mean(dim=(1, 2)) + (b_s - back).pow(2).mean(dim=(1, 2))


class ResidualAE(nn.Module):
    """Autoencoder over tokens ``c -> w_1 -> ... -> w_k -> ... -> w_1 -> c``, temporal convolutions of
    width ``kernel_size`` (1: token-wise; the released code: 3), LeakyReLU inside the encoder and ReLU
    inside the decoder (as the released code), last layer a zero-initialised 1x1 convolution.

    Shapes: ``(B, c, T) -> (B, c, T)``.
    """

    def __init__(self, dim: int, widths: Sequence[int] = (64, 32, 16), kernel_size: int = 1) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if not widths or min(widths) < 1:
            raise ValueError(f"a residual autoencoder needs positive widths, got {widths}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1 (length-preserving), got {kernel_size}")
        pad = kernel_size // 2
        layers: list[nn.Module] = []
        enc = [dim, *widths]
        for i, (a, b) in enumerate(zip(enc[:-1], enc[1:])):
            layers.append(nn.Conv1d(a, b, kernel_size, padding=pad))
            if i < len(enc) - 2:  # no activation after the bottleneck
                layers.append(nn.LeakyReLU())
        dec = [*reversed(widths), dim]
        for a, b in zip(dec[:-2], dec[1:-1]):
            layers.append(nn.Conv1d(a, b, kernel_size, padding=pad))
            layers.append(nn.ReLU())
        layers.append(nn.Conv1d(dec[-2], dim, 1))
        self.net = nn.Sequential(*layers)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class CascadedResidualAE(nn.Module):
    r"""Cascade of :class:`ResidualAE`: :math:`r_i = \mathrm{RA}_i(x + \sum_{k<i} r_k)`, then
    :math:`y = x + \sum_i r_i` and, with ``transition``, :math:`y + W_2\,\mathrm{ReLU}(W_1 y)`
    (two temporal convolutions of width ``kernel_size``, :math:`W_2` zero-initialised).

    The identity at initialisation. Shapes: ``(B, c, T) -> (B, c, T)``.
    """

    def __init__(self, dim: int, blocks: int = 2, widths: Sequence[int] = (64, 32, 16), kernel_size: int = 1,
                 transition: bool = False) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"a cascade needs >= 1 residual autoencoder, got {blocks}")
        self.blocks = nn.ModuleList(ResidualAE(dim, widths, kernel_size) for _ in range(blocks))
        self.transition: nn.Module | None = None
        if transition:
            pad = kernel_size // 2
            self.transition = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, padding=pad), nn.ReLU(),
                                            nn.Conv1d(dim, dim, kernel_size, padding=pad))
            nn.init.zeros_(self.transition[-1].weight)
            nn.init.zeros_(self.transition[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        acc = torch.zeros_like(x)
        for block in self.blocks:
            acc = acc + block(x + acc)
        y = x + acc
        return y if self.transition is None else y + self.transition(y)


#: CyIN's own sizes per preset, from the released code (RH-Lin/CyIN @ da04a3d,
#: config/config_regression.json: ``RAE_n_blocks``, ``RAE_layers``, ``p_eta`` (beta), ``w_imgaine``
#: (gamma), ``stage_divide``; models/generationBased/CyIN.py: kernel 3, one translator per unordered
#: pair used in both directions, a transition convolution). ``small`` (the tests' and the embedded
#: data's backbone) takes MOSI's. The backbone (extractors, fusion widths) is the shared preset's.
CYIN_PRESETS: dict[str, dict[str, Any]] = {
    "mosi": {"cra_blocks": 8, "cra_widths": (64, 32, 16), "cra_kernel": 3, "cra_transition": True,
             "share_reverse": True, "beta": 16.0, "gamma": 10.0, "stage1_fraction": 0.1},
    "mosei": {"cra_blocks": 4, "cra_widths": (128, 64, 32), "cra_kernel": 3, "cra_transition": True,
              "share_reverse": True, "beta": 32.0, "gamma": 5.0, "stage1_fraction": 0.3},
}
CYIN_PRESETS["small"] = dict(CYIN_PRESETS["mosi"])
#: CyIN has no AV-MNIST configuration; the CPU preset takes MOSI's sizes like ``small``
CYIN_PRESETS["avmnist"] = dict(CYIN_PRESETS["mosi"])


class CyIN(Method):
    r"""CyIN in the common framework; see the module docstring.

    Args:
        info: dataset description.
        config, preset, **overrides: the backbone :class:`FusionConfig` (extractors, fusion, head).
        latent_dim: IB latent width ``c`` (default: the backbone's ``d``; must suit the fusion,
            e.g. divisible by MulT's heads).
        beta, gamma, kl_weight: loss weights (see the total above).
        stage1_fraction: fraction of the planned epochs spent in stage 1 (the released code's
            ``stage_divide``); fixed by :meth:`plan` when training starts.
        stage1_epochs: stage 1 in epochs (overrides ``stage1_fraction``).
        max_rate: stage-2 per-sample drop rate range ``[0, max_rate]``.
        cra_blocks, cra_widths, cra_kernel, cra_transition: each translator's residual
            autoencoders (:class:`CascadedResidualAE`).
        share_reverse: one translator per unordered pair for both directions (the released code).
        combine: ``"sum"`` (paper) or ``"mean"`` of the translations from available modalities.
        detach_translation: train only the translators with :math:`\mathcal L_{tran}` (latents
            detached); default False, the paper's joint objective.
        init_logvar: initial bias of every encoder's :math:`\log\sigma^2` (the latents start
            nearly deterministic, so the task signal is not drowned by unit-variance noise).

    Options left at None take :data:`CYIN_PRESETS` ``[preset]`` (the preset of ``config=``/``preset=``,
    ``"mosi"`` when neither is given; a ``FusionConfig`` object passed as ``config`` takes ``"mosi"``'s).
    """

    name = "cyin"

    def __init__(self, info: Any, config: Any = None, *, preset: str | None = None,
                 latent_dim: int | None = None, beta: float | None = None, gamma: float | None = None,
                 kl_weight: float = 1.0, stage1_fraction: float | None = None, stage1_epochs: int | None = None,
                 max_rate: float = 0.7, cra_blocks: int | None = None, cra_widths: Sequence[int] | None = None,
                 cra_kernel: int | None = None, cra_transition: bool | None = None,
                 share_reverse: bool | None = None, combine: str = "sum",
                 init_logvar: float = -6.0, detach_translation: bool = False, **overrides: Any) -> None:
        super().__init__(info)
        if len(self.modalities) < 2:
            raise ValueError("CyIN needs two or more modalities")
        name = config if isinstance(config, str) else (preset or "mosi")
        sizes = dict(CYIN_PRESETS.get(name, CYIN_PRESETS["mosi"]))
        given = {"beta": beta, "gamma": gamma, "stage1_fraction": stage1_fraction, "cra_blocks": cra_blocks,
                 "cra_widths": cra_widths, "cra_kernel": cra_kernel, "cra_transition": cra_transition,
                 "share_reverse": share_reverse}
        sizes.update({k: v for k, v in given.items() if v is not None})
        beta, gamma = float(sizes["beta"]), float(sizes["gamma"])
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if combine not in ("sum", "mean"):
            raise ValueError(f"combine must be 'sum' or 'mean', got {combine!r}")
        if not 0.0 <= max_rate <= 1.0:
            raise ValueError(f"max_rate must lie in [0, 1], got {max_rate}")
        if stage1_epochs is None:
            epochs_from_fraction(sizes["stage1_fraction"], 10, "stage1_fraction")  # range check only
        elif isinstance(stage1_epochs, bool) or not isinstance(stage1_epochs, int) or stage1_epochs < 0:
            raise ValueError(f"stage1_epochs must be an int >= 0, got {stage1_epochs!r}")
        cfg = _fusion_config(config, preset, overrides)
        self.backbone_config = cfg
        c = cfg.d if latent_dim is None else int(latent_dim)
        self.latent_dim = c
        self.options = {"latent_dim": c, "beta": beta, "gamma": gamma, "kl_weight": float(kl_weight),
                        "stage1_fraction": float(sizes["stage1_fraction"]),
                        "stage1_epochs": None if stage1_epochs is None else int(stage1_epochs),
                        "max_rate": float(max_rate),
                        "cra_blocks": int(sizes["cra_blocks"]), "cra_widths": [int(w) for w in sizes["cra_widths"]],
                        "cra_kernel": int(sizes["cra_kernel"]), "cra_transition": bool(sizes["cra_transition"]),
                        "share_reverse": bool(sizes["share_reverse"]), "combine": combine,
                        "init_logvar": float(init_logvar), "detach_translation": bool(detach_translation)}
        opt = self.options
        mods = self.modalities
        self.extractors = ModalityExtractors(self.info.input_dims, cfg.d, cfg.extractor_kernel, cfg.target_length)
        self.ib_encoders = nn.ModuleDict({m: nn.Conv1d(cfg.d, 2 * c, 1) for m in mods})
        for enc in self.ib_encoders.values():  # start nearly deterministic: log sigma^2 = init_logvar
            nn.init.constant_(enc.bias[c:], float(init_logvar))
        self.ib_decoders = nn.ModuleDict({m: nn.Conv1d(c, self.info.input_dims[m], 1) for m in mods})
        self.predictors = nn.ModuleDict({m: build_head(self.task, c, self.info.num_classes) for m in mods})
        keys = sorted({self._translator_key(s, t) for s in mods for t in mods if s != t})
        self.translators = nn.ModuleDict({
            k: CascadedResidualAE(c, opt["cra_blocks"], opt["cra_widths"], opt["cra_kernel"], opt["cra_transition"])
            for k in keys
        })
        fcfg = replace(cfg, d=c)
        self.fusion = build_fusion_for(fcfg, mods)
        self.head = build_head_for(self.info, self.fusion.out_dim, cfg)
        self._task_loss = task_loss_for(self.task)
        self.register_buffer("epoch", torch.tensor(0))
        self.register_buffer("stage1", torch.tensor(-1 if stage1_epochs is None else int(stage1_epochs)))
        self.generator: torch.Generator | None = None

    @property
    def hparams(self) -> dict[str, Any]:
        return {"name": self.name, "dataset_info": self.info.to_dict(),
                "config": {"config": self.backbone_config.to_dict(), **self.options}}

    # ------------------------------------------------------------------ schedule
    def plan(self, total_epochs: int) -> int:
        """Fix stage 1's length for a budget of ``total_epochs`` (``round(stage1_fraction x total)``,
        at least 1, unless ``stage1_epochs`` was given); returns it.

        Raises:
            ValueError: stage 1 would take the whole budget (the translators would never train).
        """
        total = int(total_epochs)
        if int(self.stage1) < 0:
            self.stage1.fill_(epochs_from_fraction(self.options["stage1_fraction"], total, "stage1_fraction"))
        if int(self.stage1) >= total:
            raise ValueError(
                f"CyIN would never reach stage 2 (translation): stage 1 takes {int(self.stage1)} epoch(s) of a "
                f"{total}-epoch budget; give more epochs or a smaller stage1_fraction / stage1_epochs"
            )
        return int(self.stage1)

    @property
    def stage(self) -> int:
        """1 (complete, :math:`\\gamma = 0`) or 2 (random missingness, :math:`\\gamma > 0`); 1 until
        :meth:`plan` has fixed the stage-1 length when only a fraction was given."""
        s1 = int(self.stage1)
        return 1 if s1 < 0 or int(self.epoch) < s1 else 2

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(int(epoch))

    def on_epoch_start(self, epoch: int, trainer: Any = None) -> None:
        """Trainer hook: at the first epoch :meth:`plan` from the trainer's budget, then select the stage."""
        if trainer is not None and (epoch == 0 or int(self.stage1) < 0):
            self.plan(planned_epochs(trainer))
        self.set_epoch(epoch)

    # ------------------------------------------------------------------ pieces
    def _translator_key(self, src: str, dst: str) -> str:
        if self.options["share_reverse"]:
            a, b = sorted((src, dst))
            return f"{a}_{b}"
        return f"{src}_to_{dst}"

    def translate(self, latent: Tensor, src: str, dst: str) -> Tensor:
        r""":math:`\Gamma_{src\to dst}`: ``(B, c, T) -> (B, c, T)``."""
        return self.translators[self._translator_key(src, dst)](latent)

    def _encode(self, batch: Batch, sample: bool) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
        """Latents, means and log-variances ``{m: (B, c, T)}`` (absent inputs zeroed first)."""
        h = self.extractors(batch.features, batch.mask)
        lat, mus, logvars = {}, {}, {}
        for m in self.modalities:
            mu, logvar = self.ib_encoders[m](h[m]).chunk(2, dim=1)
            logvar = logvar.clamp(-10.0, 10.0)
            mus[m], logvars[m] = mu, logvar
            lat[m] = mu + (0.5 * logvar).exp() * torch.randn_like(mu) if sample else mu
        return lat, mus, logvars

    def _recover(self, lat: Mapping[str, Tensor], avail: Tensor) -> dict[str, Tensor]:
        """Every latent with the unavailable ones replaced by the combined translations."""
        out = {}
        for i, m in enumerate(self.modalities):
            need = ~avail[:, i]
            if not bool(need.any()):
                out[m] = lat[m]
                continue
            total = torch.zeros_like(lat[m])
            count = torch.zeros(avail.shape[0], 1, 1, dtype=lat[m].dtype, device=avail.device)
            for j, s in enumerate(self.modalities):
                if j == i or not bool((avail[:, j] & need).any()):
                    continue
                w = avail[:, j].to(lat[m].dtype)[:, None, None]
                src = torch.where(avail[:, j, None, None], lat[s], torch.zeros((), dtype=lat[s].dtype,
                                                                               device=avail.device))
                total = total + w * self.translate(src, s, m)
                count = count + w
            if self.options["combine"] == "mean":
                total = total / count.clamp_min(1.0)
            out[m] = torch.where(need[:, None, None], total, lat[m])
        return out

    def _fuse(self, lat: Mapping[str, Tensor]) -> Tensor:
        return self.head(self.fusion(dict(lat), None))

    def predict(self, batch: Batch) -> Tensor:
        """Latents of the present modalities, translations for the absent ones, fusion, head."""
        self._check_batch(batch)
        lat, _, _ = self._encode(batch, sample=False)
        return self._fuse(self._recover(lat, batch.mask))

    def recover(self, batch: Batch) -> dict[str, Tensor]:
        """Recovered latents ``{m: (B, c, T)}`` for modalities absent somewhere (NaN where present)."""
        self._check_batch(batch)
        lat, _, _ = self._encode(batch, sample=False)
        rec = self._recover(lat, batch.mask)
        return {m: torch.where(batch.mask[:, j, None, None], torch.full_like(rec[m], float("nan")), rec[m])
                for j, m in enumerate(self.modalities) if bool((~batch.mask[:, j]).any())}

    def encode(self, batch: Batch) -> dict[str, Tensor]:
        """Latent means ``{m: (B, c, T)}`` (NaN where absent)."""
        self._check_batch(batch)
        _, mus, _ = self._encode(batch, sample=False)
        return {m: torch.where(batch.mask[:, j, None, None], mus[m], torch.full_like(mus[m], float("nan")))
                for j, m in enumerate(self.modalities)}

    def _targets(self, batch: Batch, length: int) -> dict[str, Tensor]:
        out = {}
        for j, m in enumerate(self.modalities):
            x = torch.where(batch.mask[:, j, None, None], batch.features[m],
                            torch.zeros((), dtype=batch.features[m].dtype, device=batch.mask.device))
            out[m] = resample_time(x, length)
        return out

    # ------------------------------------------------------------------ loss
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor | float]]:
        self._check_batch(batch)
        opt = self.options
        beta, kw = opt["beta"], opt["kl_weight"]
        stage = self.stage
        sample = self.training
        data = batch.mask
        lat, mus, logvars = self._encode(batch, sample)
        length = next(iter(lat.values())).shape[-1]
        targets = self._targets(batch, length)
        kl_tok = {m: token_kl(mus[m], logvars[m]) for m in self.modalities}  # (B, T)
        mods = self.modalities
        zero = lat[mods[0]].new_zeros(())

        def masked_mean(values: Tensor, rows: Tensor) -> Tensor:
            return values[rows].mean() if bool(rows.any()) else zero

        # token-level IB: S->S and S->T
        self_terms, cross_terms = [], []
        for i, s in enumerate(mods):
            for j, t in enumerate(mods):
                rows = data[:, i] & data[:, j]
                if not bool(rows.any()):
                    continue
                rec = self.ib_decoders[t](lat[s])
                per = (kw * kl_tok[s] + beta * (targets[t] - rec).pow(2).mean(dim=1)).mean(dim=1)  # (B,)
                (self_terms if i == j else cross_terms).append(masked_mean(per, rows))
        tib = (torch.stack(self_terms).mean() if self_terms else zero) + \
              (torch.stack(cross_terms).mean() if cross_terms else zero)
        # label-level IB
        lib_terms = []
        for i, s in enumerate(mods):
            rows = data[:, i]
            if not bool(rows.any()):
                continue
            pred_s = self.predictors[s](lat[s].mean(dim=-1))
            kl_s = kl_tok[s].mean(dim=1)
            task_s = self._per_sample(pred_s, batch.labels)
            lib_terms.append(masked_mean(kw * kl_s + beta * task_s, rows))
        lib = torch.stack(lib_terms).mean() if lib_terms else zero
        # cyclic translation
        gamma = opt["gamma"] if stage == 2 else 0.0
        tran = zero
        if gamma > 0:
            tr_terms = []
            for i, s in enumerate(mods):
                for j, t in enumerate(mods):
                    rows = data[:, i] & data[:, j]
                    if i == j or not bool(rows.any()):
                        continue
                    src, dst = (lat[s].detach(), lat[t].detach()) if opt["detach_translation"] else (lat[s], lat[t])
                    per = translation_loss(src, dst, lambda x, s=s, t=t: self.translate(x, s, t),
                                           lambda x, s=s, t=t: self.translate(x, t, s))
                    tr_terms.append(masked_mean(per, rows))
            tran = torch.stack(tr_terms).mean() if tr_terms else zero
        # task on complete (stage 1) or randomly incomplete (stage 2) inputs
        avail = data
        if stage == 2 and self.training:
            avail = simulate_missing(batch, rate=(0.0, opt["max_rate"]), generator=self.generator).mask
        pred = self._fuse(self._recover(lat, avail))
        task = self._task_loss(pred, batch.labels)
        total = task + (tib + lib) / beta + gamma * tran
        parts = {"task": task.detach(), "tib": tib.detach(), "lib": lib.detach(),
                 "tran": tran.detach(), "stage": float(stage), "loss": total.detach()}
        return total, parts

    def _per_sample(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.task == "regression":
            return (pred - target).abs()
        return F.cross_entropy(pred, target.long(), reduction="none")


@register_method("cyin")
def cyin(info: Any, config: Any = None, *, preset: str | None = None, **kwargs: Any) -> CyIN:
    """CyIN (Lin et al., NeurIPS 2025): IB latents, cyclic translation, one model for all patterns."""
    return CyIN(info, config, preset=preset, **kwargs)
