r"""Class-conditional diagonal Gaussian prior over ``(batch, channels, time)`` latents.

For class :math:`c` the prior is

.. math:: p(z \mid c) = \prod_{i=1}^{C} \prod_{t=1}^{T}
          \mathcal N\big(z_{i,t};\ \mu_{c,i},\ \sigma_{c,i}^2\big),

one mean and one standard deviation per class and channel, shared over time (DiCMoR, Wang et al.,
ICCV 2023). Both are learnable and start at :math:`\mathcal N(0, I)`.

The same prior object may be handed to several :class:`~flowtransfer.flows.TemporalFlow` s: they
then map their modalities into one class-structured latent space, which is what makes cross-modal
transfer work. Sharing means passing the *same* module; its parameters then receive gradients from
every flow that uses it.
"""

from __future__ import annotations

import math

import torch
from nflows.distributions.base import Distribution
from torch import Tensor, nn

__all__ = ["ClassConditionalGaussian"]

_LOG_2PI = math.log(2.0 * math.pi)


class ClassConditionalGaussian(Distribution):
    r"""Diagonal Gaussian per class and channel, shared over time (an nflows ``Distribution``).

    Arguments:
        channels: number of latent channels :math:`C`.
        num_classes: number of classes :math:`K`. ``None`` makes the prior unconditional: a single
            Gaussian (one mean and log-std per channel) that takes no labels.
        learnable: whether the means and log-stds are trained. ``False`` fixes the prior at
            :math:`\mathcal N(0, I)` (stored as buffers, so it still moves with ``.to()``).

    Parameters: ``loc`` and ``log_std``, each ``(K, C)`` (``(1, C)`` when unconditional).

    Labels ``y`` are integer class indices of shape ``(B,)`` in ``[0, K)``. A conditional prior
    requires them (a clear error otherwise; :meth:`marginal_log_prob` gives the label-free density
    of the uniform class mixture); an unconditional prior refuses them.

    Example:
        >>> prior = ClassConditionalGaussian(32, num_classes=7)
        >>> z = torch.randn(8, 32, 50)
        >>> prior.log_prob(z, torch.randint(7, (8,))).shape
        torch.Size([8])
    """

    def __init__(self, channels: int, num_classes: int | None = None, *, learnable: bool = True):
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
        self.channels = int(channels)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.learnable = bool(learnable)
        rows = 1 if num_classes is None else num_classes
        mean = torch.zeros(rows, channels)
        log_std = torch.zeros(rows, channels)
        if learnable:
            self.loc = nn.Parameter(mean)
            self.log_std = nn.Parameter(log_std)
        else:
            self.register_buffer("loc", mean)
            self.register_buffer("log_std", log_std)

    @property
    def conditional(self) -> bool:
        """True when the prior has one Gaussian per class."""
        return self.num_classes is not None

    def extra_repr(self) -> str:
        return f"channels={self.channels}, num_classes={self.num_classes}, learnable={self.learnable}"

    # ------------------------------------------------------------------ parameters by label
    def _check_labels(self, y: Tensor | int | None, n: int) -> Tensor | None:
        """Validate labels for a batch of ``n``; return ``(n,)`` int64 indices or ``None``."""
        if not self.conditional:
            if y is not None:
                raise ValueError(
                    "this prior is unconditional (num_classes=None) but labels y were given; "
                    "build it with num_classes=K to condition on classes"
                )
            return None
        if y is None:
            raise ValueError(
                f"this prior is class-conditional (num_classes={self.num_classes}): labels y of "
                f"shape ({n},) are required (use marginal_log_prob for the label-free density)"
            )
        y = torch.as_tensor(y, device=self.loc.device)
        if y.dim() == 0:
            y = y.expand(n)
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
            raise TypeError(
                f"labels y must be integer class indices, got dtype {y.dtype} "
                "(for sentiment scores use flowtransfer.labels.sentiment_classes)"
            )
        if y.shape != (n,):
            raise ValueError(f"labels y must have shape ({n},), got {tuple(y.shape)}")
        # the value check reads the labels on the host: done on the CPU in eager mode only, so a
        # compiled flow has no graph break and a GPU never waits (an out-of-range label then fails
        # in the index below)
        if n > 0 and y.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"labels y must lie in [0, {self.num_classes}), got values in [{lo}, {hi}]"
                )
        return y.long()

    def params(self, y: Tensor | None = None, n: int = 1) -> tuple[Tensor, Tensor]:
        """Means and log-stds ``(n, C)`` for labels ``y`` (shape ``(n,)``), gathered in one index."""
        idx = self._check_labels(y, n)
        if idx is None:
            return self.loc.expand(n, -1), self.log_std.expand(n, -1)
        return self.loc[idx], self.log_std[idx]

    def _check_latent(self, z: Tensor) -> None:
        if z.dim() != 3 or z.shape[1] != self.channels:
            raise ValueError(
                f"expected latent of shape (batch, {self.channels}, time), got {tuple(z.shape)}"
            )

    # ------------------------------------------------------------------ density
    def log_prob(self, inputs: Tensor, context: Tensor | int | None = None) -> Tensor:
        r"""Log-density :math:`\log p(z \mid y)` summed over channels and time, shape ``(B,)``.

        ``context`` is the label tensor ``y`` (nflows' name for the conditioning input).
        """
        self._check_latent(inputs)
        return self._log_prob(inputs, context)

    def _log_prob(self, inputs: Tensor, context: Tensor | int | None) -> Tensor:
        b, c, t = inputs.shape
        mean, log_std = self.params(context, b)
        u = (inputs - mean.unsqueeze(-1)) * torch.exp(-log_std).unsqueeze(-1)
        return -0.5 * u.square().sum((1, 2)) - t * log_std.sum(1) - 0.5 * c * t * _LOG_2PI

    def marginal_log_prob(self, z: Tensor) -> Tensor:
        r"""Label-free log-density of the uniform class mixture,
        :math:`\log \frac1K \sum_c p(z \mid c)`, shape ``(B,)``.

        For an unconditional prior this equals :meth:`log_prob`.
        """
        self._check_latent(z)
        if not self.conditional:
            return self._log_prob(z, None)
        b, c, t = z.shape
        k = self.num_classes
        # one broadcast over classes: (B, K, C, T); fine for the small K of class priors
        inv = torch.exp(-self.log_std)  # (K, C)
        u = (z.unsqueeze(1) - self.loc[None, :, :, None]) * inv[None, :, :, None]  # (B,K,C,T)
        per_class = -0.5 * u.square().sum((2, 3)) - t * self.log_std.sum(1) - 0.5 * c * t * _LOG_2PI
        return torch.logsumexp(per_class, dim=1) - math.log(k)

    # ------------------------------------------------------------------ sampling
    def sample(
        self,
        num_samples: int,
        y: Tensor | int | None = None,
        length: int = 1,
        *,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> Tensor:
        """Draw ``(num_samples, C, length)`` latents; ``y`` is ``(num_samples,)`` or one int.
        ``temperature`` multiplies the standard deviations (1: the prior itself)."""
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        if int(length) != length or length < 1:
            raise ValueError(f"length must be a positive integer, got {length}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        mean, log_std = self.params(y, int(num_samples))
        eps = torch.randn(
            int(num_samples), self.channels, int(length),
            dtype=self.loc.dtype, device=self.loc.device, generator=generator,
        )
        return mean.unsqueeze(-1) + (float(temperature) * torch.exp(log_std)).unsqueeze(-1) * eps

    def box_radius(self, k: float = 6.0, y: Tensor | int | None = None) -> Tensor:
        r"""Per-channel radius ``(C,)`` of the prior's ``k``-sigma box around the origin:
        :math:`\max_y |\mu_{y,c}| + k\sigma_{y,c}` over the classes ``y`` (default: all classes).
        Every latent within ``k`` standard deviations of a class mean lies inside it."""
        if not (math.isfinite(k) and k >= 0):
            raise ValueError(f"k must be a finite number >= 0, got {k}")
        with torch.no_grad():
            loc, log_std = self.loc, self.log_std
            if y is not None:
                idx = torch.as_tensor(y, device=loc.device).reshape(-1).unique()
                loc, log_std = self.params(idx, len(idx))
            return (loc.abs() + k * torch.exp(log_std)).amax(0).double()

    def _sample(self, num_samples: int, context: Tensor | None) -> Tensor:
        return self.sample(num_samples, context)

    def _mean(self, context: Tensor | None) -> Tensor:
        n = 1 if context is None else len(context)
        return self.params(context, n)[0].unsqueeze(-1)
