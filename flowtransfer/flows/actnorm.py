r"""Activation normalisation over channels for ``(batch, channels, time)`` inputs (Glow).

.. math:: y_{c,t} = (x_{c,t} - b_c)\, e^{\ell_c}, \qquad
          \log\lvert\det J\rvert = T \sum_c \ell_c

with a per-channel shift :math:`b` and log-scale :math:`\ell` (so the scale :math:`s = e^{\ell}`
is positive and :math:`\log|s| = \ell`). Reference: Kingma & Dhariwal, *Glow*, NeurIPS 2018.
"""

from __future__ import annotations

import torch
from nflows.transforms.base import Transform
from torch import Tensor, nn

__all__ = ["ActNorm"]


def _check_input(x: Tensor, channels: int, who: str) -> None:
    if x.dim() != 3 or x.shape[1] != channels:
        raise ValueError(f"{who}: expected input of shape (batch, {channels}, time), got {tuple(x.shape)}")


class ActNorm(Transform):
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

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set shift and scale from a batch ``x`` of shape ``(B, C, T)``; mark as initialised."""
        _check_input(x, self.channels, "ActNorm.initialize")
        flat = x.detach().transpose(0, 1).reshape(self.channels, -1).double()
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

    def _logabsdet(self, x: Tensor) -> Tensor:
        return (x.shape[2] * self.log_scale.sum()).expand(x.shape[0])

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input(inputs, self.channels, "ActNorm")
        if self.training and not bool(self.initialized):
            self.initialize(inputs)
        y = (inputs - self.shift[:, None]) * torch.exp(self.log_scale)[:, None]
        return y, self._logabsdet(inputs)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        _check_input(inputs, self.channels, "ActNorm.inverse")
        # divide by the same exp(log_scale) the forward multiplies by: one rounding, not two
        x = inputs / torch.exp(self.log_scale)[:, None] + self.shift[:, None]
        return x, -self._logabsdet(inputs)
