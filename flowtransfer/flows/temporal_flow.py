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
from typing import Any, Literal, Mapping

import torch
from nflows.flows.base import Flow
from nflows.transforms.base import CompositeTransform, Transform
from torch import Tensor

from . import spline as _spline  # noqa: F401  (registers the "spline" coupling)
from .actnorm import ActNorm
from .conditioner import ConditionerFactory, resolve_conditioner
from .coupling import CouplingBuilder, build_coupling
from .layout import ChannelMajorTransform, from_channel_major, to_channel_major
from .linear import ChannelFlip, ChannelPermutation, InvertibleConv1x1
from .prior import ClassConditionalGaussian

__all__ = ["ACTNORM_PLACEMENTS", "FlowStep", "TemporalFlow", "MIXINGS", "resolve_coupling"]

#: channel-mixing choices of a :class:`FlowStep`
MIXINGS = ("conv1x1", "flip", "permutation", None)

#: where a :class:`TemporalFlow` puts ActNorm: every step, only the data end, or nowhere
ACTNORM_PLACEMENTS = ("every", "input", None)

_AFFINE_OPTIONS = ("scale", "clamp")
_SPLINE_OPTIONS = ("num_bins", "tail_bound")


def resolve_coupling(
    coupling: str | CouplingBuilder | None,
    *,
    scale: str | None = None,
    clamp: float | None = None,
    shift_bound: float | None = None,
    num_bins: int | None = None,
    tail_bound: float | None = None,
    options: Mapping[str, Any] | None = None,
) -> tuple[str | CouplingBuilder, dict[str, Any]]:
    """The coupling to build and its options, from the arguments of :class:`FlowStep`.

    ``coupling=None`` means ``"spline"``, unless an affine option (``scale``, ``clamp``) is given,
    which selects ``"affine"`` (so ``TemporalFlow(C, scale="sigmoid")`` keeps meaning what it
    always meant). An option that the chosen coupling does not read is an error, never ignored.
    """
    given = {k: v for k, v in dict(scale=scale, clamp=clamp, shift_bound=shift_bound,
                                  num_bins=num_bins, tail_bound=tail_bound).items() if v is not None}
    if coupling is None:
        coupling = "affine" if any(k in given for k in _AFFINE_OPTIONS) else "spline"
    allowed = {"affine": (*_AFFINE_OPTIONS, "shift_bound"), "additive": ("shift_bound",),
               "spline": _SPLINE_OPTIONS}
    if isinstance(coupling, str) and coupling in allowed:
        wrong = sorted(set(given) - set(allowed[coupling]))
        if wrong:
            raise ValueError(
                f"{wrong} do not apply to the {coupling!r} coupling (it takes {list(allowed[coupling])}); "
                "pass coupling='affine' for scale/clamp, coupling='spline' for num_bins/tail_bound"
            )
    return coupling, {**given, **dict(options or {})}


