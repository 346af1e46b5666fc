r"""Residual channel-attention blocks with 1D convolutions (RCAN, Zhang et al., ECCV 2018).

DiCMoR refines a recovered modality with one residual group of 20 RCABs wrapped between 1x1
convolutions ``d -> 2d`` and ``2d -> d`` (METHODS §3). Everything here maps ``(B, C, T)`` to
``(B, C, T)``, keeps ``T`` (padding ``k // 2`` with odd kernels) and works for ``T = 1``.

Channel attention, with :math:`W_D: C \to C/r` and :math:`W_U: C/r \to C` (1x1 convs with bias):

.. math:: z_c = \frac1T \sum_t x_{c,t}, \qquad s = \sigma\big(W_U\,\mathrm{ReLU}(W_D z)\big),
          \qquad \mathrm{CA}(x)_{c,t} = s_c\, x_{c,t}

RCAB: :math:`F_b = F_{b-1} + \mathrm{CA}\big(W_2\,\mathrm{ReLU}(W_1 F_{b-1})\big)` with ``k = 3``
convolutions and no normalisation. Residual group: ``B`` RCABs, a ``k = 3`` convolution, and a skip
from the group input.

Example:
    >>> import torch
    >>> refiner = Refiner(d=32)            # hidden 64, 20 RCABs, bottleneck 4 channels
    >>> refiner(torch.randn(8, 32, 50)).shape
    torch.Size([8, 32, 50])
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["ChannelAttention1d", "RCAB1d", "ResidualGroup1d", "Refiner"]


def _check(x: Tensor, channels: int, who: str) -> None:
    if x.dim() != 3 or x.shape[1] != channels:
        raise ValueError(f"{who}: expected (batch, {channels}, time), got shape {tuple(x.shape)}")


def _odd_kernel(kernel_size: int) -> int:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1 (to keep T), got {kernel_size}")
    return kernel_size


class ChannelAttention1d(nn.Module):
    """Squeeze-and-excitation over channels: ``(B, C, T) -> (B, C, T)``.

    Args:
        channels: ``C``.
        reduction: ``r``; the bottleneck has ``max(1, C // r)`` channels.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1, got {channels}, {reduction}")
        self.channels = channels
        self.bottleneck = max(1, channels // reduction)
        self.down = nn.Conv1d(channels, self.bottleneck, 1)
        self.up = nn.Conv1d(self.bottleneck, channels, 1)

    def weights(self, x: Tensor) -> Tensor:
        """The attention weights ``s`` of shape ``(B, C, 1)``, each in (0, 1)."""
        _check(x, self.channels, type(self).__name__)
        z = x.mean(dim=-1, keepdim=True)
        return self.up(self.down(z).relu()).sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weights(x)


class RCAB1d(nn.Module):
    """Residual channel-attention block: ``x + CA(conv(ReLU(conv(x))))``, shape-preserving."""

    def __init__(self, channels: int, kernel_size: int = 3, reduction: int = 16) -> None:
        super().__init__()
        k = _odd_kernel(kernel_size)
        self.channels = channels
        self.body = nn.Sequential(
            nn.Conv1d(channels, channels, k, padding=k // 2),
            nn.ReLU(),
            nn.Conv1d(channels, channels, k, padding=k // 2),
            ChannelAttention1d(channels, reduction),
        )

    def forward(self, x: Tensor) -> Tensor:
        _check(x, self.channels, type(self).__name__)
        return x + self.body(x)


class ResidualGroup1d(nn.Module):
    """``num_blocks`` RCABs, then a convolution, plus a skip: ``x + conv(RCABs(x))``."""

    def __init__(self, channels: int, num_blocks: int = 20, kernel_size: int = 3, reduction: int = 16) -> None:
        super().__init__()
        k = _odd_kernel(kernel_size)
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.channels = channels
        self.body = nn.Sequential(
            *(RCAB1d(channels, k, reduction) for _ in range(num_blocks)),
            nn.Conv1d(channels, channels, k, padding=k // 2),
        )

    def forward(self, x: Tensor) -> Tensor:
        _check(x, self.channels, type(self).__name__)
        return x + self.body(x)


class Refiner(nn.Module):
    """DiCMoR's refiner ``D``: 1x1 conv ``d -> hidden``, a residual group, 1x1 conv ``hidden -> d``.

    Args:
        d: feature width in and out.
        hidden: width inside (default ``2 d``: 64 for MOSI, 128 for MOSEI).
        num_blocks: RCABs in the group (DiCMoR: 20).
        reduction: channel-attention reduction (DiCMoR: 16, so a 4-channel bottleneck at hidden 64).
        kernel_size: temporal kernel of the group's convolutions (odd).

    Shapes: ``(B, d, T) -> (B, d, T)``.
    """

    def __init__(
        self, d: int, hidden: int | None = None, num_blocks: int = 20, reduction: int = 16, kernel_size: int = 3
    ) -> None:
        super().__init__()
        if d < 1:
            raise ValueError(f"d must be >= 1, got {d}")
        hidden = 2 * d if hidden is None else hidden
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        self.d, self.hidden = d, hidden
        self.head = nn.Conv1d(d, hidden, 1)
        self.group = ResidualGroup1d(hidden, num_blocks, kernel_size, reduction)
        self.tail = nn.Conv1d(hidden, d, 1)

    def forward(self, x: Tensor) -> Tensor:
        _check(x, self.d, type(self).__name__)
        return self.tail(self.group(self.head(x)))
