r"""Activation normalisation over channels for ``(batch, channels, time)`` inputs (Glow).

.. math:: y_{c,t} = (x_{c,t} - b_c)\, e^{\ell_c}, \qquad
          \log\lvert\det J\rvert = T \sum_c \ell_c

with a per-channel shift :math:`b` and log-scale :math:`\ell` (so the scale :math:`s = e^{\ell}`
is positive and :math:`\log|s| = \ell`). Reference: Kingma & Dhariwal, *Glow*, NeurIPS 2018.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layout import ChannelMajorTransform, check_input

__all__ = ["ActNorm"]


class ActNorm(ChannelMajorTransform):
    r"""Per-channel affine normalisation with data-dependent initialisation.

    On the first :meth:`forward` in training mode the shift and scale are set so that the output
    has zero mean and unit standard deviation per channel over batch and time. A buffer
    ``initialized`` records this, so the state survives ``state_dict`` save/load and a loaded
    layer is not re-initialised. Until initialised (e.g. in eval mode) the layer is the identity.
    When the first batch holds a single value per channel (``B * T == 1``) only the mean is set.
    Under ``torch.distributed`` the statistics are pooled over every process's first batch (one
    all-reduce), so all ranks start from the same shift and scale.

    Arguments:
        channels: number of channels :math:`C`.
        eps: added to the standard deviation at initialisation.

    Shapes: ``(B, C, T) -> (B, C, T)``, log-det ``(B,)``.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.channels = int(channels)
        self.eps = float(eps)
        self.shift = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(False))
        # a host-side copy of ``initialized``, so the forward never reads a tensor to decide
        self._initialized = False

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    def initialize(self, x: Tensor) -> None:
        """Set shift and scale from a batch ``x`` of shape ``(B, C, T)``; mark as initialised."""
        check_input(x, self.channels, "ActNorm.initialize")
        self.initialize_cm(x.transpose(0, 1))

    @torch.no_grad()
    def initialize_cm(self, x: Tensor) -> None:
        """:meth:`initialize` from a channel-major batch ``(C, B, T)``."""
        flat = x.detach().reshape(self.channels, -1).double()
        # count, sum and sum of squares per channel, pooled over processes when distributed
        stats = torch.cat([flat.new_tensor([flat.shape[1]]), flat.sum(1), flat.square().sum(1)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        n, total, squares = stats[0], stats[1 : 1 + self.channels], stats[1 + self.channels :]
        mean = total / n
        self.shift.copy_(mean)
        if n > 1:
            std = (squares / n - mean.square()).clamp_min(0.0).sqrt()
            self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)
        self._initialized = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)  # read once, at load time

    def _logabsdet(self, x: Tensor) -> Tensor:
        # x is channel-major (C, B, T)
        return (x.shape[2] * self.log_scale.sum()).expand(x.shape[1])

    def forward_cm(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.training and not self._initialized:
            self.initialize_cm(x)
        y = (x - self.shift[:, None, None]) * torch.exp(self.log_scale)[:, None, None]
        return y, self._logabsdet(x)

    def inverse_bound(self, radius: Tensor) -> Tensor:
        """``|x_c| <= radius_c e^{-l_c} + |b_c|`` for the inverse ``x = y e^{-l} + b``."""
        ls, b = self.log_scale.detach().to(radius), self.shift.detach().to(radius)
        return radius * torch.exp(-ls) + b.abs()

    def inverse_cm(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # divide by the same exp(log_scale) the forward multiplies by: one rounding, not two
        return self.inverse_cm_nologdet(x, context), -self._logabsdet(x)

    def inverse_cm_nologdet(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return x / torch.exp(self.log_scale)[:, None, None] + self.shift[:, None, None]
