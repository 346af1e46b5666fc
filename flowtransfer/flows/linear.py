r"""Channel mixing for ``(batch, channels, time)`` inputs: LU 1x1 convolution, permutation, flip.

A coupling layer leaves half of the channels unchanged; mixing between couplings makes every channel
transformed somewhere in the stack. All three layers act on channels only, identically at every time
step: on channel-major ``(C, B, T)`` tensors (:mod:`~flowtransfer.flows.layout`) the 1x1 convolution
is one ``(C, C) @ (C, B*T)`` matrix product and the permutations are row gathers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .layout import ChannelMajorTransform

__all__ = ["InvertibleConv1x1", "ChannelPermutation", "ChannelFlip"]


def _channel_matmul(w: Tensor, x: Tensor) -> Tensor:
    """``(C', C) @ (C, B, T) -> (C', B, T)``, one matrix product."""
    return torch.mm(w, x.reshape(x.shape[0], -1)).view(w.shape[0], x.shape[1], x.shape[2])


class InvertibleConv1x1(ChannelMajorTransform):
    r"""Invertible 1x1 convolution over channels, LU-parametrised (Glow, Kingma & Dhariwal 2018).

    .. math:: W = P L \big(U + \operatorname{diag}(\mathrm{sign} \odot e^{\mathbf{s}})\big),
              \qquad y_{:,t} = W x_{:,t}, \qquad \log\lvert\det J\rvert = T \sum_i s_i

    with a fixed permutation :math:`P`, a unit lower-triangular :math:`L`, a strictly upper
    triangular :math:`U`, a fixed sign vector and a learnable log-magnitude :math:`\mathbf s` of the
    diagonal. Initialised from the LU decomposition of a random orthogonal matrix.

    The weight (and, for :meth:`inverse`, its inverse) is computed once per call, not per time step,
    in float64 for float32 layers, so the round trip is accurate to float32 precision (see
    :meth:`weight_inverse`).

    Arguments:
        channels: number of channels :math:`C`.
        generator: optional random generator for the initial orthogonal matrix.

    Shapes: ``(B, C, T) -> (B, C, T)``, log-det ``(B,)``.
    """

    def __init__(self, channels: int, generator: torch.Generator | None = None):
        super().__init__()
        self.channels = int(channels)
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        dt = torch.get_default_dtype()  # formed in float64, stored in the default dtype
        self.register_buffer("permutation", p.to(dt))
        self.register_buffer("sign", torch.sign(diag).to(dt))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(torch.tril(lower, -1).to(dt))
        self.upper = nn.Parameter(torch.triu(upper, 1).to(dt))
        self.log_diag = nn.Parameter(torch.log(torch.abs(diag)).to(dt))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    def _factors(self) -> tuple[Tensor, Tensor]:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign * torch.exp(self.log_diag))
        return lower, upper

    def _work_dtype(self) -> torch.dtype:
        dt = self.lower.dtype
        return torch.float64 if dt in (torch.float32, torch.float16, torch.bfloat16) else dt

    def weight(self) -> Tensor:
        """The ``(C, C)`` matrix :math:`W` (formed in float64, rounded once to the layer's dtype).

        Formed afresh at every call, never cached: an optimiser may update the parameters without
        a trace a cache could check (PyTorch's fused Adam leaves the version counters as they are)."""
        work = self._work_dtype()
        lower, upper = self._factors()
        w = self.permutation.to(work) @ (lower.to(work) @ upper.to(work))
        return w.to(self.lower.dtype)

    def weight_inverse(self) -> Tensor:
        """The ``(C, C)`` matrix :math:`W^{-1}`, the inverse of the *rounded* :meth:`weight` actually
        applied by :meth:`forward`, computed in float64 for lower-precision layers.

        Inverting the rounded matrix (rather than the exact LU product) removes a mismatch of one
        rounding per entry between the two directions; the round trip then only carries the
        rounding of the two matrix products.
        """
        work = self._work_dtype()
        w = self.weight().detach().to(work) if not torch.is_grad_enabled() else self.weight().to(work)
        return torch.linalg.inv(w).to(self.lower.dtype)

    def logabsdet_per_step(self) -> Tensor:
        r"""Scalar :math:`\sum_i s_i`, the log-det of one time step."""
        return self.log_diag.sum()

    def _logabsdet(self, x: Tensor) -> Tensor:
        # x is channel-major (C, B, T)
        return (x.shape[2] * self.logabsdet_per_step()).expand(x.shape[1])

    def forward_cm(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return _channel_matmul(self.weight(), x), self._logabsdet(x)

    def inverse_cm(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return _channel_matmul(self.weight_inverse(), x), -self._logabsdet(x)

    def forward_cm_nologdet(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return _channel_matmul(self.weight(), x)

    def inverse_cm_nologdet(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return _channel_matmul(self.weight_inverse(), x)

    def inverse_bound(self, radius: Tensor) -> Tensor:
        """``|x| <= |W^{-1}| radius`` (entrywise absolute values): finite, but it compounds over a
        stack of 1x1 convolutions, which is why the bounded default flow permutes instead."""
        with torch.no_grad():
            w_inv = torch.linalg.inv(self.weight().detach().double())
        return w_inv.abs().to(radius) @ radius


class ChannelPermutation(ChannelMajorTransform):
    """A fixed random permutation of channels (log-det 0).

    Arguments:
        channels: number of channels :math:`C`.
        seed: seed of the permutation; ``None`` draws it from torch's global generator.
            The permutation is a buffer, so it is saved and loaded with the model.
    """

    def __init__(self, channels: int, seed: int | None = None):
        super().__init__()
        self.channels = int(channels)
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(channels, generator=gen)
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    def forward_cm(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x.index_select(0, self.perm), x.new_zeros(x.shape[1])

    def inverse_cm(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x.index_select(0, self.inverse_perm), x.new_zeros(x.shape[1])

    def forward_cm_nologdet(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return x.index_select(0, self.perm)

    def inverse_cm_nologdet(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return x.index_select(0, self.inverse_perm)

    def inverse_bound(self, radius: Tensor) -> Tensor:
        return radius.index_select(0, self.inverse_perm.to(radius.device))


class ChannelFlip(ChannelMajorTransform):
    """Reverse the channel order (log-det 0); its own inverse. Swaps the coupling halves."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    def forward_cm(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x.flip(0), x.new_zeros(x.shape[1])

    def inverse_cm(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return x.flip(0), x.new_zeros(x.shape[1])

    def forward_cm_nologdet(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return x.flip(0)

    def inverse_cm_nologdet(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return x.flip(0)

    def inverse_bound(self, radius: Tensor) -> Tensor:
        return radius.flip(0)
