r"""Class-conditional temporal normalizing flow over ``(batch, channels, time)`` features.

A :class:`TemporalFlow` is an nflows ``Flow``: a stack of :class:`FlowStep` s (data to noise) and a
:class:`~flowtransfer.flows.prior.ClassConditionalGaussian`. Its exact log-density follows from the
change of variables,

.. math:: \log p(x \mid y) = \log \mathcal N\big(f(x);\ \mu_y, \sigma_y^2\big)
          + \log\bigl\lvert\det \tfrac{\partial f}{\partial x}\bigr\rvert ,

and cross-modal transfer (DiCMoR, Wang et al., ICCV 2023) is
``flow_dst.from_latent(flow_src.to_latent(x))`` with both flows sharing one prior.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from nflows.flows.base import Flow
from nflows.transforms.base import CompositeTransform, Transform
from torch import Tensor

from .actnorm import ActNorm
from .coupling import AffineCoupling
from .layout import ChannelMajorTransform, from_channel_major, to_channel_major
from .linear import ChannelFlip, ChannelPermutation, InvertibleConv1x1
from .prior import ClassConditionalGaussian

__all__ = ["FlowStep", "TemporalFlow", "MIXINGS"]

#: channel-mixing choices of a :class:`FlowStep`
MIXINGS = ("conv1x1", "flip", "permutation", None)


class FlowStep(ChannelMajorTransform):
    """One step: ``ActNorm -> channel mixing -> AffineCoupling``, each part switchable.

    Arguments:
        channels: number of channels.
        hidden, kernel_size, scale, cond_channels, clamp, activation: see
            :class:`~flowtransfer.flows.coupling.AffineCoupling`.
        actnorm: include an :class:`~flowtransfer.flows.actnorm.ActNorm`.
        mixing: ``"conv1x1"`` (LU 1x1 convolution), ``"flip"``, ``"permutation"`` or ``None``.
        seed: seeds the permutation / the 1x1 convolution's initial matrix (``None``: global RNG).

    Shapes: ``(B, C, T) -> (B, C, T)``, log-det ``(B,)``.
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        kernel_size: int = 3,
        *,
        actnorm: bool = True,
        mixing: Literal["conv1x1", "flip", "permutation"] | None = "conv1x1",
        scale: Literal["sigmoid", "softclamp", "additive"] = "softclamp",
        cond_channels: int = 0,
        clamp: float = 2.0,
        activation: str = "relu",
        seed: int | None = None,
    ):
        super().__init__()
        if mixing not in MIXINGS:
            raise ValueError(f"unknown mixing {mixing!r}; choose one of {MIXINGS}")
        layers: list[Transform] = []
        if actnorm:
            layers.append(ActNorm(channels))
        if mixing == "conv1x1":
            gen = None if seed is None else torch.Generator().manual_seed(int(seed))
            layers.append(InvertibleConv1x1(channels, generator=gen))
        elif mixing == "flip":
            layers.append(ChannelFlip(channels))
        elif mixing == "permutation":
            layers.append(ChannelPermutation(channels, seed=seed))
        layers.append(
            AffineCoupling(
                channels, hidden, kernel_size, scale=scale, cond_channels=cond_channels,
                clamp=clamp, activation=activation,
            )
        )
        self.layers = torch.nn.ModuleList(layers)
        self.channels = int(channels)
        self.cond_channels = int(cond_channels)

    @property
    def coupling(self) -> AffineCoupling:
        return self.layers[-1]

    def context_cm(self, context: Tensor | None, batch: int, length: int) -> Tensor | None:
        return self.coupling.context_cm(context, batch, length)

    def forward_cm(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = None
        for layer in self.layers:
            x, ld = layer.forward_cm(x, context)
            total = ld if total is None else total + ld
        return x, total

    def inverse_cm(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        total = None
        for layer in reversed(self.layers):
            x, ld = layer.inverse_cm(x, context)
            total = ld if total is None else total + ld
        return x, total


class TemporalFlow(Flow):
    r"""A class-conditional normalizing flow over ``(batch, channels, time)`` sequences.

    ``num_layers`` :class:`FlowStep` s (ActNorm -> mixing -> affine coupling with a ``Conv1d``
    conditioner over time) followed by a class-conditional diagonal Gaussian prior shared over
    time. Works for any sequence length ``T >= 1``.

    Arguments:
        channels: number of channels :math:`C` (>= 2).
        num_layers: number of flow steps (couplings).
        hidden: hidden width of the coupling networks.
        kernel_size: temporal kernel of the first conv of each coupling network (1 = pointwise).
        num_classes: classes of the prior; ``None`` gives an unconditional learnable Gaussian.
        actnorm: ActNorm at the start of every step.
        mixing: ``"conv1x1"`` (default), ``"flip"``, ``"permutation"`` or ``None`` (no mixing: the
            first ``C // 2`` channels then pass through every layer unchanged).
        scale: coupling scale function. The default ``"softclamp"`` bounds every layer's scale
            in :math:`(e^{-c}, e^{c})` in both directions and starts as the identity; ``"sigmoid"``
            (DiCMoR/Glow) bounds only the forward direction, so :meth:`inverse` (used by
            :meth:`from_latent`, i.e. by transfer) can expand without bound. See
            :class:`~flowtransfer.flows.coupling.AffineCoupling`.
        cond_channels: channels of an optional conditioning input ``context`` to the couplings.
        prior: a :class:`ClassConditionalGaussian` to use (and share): the *same* module object is
            registered, never copied. ``None`` builds a new one.
        clamp: the soft-clamp bound :math:`c`.
        activation: activation of the coupling networks.
        seed: if given, the permutations / initial 1x1 matrices are seeded (step ``i`` uses
            ``seed + i``).

    Example:
        >>> flow = TemporalFlow(32, num_layers=4, num_classes=7)
        >>> x, y = torch.randn(8, 32, 50), torch.randint(7, (8,))
        >>> flow.log_prob(x, y).shape
        torch.Size([8])
        >>> torch.allclose(flow.from_latent(flow.to_latent(x)), x, atol=1e-5)
        True
    """

    def __init__(
        self,
        channels: int,
        num_layers: int = 32,
        hidden: int = 64,
        kernel_size: int = 3,
        num_classes: int | None = None,
        *,
        actnorm: bool = True,
        mixing: Literal["conv1x1", "flip", "permutation"] | None = "conv1x1",
        scale: Literal["sigmoid", "softclamp", "additive"] = "softclamp",
        cond_channels: int = 0,
        prior: ClassConditionalGaussian | None = None,
        clamp: float = 2.0,
        activation: str = "relu",
        seed: int | None = None,
    ):
        if channels < 2:
            raise ValueError(f"TemporalFlow needs channels >= 2, got {channels}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if prior is None:
            prior = ClassConditionalGaussian(channels, num_classes)
        else:
            if not isinstance(prior, ClassConditionalGaussian):
                raise TypeError(f"prior must be a ClassConditionalGaussian, got {type(prior).__name__}")
            if prior.channels != channels:
                raise ValueError(f"prior has {prior.channels} channels but the flow has {channels}")
            if num_classes is not None and prior.num_classes != num_classes:
                raise ValueError(f"prior has num_classes={prior.num_classes} but num_classes={num_classes} was given")
        steps = [
            FlowStep(
                channels, hidden, kernel_size, actnorm=actnorm, mixing=mixing, scale=scale,
                cond_channels=cond_channels, clamp=clamp, activation=activation,
                seed=None if seed is None else seed + i,
            )
            for i in range(num_layers)
        ]
        super().__init__(CompositeTransform(steps), prior)
        self.channels = int(channels)
        self.num_classes = prior.num_classes
        self.cond_channels = int(cond_channels)
        self.config = dict(
            channels=channels, num_layers=num_layers, hidden=hidden, kernel_size=kernel_size,
            num_classes=prior.num_classes, actnorm=actnorm, mixing=mixing, scale=scale,
            cond_channels=cond_channels, clamp=clamp, activation=activation, seed=seed,
        )

    @classmethod
    def dicmor_official(
        cls,
        channels: int,
        num_layers: int = 32,
        hidden: int = 64,
        num_classes: int | None = None,
        **kwargs,
    ) -> "TemporalFlow":
        """The flow of DiCMoR's released code: couplings only (no ActNorm, no mixing), pointwise
        networks (``kernel_size=1``), Glow's sigmoid scale.

        Its documented flaw: without mixing the first ``channels // 2`` channels pass through all
        layers unchanged, and each time step is transformed independently.
        """
        return cls(
            channels, num_layers, hidden, kernel_size=1, num_classes=num_classes,
            actnorm=False, mixing=None, scale="sigmoid", **kwargs,
        )

    # ------------------------------------------------------------------ structure
    @property
    def prior(self) -> ClassConditionalGaussian:
        """The (possibly shared) prior."""
        return self._distribution

    @property
    def steps(self) -> torch.nn.ModuleList:
        """The :class:`FlowStep` s, in data-to-noise order."""
        return self._transform._transforms

    def _check(self, x: Tensor, what: str) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[1] != self.channels or x.shape[2] < 1:
            raise ValueError(
                f"{what} must have shape (batch, {self.channels}, time) with time >= 1, got {tuple(x.shape)}"
            )

    # ------------------------------------------------------------------ maps
    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Data to noise: ``(z, logabsdet)`` with ``z`` ``(B, C, T)`` and log-det ``(B,)``.

        The same map as the ``CompositeTransform`` of the steps, computed channel-major between
        one transpose in and one out (:mod:`~flowtransfer.flows.layout`)."""
        self._check(inputs, "x")
        return self._run(inputs, context, inverse=False)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Noise to data: ``(x, logabsdet)``, the log-det of the inverse map (``(B,)``)."""
        self._check(inputs, "z")
        return self._run(inputs, context, inverse=True)

    def _run(self, inputs: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        steps = self.steps
        ctx = steps[0].context_cm(context, inputs.shape[0], inputs.shape[2])
        x, total = to_channel_major(inputs), inputs.new_zeros(inputs.shape[0])
        for step in (reversed(steps) if inverse else steps):
            x, ld = step.inverse_cm(x, ctx) if inverse else step.forward_cm(x, ctx)
            total = total + ld
        return from_channel_major(x), total

    def to_latent(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``z = f(x)``, shape ``(B, C, T)``."""
        return self.forward(x, context)[0]

    def from_latent(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``x = f^{-1}(z)``, shape ``(B, C, T)``."""
        return self.inverse(z, context)[0]

    def transform_to_noise(self, inputs: Tensor, context: Tensor | None = None) -> Tensor:
        """nflows' name for :meth:`to_latent`."""
        return self.to_latent(inputs, context)

    # ------------------------------------------------------------------ density
    def log_prob(self, x: Tensor, y: Tensor | int | None = None, context: Tensor | None = None) -> Tensor:
        r"""Exact :math:`\log p(x \mid y)` in nats, summed over channels and time, shape ``(B,)``.

        ``y``: class labels ``(B,)`` (required iff the prior is class-conditional);
        ``context``: the couplings' conditioning input, if they take one.
        """
        z, logabsdet = self.forward(x, context)
        return self._distribution.log_prob(z, y) + logabsdet

    def bits_per_dim(self, x: Tensor, y: Tensor | int | None = None, context: Tensor | None = None) -> Tensor:
        r"""Negative log-likelihood in bits per dimension, :math:`-\log p(x\mid y) / (C\,T\ln 2)`, ``(B,)``."""
        return -self.log_prob(x, y, context) / (x.shape[1] * x.shape[2] * math.log(2.0))

    # ------------------------------------------------------------------ sampling
    def _length(self, length: int | None, context: Tensor | None) -> int:
        if length is None:
            if context is not None and context.dim() == 3:
                return int(context.shape[2])
            raise ValueError("length (the number of time steps to sample) is required")
        return int(length)

    def sample(
        self,
        num_samples: int,
        y: Tensor | int | None = None,
        *,
        length: int | None = None,
        context: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw ``(num_samples, C, length)`` sequences: ``z ~ prior(y)``, ``x = f^{-1}(z)``."""
        z = self._distribution.sample(num_samples, y, self._length(length, context), generator=generator)
        return self.inverse(z, context)[0]

    def sample_and_log_prob(
        self,
        num_samples: int,
        y: Tensor | int | None = None,
        *,
        length: int | None = None,
        context: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Samples ``(n, C, length)`` and their log-density ``(n,)``, from one inverse pass."""
        z = self._distribution.sample(num_samples, y, self._length(length, context))
        x, logabsdet_inv = self.inverse(z, context)
        return x, self._distribution.log_prob(z, y) - logabsdet_inv
