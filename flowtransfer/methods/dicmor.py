r"""DiCMoR: distribution-consistent modality recovery with class-conditional flows.

Wang, Cui, Li, *Distribution-Consistent Modal Recovering for Incomplete Multimodal Learning*,
ICCV 2023 (METHODS §1). Pipeline for a batch with a presence mask ``(B, M)``:

1. **Extract.** Per modality, :class:`~flowtransfer.models.extractors.ModalityExtractors` maps
   ``(B, C_m, T_m)`` to ``h_m`` of shape ``(B, d, T)``, one common width ``d`` and length ``T``
   (absent slots are zeroed *before* the convolution, so NaN never enters).
2. **Latents.** One :class:`~flowtransfer.flows.TemporalFlow` per modality, all sharing **one**
   class-conditional prior :math:`\mathcal N(\mu_c, \operatorname{diag}\sigma_c^2)` (``self.prior``).
   :math:`z_m = F_m(h_m)`. One forward pass per modality gives both the latent used for transfer and
   the log-density used for the NLL.
3. **Transfer.** A missing modality :math:`m` is recovered from each available source :math:`a` as
   :math:`\hat h_{a\to m} = F_m^{-1}(F_a(h_a))`. For a target, the latents of every (sample, source)
   pair are concatenated along the batch axis and inverted in **one** call of :math:`F_m^{-1}`.
4. **Combine** the transfers of a sample's present sources (their number varies per sample):

   * ``"mean"`` (paper variant): :math:`\tilde h_m = \frac1{|S_b|}\sum_{a\in S_b}\hat h_{a\to m}`,
     averaged in feature space after the inverse (averaging latents instead would shrink their spread
     below the prior's);
   * ``"conv"`` (official variant): the released code concatenates the two transfers and fuses them
     with a ``1x1`` convolution ``2d -> d``. Here the ``M - 1`` possible sources fill a fixed-size
     stack (zeros for absent sources) read by a ``1x1`` convolution ``(M-1) d -> d``; samples with a
     single source use that transfer as is (as the released code does). For ``M = 3`` this is
     exactly the released rule.
5. **Refine** with a per-modality RCAB-1D refiner: :math:`r_m = D_m(\tilde h_m)`.
6. **Fuse** (MulT by default) the present :math:`h_m` and the refined :math:`r_m` of absent ones,
   chosen per sample with ``torch.where`` on the mask, then a head predicts.

**Losses** (training, :meth:`DiCMoR.loss`). The batch first loses modalities **per sample** with
:func:`~flowtransfer.methods.base.simulate_missing` at ``train_missing_rate``. Then

.. math:: \mathcal L = \mathcal L_{task} + \lambda_{nll}\sum_m \mathrm{bpd}_m + \lambda_{rec}\,\mathcal L_{rec},
   \qquad \mathrm{bpd}_m = -\frac{1}{|P_m|}\sum_{b\in P_m}\frac{\log p_m(h_{m,b}\mid c_b)}{d\,T\,\ln 2}

where :math:`P_m` are the samples whose modality :math:`m` is present **in the data** (the released
code also scores samples it treats as missing; we never score features that do not exist) and
:math:`c_b` is the class (the task's class, or for regression the 7-class rule of
:func:`flowtransfer.labels.sentiment_classes`). :math:`\mathcal L_{rec}` is the MSE between
:math:`r_m` and the stop-gradient real :math:`h_m` over the samples where :math:`m` exists in the data
but was dropped by the simulation, averaged over the targets that have such samples.

**Gradient paths.** The flows read ``h.detach()``: extractors learn only from the task loss through
the fusion of present features, so they cannot shrink their features to inflate the flows'
likelihood. ``paper``: the task and reconstruction losses also reach the flows through the transfer.
``official``: transfers are detached before the combiner and refiner, so flows learn from the NLL
only, and the bits/dim is clamped at 0 (``max(0, .)``, which stops the flows' gradient once the NLL
per dimension turns negative; METHODS §1.6.5).

**Variants** (see :mod:`flowtransfer.methods.presets`): ``paper`` (actnorm, LU 1x1 convolution,
temporal couplings, kernel 3, soft-clamped scale) and ``official`` (couplings only, kernel 1, Glow's
sigmoid scale: the first ``d/2`` channels of every recovered modality are an exact copy of the
source's, METHODS §1.6.1 — the tests check this flaw).

**Stages** (:meth:`DiCMoR.set_stage`): ``"complete"`` trains extractors, fusion and head on the
batch as given (no simulation, no flow work); ``"recovery"`` freezes the extractors (as the released
code does) and trains flows, prior, combiners, refiners, fusion and head under simulated missingness;
``"joint"`` trains everything at once.

**Input-space decoders** (optional, ``input_decoder=True``): one :class:`InputDecoder` per
modality maps the shared feature space back to the input space,
:math:`\hat x_m = G_m(h_m)`, trained with :math:`\lambda_{dec}\,\mathrm{MSE}(G_m(\mathrm{sg}[h_m]), x_m)`
over the samples where :math:`m` exists (in every stage; the features are detached, so the
decoders never change what the rest of the model learns). :meth:`DiCMoR.transfer_input` then
recovers a modality *in its input space*, e.g. AV-MNIST audio in, image out:
:math:`\hat x_{dst} = G_{dst}(D_{dst}(F_{dst}^{-1}(F_{src}(E_{src}(x_{src})))))`.

Text as token ids (MMSA ``text_bert``): set ``text_encoder_path`` (a local BERT folder) or
``text_encoder_config`` and the extractor of ``text_modality`` reads BERT's hidden states
(:mod:`flowtransfer.models.text`); ``text_finetune`` fine-tunes it in the complete/joint stages.

Example::

    model = build_method("dicmor", DatasetInfo.from_dataset(train), preset="small")
    loss, parts = model.loss(batch)          # parts: task, nll, nll_<m>, rec, sim_missing_rate
    y_hat = model.predict(batch)             # no labels read
    rec = model.recover(batch)               # {m: (B, d, T)}, NaN rows where m is present
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from flowtransfer.data.dataset import Batch
from flowtransfer.flows import ClassConditionalGaussian, TemporalFlow
from flowtransfer.models.extractors import ModalityExtractors, common_length, resample_time
from flowtransfer.models.text import text_encoders_for

from .fusion_model import build_fusion_for, build_head_for, task_loss_for
from .base import DatasetInfo, Method, prior_labels, register_method, simulate_missing
from .presets import STAGES, DiCMoRConfig

__all__ = ["DiCMoR", "InputDecoder", "Recovery"]

_LOG2 = math.log(2.0)


def build_refiner(d: int, hidden: int, blocks: int, reduction: int) -> nn.Module:
    """The RCAB-1D refiner ``(R, d, T) -> (R, d, T)`` (1x1 conv d -> hidden, RCAB group, 1x1 conv back)."""
    from flowtransfer.models.rcab import Refiner

    return Refiner(d, hidden, blocks, reduction)


class InputDecoder(nn.Module):
    r"""Map shared features ``(B, d, T)`` back to one modality's input space ``(B, C_m, T_m)``.

    .. math:: \hat x = W_3 * \mathrm{GELU}(W_2 * \mathrm{GELU}(W_1 * \mathrm{resample}_{T_m}(h)))

    ``resample`` is :func:`~flowtransfer.models.extractors.resample_time` (linear interpolation up,
    window means down); ``W_1, W_2`` are ``Conv1d`` with ``kernel_size`` and 'same' padding,
    ``W_3`` a ``1x1`` convolution to ``C_m`` channels.

    Args:
        d: shared feature width. channels: ``C_m``. length: ``T_m``.
        hidden: width of the two hidden convolutions. kernel_size: their temporal kernel.
    """

    def __init__(self, d: int, channels: int, length: int, hidden: int = 64, kernel_size: int = 5) -> None:
        super().__init__()
        if min(d, channels, length, hidden, kernel_size) < 1:
            raise ValueError(
                f"InputDecoder sizes must be >= 1, got d={d}, channels={channels}, length={length}, "
                f"hidden={hidden}, kernel_size={kernel_size}"
            )
        self.d, self.channels, self.length = d, channels, length
        self.net = nn.Sequential(
            nn.Conv1d(d, hidden, kernel_size, padding="same"),
            nn.GELU(),
            nn.Conv1d(hidden, hidden, kernel_size, padding="same"),
            nn.GELU(),
            nn.Conv1d(hidden, channels, 1),
        )

    def forward(self, h: Tensor) -> Tensor:
        """``(B, d, T) -> (B, channels, length)``."""
        if h.dim() != 3 or h.shape[1] != self.d:
            raise ValueError(f"InputDecoder expects features (batch, {self.d}, time), got {tuple(h.shape)}")
        return self.net(resample_time(h, self.length))


class Recovery(dict):
    """Per-target recovery of one batch: ``{m: (rows, combined, refined)}``.

    ``rows`` ``(R,)`` int64 are the samples whose ``m`` was recovered; ``combined`` ``(R, d, T)`` the
    combined transfers before the refiner; ``refined`` ``(R, d, T)`` after it.
    """


def _config_from(config: DiCMoRConfig | Mapping[str, Any] | str | None, preset: str | None,
                 overrides: dict[str, Any]) -> DiCMoRConfig:
    if isinstance(config, str):
        if preset is not None:
            raise ValueError("give the preset either as config= or as preset=, not both")
        preset, config = config, None
    if config is None:
        return DiCMoRConfig.preset(preset or "mosi", **overrides)
    if preset is not None:
        raise ValueError("give either config= or preset=, not both")
    if isinstance(config, Mapping):
        config = DiCMoRConfig(**dict(config))
    if not isinstance(config, DiCMoRConfig):
        raise TypeError(f"config must be a DiCMoRConfig, a mapping or a preset name, got {type(config).__name__}")
    return replace(config, **overrides) if overrides else config


def flow_design(r: DiCMoRConfig) -> dict[str, Any]:
    """:class:`~flowtransfer.flows.TemporalFlow` keyword arguments of a resolved configuration
    (official: the released flow, couplings only with Glow's sigmoid scale; paper: the bounded
    spline design)."""
    options: dict[str, Any] = {"coupling": r.flow_coupling,
                               "mixing": None if r.flow_mixing == "none" else r.flow_mixing,
                               "actnorm": None if r.flow_actnorm == "none" else r.flow_actnorm}
    if r.flow_coupling == "spline":
        options.update(num_bins=r.flow_bins, tail_bound=r.flow_tail_bound)
    elif r.flow_coupling == "affine":
        options.update(scale=r.flow_scale)
    return options


@register_method("dicmor")
class DiCMoR(Method):
    """DiCMoR over any ``M >= 2`` named modalities (see the module docstring).

    Args:
        info: the dataset's :class:`~flowtransfer.methods.base.DatasetInfo` (or a dataset).
        config: a :class:`DiCMoRConfig`, its plain dict, or a preset name.
        preset: a preset name (``"mosi"``, ``"mosei"``, ``"small"``), when ``config`` is not given.
        **overrides: any :class:`DiCMoRConfig` field.

    Attributes:
        extractors, flows (``ModuleDict``), prior (the one shared prior), combiners, refiners,
        fusion, head; ``stage``; ``generator`` (an optional ``torch.Generator`` for the simulated
        missingness; ``None`` uses the global RNG).
    """

    name = "dicmor"

    def __init__(
        self,
        info: DatasetInfo | Mapping[str, Any] | Any,
        config: DiCMoRConfig | Mapping[str, Any] | str | None = None,
        *,
        preset: str | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__(info)
        cfg = _config_from(config, preset, overrides)
        self.config = cfg
        self.name = "dicmor_official" if cfg.variant == "official" else "dicmor"
        r = cfg.resolved()
        self._r = r
        mods = self.modalities
        if len(mods) < 2:
            raise ValueError(f"DiCMoR needs at least two modalities, got {list(mods)}")
        for m in mods:
            if not m.isidentifier():
                raise ValueError(f"modality names must be identifiers (they name sub-modules), got {m!r}")
        d = r.d
        self.d = d
        self.extractors = ModalityExtractors(self.info.input_dims, d, r.extractor_kernel, r.target_length,
                                             encoders=text_encoders_for(r, mods))
        self.prior = ClassConditionalGaussian(d, self.info.prior_classes)
        self.flows = nn.ModuleDict({m: TemporalFlow(d, r.flow_layers, r.flow_hidden, r.flow_kernel,
                                                    prior=self.prior, **flow_design(r)) for m in mods})
        self.combiners = nn.ModuleDict()
        if r.combine == "conv" and len(mods) >= 3:
            self.combiners.update({m: nn.Conv1d((len(mods) - 1) * d, d, 1) for m in mods})
        self.refiners = nn.ModuleDict(
            {m: build_refiner(d, r.refiner_hidden, r.refiner_blocks, r.refiner_reduction) for m in mods}
        )
        self.fusion = build_fusion_for(r, mods)
        self.head = build_head_for(self.info, self.fusion.out_dim, r)
        # optional input-space decoders (empty, hence parameter-free, when disabled); a modality
        # that arrives as token ids (BERT text) has no input space to regress onto and gets none
        token_ids = {r.text_modality} if (r.text_encoder_path or r.text_encoder_config) else set()
        self._token_modalities = frozenset(token_ids)
        self.decoders = nn.ModuleDict()
        if r.input_decoder:
            self.decoders.update({
                m: InputDecoder(d, self.info.input_dims[m], self.info.seq_lens[m], r.refiner_hidden, r.extractor_kernel)
                for m in mods if m not in token_ids
            })
        self._task_loss = task_loss_for(self.info.task)
        self.generator: torch.Generator | None = None
        self.stage = r.stage
        self.set_stage(r.stage)

    # ------------------------------------------------------------------ configuration
    @property
    def variant(self) -> str:
        return self.config.variant

    @property
    def hparams(self) -> dict[str, Any]:
        return {"name": self.name, "dataset_info": self.info.to_dict(), "config": {"config": self.config.to_dict()}}

    def _recovery_modules(self) -> list[nn.Module]:
        return [self.flows, self.combiners, self.refiners]

    def set_stage(self, stage: str) -> DiCMoR:
        """Switch the training stage and the matching ``requires_grad`` flags (returns ``self``).

        ``"complete"``: extractors, fusion, head train; flows, prior, combiners, refiners frozen.
        ``"recovery"``: extractors frozen (and kept in eval mode); everything else trains.
        ``"joint"``: everything trains.
        """
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        self.stage = stage
        if self.config.stage != stage:  # so that hparams rebuild the model in its current stage
            self.config = replace(self.config, stage=stage)
        train_ext = stage in ("complete", "joint")
        train_rec = stage in ("recovery", "joint")
        for p in self.extractors.parameters():
            p.requires_grad_(train_ext)
        for encoder in self.extractors.encoders.values():  # BERT: fine-tuned only when asked
            encoder.set_finetune(train_ext and self.config.text_finetune)
        for mod in self._recovery_modules():
            for p in mod.parameters():
                p.requires_grad_(train_rec)
        for mod in (self.fusion, self.head, self.decoders):
            for p in mod.parameters():
                p.requires_grad_(True)
        self.train(self.training)
        return self

    def train(self, mode: bool = True) -> DiCMoR:
        super().train(mode)
        if getattr(self, "stage", None) == "recovery":
            self.extractors.eval()
        return self

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Groups ``extractors``, ``flows`` (flows and the shared prior), ``recovery`` (combiners,
        refiners), ``fusion`` (fusion and head) and ``decoders`` (when built), each holding only
        trainable parameters."""
        groups = [
            ("extractors", list(self.extractors.parameters())),
            ("flows", list(self.flows.parameters())),
            ("recovery", list(self.combiners.parameters()) + list(self.refiners.parameters())),
            ("fusion", list(self.fusion.parameters()) + list(self.head.parameters())),
            ("decoders", list(self.decoders.parameters())),
        ]
        out = []
        for name, params in groups:
            params = [p for p in params if p.requires_grad]
            if params:
                out.append({"name": name, "params": params})
        return out

    # ------------------------------------------------------------------ building blocks
    def _extract(self, batch: Batch) -> dict[str, Tensor]:
        """``{m: (B, d, T)}``; absent slots are zero-filled before the extractor (never NaN)."""
        self._check_batch(batch)
        frozen = self.stage == "recovery"
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return self.extractors(batch.features, batch.mask)

    def _latents(self, h: dict[str, Tensor], rows: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
        """One forward pass per modality over its ``rows``: ``{m: (z (P, d, T), logabsdet (P,))}``."""
        out = {}
        for m, idx in rows.items():
            if idx.numel():
                out[m] = self.flows[m](h[m].detach().index_select(0, idx))
        return out

    def _latents_only(self, h: dict[str, Tensor], rows: dict[str, Tensor]) -> dict[str, Tensor]:
        """:meth:`_latents` without the log-dets (prediction needs no likelihood): ``{m: z (P, d, T)}``."""
        return {m: self.flows[m].to_latent(h[m].detach().index_select(0, idx))
                for m, idx in rows.items() if idx.numel()}

    def _clamp_latent(self, z: Tensor) -> Tensor:
        """Clamp ``z`` (``(N, d, T)``) per channel to the prior's ``k``-sigma range over classes
        (``k = latent_clamp``; 0 returns ``z`` unchanged)."""
        k = self._r.latent_clamp
        if not k:
            return z
        std = torch.exp(self.prior.log_std)
        low = (self.prior.loc - k * std).amin(0)
        high = (self.prior.loc + k * std).amax(0)
        return torch.clamp(z, low[:, None].to(z.dtype), high[:, None].to(z.dtype))

    def _recover(
        self,
        avail: Tensor,
        latents: Mapping[str, Tensor],
        latent_rows: Mapping[str, Tensor],
        refine: bool = True,
    ) -> Recovery:
        """Recover every modality absent (``avail`` False) in some sample.

        ``latents[a]`` holds :math:`F_a(h_a)` for the samples ``latent_rows[a]`` (a superset of the
        samples where ``a`` is available and some target is missing).
        """
        b, n_mod = avail.shape
        dev = avail.device
        pos = {}
        for a, rows in latent_rows.items():
            p = torch.full((b,), -1, dtype=torch.long, device=dev)
            p[rows] = torch.arange(rows.numel(), device=dev)
            pos[a] = p
        out = Recovery()
        for j, m in enumerate(self.modalities):
            missing = ~avail[:, j]
            if not bool(missing.any()):
                continue  # no flow work for a target nobody misses
            tgt = missing.nonzero().squeeze(1)  # (R,)
            slot_of = torch.full((b,), -1, dtype=torch.long, device=dev)
            slot_of[tgt] = torch.arange(tgt.numel(), device=dev)
            zs, owners, slots = [], [], []
            for s, (k, a) in enumerate((k, a) for k, a in enumerate(self.modalities) if k != j):
                rows = (missing & avail[:, k]).nonzero().squeeze(1)
                if rows.numel():
                    zs.append(latents[a].index_select(0, pos[a][rows]))
                    owners.append(slot_of[rows])
                    slots.append(torch.full_like(rows, s))
            z = torch.cat(zs)
            owner = torch.cat(owners)
            slot = torch.cat(slots)
            x = self.flows[m].from_latent(self._clamp_latent(z))  # one inverse per target, all sources batched
            if self._r.detach_transfer:
                x = x.detach()
            r = tgt.numel()
            count = torch.bincount(owner, minlength=r).to(x.dtype)
            combined = torch.zeros(r, self.d, x.shape[2], dtype=x.dtype, device=dev).index_add(0, owner, x)
            combined = combined / count[:, None, None]
            if m in self.combiners:
                n_src = n_mod - 1
                stack = torch.zeros(r, n_src, self.d, x.shape[2], dtype=x.dtype, device=dev)
                stack = stack.index_put((owner, slot), x)
                fused = self.combiners[m](stack.flatten(1, 2))
                combined = torch.where((count > 1)[:, None, None], fused, combined)
            refined = self.refiners[m](combined) if refine else combined
            out[m] = (tgt, combined, refined)
        return out

    def _fuse(self, h: dict[str, Tensor], avail: Tensor, rec: Recovery) -> Tensor:
        feats = {}
        for j, m in enumerate(self.modalities):
            if m in rec:
                rows, _, refined = rec[m]
                filled = torch.zeros_like(h[m]).index_copy(0, rows, refined.to(h[m].dtype))
                feats[m] = torch.where(avail[:, j, None, None], h[m], filled)
            else:
                feats[m] = h[m]
        return self.head(self.fusion(feats, None))

    def _source_rows(self, avail: Tensor) -> dict[str, Tensor]:
        """Rows where ``a`` is available and some other modality is missing (the only latents needed)."""
        any_missing = ~avail.all(dim=1)
        return {a: (avail[:, k] & any_missing).nonzero().squeeze(1) for k, a in enumerate(self.modalities)}

    # ------------------------------------------------------------------ Method interface
    def encode(self, batch: Batch) -> dict[str, Tensor]:
        """Extracted real features ``{m: (B, d, T)}``, NaN in rows where ``m`` is absent."""
        h = self._extract(batch)
        nan = torch.full((), float("nan"))
        return {m: torch.where(batch.mask[:, j, None, None], h[m], nan.to(h[m])) for j, m in enumerate(self.modalities)}

    #: a checkpoint whose recovered validation features exceed this many times the real features'
    #: largest absolute value (or are non-finite) is never selected (see :meth:`selection_veto`)
    veto_ratio: float = 10.0

    def selection_veto(self, dataset: Any, batch_size: int = 256) -> str | None:
        """Why this epoch's weights must not be selected, or ``None``; called by the trainer after
        each validation pass. Recovers every modality of the validation samples from the others
        (each sample loses one modality, chosen by a fixed seed, so every epoch sees the same
        masks) and refuses non-finite recoveries or ones beyond :attr:`veto_ratio` times the real
        features' largest absolute value."""
        gen = torch.Generator().manual_seed(0)
        worst, scale, bad = 0.0, 0.0, 0
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(dataset), batch_size):
                    batch = dataset.batch(np.arange(start, min(start + batch_size, len(dataset))))
                    batch = batch.to(next(self.parameters()).device) if hasattr(batch, "to") else batch
                    present = batch.mask
                    drop = torch.multinomial(present.float() + 1e-9, 1, generator=gen.manual_seed(start)).squeeze(1)
                    keep = present.clone()
                    keep[torch.arange(len(keep)), drop] = False
                    keep |= ~keep.any(1, keepdim=True) & present  # a sample with one modality keeps it
                    if not bool((present & ~keep).any()):
                        continue
                    real = self.encode(batch)
                    rec = self.recover(simulate_missing(batch, pattern=keep))
                    for m, x in rec.items():
                        j = self.modalities.index(m)
                        rows = (present[:, j] & ~keep[:, j]).nonzero().squeeze(1)
                        if rows.numel() == 0:
                            continue
                        r = x.index_select(0, rows)
                        bad += int((~torch.isfinite(r)).flatten(1).any(1).sum())
                        finite = r[torch.isfinite(r)]
                        if finite.numel():
                            worst = max(worst, float(finite.abs().max()))
                        scale = max(scale, float(real[m].index_select(0, rows).abs().max()))
        finally:
            self.train(was)
        if bad:
            return f"{bad} recovered validation samples are non-finite"
        if scale > 0 and worst > self.veto_ratio * scale:
            return f"recovered validation features reach {worst:.3g}, {worst / scale:.3g}x the real features' largest |value| {scale:.3g}"
        return None

    def recover(self, batch: Batch, refine: bool = True) -> dict[str, Tensor]:
        """Recovered features ``{m: (B, d, T)}`` for every modality absent in some sample.

        Rows where ``m`` is present hold NaN. ``refine=False`` returns the combined transfers before
        the refiner (for the official variant's identity-half check). Never reads labels.
        """
        h = self._extract(batch)
        avail = batch.mask
        rows = self._source_rows(avail)
        rec = self._recover(avail, self._latents_only(h, rows), rows, refine=refine)
        out = {}
        for m, (tgt, combined, refined) in rec.items():
            full = torch.full_like(h[m], float("nan"))
            out[m] = full.index_copy(0, tgt, (refined if refine else combined).to(full.dtype))
        return out

    def transfer(self, h: Tensor, src: str, dst: str, space: str = "feature") -> Tensor:
        """Transfer from modality ``src`` to ``dst``.

        ``space="feature"``: ``h`` are shared features ``(B, d, T)``; returns ``F_dst^{-1}(F_src(h))``
        ``(B, d, T)`` (no refiner). ``space="input"``: ``h`` is an input-space tensor
        ``(B, C_src, T_src)`` or a :class:`Batch`; returns :meth:`transfer_input`'s
        ``(B, C_dst, T_dst)`` (needs ``input_decoder=True``).
        """
        if space == "input":
            return self.transfer_input(h, src, dst)
        if space != "feature":
            raise ValueError(f"unknown space {space!r}; expected 'feature' or 'input'")
        self._check_pair(src, dst)
        return self.flows[dst].from_latent(self._clamp_latent(self.flows[src].to_latent(h)))

    def _check_pair(self, src: str, dst: str) -> None:
        for name in (src, dst):
            if name not in self.flows:
                raise KeyError(f"unknown modality {name!r}; known: {list(self.modalities)}")

    def decode(self, h: Tensor, modality: str) -> Tensor:
        """Input-space reconstruction ``(B, C_m, T_m)`` of shared features ``h`` ``(B, d, T)``."""
        if not len(self.decoders):
            raise RuntimeError("this DiCMoR has no input decoders; build it with input_decoder=True")
        if modality not in self.decoders:
            if modality in self._token_modalities:
                raise KeyError(f"modality {modality!r} arrives as token ids and has no input decoder")
            raise KeyError(f"unknown modality {modality!r}; known: {list(self.modalities)}")
        return self.decoders[modality](h)

    def transfer_input(self, batch_or_x: Batch | Tensor, src: str, dst: str, refine: bool = True) -> Tensor:
        r"""Recover ``dst`` in its input space from ``src`` inputs (e.g. audio in, image out).

        .. math:: \hat x_{dst} = G_{dst}\big(D_{dst}(F_{dst}^{-1}(F_{src}(E_{src}(x_{src}))))\big)

        with the extractor :math:`E`, flows :math:`F`, refiner :math:`D` (skipped with
        ``refine=False``) and input decoder :math:`G`. Never reads labels.

        Args:
            batch_or_x: a :class:`Batch` (rows where ``src`` is absent give NaN rows) or the
                ``src`` input features ``(B, C_src, T_src)``.
            src, dst: modality names, ``src != dst``.

        Returns:
            ``(B, C_dst, T_dst)``, the shape of ``dst``'s inputs.
        """
        self._check_pair(src, dst)
        if src == dst:
            raise ValueError(f"src and dst must differ, got {src!r} for both")
        if not len(self.decoders):
            raise RuntimeError("transfer_input needs input decoders; build DiCMoR with input_decoder=True")
        if src in self._token_modalities:
            raise ValueError(f"transfer_input takes input features; modality {src!r} arrives as token ids")
        if isinstance(batch_or_x, Batch):
            self._check_batch(batch_or_x)
            present = batch_or_x.present(src)
            x = batch_or_x.features[src]
        else:
            x = batch_or_x
            present = None
        c = self.info.input_dims[src]
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1] != c:
            raise ValueError(
                f"modality {src!r}: expected input features (batch, {c}, time), got "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        if present is not None:
            x = torch.where(present[:, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        elif not bool(torch.isfinite(x).all()):
            raise ValueError(f"modality {src!r}: input features contain NaN or inf")
        length = common_length(self.info.seq_lens, self._r.target_length)
        h = self.extractors[src](x, length)
        rec = self.flows[dst].from_latent(self._clamp_latent(self.flows[src].to_latent(h)))
        if refine:
            rec = self.refiners[dst](rec)
        out = self.decode(rec, dst)
        if present is not None:
            nan = torch.full((), float("nan"), dtype=out.dtype, device=out.device)
            out = torch.where(present[:, None, None], out, nan)
        return out

    def _decoder_loss(self, batch: Batch, h: dict[str, Tensor]) -> Tensor | None:
        """Mean over modalities of the MSE between ``G_m(sg[h_m])`` and ``x_m`` on present rows."""
        if not len(self.decoders):
            return None
        terms = []
        for j, m in enumerate(self.modalities):
            rows = batch.mask[:, j].nonzero().squeeze(1)
            if m in self.decoders and rows.numel():
                x_hat = self.decoders[m](h[m].detach().index_select(0, rows))
                terms.append(torch.mean((x_hat - batch.features[m].index_select(0, rows)) ** 2))
        return torch.stack(terms).mean() if terms else None

    def predict(self, batch: Batch) -> Tensor:
        """``(B,)`` regression outputs or ``(B, K)`` logits; absent modalities are recovered."""
        h = self._extract(batch)
        avail = batch.mask
        rec = Recovery()
        if not bool(avail.all()):
            rows = self._source_rows(avail)
            rec = self._recover(avail, self._latents_only(h, rows), rows)
        return self._fuse(h, avail, rec)

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Training loss under the current stage; parts: ``loss``, ``task``, ``nll``, ``nll_<m>``,
        ``rec``, ``sim_missing_rate``."""
        self._check_batch(batch)
        target = batch.labels
        if self.stage == "complete":
            h = self._extract(batch)
            pred = self.head(self.fusion(h, batch.mask))
            task = self._task_loss(pred, target)
            parts = {"task": task.detach()}
            dec = self._decoder_loss(batch, h)
            if dec is not None:
                task = task + self._r.input_decoder_weight * dec
                parts["dec"] = dec.detach()
            return task, {"loss": task.detach(), **parts}

        h = self._extract(batch)
        data = batch.mask
        gen = self.simulation_generator(batch)  # deterministic in eval mode (validation losses)
        sim = simulate_missing(batch, rate=self._r.train_missing_rate, generator=gen).mask
        y = prior_labels(batch, self.info).to(data.device)

        # one flow forward per modality over the samples where it exists: NLL and latents together
        rows = {m: data[:, j].nonzero().squeeze(1) for j, m in enumerate(self.modalities)}
        fwd = self._latents(h, rows)
        nll_parts: dict[str, Tensor] = {}
        for m, (z, logdet) in fwd.items():
            t = z.shape[2]
            logp = self.prior.log_prob(z, y.index_select(0, rows[m])) + logdet
            bpd = -logp.mean() / (self.d * t * _LOG2)
            if self._r.clamp_bpd:
                bpd = torch.clamp(bpd, min=0.0)
            nll_parts[m] = bpd
        nll = torch.stack(list(nll_parts.values())).sum()

        rec = self._recover(sim, {m: zl[0] for m, zl in fwd.items()}, rows)
        rec_terms = []
        for j, m in enumerate(self.modalities):
            if m not in rec:
                continue
            tgt, _, refined = rec[m]
            known = data[tgt, j]  # dropped by the simulation but present in the data
            if bool(known.any()):
                sel = known.nonzero().squeeze(1)
                real = h[m].detach().index_select(0, tgt.index_select(0, sel))
                rec_terms.append(torch.mean((refined.index_select(0, sel) - real) ** 2))
        rec_loss = torch.stack(rec_terms).mean() if rec_terms else nll.new_zeros(())

        pred = self._fuse(h, sim, rec)
        task = self._task_loss(pred, target)
        total = task + self._r.nll_weight * nll + self._r.rec_weight * rec_loss
        parts = {
            "loss": total.detach(),
            "task": task.detach(),
            "nll": nll.detach(),
            "rec": rec_loss.detach(),
            "sim_missing_rate": (1.0 - sim.float().mean()).detach(),
        }
        parts.update({f"nll_{m}": v.detach() for m, v in nll_parts.items()})
        dec = self._decoder_loss(batch, h)
        if dec is not None:
            total = total + self._r.input_decoder_weight * dec
            parts["dec"] = dec.detach()
            parts["loss"] = total.detach()
        return total, parts



@register_method("dicmor_official")
def _dicmor_official(info: Any, config: Any = None, *, preset: str | None = None, **overrides: Any) -> DiCMoR:
    """DiCMoR as released: ``variant="official"`` (any ``variant`` given is overridden)."""
    overrides["variant"] = "official"
    return DiCMoR(info, config, preset=preset, **overrides)