class FlowStep(ChannelMajorTransform):
    """One step: ``ActNorm -> channel mixing -> coupling``, each part switchable.

    Arguments:
        channels: number of channels.
        hidden, kernel_size, activation: sizes of the default conditioner
            (:class:`~flowtransfer.flows.conditioner.TemporalConditioner`).
        coupling: ``"spline"`` (:class:`~flowtransfer.flows.spline.RationalQuadraticCoupling`),
            ``"affine"`` / ``"additive"`` (:class:`~flowtransfer.flows.coupling.AffineCoupling`), a
            name added with :func:`~flowtransfer.flows.coupling.register_coupling`, or a builder
            callable; ``None``: see :func:`resolve_coupling`.
        conditioner: a :data:`~flowtransfer.flows.conditioner.ConditionerFactory` replacing the
            default conditioner (then leave ``hidden``, ``kernel_size``, ``activation`` alone).
        actnorm: include an :class:`~flowtransfer.flows.actnorm.ActNorm`.
        mixing: ``"conv1x1"`` (LU 1x1 convolution), ``"flip"``, ``"permutation"`` or ``None``.
        scale, clamp, shift_bound: options of the affine coupling.
        num_bins, tail_bound: options of the spline coupling.
        coupling_options: further keyword options for the coupling builder.
        cond_channels: channels of the couplings' conditioning input.
        seed: seeds the permutation / the 1x1 convolution's initial matrix (``None``: global RNG).

    Shapes: ``(B, C, T) -> (B, C, T)``, log-det ``(B,)``.
    """

    def __init__(
        self,
        channels: int,
        hidden: int = 64,
        kernel_size: int = 3,
        *,
        coupling: str | CouplingBuilder | None = None,
        conditioner: ConditionerFactory | None = None,
        actnorm: bool = True,
        mixing: Literal["conv1x1", "flip", "permutation"] | None = "permutation",
        scale: Literal["sigmoid", "softclamp", "additive"] | None = None,
        cond_channels: int = 0,
        clamp: float | None = None,
        shift_bound: float | None = None,
        num_bins: int | None = None,
        tail_bound: float | None = None,
        coupling_options: Mapping[str, Any] | None = None,
        activation: str = "relu",
        seed: int | None = None,
    ):
        super().__init__()
        if mixing not in MIXINGS:
            raise ValueError(f"unknown mixing {mixing!r}; choose one of {MIXINGS}")
        conditioner = resolve_conditioner(conditioner, hidden, kernel_size, activation)
        kind, options = resolve_coupling(coupling, scale=scale, clamp=clamp, shift_bound=shift_bound,
                                         num_bins=num_bins, tail_bound=tail_bound, options=coupling_options)
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
        layers.append(build_coupling(kind, channels, conditioner=conditioner, cond_channels=cond_channels, **options))
        self.layers = torch.nn.ModuleList(layers)
        self.channels = int(channels)
        self.cond_channels = int(cond_channels)

    @property
    def coupling(self) -> ChannelMajorTransform:
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

    def forward_cm_nologdet(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer.forward_cm_nologdet(x, context)
        return x

    def inverse_cm_nologdet(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        for layer in reversed(self.layers):
            x = layer.inverse_cm_nologdet(x, context)
        return x

    def inverse_bound(self, radius: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            radius = layer.inverse_bound(radius)
        return radius


class TemporalFlow(Flow):
    r"""A class-conditional normalizing flow over ``(batch, channels, time)`` sequences.

    ``num_layers`` :class:`FlowStep` s (mixing -> coupling with a ``Conv1d`` conditioner over time,
    ActNorm as placed by ``actnorm``) followed by a class-conditional diagonal Gaussian prior shared
    over time. Works for any sequence length ``T >= 1``.

    **The default is bounded by construction**: one ActNorm at the data end, then steps of a random
    channel permutation and a rational-quadratic spline coupling with identity tails outside
    :math:`[-B, B]` (:class:`~flowtransfer.flows.spline.RationalQuadraticCoupling`). Each spline's
    inverse obeys :math:`|x| \le \max(|y|, B)` elementwise and a permutation moves no value, so for
    every latent with :math:`\lVert z\rVert_\infty \le R` the output of :meth:`inverse` obeys

    .. math:: |x_c| \le \max(R, B)\, e^{-\ell_c} + |b_c|

    with the data-end ActNorm's log-scale :math:`\ell` and shift :math:`b`, whatever the conditioners
    output and however deep the flow is. :meth:`inverse_bound` computes this certificate for any
    design (it is ``inf`` where a layer cannot bound its inverse: an affine coupling with an
    unbounded shift, or Glow's sigmoid scale); for the prior's :math:`k`-sigma box,
    :math:`R = \max_{y,c} |\mu_{y,c}| + k\sigma_{y,c}`.

    Arguments:
        channels: number of channels :math:`C` (>= 2).
        num_layers: number of flow steps (couplings).
        hidden: hidden width of the coupling networks.
        kernel_size: temporal kernel of the first conv of each coupling network (1 = pointwise).
        num_classes: classes of the prior; ``None`` gives an unconditional learnable Gaussian.
        coupling: ``"spline"`` (default), ``"affine"``, ``"additive"``, a registered name or a
            builder (see :class:`FlowStep`, :func:`resolve_coupling`).
        conditioner: a conditioner factory replacing the default
            (:mod:`~flowtransfer.flows.conditioner` states the contract).
        actnorm: ``"input"`` (default: one ActNorm at the data end), ``"every"`` (or ``True``:
            every step, Glow), or ``None`` / ``False``.
        mixing: ``"permutation"`` (default), ``"conv1x1"``, ``"flip"`` or ``None`` (no mixing: the
            first ``C // 2`` channels then pass through every layer unchanged).
        scale, clamp, shift_bound: options of the affine coupling (see
            :class:`~flowtransfer.flows.coupling.AffineCoupling`); giving ``scale`` or ``clamp``
            without ``coupling`` selects the affine coupling.
        num_bins, tail_bound: options of the spline coupling (defaults 4 and 5.0).
        coupling_options: further options for the coupling builder.
        cond_channels: channels of an optional conditioning input ``context`` to the couplings.
        prior: a :class:`ClassConditionalGaussian` to use (and share): the *same* module object is
            registered, never copied. ``None`` builds a new one.
        activation: activation of the coupling networks.
        seed: if given, the permutations / initial 1x1 matrices are seeded (step ``i`` uses
            ``seed + i``).
        dtype, device: where the parameters live (default: torch's default dtype, the CPU).

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
        coupling: str | CouplingBuilder | None = None,
        conditioner: ConditionerFactory | None = None,
        actnorm: bool | str | None = "input",
        mixing: Literal["conv1x1", "flip", "permutation"] | None = "permutation",
        scale: Literal["sigmoid", "softclamp", "additive"] | None = None,
        clamp: float | None = None,
        shift_bound: float | None = None,
        num_bins: int | None = None,
        tail_bound: float | None = None,
        coupling_options: Mapping[str, Any] | None = None,
        cond_channels: int = 0,
        prior: ClassConditionalGaussian | None = None,
        activation: str = "relu",
        seed: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        if int(channels) != channels or channels < 2:
            raise ValueError(f"TemporalFlow needs channels >= 2, got {channels}")
        if int(num_layers) != num_layers or num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        placement = {True: "every", False: None}.get(actnorm, actnorm) if isinstance(actnorm, bool) else actnorm
        if placement not in ACTNORM_PLACEMENTS:
            raise ValueError(f"unknown actnorm {actnorm!r}; choose one of {ACTNORM_PLACEMENTS} (or True / False)")
        if prior is None:
            prior = ClassConditionalGaussian(channels, num_classes)
        else:
            if not isinstance(prior, ClassConditionalGaussian):
                raise TypeError(f"prior must be a ClassConditionalGaussian, got {type(prior).__name__}")
            if prior.channels != channels:
                raise ValueError(f"prior has {prior.channels} channels but the flow has {channels}")
            if num_classes is not None and prior.num_classes != num_classes:
                raise ValueError(f"prior has num_classes={prior.num_classes} but num_classes={num_classes} was given")
        kind, options = resolve_coupling(coupling, scale=scale, clamp=clamp, shift_bound=shift_bound,
                                         num_bins=num_bins, tail_bound=tail_bound, options=coupling_options)
        custom_conditioner = conditioner is not None
        conditioner = resolve_conditioner(conditioner, hidden, kernel_size, activation)
        steps = [
            FlowStep(
                channels, coupling=kind, conditioner=conditioner, coupling_options=options,
                actnorm=placement == "every" or (placement == "input" and i == 0), mixing=mixing,
                cond_channels=cond_channels, seed=None if seed is None else seed + i,
            )
            for i in range(num_layers)
        ]
        super().__init__(CompositeTransform(steps), prior)
        self.channels = int(channels)
        self.num_classes = prior.num_classes
        self.cond_channels = int(cond_channels)

        def name(obj: Any) -> Any:
            return obj if obj is None or isinstance(obj, str) else f"custom:{getattr(obj, '__qualname__', type(obj).__name__)}"

        #: plain-data arguments that rebuild this flow (a custom coupling or conditioner is named,
        #: not stored: such a flow must be rebuilt by the code that made it)
        self.config = dict(
            channels=channels, num_layers=num_layers, hidden=hidden, kernel_size=kernel_size,
            num_classes=prior.num_classes, coupling=name(kind), coupling_options=dict(options),
            conditioner=name(conditioner) if custom_conditioner else None, actnorm=placement, mixing=mixing,
            cond_channels=cond_channels, activation=activation, seed=seed,
        )
        if dtype is not None or device is not None:
            self.to(device=device, dtype=dtype)

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

    def forward_nologdet(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Data to noise without the log-det: the same ``z`` ``(B, C, T)`` as ``forward(x)[0]``,
        with no log-det computed (nor differentiated) in any layer. What :meth:`to_latent` runs."""
        self._check(x, "x")
        steps = self.steps
        ctx = steps[0].context_cm(context, x.shape[0], x.shape[2])
        z = to_channel_major(x)
        for step in steps:
            z = step.forward_cm_nologdet(z, ctx)
        return from_channel_major(z)

    def inverse_nologdet(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Noise to data without the log-det: the same ``x`` ``(B, C, T)`` as ``inverse(z)[0]``,
        with no log-det computed (nor differentiated) in any layer (the spline couplings skip
        their log-derivatives). What :meth:`from_latent` and :meth:`sample` run."""
        self._check(z, "z")
        steps = self.steps
        ctx = steps[0].context_cm(context, z.shape[0], z.shape[2])
        x = to_channel_major(z)
        for step in reversed(steps):
            x = step.inverse_cm_nologdet(x, ctx)
        return from_channel_major(x)

    def to_latent(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``z = f(x)``, shape ``(B, C, T)``, without computing the log-det
        (:meth:`forward_nologdet`; :meth:`forward` when it is needed)."""
        return self.forward_nologdet(x, context)

    def from_latent(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """``x = f^{-1}(z)``, shape ``(B, C, T)``, without computing the log-det
        (:meth:`inverse_nologdet`; :meth:`inverse` when it is needed)."""
        return self.inverse_nologdet(z, context)

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
        temperature: float = 1.0,
    ) -> Tensor:
        """Draw ``(num_samples, C, length)`` sequences: ``z ~ prior(y)`` with its standard deviations
        multiplied by ``temperature`` (``< 1`` gives more typical samples; 0 the class modes' images),
        then ``x = f^{-1}(z)``."""
        z = self._distribution.sample(num_samples, y, self._length(length, context), generator=generator,
                                      temperature=temperature)
        return self.inverse_nologdet(z, context)

    def sample_and_log_prob(
        self,
        num_samples: int,
        y: Tensor | int | None = None,
        *,
        length: int | None = None,
        context: Tensor | None = None,
        temperature: float = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """Samples ``(n, C, length)`` and their log-density ``(n,)`` under the model (not the tempered
        prior), from one inverse pass."""
        z = self._distribution.sample(num_samples, y, self._length(length, context), temperature=temperature)
        x, logabsdet_inv = self.inverse(z, context)
        return x, self._distribution.log_prob(z, y) - logabsdet_inv

    # ------------------------------------------------------------------ stability certificate
    def inverse_bound_from(self, radius: Tensor | float) -> Tensor:
        r"""Per-channel bound ``(C,)`` on :math:`|f^{-1}(z)_{c,t}|` for every latent with
        :math:`|z_{c,t}| \le` ``radius`` (a scalar or ``(C,)``), any length and context.

        Composed layer by layer from each layer's ``inverse_bound``: ActNorm
        :math:`r e^{-\ell} + |b|`, a 1x1 convolution :math:`|W^{-1}|\,r`, permutations move radii,
        spline couplings :math:`\max(r, B)`, affine couplings ``inf`` unless their shift is bounded.
        ``inf`` means the design gives no bound, not that the inverse diverges."""
        ref = self.prior.loc
        r = torch.as_tensor(radius, dtype=torch.float64, device=ref.device).detach()
        r = r.expand(self.channels).clone() if r.dim() == 0 else r.clone()
        if r.shape != (self.channels,):
            raise ValueError(f"radius must be a scalar or have shape ({self.channels},), got {tuple(r.shape)}")
        with torch.no_grad():
            for step in reversed(self.steps):
                r = step.inverse_bound(r)
        return r

    def inverse_bound(self, k: float = 6.0, y: Tensor | int | None = None) -> Tensor:
        r"""Per-channel bound ``(C,)`` on the inverse's output over the prior's ``k``-sigma box: every
        latent with :math:`|z_{c,t} - \mu_{y,c}| \le k\sigma_{y,c}` for the classes ``y`` (default:
        every class) maps to :math:`|x_{c,t}|` at most this (see :meth:`inverse_bound_from`)."""
        return self.inverse_bound_from(self.prior.box_radius(k, y))
