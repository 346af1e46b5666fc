r"""Typed DiCMoR configuration with the paper's presets.

The hyperparameters follow DiCMoR's supplementary table (METHODS §1.4):

================  =========  =========  ===========================================
field             ``mosi``   ``mosei``  ``small`` (embedded default, tests)  ``avmnist`` (CPU)
================  =========  =========  ===================================  =================
extractor kernel  5          5          5                                    5
d                 32         64         16                                   24
flow layers       32         32         4 [#]_                               8
flow hidden       64         128 [#]_   32                                   32
RCAB blocks       20         20         4                                    4
RCAB hidden       64         128        32                                   32
MulT d/heads/lyr  32/8/4     64/8/6     16/4/2                               24/4/2
================  =========  =========  ===================================  =================

``run`` picks the preset from the dataset when none is given (:func:`preset_for_dataset`):
``small`` for the embedded data, ``avmnist`` for AV-MNIST, the paper's ``mosi`` otherwise.

.. [#] the supplementary says 128; the released code silently uses 64 (METHODS §1.6.3).
.. [#] 4 steps keep ``make demo`` within 3 minutes on two cores: measured on the embedded data (seed 0,
   5 epochs per stage), 8 steps train in 61 s and score 66.7 at MR 0.5, 4 steps in 41 s and 65.0.

Variant-dependent choices default to ``None`` and are resolved by :meth:`DiCMoRConfig.resolved`:

============================  ===========================  ===============================
choice                        ``paper`` (default)          ``official`` (released code)
============================  ===========================  ===============================
flow steps                    one ActNorm at the data end, couplings only
                              then permutation + coupling
coupling                      rational-quadratic spline    affine
                              (4 bins, identity tails
                              outside [-5, 5])
coupling kernel               3 (temporal context)         1 (per time step)
coupling scale                (spline: none)               Glow ``sigmoid(h + 2)``
latent clamp                  off (the flow is bounded)    off
bits/dim clamp ``max(0,.)``   no                           yes
transfers before refiner      gradients flow               detached
combining several sources     mean over present sources    concat + 1x1 conv (padded stack)
============================  ===========================  ===============================

Example::

    cfg = DiCMoRConfig.preset("mosi", variant="official")
    cfg.resolved().flow_kernel   # 1
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from flowtransfer.models.mult import MulTConfig

__all__ = ["DiCMoRConfig", "FusionConfig", "PRESETS", "DATASET_PRESETS", "preset_for_dataset", "VARIANTS", "COMBINERS", "STAGES", "FILLS"]

#: the two DiCMoR variants
VARIANTS = ("paper", "official")
#: how the transfers from several available sources are combined
COMBINERS = ("mean", "conv")
#: training stages
STAGES = ("complete", "recovery", "joint")
#: how a fusion model fills absent modalities
FILLS = ("zero", "mean")


def _coerce_plain_fields(cfg: Any) -> None:
    """Turn the plain-data forms a checkpoint stores back into typed fields: ``mult`` dict ->
    :class:`MulTConfig`, ``train_missing_rate`` list -> tuple (shared by both configs)."""
    if isinstance(cfg.mult, dict):
        cfg.mult = MulTConfig(**cfg.mult)
    if isinstance(cfg.train_missing_rate, list):
        cfg.train_missing_rate = tuple(cfg.train_missing_rate)


@dataclass
class DiCMoRConfig:
    """Every DiCMoR option; build one with :meth:`preset` and keyword overrides.

    Attributes:
        variant: ``"paper"`` (default: every channel transformed, temporal couplings, no clamp,
            gradients from the reconstruction into the flows) or ``"official"`` (the released code).
        d: common feature width after the extractors (and of the flows, refiners and MulT).
        extractor_kernel: temporal kernel of each modality's extractor (any ``T >= 1`` works).
        target_length: common sequence length; ``None`` takes the shortest modality's length.
        flow_layers, flow_hidden: coupling steps per flow and width of their networks.
        flow_kernel: coupling-network kernel; ``None``: 3 (paper) or 1 (official).
        flow_coupling: ``"spline"``, ``"affine"``, ``"additive"`` (see
            :class:`~flowtransfer.flows.TemporalFlow`); ``None``: the spline (paper) or affine (official).
            A transfer runs the target flow *backwards* on another modality's latent: the spline's
            inverse is bounded by construction (``|x| <= max(|z|, B)`` per coupling, so the
            recovered features stay within ``max(R, B) e^{-l} + |b|`` of the data-end ActNorm for
            latents in the prior's box of radius ``R``), while the affine couplings' inverse is
            unbounded (seen: 2.4e18 with 32 soft-clamped steps on MOSI).
        flow_scale: affine coupling scale (``"sigmoid"``, ``"softclamp"``, ``"additive"``); ``None``:
            Glow's sigmoid (official) or the soft-clamped exp (paper with ``flow_coupling="affine"``).
            Not used by the spline.
        flow_bins, flow_tail_bound: the spline's bins and tail bound ``B``.
        flow_mixing: channel mixing between couplings; ``None``: ``"permutation"`` (paper) or none
            (official: the first half of the channels is never transformed).
        flow_actnorm: ``"input"``, ``"every"`` or ``"none"``; ``None``: ``"input"`` (paper) or
            ``"none"`` (official).
        refiner_blocks, refiner_hidden, refiner_reduction: the RCAB-1D refiner (METHODS §3).
        combine: ``"mean"`` or ``"conv"`` (see :mod:`flowtransfer.methods.dicmor`); ``None``: by variant.
        detach_transfer: stop gradients between the flows' transfers and the refiner; ``None``: by variant.
        clamp_bpd: ``max(0, bits/dim)`` as the released code; ``None``: by variant.
        latent_clamp: before a transfer's inverse flow, clamp each latent channel to the prior's range
            ``[min_c(mu_c - k sigma_c), max_c(mu_c + k sigma_c)]`` with this ``k``. It does not bound
            an unbounded inverse (with affine couplings the exploding latents were inside the
            clamp); the spline design needs none. ``0`` disables it; ``None``: 0.
        fusion: name for :func:`flowtransfer.models.fusion.build_fusion` (``"mult"``, ``"concat"``, ``"late"``).
        mult: MulT hyperparameters (its ``d`` is replaced by ``d``); ``head_dropout`` is the head's dropout.
        fusion_kwargs: extra keyword arguments for non-MulT fusions.
        nll_weight, rec_weight: loss weights (released code: 0.1 and 0.1).
        train_missing_rate: training-time per-sample missing rate, a number or a ``(lo, hi)``
            range from which each sample draws its own rate (default ``(0.2, 0.7)``: one model
            serves every test missing rate).
        stage: initial training stage, ``"complete"``, ``"recovery"`` or ``"joint"``.
        input_decoder: also build one decoder per modality from the shared feature space
            ``(B, d, T)`` back to the input space ``(B, C_m, T_m)``, trained with an MSE
            reconstruction loss on the real features (``DiCMoR.transfer_input``: audio in, image
            out). Off by default: the method itself never needs it.
        input_decoder_weight: weight of that reconstruction loss.
        text_encoder_path, text_encoder_config: text as token ids (MMSA ``text_bert``, loaded with
            ``load_mmsa(..., text_key="text_bert")``): a local BERT folder, or a ``BertConfig``
            dict for a randomly initialised one, encodes modality ``text_modality`` before its
            extractor (:class:`flowtransfer.models.text.BertTextEncoder`; needs ``transformers``).
            ``None`` (default): text is pre-extracted features.
        text_finetune: fine-tune the BERT encoder in the stages that train the extractors
            (``complete``, ``joint``); it is frozen in the ``recovery`` stage either way.
        text_modality: the modality the BERT encoder reads.
    """

    variant: str = "paper"
    d: int = 32
    extractor_kernel: int = 5
    target_length: int | None = None
    flow_layers: int = 32
    flow_hidden: int = 64
    flow_kernel: int | None = None
    flow_coupling: str | None = None
    flow_scale: str | None = None
    flow_bins: int = 4
    flow_tail_bound: float = 5.0
    flow_mixing: str | None = None
    flow_actnorm: str | None = None
    refiner_blocks: int = 20
    refiner_hidden: int = 64
    refiner_reduction: int = 16
    combine: str | None = None
    detach_transfer: bool | None = None
    clamp_bpd: bool | None = None
    latent_clamp: float | None = None
    fusion: str = "mult"
    mult: MulTConfig = field(default_factory=MulTConfig.mosi)
    fusion_kwargs: dict[str, Any] = field(default_factory=dict)
    nll_weight: float = 0.1
    rec_weight: float = 0.1
    train_missing_rate: float | tuple[float, float] = (0.2, 0.7)
    stage: str = "joint"
    input_decoder: bool = False
    input_decoder_weight: float = 1.0
    text_encoder_path: str | None = None
    text_encoder_config: dict[str, Any] | None = None
    text_finetune: bool = False
    text_modality: str = "L"

    def __post_init__(self) -> None:
        _coerce_plain_fields(self)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown DiCMoR variant {self.variant!r}; expected one of {VARIANTS}")
        if self.combine is not None and self.combine not in COMBINERS:
            raise ValueError(f"unknown combine {self.combine!r}; expected one of {COMBINERS}")
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; expected one of {STAGES}")
        for name in ("d", "extractor_kernel", "flow_layers", "flow_hidden", "refiner_blocks",
                     "refiner_hidden", "refiner_reduction"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d % 2:
            raise ValueError(f"d must be even (couplings split the channels in halves), got {self.d}")
        if self.flow_coupling is not None and self.flow_coupling not in ("spline", "affine", "additive"):
            raise ValueError(f"unknown flow_coupling {self.flow_coupling!r}; expected spline, affine or additive")
        if self.flow_coupling in ("spline", None) and self.variant == "paper" and self.flow_scale is not None:
            raise ValueError("flow_scale applies to affine couplings; set flow_coupling='affine' to use it")
        if self.flow_mixing not in (None, "permutation", "conv1x1", "flip", "none"):
            raise ValueError(f"unknown flow_mixing {self.flow_mixing!r}")
        if self.flow_actnorm not in (None, "input", "every", "none"):
            raise ValueError(f"unknown flow_actnorm {self.flow_actnorm!r}; expected input, every or none")
        if int(self.flow_bins) < 1 or not self.flow_tail_bound > 0:
            raise ValueError(f"flow_bins must be >= 1 and flow_tail_bound > 0, got {self.flow_bins}, {self.flow_tail_bound}")
        if self.flow_kernel is not None and (self.flow_kernel < 1 or self.flow_kernel % 2 == 0):
            raise ValueError(f"flow_kernel must be odd and >= 1, got {self.flow_kernel}")
        if self.target_length is not None and self.target_length < 1:
            raise ValueError(f"target_length must be >= 1, got {self.target_length}")
        if self.nll_weight < 0 or self.rec_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got nll {self.nll_weight}, rec {self.rec_weight}")
        if self.input_decoder_weight < 0:
            raise ValueError(f"input_decoder_weight must be >= 0, got {self.input_decoder_weight}")
        r = self.train_missing_rate
        if isinstance(r, tuple):
            if len(r) != 2 or not 0.0 <= r[0] <= r[1] <= 1.0:
                raise ValueError(f"train_missing_rate range must be (lo, hi) with 0 <= lo <= hi <= 1, got {r}")
        elif not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"train_missing_rate must lie in [0, 1], got {r}")

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str = "mosi", **overrides: Any) -> DiCMoRConfig:
        """A named preset (``"mosi"``, ``"mosei"``, ``"small"``, ``"avmnist"``) with keyword overrides."""
        if name not in PRESETS:
            raise KeyError(f"unknown DiCMoR preset {name!r}; known: {sorted(PRESETS)}")
        cfg = PRESETS[name]()
        known = {f.name for f in fields(cls)}
        bad = [k for k in overrides if k not in known]
        if bad:
            raise TypeError(f"unknown DiCMoRConfig fields {bad}; known: {sorted(known)}")
        if isinstance(overrides.get("mult"), dict):
            overrides["mult"] = replace(cfg.mult, **overrides["mult"])
        return replace(cfg, **overrides)

    def resolved(self) -> DiCMoRConfig:
        """A copy whose variant-dependent ``None`` fields are filled in (table in the module docstring)."""
        official = self.variant == "official"
        coupling = self.flow_coupling if self.flow_coupling is not None else ("affine" if official else "spline")
        scale = self.flow_scale
        if scale is None and coupling == "affine":
            scale = "sigmoid" if official else "softclamp"
        return replace(
            self,
            flow_coupling=coupling,
            flow_mixing=self.flow_mixing if self.flow_mixing is not None else ("none" if official else "permutation"),
            flow_actnorm=self.flow_actnorm if self.flow_actnorm is not None else ("none" if official else "input"),
            flow_kernel=self.flow_kernel if self.flow_kernel is not None else (1 if official else 3),
            flow_scale=scale,
            combine=self.combine if self.combine is not None else ("conv" if official else "mean"),
            detach_transfer=self.detach_transfer if self.detach_transfer is not None else official,
            clamp_bpd=self.clamp_bpd if self.clamp_bpd is not None else official,
            latent_clamp=self.latent_clamp if self.latent_clamp is not None else 0.0,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for checkpoints): ``DiCMoRConfig(**cfg.to_dict()) == cfg``."""
        out = asdict(self)
        if isinstance(self.train_missing_rate, tuple):
            out["train_missing_rate"] = list(self.train_missing_rate)
        return out


def _mosi() -> DiCMoRConfig:
    return DiCMoRConfig(
        d=32, extractor_kernel=5, flow_layers=32, flow_hidden=64,
        refiner_blocks=20, refiner_hidden=64, mult=MulTConfig.mosi(),
    )


def _mosei() -> DiCMoRConfig:
    return DiCMoRConfig(
        d=64, extractor_kernel=5, flow_layers=32, flow_hidden=128,
        refiner_blocks=20, refiner_hidden=128, mult=MulTConfig.mosei(),
    )


def _small() -> DiCMoRConfig:
    mult = MulTConfig(d=16, heads=4, layers=2, memory_layers=2, attn_dropout=0.1, relu_dropout=0.1,
                      res_dropout=0.1, embed_dropout=0.1, head_dropout=0.1)
    return DiCMoRConfig(
        d=16, extractor_kernel=5, flow_layers=4, flow_hidden=32,
        refiner_blocks=4, refiner_hidden=32, refiner_reduction=8, mult=mult,
    )


def _avmnist() -> DiCMoRConfig:
    """AV-MNIST on a CPU: the ``small`` design at width 24 with 8 spline flow steps (the paper has
    no AV-MNIST preset; ``mosi``'s 32-step flows and 20 RCAB blocks take hours on two cores)."""
    mult = MulTConfig(d=24, heads=4, layers=2, memory_layers=2, attn_dropout=0.1, relu_dropout=0.1,
                      res_dropout=0.1, embed_dropout=0.1, head_dropout=0.1)
    return DiCMoRConfig(
        d=24, extractor_kernel=5, flow_layers=8, flow_hidden=32,
        refiner_blocks=4, refiner_hidden=32, refiner_reduction=8, mult=mult,
    )


#: preset name -> factory of a fresh :class:`DiCMoRConfig`
PRESETS = {"mosi": _mosi, "mosei": _mosei, "small": _small, "avmnist": _avmnist}

#: the preset ``run`` picks for a dataset when none is given (other datasets: ``mosi``)
DATASET_PRESETS: dict[str, str] = {"synthetic": "small", "avmnist": "avmnist", "mmsa": "mosi", "npz": "mosi"}


def preset_for_dataset(dataset: str) -> str:
    """The preset of :data:`DATASET_PRESETS` for a registered dataset name (``mosi`` otherwise):
    sized for a CPU on the embedded data and AV-MNIST, the paper's on MOSI/MOSEI files."""
    return DATASET_PRESETS.get(dataset, "mosi")


@dataclass
class FusionConfig:
    """Options of :class:`~flowtransfer.methods.fusion_model.FusionModel` (extractors + fusion + head).

    Its presets take the extractor and fusion settings of the DiCMoR preset of the same name, so a
    bound and DiCMoR share one architecture apart from the recovery branch.

    Attributes:
        d, extractor_kernel, target_length, fusion, mult, fusion_kwargs: as in :class:`DiCMoRConfig`.
        fill: ``"zero"`` or ``"mean"`` (per-channel training mean of the *input* features, see
            :meth:`~flowtransfer.methods.fusion_model.FusionModel.fit_fill_statistics`).
        train_missing_rate: ``None`` (train on the batch as given) or a per-sample rate / range
            of modality dropout during training (filled the same way as at test).
        text_encoder_path, text_encoder_config, text_finetune, text_modality: as in
            :class:`DiCMoRConfig` (text as token ids through BERT).
    """

    d: int = 32
    extractor_kernel: int = 5
    target_length: int | None = None
    fusion: str = "mult"
    mult: MulTConfig = field(default_factory=MulTConfig.mosi)
    fusion_kwargs: dict[str, Any] = field(default_factory=dict)
    fill: str = "zero"
    train_missing_rate: float | tuple[float, float] | None = None
    text_encoder_path: str | None = None
    text_encoder_config: dict[str, Any] | None = None
    text_finetune: bool = False
    text_modality: str = "L"

    def __post_init__(self) -> None:
        _coerce_plain_fields(self)
        if self.fill not in FILLS:
            raise ValueError(f"unknown fill {self.fill!r}; expected one of {FILLS}")
        if self.d < 1 or self.extractor_kernel < 1:
            raise ValueError(f"d and extractor_kernel must be >= 1, got {self.d}, {self.extractor_kernel}")
        if self.target_length is not None and self.target_length < 1:
            raise ValueError(f"target_length must be >= 1, got {self.target_length}")
        r = self.train_missing_rate
        if isinstance(r, tuple):
            if len(r) != 2 or not 0.0 <= r[0] <= r[1] <= 1.0:
                raise ValueError(f"train_missing_rate range must be (lo, hi) with 0 <= lo <= hi <= 1, got {r}")
        elif r is not None and not 0.0 <= float(r) <= 1.0:
            raise ValueError(f"train_missing_rate must lie in [0, 1], got {r}")

    @classmethod
    def preset(cls, name: str = "mosi", **overrides: Any) -> FusionConfig:
        """The extractor and fusion settings of DiCMoR preset ``name``, with keyword overrides."""
        base = DiCMoRConfig.preset(name)
        cfg = cls(d=base.d, extractor_kernel=base.extractor_kernel, target_length=base.target_length,
                  fusion=base.fusion, mult=base.mult, fusion_kwargs=dict(base.fusion_kwargs))
        known = {f.name for f in fields(cls)}
        bad = [k for k in overrides if k not in known]
        if bad:
            raise TypeError(f"unknown FusionConfig fields {bad}; known: {sorted(known)}")
        if isinstance(overrides.get("mult"), dict):
            overrides["mult"] = replace(cfg.mult, **overrides["mult"])
        return replace(cfg, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """Plain data: ``FusionConfig(**cfg.to_dict()) == cfg``."""
        out = asdict(self)
        if isinstance(self.train_missing_rate, tuple):
            out["train_missing_rate"] = list(self.train_missing_rate)
        return out
