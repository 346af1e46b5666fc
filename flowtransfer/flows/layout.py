r"""Channel-major computation for the flow layers.

Every flow layer acts on channels, identically at every time step (the coupling networks also look
at neighbouring steps). Public inputs are ``(B, C, T)``, but there a channel mix ``W x`` is a batched
product whose operands need a transposed copy for every call. The layers therefore compute on
**channel-major** tensors ``(C, B, T)``: a channel mix is then one plain matrix product
``(C_out, C_in) @ (C_in, B*T)`` on contiguous memory, channel halves are contiguous views, and a
temporal convolution is one product over stacked shifted copies (:func:`conv1d_channel_major`).

A :class:`ChannelMajorTransform` implements :meth:`~ChannelMajorTransform.forward_cm` and
:meth:`~ChannelMajorTransform.inverse_cm` on ``(C, B, T)``; its public nflows ``forward`` /
``inverse`` on ``(B, C, T)`` transpose in and out around them. A
:class:`~flowtransfer.flows.temporal_flow.TemporalFlow` transposes once at each end and chains the
channel-major maps of its steps in between.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from nflows.transforms.base import Transform
from torch import Tensor

__all__ = [
    "ChannelMajorTransform",
    "to_channel_major",
    "from_channel_major",
    "context_to_channel_major",
    "conv1d_channel_major",
    "check_input",
]


def check_input(x: Tensor, channels: int, who: str) -> None:
    """Raise ``ValueError`` unless ``x`` is ``(batch, channels, time)``."""
    if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{who}: expected input of shape (batch, {channels}, time), got {shape}")


def to_channel_major(x: Tensor) -> Tensor:
    """``(B, C, T) -> (C, B, T)``, contiguous."""
    return x.transpose(0, 1).contiguous()


def from_channel_major(x: Tensor) -> Tensor:
    """``(C, B, T) -> (B, C, T)``, contiguous."""
    return x.transpose(0, 1).contiguous()


def context_to_channel_major(context: Tensor | None, cond_channels: int, batch: int, length: int) -> Tensor | None:
    """Validate a coupling context given as ``(B, cond, T)`` or ``(B, cond)`` (constant over time)
    and return it channel-major, ``(cond, B, T)``; ``None`` stays ``None``."""
    if context is None:
        return None
    if context.dim() == 2:
        context = context.unsqueeze(-1).expand(-1, -1, length)
    if context.dim() != 3 or context.shape[0] != batch or context.shape[1] != cond_channels or context.shape[2] != length:
        raise ValueError(
            f"context must have shape ({batch}, {cond_channels}, {length}) or ({batch}, {cond_channels}), "
            f"got {tuple(context.shape)}"
        )
    return to_channel_major(context)


def conv1d_channel_major(x: Tensor, weight: Tensor, bias: Tensor | None, pad: tuple[int, int] = (0, 0)) -> Tensor:
    r"""``Conv1d`` on a channel-major input: ``(C_in, B, T) -> (C_out, B, T')``.

    The same map as ``F.conv1d(F.pad(x_bct, pad), weight, bias)`` (stride 1, no dilation) with
    ``T' = T + pad[0] + pad[1] - k + 1``, computed as one matrix product: the ``k`` shifted copies
    of the (zero-padded) input are stacked along channels (row ``j C_in + c`` holds channel ``c``
    shifted by ``j``) and multiplied by the weight reshaped to ``(C_out, k C_in)``.

    Args:
        x: ``(C_in, B, T)``.
        weight: ``(C_out, C_in, k)``, as stored by ``nn.Conv1d``.
        bias: ``(C_out,)`` or ``None``.
        pad: zeros added before and after every sequence.
    """
    c_out, c_in, k = weight.shape
    if pad != (0, 0):
        x = F.pad(x, pad)
    t_out = x.shape[2] - k + 1
    if k == 1:
        cols, w = x, weight[:, :, 0]
    else:
        cols = torch.cat([x[:, :, j : j + t_out] for j in range(k)], dim=0)
        w = weight.permute(0, 2, 1).reshape(c_out, k * c_in)
    flat = cols.reshape(cols.shape[0], -1)
    y = torch.mm(w, flat) if bias is None else torch.addmm(bias[:, None], w, flat)
    return y.view(c_out, x.shape[1], t_out)


class ChannelMajorTransform(Transform):
    """An nflows ``Transform`` computed on channel-major ``(C, B, T)`` tensors.

    Subclasses set ``self.channels`` and implement :meth:`forward_cm` / :meth:`inverse_cm`, each
    returning ``(output (C, B, T), logabsdet (B,))`` and taking an optional channel-major context
    ``(cond, B, T)``, and may override :meth:`forward_cm_nologdet` / :meth:`inverse_cm_nologdet`
    (the maps without their log-det). The public :meth:`forward` / :meth:`inverse` take and return ``(B, C, T)``.
    """

    channels: int
    #: channels of the conditioning input; layers that read no context ignore one
    cond_channels: int = 0
    #: whether the layer reads a context (a coupling); others accept and ignore one
    reads_context: bool = False

    def forward_cm(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse_cm(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward_cm_nologdet(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The output of :meth:`forward_cm` ``(C, B, T)`` without its log-det, for callers that only
        need the latent (prediction, transfer). The same values as ``forward_cm(x, context)[0]``;
        the default computes the log-det and drops it."""
        return self.forward_cm(x, context)[0]

    def inverse_cm_nologdet(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The output of :meth:`inverse_cm` ``(C, B, T)`` without its log-det, for callers that
        only need the map (cross-modal transfer, sampling). The same values as
        ``inverse_cm(x, context)[0]``; layers whose log-det costs something override this to
        skip it (the default computes it and drops it)."""
        return self.inverse_cm(x, context)[0]

    def inverse_bound(self, radius: Tensor) -> Tensor:
        """Per-channel bound ``(C,)`` on ``|inverse(y)|`` given ``|y_c| <= radius_c``, for any input of
        that size (a certificate from the parameters, used by
        :meth:`~flowtransfer.flows.TemporalFlow.inverse_bound`). The default is ``inf``: no bound known."""
        return torch.full_like(radius, float("inf"))

    def _public(self, inputs: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        name = type(self).__name__ + (".inverse" if inverse else "")
        check_input(inputs, self.channels, name)
        ctx = self.context_cm(context, inputs.shape[0], inputs.shape[2])
        fn = self.inverse_cm if inverse else self.forward_cm
        y, logdet = fn(to_channel_major(inputs), ctx)
        return from_channel_major(y), logdet

    def context_cm(self, context: Tensor | None, batch: int, length: int) -> Tensor | None:
        """The context, validated and channel-major (see :func:`context_to_channel_major`)."""
        if not self.reads_context:
            return None
        if self.cond_channels == 0:
            if context is not None:
                raise ValueError("this coupling takes no context (cond_channels=0) but one was given")
            return None
        if context is None:
            raise ValueError(
                f"this coupling is conditional (cond_channels={self.cond_channels}): "
                "context of shape (batch, cond_channels[, time]) is required"
            )
        return context_to_channel_major(context, self.cond_channels, batch, length)

    def forward(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._public(inputs, context, inverse=False)

    def inverse(self, inputs: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._public(inputs, context, inverse=True)
