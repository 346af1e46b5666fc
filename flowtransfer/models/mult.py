r"""MulT, the multimodal transformer (Tsai et al., ACL 2019), as DiCMoR uses it — batched.

For ``M`` modalities there are ``M (M - 1)`` directional cross-modal transformers
:math:`\beta \to \alpha` and ``M`` self-attention "memory" transformers, one per target.

**Embedding.** :math:`Z^{[0]}_\alpha = \sqrt d\, X_\alpha + \mathrm{PE}(T_\alpha)` with ``X`` of
shape ``(B, T, d)`` and a sinusoidal table (half sines, half cosines), then embedding dropout.

**Cross-modal layer** :math:`i = 1..D` of :math:`\beta\to\alpha` (pre-LN, raw residual):

.. math::
    \hat Z^{[i]} &= Z^{[i-1]} + \mathrm{MHA}\big(\mathrm{LN}_q(Z^{[i-1]}),\ \mathrm{LN}_{kv}(Z^{[0]}_\beta)\big) \\
    Z^{[i]} &= \hat Z^{[i]} + W_2\,\mathrm{ReLU}\big(W_1\,\mathrm{LN}(\hat Z^{[i]})\big), \qquad W_1: d \to 4d

Keys and values always come from the low-level source :math:`Z^{[0]}_\beta`; a final LayerNorm
closes each transformer. Per target, the ``M - 1`` streams are concatenated (width ``(M-1) d``) and
pass through a self-attention transformer of ``memory_layers`` layers (the same layer, keys and values
from the current input). The last time step of each target (or the time mean, ``pool="mean"``) is
kept; the ``M`` vectors are concatenated: output ``(B, M (M-1) d)`` ordered target-major, sources in
``modalities`` order.

**Efficiency.** The parameters of all directions are stacked (``(P, d_in, d_out)`` tensors) and all
directions with the same lengths run as one batched matmul per projection and one attention call
per layer (per-direction attention dropouts included); the sinusoidal table and causal masks are
cached by length; dropouts with ``p = 0`` (or in eval mode) are skipped and the others draw one
``int16`` per element, four per 64-bit generator word (see :func:`_keep_mask`); there is no loop
over samples. With ``pool="last"`` the
memory transformers' last layer computes its queries, output projection and feed-forward for the
last step only (the other steps of that layer are never read).

**Where this departs from DiCMoR's copy** (``trains/subNets/transformers_encoder``, METHODS §2.3):

* exact zeros are **not** read as padding: DiCMoR gives position 0 (a zero embedding) to any time
  step whose first channel is exactly 0, so zero-filled inputs lose their positions; here every time
  step gets its position. Absent modalities (``present`` mask) are zero-filled before embedding.
* the causal mask is optional and **off** by default (DiCMoR: on). With ``causal=True`` query step
  ``i`` of a length-``T_q`` target sees source steps ``j`` with ``(j + 1) / T_k <= (i + 1) / T_q``
  (the usual lower-triangular mask when lengths match).
* residual form: the same pre-LN layer as DiCMoR's code (raw input on the residual; the paper adds
  ``LN(input)``), but queries and keys/values have separate LayerNorms (DiCMoR shares one).
* the embedding is :math:`\sqrt d\,X + \mathrm{PE}` as in DiCMoR, with positions ``0 .. T-1``
  (DiCMoR's fairseq table starts at 1).
* embedding dropout is drawn once per modality and shared by its uses as query and as source
  (DiCMoR draws a fresh mask for ``x``, ``x_k`` and ``x_v``).
* the output dropout ``out_dropout`` acts on the fused representation; DiCMoR's
  ``output_dropout`` sits inside its head (use ``heads.build_head(..., dropout=...)``; the presets
  carry it as ``head_dropout``).

Presets (DiCMoR supplementary, METHODS §1.4): MOSI ``d=32, heads=8, layers=4`` and MOSEI
``d=64, heads=8, layers=6``; see :class:`MulTConfig`.

Example:
    >>> import torch
    >>> mult = MulT(("L", "A", "V"), d=32, heads=8, layers=4)
    >>> z = mult({m: torch.randn(2, 32, 50) for m in "LAV"})
    >>> z.shape, mult.out_dim
    (torch.Size([2, 192]), 192)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

__all__ = ["MulTConfig", "MulT", "sinusoidal_positions", "StackedTransformer"]


_DROP_LEVELS = 65536  # a dropout draw is one int16: 65536 equally likely values


def _drop_threshold(p: float) -> int:
    """``k = min(round(65536 p), 65535)``: an element is dropped when its int16 draw is below
    ``-32768 + k`` (the cap keeps the threshold inside int16 for ``p`` within :math:`2^{-17}` of 1)."""
    return min(round(_DROP_LEVELS * float(p)), _DROP_LEVELS - 1)


def _int16_draws(shape: Sequence[int], device: torch.device) -> Tensor:
    """Uniform int16 draws of ``shape``, four per 64-bit random word (each 16-bit piece of a word
    drawn uniformly from the full int64 range is uniform over int16); about 3 times faster on CPU
    than one generator call per element."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), 2**63 - 1)
    return words.view(torch.int16)[:n].view(tuple(shape))


