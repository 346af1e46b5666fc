"""Cross-modal transfer through one shared class-conditional latent space.

:class:`CrossModalFlows` holds one :class:`~flowtransfer.flows.TemporalFlow` per named modality and
**one** class-conditional Gaussian prior that every flow shares. Training each flow by maximum
likelihood pushes every modality's class-conditional distribution onto the same Gaussian
``N(mu_c, diag sigma_c^2)``, so a sample of modality ``src`` can be carried to modality ``dst`` by

.. math:: \\hat x_{dst} = F_{dst}^{-1}(F_{src}(x_{src})),

which is DiCMoR's recovery rule (Wang et al., ICCV 2023) applied in the input space. No label is
needed at transfer time: the latent already carries the class structure.

Modalities of different widths
    Flows are bijections, so every flow must act on the same number of channels ``width``. A modality
    with ``C_m < width`` channels is *augmented* with ``width - C_m`` auxiliary channels ``e``
    (augmented flows: Huang et al. 2020, "Augmented Normalizing Flows"; Chen et al. 2020, "VFlow").
    In training ``e ~ N(0, s^2 I)`` and the objective is the variational lower bound

    .. math:: \\log p(x) \\ge \\mathbb E_e[\\log p_F([x; e]) - \\log \\mathcal N(e; 0, s^2 I)],

    so :meth:`CrossModalFlows.nll` is an upper bound on the true NLL for augmented modalities and the
    exact NLL for the widest ones. At transfer time ``e = 0`` (the augmentation's mode), which makes
    :meth:`transfer` deterministic, and the output keeps the first ``C_dst`` channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flowtransfer.flows import ClassConditionalGaussian, TemporalFlow
from flowtransfer.io import CheckpointError, atomic_save, safe_load

__all__ = ["CrossModalFlows", "ModalityError"]

_FORMAT = "flowtransfer.CrossModalFlows/2"
#: files of format /1 stored only the flow arguments that differed from the defaults of their
#: time (Glow steps: ActNorm in every step, LU 1x1 convolution, affine coupling); those are restored
_LEGACY_FORMATS = {"flowtransfer.CrossModalFlows/1": {"actnorm": "every", "mixing": "conv1x1", "coupling": "affine"}}


class ModalityError(ValueError):
    """An unknown modality name, or features of the wrong shape for a modality."""


class CrossModalFlows(nn.Module):
    """One temporal flow per modality over a common width, all sharing one prior.

    Args:
        input_dims: modality name -> number of input channels ``C_m``.
        width: channels every flow acts on (default ``max(C_m)``); must be >= every ``C_m``.
        num_classes: classes of the shared prior; ``None`` for an unconditional prior.
        augment_std: std ``s`` of the auxiliary channels of narrower modalities in training.
        **flow_kwargs: passed to every :class:`TemporalFlow` (``num_layers``, ``hidden``,
            ``kernel_size``, ``mixing``, ``scale``, ...).

    Shapes: features are ``(batch, C_m, time)``; latents are ``(batch, width, time)``.

    Example:
        >>> model = CrossModalFlows({"A": 6, "L": 10}, num_classes=3, num_layers=2, hidden=8)
        >>> x_a = torch.randn(4, 6, 5)
        >>> model.transfer(x_a, src="A", dst="L").shape
        torch.Size([4, 10, 5])
    """

    def __init__(
        self,
        input_dims: Mapping[str, int],
        width: int | None = None,
        num_classes: int | None = None,
        augment_std: float = 1.0,
        **flow_kwargs: Any,
    ) -> None:
        super().__init__()
        if len(input_dims) < 2:
            raise ModalityError(f"need at least two modalities to transfer between, got {list(input_dims)}")
        dims = {str(name): int(c) for name, c in input_dims.items()}
        for name, c in dims.items():
            if c < 1:
                raise ModalityError(f"modality {name!r} must have at least one channel, got {c}")
        width = max(dims.values()) if width is None else int(width)
        too_wide = {n: c for n, c in dims.items() if c > width}
        if too_wide:
            raise ModalityError(f"width {width} is smaller than the channels of {too_wide}")
        if augment_std <= 0:
            raise ValueError(f"augment_std must be positive, got {augment_std}")
        self.input_dims: dict[str, int] = dims
        self.width = width
        self.num_classes = num_classes
        self.augment_std = float(augment_std)
        self.flow_kwargs = dict(flow_kwargs)
        self.prior = ClassConditionalGaussian(width, num_classes)
        self.flows = nn.ModuleDict(
            {name: TemporalFlow(width, num_classes=num_classes, prior=self.prior, **flow_kwargs) for name in dims}
        )

    # ------------------------------------------------------------------ helpers
    @property
    def modalities(self) -> tuple[str, ...]:
        """Modality names in order."""
        return tuple(self.input_dims)

    def config(self) -> dict[str, Any]:
        """Plain-data configuration that rebuilds this model (saved with the weights). The flows'
        arguments are stored in full, so a later change of a default cannot change a saved model."""
        flow_config = dict(next(iter(self.flows.values())).config)
        for key in ("channels", "num_classes"):
            flow_config.pop(key)
        return {
            "input_dims": dict(self.input_dims),
            "width": self.width,
            "num_classes": self.num_classes,
            "augment_std": self.augment_std,
            "flow_kwargs": flow_config,
        }

    def check_input(self, x: Tensor, modality: str, what: str = "x") -> None:
        """Raise a clear error unless ``x`` is finite ``(batch, C_modality, time)`` data."""
        if modality not in self.input_dims:
            raise ModalityError(f"unknown modality {modality!r}; this model knows {list(self.input_dims)}")
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        expected = self.input_dims[modality]
        if x.dim() != 3:
            raise ModalityError(
                f"{what} must be (batch, channels, time) = (B, {expected}, T), got shape {tuple(x.shape)}"
            )
        if x.shape[1] != expected:
            raise ModalityError(
                f"modality {modality!r} expects {expected} channels, got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        if x.shape[0] == 0 or x.shape[2] == 0:
            raise ModalityError(f"{what} is empty: shape {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"{what} for modality {modality!r} has {bad} non-finite values (NaN or inf)")

    def _augment(self, x: Tensor, modality: str, noise: bool) -> tuple[Tensor, Tensor]:
        """Pad ``x`` to ``width`` channels; return padded input and ``log q(e)`` per sample."""
        extra = self.width - self.input_dims[modality]
        zeros = x.new_zeros(x.shape[0])
        if extra == 0:
            return x, zeros
        shape = (x.shape[0], extra, x.shape[2])
        if not noise:
            return torch.cat([x, x.new_zeros(shape)], dim=1), zeros
        e = torch.randn(shape, dtype=x.dtype, device=x.device) * self.augment_std
        log_q = -0.5 * (e / self.augment_std).pow(2) - math.log(self.augment_std) - 0.5 * math.log(2 * math.pi)
        return torch.cat([x, e], dim=1), log_q.sum(dim=(1, 2))

    # ------------------------------------------------------------------ the maps
    def to_latent(self, x: Tensor, modality: str) -> Tensor:
        """``z = F_modality([x; 0])``: features ``(B, C_m, T)`` -> latent ``(B, width, T)``."""
        self.check_input(x, modality)
        padded, _ = self._augment(x, modality, noise=False)
        return self.flows[modality].to_latent(padded)

    def from_latent(self, z: Tensor, modality: str) -> Tensor:
        """``x = F_modality^{-1}(z)[:, :C_m]``: latent ``(B, width, T)`` -> features ``(B, C_m, T)``."""
        if modality not in self.input_dims:
            raise ModalityError(f"unknown modality {modality!r}; this model knows {list(self.input_dims)}")
        if z.dim() != 3 or z.shape[1] != self.width:
            raise ModalityError(f"latent must be (B, {self.width}, T), got shape {tuple(z.shape)}")
        return self.flows[modality].from_latent(z)[:, : self.input_dims[modality]]

    def transfer(self, x: Tensor, src: str, dst: str) -> Tensor:
        """Carry ``x`` of modality ``src`` to modality ``dst``: ``F_dst^{-1}(F_src(x))``.

        Args:
            x: ``(B, C_src, T)`` features of modality ``src``.
        Returns:
            ``(B, C_dst, T)`` recovered features of modality ``dst``.
        """
        if src == dst:
            raise ModalityError(f"src and dst are both {src!r}: nothing to transfer")
        if dst not in self.input_dims:
            raise ModalityError(f"unknown modality {dst!r}; this model knows {list(self.input_dims)}")
        return self.from_latent(self.to_latent(x, src), dst)

    def log_prob(self, x: Tensor, modality: str, y: Tensor | None = None) -> Tensor:
        """Log-density per sample ``(B,)`` in nats: exact for full-width modalities, a one-sample
        lower bound (augmentation noise drawn) for narrower ones."""
        self.check_input(x, modality)
        padded, log_q = self._augment(x, modality, noise=True)
        return self.flows[modality].log_prob(padded, y) - log_q

    def nll(self, x: Tensor, modality: str, y: Tensor | None = None) -> Tensor:
        """Mean negative log-likelihood in bits per input dimension (the training loss)."""
        dims = self.input_dims[modality] * x.shape[-1]
        return (-self.log_prob(x, modality, y) / (dims * math.log(2))).mean()

    def sample(self, n: int, modality: str, y: Tensor | None = None, length: int = 1) -> Tensor:
        """Draw ``n`` samples ``(n, C_m, length)`` of a modality from the shared prior."""
        z = self.prior.sample(n, y=y, length=length)
        return self.from_latent(z, modality)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> Path:
        """Write configuration and weights to one file, atomically."""
        return atomic_save({"format": _FORMAT, "config": self.config(), "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str | Path) -> CrossModalFlows:
        """Rebuild a model saved with :meth:`save`. Never executes code from the file."""
        payload = safe_load(path)
        fmt = payload.get("format") if isinstance(payload, dict) else None
        if fmt != _FORMAT and fmt not in _LEGACY_FORMATS:
            raise CheckpointError(f"{path} is not a saved CrossModalFlows (format {_FORMAT!r} expected)")
        config = payload["config"]
        flow_kwargs = {**_LEGACY_FORMATS.get(fmt, {}), **config["flow_kwargs"]}
        for key in ("coupling", "conditioner"):
            if isinstance(flow_kwargs.get(key), str) and flow_kwargs[key].startswith("custom:"):
                raise CheckpointError(
                    f"{path} was saved from flows with a custom {key} ({flow_kwargs[key]}); "
                    "rebuild the model in code and load its state_dict instead"
                )
        model = cls(
            config["input_dims"],
            width=config["width"],
            num_classes=config["num_classes"],
            augment_std=config["augment_std"],
            **flow_kwargs,
        )
        model.load_state_dict(payload["state_dict"])
        model.eval()
        return model