def _keep_mask(shape: Sequence[int], p: float | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    r"""A 0/1 mask of ``shape`` and ``dtype``: 0 (dropped) with probability :math:`k/65536`,
    :math:`k = \mathrm{round}(65536\,p)` (within :math:`7.7\cdot10^{-6}` of ``p``). ``p`` may be a tensor
    of probabilities broadcastable to ``shape`` (one per stream). The comparison writes the mask
    straight into ``dtype`` (no bool intermediate)."""
    if isinstance(p, Tensor):
        threshold = (torch.round(p * _DROP_LEVELS).clamp(max=_DROP_LEVELS - 1) - 32768).to(torch.int16)
    else:
        threshold = _drop_threshold(p) - 32768
    return torch.ge(_int16_draws(shape, device), threshold, out=torch.empty(tuple(shape), dtype=dtype, device=device))


def _keep_scale(p: float) -> float:
    """The inverted-dropout factor :math:`65536/(65536-k)` that keeps the expectation exact."""
    return _DROP_LEVELS / (_DROP_LEVELS - _drop_threshold(p))


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    r"""Inverted dropout that costs nothing when it would do nothing (``p = 0``, ``p`` below
    :math:`1/131072`, or eval mode); otherwise ``x * mask * factor`` with the mask of
    :func:`_keep_mask` (about eight times faster on CPU than ``F.dropout``'s float Bernoulli draws)."""
    if not training or p <= 0 or _drop_threshold(p) == 0:
        return x
    return x * _keep_mask(x.shape, p, x.dtype, x.device).mul_(_keep_scale(p))


class _ReluDropout(torch.autograd.Function):
    r""":math:`y = \mathrm{ReLU}(x) \odot m \cdot c` for a 0/1 dropout mask ``m`` and its inverted-dropout
    factor ``c > 0``, saving only ``y``: :math:`\partial x = g\,c\,[y > 0]` (``y > 0`` exactly where
    ``x > 0`` and the unit is kept, the two cases where autograd's chain ``g c m \,[x > 0]`` is not 0).
    The next layer saves ``y`` anyway, so the mask and the ReLU's output cost no memory; the backward
    is built from differentiable ops."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        y = torch.relu(x).mul_(keep)
        ctx.scale = scale
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        (y,) = ctx.saved_tensors
        return g * (y > 0).to(g.dtype).mul_(ctx.scale), None, None


def _relu_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """``_dropout(relu(x), p, training)`` with the memory of one tensor (:class:`_ReluDropout`)."""
    if not training or p <= 0 or _drop_threshold(p) == 0:
        return F.relu(x)
    scale = _keep_scale(p)
    return _ReluDropout.apply(x, _keep_mask(x.shape, p, x.dtype, x.device).mul_(scale), scale)


class _WeightsTimesValues(torch.autograd.Function):
    r"""``(w * keep) @ vt^T`` for attention weights ``w`` ``(N, T_q, T_k)``, an optional 0/1 dropout
    mask ``keep`` (``bool``, the shape of ``w``, or ``None``) and **transposed** values ``vt``
    ``(N, e, T_k)``: ``(N, T_q, e)``.

    The backward keeps every product in the form the CPU BLAS runs fast at head widths of 4 or 8 and
    returns contiguous gradients: :math:`\partial w = (g\,vt) \odot keep` and
    :math:`\partial vt = g^\top (w \odot keep)`. (Autograd's own rule would compute :math:`w^\top g` on
    a ``(T_q, e)`` row-major right operand, 2-3 times slower, or, for the transposed product, hand
    softmax's backward a transposed gradient that it copies.) Memory: it saves ``w`` (the softmax's
    output, which softmax saves anyway: no extra storage), the one-byte mask and ``vt``, and recomputes
    ``w * keep`` in the backward, instead of keeping a float mask and the dropped weights (two more
    float copies of the largest tensor of the layer). The backward is built from differentiable ops,
    so double backward works."""

    @staticmethod
    def forward(ctx: Any, w: Tensor, keep: Tensor | None, vt: Tensor) -> Tensor:
        ctx.save_for_backward(w, keep, vt)
        # a float copy of the mask: a mixed-dtype product would cast it anyway (one more pass)
        return torch.bmm(w if keep is None else w * keep.to(w.dtype), vt.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, Tensor | None]:
        w, keep, vt = ctx.saved_tensors
        mask = None if keep is None else keep.to(g.dtype)  # one float copy, used twice
        gw = gvt = None
        if ctx.needs_input_grad[0]:
            gw = torch.bmm(g, vt)
            if mask is not None:
                gw = gw.mul_(mask)
        if ctx.needs_input_grad[2]:
            gvt = torch.bmm(g.transpose(1, 2).contiguous(), w if mask is None else w * mask)
        return gw, None, gvt


def _attend(w: Tensor, keep: Tensor | None, vt: Tensor) -> Tensor:
    """``(N, H, T_q, T_k)`` weights, optionally masked by ``keep`` (``bool``, same shape), times
    ``(N, H, e, T_k)`` transposed values: ``(N, H, T_q, e)``."""
    n, h, tq, tk = w.shape
    flat_keep = None if keep is None else keep.reshape(n * h, tq, tk)
    out = _WeightsTimesValues.apply(w.reshape(n * h, tq, tk), flat_keep, vt.flatten(0, 1))
    return out.view(n, h, tq, vt.shape[2])


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
               p: float | Sequence[float], training: bool) -> Tensor:
    """Multi-head attention on ``(N, H, T, e)`` queries, keys and values: :func:`_attention_t` on
    transposed views of ``k`` and ``v``."""
    return _attention_t(q, k.transpose(-1, -2), v.transpose(-1, -2), mask, is_causal, p, training)


def _attention_t(q: Tensor, kt: Tensor, vt: Tensor, mask: Tensor | None, is_causal: bool,
                 p: float | Sequence[float], training: bool) -> Tensor:
    """Multi-head attention: queries ``q`` ``(N, H, T_q, e)``, keys and values **transposed**,
    ``kt``/``vt`` ``(N, H, e, T_k)``; ``N = P * B`` for ``P`` stacked streams. Returns ``(N, H, T_q, e)``.

    ``p`` is the attention-weight dropout, one float or one per stream (``len(p) == P``). The explicit
    path is a softmax of ``q kt / sqrt(e)``, the weights' one-byte 0/1 mask (:func:`_keep_mask`;
    streams whose ``p`` is 0 draw none), the masked product with the values
    (:class:`_WeightsTimesValues`), and the
    inverted-dropout factor applied to the ``(T_q, e)`` output rather than to the ``(T_q, T_k)``
    weights (the same product, one pass over the weights fewer). Why the transposed layout: with a
    head width of 4 or 8 the CPU BLAS is 2-3 times slower on an ``(T, e)`` row-major right operand
    than on an ``(e, T)`` one; with keys and values transposed, every product of the forward and
    backward (``S = q kt``, ``dq = dS kt^T``, ``dkt = q^T dS``, ``out = w vt^T``, ``dw = g vt``,
    ``dvt = g^T w``) takes the fast form. Without dropout on an accelerator this is
    ``scaled_dot_product_attention`` (fused kernels); on CPU the explicit path is faster than the fused
    CPU kernel at these head widths.
    """
    ps = [float(p)] if isinstance(p, (int, float)) else [float(x) for x in p]
    thresholds = [_drop_threshold(x) for x in ps] if training else [0]
    if max(thresholds) == 0 and q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, kt.transpose(-1, -2), vt.transpose(-1, -2),
                                              attn_mask=mask, is_causal=is_causal)
    n, h, tq, e = q.shape
    scores = torch.bmm((q * (e ** -0.5)).flatten(0, 1), kt.flatten(0, 1)).view(n, h, tq, kt.shape[-1])
    if is_causal:
        mask = torch.ones(tq, kt.shape[-1], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    if max(thresholds) == 0:
        return _attend(weights, None, vt)
    if len(set(thresholds)) == 1:
        keep = _keep_mask(weights.shape, ps[0], torch.bool, q.device)
        return _attend(weights, keep, vt).mul_(_keep_scale(ps[0]))
    # per-stream probabilities: one threshold and one factor per stream, no draws where p is 0
    streams = len(ps)
    grouped = weights.view(streams, -1, *weights.shape[1:])
    active = [i for i, k in enumerate(thresholds) if k > 0]
    draws = _int16_draws((len(active),) + grouped.shape[1:], q.device)
    keep = torch.empty(grouped.shape, dtype=torch.bool, device=q.device)
    for i in range(streams):
        if thresholds[i]:
            torch.ge(draws[active.index(i)], thresholds[i] - 32768, out=keep[i])
        else:
            keep[i].fill_(True)
    out = _attend(weights, keep.view(weights.shape), vt)
    scale = _stream_scales(tuple(ps), vt.dtype, q.device).view((streams,) + (1,) * (grouped.dim() - 1))
    return (out.view(streams, -1, *out.shape[1:]) * scale).view(out.shape)


_SCALE_CACHE: dict[tuple, Tensor] = {}


def _stream_scales(ps: tuple[float, ...], dtype: torch.dtype, device) -> Tensor:
    """The inverted-dropout factors of ``ps`` as a cached tensor on ``device`` (no host-to-device
    copy, hence no synchronisation, per call)."""
    key = (ps, dtype, str(device))
    scale = _SCALE_CACHE.get(key)
    if scale is None:
        scale = _SCALE_CACHE[key] = torch.tensor([_keep_scale(x) for x in ps], dtype=dtype, device=device)
    return scale


_PE_CACHE: dict[tuple, Tensor] = {}


def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32) -> Tensor:
    r"""Sinusoidal position table ``(length, dim)``, cached by ``(length, dim, device, dtype)``.

    Row ``t`` is :math:`[\sin(t\omega_0), .., \sin(t\omega_{h-1}), \cos(t\omega_0), .., \cos(t\omega_{h-1})]`
    with :math:`h = \lfloor d/2 \rfloor`, :math:`\omega_i = 10000^{-i/h}`, and a zero last column when
    ``dim`` is odd; ``t = 0 .. length-1``.
    """
    key = (length, dim, str(device), dtype)
    table = _PE_CACHE.get(key)
    if table is None:
        half = dim // 2
        t = torch.arange(length, dtype=torch.float64).unsqueeze(1)
        omega = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / max(half, 1))
        table = torch.cat([torch.sin(t * omega), torch.cos(t * omega)], dim=1)
        if dim % 2:
            table = torch.cat([table, torch.zeros(length, 1, dtype=torch.float64)], dim=1)
        table = table.to(device=device, dtype=dtype)
        _PE_CACHE[key] = table
    return table


_MASK_CACHE: dict[tuple, Tensor] = {}


def _causal_mask(tq: int, tk: int, device) -> Tensor:
    """Bool ``(tq, tk)`` mask, True where query ``i`` may see key ``j``: ``(j+1)/tk <= (i+1)/tq``."""
    key = (tq, tk, str(device))
    mask = _MASK_CACHE.get(key)
    if mask is None:
        i = torch.arange(1, tq + 1, device=device).unsqueeze(1)
        j = torch.arange(1, tk + 1, device=device).unsqueeze(0)
        mask = j * tq <= i * tk
        mask[:, 0] = True  # every query sees at least the first key
        _MASK_CACHE[key] = mask
    return mask


_INDEX_CACHE: dict[tuple, Tensor] = {}


def _index(ks: Sequence[int], device) -> Tensor:
    """A cached ``long`` index tensor of ``ks`` on ``device`` (no host-to-device copy per call)."""
    key = (tuple(ks), str(device))
    idx = _INDEX_CACHE.get(key)
    if idx is None:
        idx = _INDEX_CACHE[key] = torch.tensor(ks, dtype=torch.long, device=device)
    return idx


class _StackedLinear(nn.Module):
    """``P`` independent linear maps applied to ``P`` stacked inputs: ``(P, N, i) -> (P, N, o)``."""

    def __init__(self, streams: int, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(streams, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(streams, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        w, b = (self.weight, self.bias) if idx is None else (self.weight[idx], self.bias[idx])
        return torch.baddbmm(b, x, w)


class _StackedLayerNorm(nn.Module):
    """``P`` independent LayerNorms over the last axis of ``(P, N, d)``."""

    def __init__(self, streams: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(streams, 1, dim))
        self.bias = nn.Parameter(torch.zeros(streams, 1, dim))
        self.eps = eps

    def forward(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        w, b = (self.weight, self.bias) if idx is None else (self.weight[idx], self.bias[idx])
        return torch.addcmul(b, F.layer_norm(x, x.shape[-1:], eps=self.eps), w)


class _StackedLayer(nn.Module):
    """One pre-LN transformer layer for ``P`` parallel streams (cross- or self-attention)."""

    def __init__(self, streams: int, dim: int, heads: int, cross: bool, ffn_mult: int = 4) -> None:
        super().__init__()
        self.cross, self.heads = cross, heads
        self.ln_q = _StackedLayerNorm(streams, dim)
        if cross:
            self.ln_kv = _StackedLayerNorm(streams, dim)
            self.q = _StackedLinear(streams, dim, dim)
            self.kv = _StackedLinear(streams, dim, 2 * dim)
        else:
            self.qkv = _StackedLinear(streams, dim, 3 * dim)
        self.out = _StackedLinear(streams, dim, dim)
        self.ln_ff = _StackedLayerNorm(streams, dim)
        self.ff1 = _StackedLinear(streams, dim, ffn_mult * dim)
        self.ff2 = _StackedLinear(streams, ffn_mult * dim, dim)

    def forward(
        self,
        x: Tensor,
        source: Tensor | None,
        shape: tuple[int, int, int],
        idx: Tensor | None,
        attn_p: float | Sequence[float],
        relu_p: float,
        res_p: float,
        causal: bool,
        last_only: bool = False,
    ) -> Tensor:
        # x: (P, B*Tq, d); source: (P, B*Tk, d) for cross-attention. With last_only, only the last
        # query step is computed (keys/values still span every step): output (P, B, d).
        batch, tq, tk = shape
        d = x.shape[-1]
        h = self.ln_q(x, idx)
        if last_only:
            x = x.view(x.shape[0], batch, tq, d)[:, :, -1]
        if self.cross:
            q = self.q(h.view(h.shape[0], batch, tq, d)[:, :, -1] if last_only else h, idx)
            k, v = self.kv(self.ln_kv(source, idx), idx).chunk(2, dim=-1)
        elif last_only:
            w, b = (self.qkv.weight, self.qkv.bias) if idx is None else (self.qkv.weight[idx], self.qkv.bias[idx])
            q = torch.baddbmm(b[..., :d], h.view(h.shape[0], batch, tq, d)[:, :, -1], w[..., :d])
            k, v = torch.baddbmm(b[..., d:], h, w[..., d:]).chunk(2, dim=-1)
        else:
            q, k, v = self.qkv(h, idx).chunk(3, dim=-1)
        n_q = 1 if last_only else tq
        # 4-D (P*B, H, T, e) inputs reach the fused CPU kernel; 5-D ones fall back to the math path
        q = rearrange(q, "p (b t) (h e) -> (p b) h t e", b=batch, h=self.heads, t=n_q)
        k = rearrange(k, "p (b t) (h e) -> (p b) h e t", b=batch, h=self.heads)  # transposed: see _attention
        v = rearrange(v, "p (b t) (h e) -> (p b) h e t", b=batch, h=self.heads)
        mask, is_causal = None, False
        if causal and not last_only:  # the last query step sees every key step anyway
            if tq == tk:
                is_causal = True
            else:
                mask = _causal_mask(tq, tk, x.device)
        a = _attention_t(q, k, v, mask, is_causal, attn_p, self.training)
        a = rearrange(a, "(p b) h t e -> p (b t) (h e)", b=batch)
        x = x + _dropout(self.out(a, idx), res_p, self.training)
        h = _relu_dropout(self.ff1(self.ln_ff(x, idx), idx), relu_p, self.training)
        return x + _dropout(self.ff2(h, idx), res_p, self.training)


class StackedTransformer(nn.Module):
    r"""``streams`` independent pre-LN transformers of ``layers`` layers, run as one batch.

    ``forward(x, source=None, idx=None, ...)`` takes ``x`` of shape ``(P, B, T_q, dim)`` (and, for
    cross-attention, ``source`` ``(P, B, T_k, dim)``, the fixed keys/values of every layer) and
    returns ``(P, B, T_q, dim)`` after a final LayerNorm. ``idx`` (``(P,)`` long) selects which of the
    ``streams`` parameter sets to use; ``None`` means all, in order. ``attn_p`` is one attention
    dropout probability or one per stream. ``last_only=True`` returns only
    the last step, ``(P, B, 1, dim)``, and computes the last layer's queries, output projection and
    feed-forward for that step alone (exact: no other step of the last layer reaches it).
    """

    def __init__(self, streams: int, dim: int, heads: int, layers: int, cross: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.cross = cross
        self.layers = nn.ModuleList(_StackedLayer(streams, dim, heads, cross) for _ in range(layers))
        self.ln_out = _StackedLayerNorm(streams, dim)

    def forward(
        self,
        x: Tensor,
        source: Tensor | None = None,
        idx: Tensor | None = None,
        attn_p: float | Sequence[float] = 0.0,
        relu_p: float = 0.0,
        res_p: float = 0.0,
        causal: bool = False,
        last_only: bool = False,
    ) -> Tensor:
        p, b, tq, d = x.shape
        if self.cross:
            if source is None or source.shape[:2] != (p, b) or source.shape[-1] != d:
                raise ValueError(f"cross-attention source must be ({p}, {b}, T_k, {d})")
            tk = source.shape[2]
            source = source.reshape(p, b * tk, d)
        else:
            tk = tq
        h = x.reshape(p, b * tq, d)
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            h = layer(h, source, (b, tq, tk), idx, attn_p, relu_p, res_p, causal, last_only and i == n - 1)
        if last_only and n == 0:
            h = h.view(p, b, tq, d)[:, :, -1]
        return self.ln_out(h, idx).view(p, b, 1 if last_only else tq, d)


@dataclass
class MulTConfig:
    """MulT hyperparameters, with the DiCMoR presets :meth:`mosi` and :meth:`mosei`.

    ``attn_dropout_by_source`` overrides ``attn_dropout`` for directions whose *source* (keys and
    values) is the named modality, as DiCMoR does; memory transformers use ``attn_dropout``.
    ``head_dropout`` is not used by :class:`MulT`: it is DiCMoR's ``output_dropout``, the dropout of
    the residual head (pass it to ``flowtransfer.models.heads.build_head``).
    """

    d: int = 32
    heads: int = 8
    layers: int = 4
    memory_layers: int | None = None
    attn_dropout: float = 0.1
    attn_dropout_by_source: dict[str, float] = field(default_factory=dict)
    relu_dropout: float = 0.1
    res_dropout: float = 0.1
    embed_dropout: float = 0.1
    out_dropout: float = 0.0
    causal: bool = False
    pool: str = "last"
    head_dropout: float = 0.0

    @classmethod
    def mosi(cls) -> "MulTConfig":
        """DiCMoR on MOSI: d 32, 8 heads, 4 layers; attention dropout .3 (L) / .2 (A) / 0 (V),
        embedding .2, head .5 (config.json); relu/res dropout .1 (MulT's defaults)."""
        return cls(d=32, heads=8, layers=4, attn_dropout=0.3, attn_dropout_by_source={"A": 0.2, "V": 0.0},
                   relu_dropout=0.1, res_dropout=0.1, embed_dropout=0.2, head_dropout=0.5)

    @classmethod
    def mosei(cls) -> "MulTConfig":
        """DiCMoR on MOSEI: d 64, 8 heads, 6 layers; attention dropout .2 (L) / 0 (A) / 0 (V),
        embedding 0, head .2; relu/res dropout .1."""
        return cls(d=64, heads=8, layers=6, attn_dropout=0.2, attn_dropout_by_source={"A": 0.0, "V": 0.0},
                   relu_dropout=0.1, res_dropout=0.1, embed_dropout=0.0, head_dropout=0.2)

    def mult_kwargs(self) -> dict:
        """Keyword arguments for :class:`MulT` (everything but ``head_dropout``)."""
        kw = asdict(self)
        kw.pop("head_dropout")
        return kw


class MulT(nn.Module):
    r"""Multimodal transformer over any set of ``M >= 2`` modalities (see the module docstring).

    Args:
        modalities: modality names, in the order of the ``present`` mask's columns.
        d: feature width of every modality (inputs are ``(B, d, T_m)``).
        heads: attention heads (``d`` and ``(M-1) d`` must be divisible by it).
        layers: cross-modal layers per direction.
        memory_layers: self-attention layers per target; ``None`` gives ``max(layers, 3)`` (DiCMoR).
        attn_dropout: attention-weight dropout (memory transformers and default for directions).
        attn_dropout_by_source: per-source-modality override for the cross-modal directions.
        relu_dropout: dropout after the FFN's ReLU.
        res_dropout: dropout on each residual branch.
        embed_dropout: dropout on the embedded inputs :math:`Z^{[0]}`.
        out_dropout: dropout on the output representation.
        causal: causal attention masks (DiCMoR: on; default off).
        pool: ``"last"`` time step (DiCMoR) or ``"mean"`` over time of each memory output.
        embed_scale: multiply inputs by :math:`\sqrt d` before adding positions (MulT, DiCMoR).

    ``forward(features, present=None) -> (B, M (M-1) d)``; ``out_dim`` holds ``M (M-1) d``.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        d: int = 32,
        heads: int = 8,
        layers: int = 4,
        memory_layers: int | None = None,
        attn_dropout: float = 0.1,
        attn_dropout_by_source: Mapping[str, float] | None = None,
        relu_dropout: float = 0.1,
        res_dropout: float = 0.1,
        embed_dropout: float = 0.1,
        out_dropout: float = 0.0,
        causal: bool = False,
        pool: str = "last",
        embed_scale: bool = True,
    ) -> None:
        super().__init__()
        modalities = tuple(modalities)
        m = len(modalities)
        if m < 2 or len(set(modalities)) != m:
            raise ValueError(f"MulT needs 2 or more distinct modalities, got {modalities}")
        if d < 1 or heads < 1 or layers < 1:
            raise ValueError(f"d, heads, layers must be >= 1, got {d}, {heads}, {layers}")
        if memory_layers is not None and memory_layers < 0:
            raise ValueError(f"memory_layers must be >= 0, got {memory_layers}")
        if d % heads:
            raise ValueError(f"d={d} is not divisible by heads={heads}")
        if pool not in ("last", "mean"):
            raise ValueError(f"pool must be 'last' or 'mean', got {pool!r}")
        by_source = dict(attn_dropout_by_source or {})
        unknown = [k for k in by_source if k not in modalities]
        if unknown:
            raise ValueError(f"attn_dropout_by_source names unknown modalities {unknown}; have {modalities}")
        for name, p in [("attn", attn_dropout), ("relu", relu_dropout), ("res", res_dropout),
                        ("embed", embed_dropout), ("out", out_dropout), *by_source.items()]:
            if not 0.0 <= float(p) < 1.0:
                raise ValueError(f"dropout {name!r} must be in [0, 1), got {p}")
        self.modalities = modalities
        self.d, self.heads, self.layers = d, heads, layers
        self.memory_layers = max(layers, 3) if memory_layers is None else memory_layers
        self.attn_dropout, self.relu_dropout, self.res_dropout = attn_dropout, relu_dropout, res_dropout
        self.embed_dropout, self.out_dropout = embed_dropout, out_dropout
        self.causal, self.pool = causal, pool
        self.scale = math.sqrt(d) if embed_scale else 1.0
        # directions (target, source), target-major, sources in modality order
        self.directions: tuple[tuple[str, str], ...] = tuple(
            (t, s) for t in modalities for s in modalities if s != t
        )
        self._dir_attn_p = [float(by_source.get(s, attn_dropout)) for _, s in self.directions]
        tgt = torch.tensor([modalities.index(t) for t, _ in self.directions])
        src = torch.tensor([modalities.index(s) for _, s in self.directions])
        self.register_buffer("_tgt_idx", tgt, persistent=False)
        self.register_buffer("_src_idx", src, persistent=False)
        self.crossmodal = StackedTransformer(len(self.directions), d, heads, layers, cross=True)
        self.memory = StackedTransformer(m, (m - 1) * d, heads, self.memory_layers, cross=False)
        self.out_dim = m * (m - 1) * d

    @classmethod
    def from_config(cls, modalities: Sequence[str], config: MulTConfig) -> "MulT":
        return cls(modalities, **config.mult_kwargs())

    def _embed(self, features: Mapping[str, Tensor], present: Tensor | None) -> list[Tensor]:
        missing = [m for m in self.modalities if m not in features]
        extra = [m for m in features if m not in self.modalities]
        if missing or extra:
            raise KeyError(f"MulT expects modalities {list(self.modalities)}; missing {missing}, unknown {extra}")
        batch = features[self.modalities[0]].shape[0]
        if present is not None and (present.shape != (batch, len(self.modalities)) or present.dtype != torch.bool):
            raise ValueError(
                f"present must be a bool tensor of shape ({batch}, {len(self.modalities)}), "
                f"got {tuple(present.shape)} {present.dtype}"
            )
        out = []
        for i, m in enumerate(self.modalities):
            x = features[m]
            if x.dim() != 3 or x.shape[0] != batch or x.shape[1] != self.d or x.shape[2] < 1:
                raise ValueError(f"modality {m!r}: expected ({batch}, {self.d}, T), got {tuple(x.shape)}")
            if present is not None:
                x = torch.where(present[:, i].view(-1, 1, 1), x, torch.zeros((), dtype=x.dtype, device=x.device))
            x = rearrange(x, "b c t -> b t c")
            z = x * self.scale + sinusoidal_positions(x.shape[1], self.d, x.device, x.dtype)
            out.append(_dropout(z, self.embed_dropout, self.training))
        return out

    def forward(self, features: Mapping[str, Tensor], present: Tensor | None = None) -> Tensor:
        """Fuse ``{m: (B, d, T_m)}`` into ``(B, M (M-1) d)``. Absent slots (``present`` False) are
        replaced by zeros before embedding, so NaN placeholders never enter the model."""
        z0 = self._embed(features, present)
        lengths = [z.shape[1] for z in z0]
        n_dir = len(self.directions)
        streams: list[Tensor | None] = [None] * n_dir
        aligned = len(set(lengths)) == 1
        stacked = torch.stack(z0) if aligned else None  # (M, B, T, d)
        # group the directions that can share one batched pass: same target and source lengths
        groups: dict[tuple, list[int]] = {}
        for k, (t, s) in enumerate(self.directions):
            key = (lengths[self.modalities.index(t)], lengths[self.modalities.index(s)])
            groups.setdefault(key, []).append(k)
        m = len(self.modalities)
        for ks in groups.values():
            attn_p = [self._dir_attn_p[k] for k in ks]
            if len(ks) == n_dir:
                idx, tgt, src = None, self._tgt_idx, self._src_idx
            else:
                idx = _index(ks, self._tgt_idx.device)
                tgt, src = self._tgt_idx[idx], self._src_idx[idx]
            if stacked is not None:
                x, source = stacked.index_select(0, tgt), stacked.index_select(0, src)
            else:  # host-side indices: no device-to-host copy
                x = torch.stack([z0[self.modalities.index(self.directions[k][0])] for k in ks])
                source = torch.stack([z0[self.modalities.index(self.directions[k][1])] for k in ks])
            h = self.crossmodal(x, source, idx, attn_p, self.relu_dropout, self.res_dropout, self.causal)
            if len(ks) == n_dir:
                full = h
            for j, k in enumerate(ks):
                streams[k] = h[j]
        last = self.pool == "last"
        if aligned:
            # directions are target-major: (M (M-1), B, T, d) -> (M, B, T, (M-1) d) in one copy
            per_target = rearrange(full, "(m s) b t d -> m b t (s d)", m=m)
            mem = self.memory(per_target, None, None, self.attn_dropout,
                              self.relu_dropout, self.res_dropout, self.causal, last)
            pooled = mem[:, :, -1] if last else mem.mean(dim=2)  # (M, B, (M-1)d)
            rep = rearrange(pooled, "m b c -> b (m c)")
        else:
            parts = []
            for i in range(m):
                x = torch.cat(streams[i * (m - 1):(i + 1) * (m - 1)], dim=-1)
                mem = self.memory(x.unsqueeze(0), None, _index((i,), x.device), self.attn_dropout,
                                  self.relu_dropout, self.res_dropout, self.causal, last)[0]
                parts.append(mem[:, -1] if last else mem.mean(dim=1))
            rep = torch.cat(parts, dim=-1)
        return _dropout(rep, self.out_dropout, self.training)
