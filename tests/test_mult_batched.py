"""MulT's batched computation equals the unbatched one: the six cross-modal transformers and three memory
transformers run as stacked streams (one product per projection, one attention call per layer), with keys
and values in a transposed layout and a hand-written backward for the weights-times-values product. Every
check here is float64: outputs and gradients (inputs and every parameter) against a plain loop over the
directions with standard PyTorch ops; dropout masks against the same masks applied stream by stream; and
the parameter layout that existing checkpoints hold."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import flowtransfer.models.mult as mult_module
from flowtransfer.models.mult import MulT, MulTConfig, _attention, _attention_t, _ReluDropout, _WeightsTimesValues

MODS = {2: ("L", "A"), 3: ("L", "A", "V")}


# ----------------------------------------------------------------------------- the unbatched reference


def _plain_layer_stack(stack, k, x, source, heads, causal):
    """Stream ``k`` of a StackedTransformer as one ordinary pre-LN transformer, ``(B, T, d)`` layout,
    attention as ``softmax(q k^T / sqrt(e)) v`` with per-head reshapes (no batching across streams)."""
    d = x.shape[-1]

    def ln(y, norm):
        return F.layer_norm(y, (d,), norm.weight[k, 0], norm.bias[k, 0], eps=norm.eps)

    def lin(y, layer):
        return F.linear(y, layer.weight[k].t(), layer.bias[k, 0])

    for layer in stack.layers:
        h = ln(x, layer.ln_q)
        if stack.cross:
            q = lin(h, layer.q)
            kk, v = lin(ln(source, layer.ln_kv), layer.kv).chunk(2, -1)
        else:
            q, kk, v = lin(h, layer.qkv).chunk(3, -1)
        b, tq, tk, e = x.shape[0], x.shape[1], kk.shape[1], d // heads
        q, kk, v = (y.reshape(b, -1, heads, e).transpose(1, 2) for y in (q, kk, v))
        scores = q @ kk.transpose(-1, -2) / math.sqrt(e)
        if causal:
            i = torch.arange(1, tq + 1).unsqueeze(1)
            j = torch.arange(1, tk + 1).unsqueeze(0)
            allowed = (j * tq <= i * tk) | (j == 1)
            scores = scores.masked_fill(~allowed, float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, tq, d)
        x = x + lin(a, layer.out)
        x = x + lin(F.relu(lin(ln(x, layer.ln_ff), layer.ff1)), layer.ff2)
    return ln(x, stack.ln_out)


def _unbatched_mult(mult, feats, present=None):
    """MulT's forward as a Python loop: one transformer call per direction, one per memory stream."""
    z0 = {}
    for i, m in enumerate(mult.modalities):
        x = feats[m] if present is None else torch.where(present[:, i].view(-1, 1, 1), feats[m], 0.0)
        x = x.transpose(1, 2)
        t = torch.arange(x.shape[1], dtype=torch.float64).unsqueeze(1)
        half = mult.d // 2
        omega = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
        pe = torch.cat([torch.sin(t * omega), torch.cos(t * omega)], 1).to(x.dtype)
        z0[m] = x * math.sqrt(mult.d) + pe
    streams = [_plain_layer_stack(mult.crossmodal, k, z0[t], z0[s], mult.heads, mult.causal)
               for k, (t, s) in enumerate(mult.directions)]
    m = len(mult.modalities)
    out = []
    for i in range(m):
        x = torch.cat(streams[i * (m - 1):(i + 1) * (m - 1)], -1)
        h = _plain_layer_stack(mult.memory, i, x, None, mult.heads, mult.causal)
        out.append(h[:, -1] if mult.pool == "last" else h.mean(1))
    return torch.cat(out, -1)


def _inputs(mods, lengths, batch=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch, d, t, generator=g, dtype=torch.float64).requires_grad_(True)
            for m, t in zip(mods, lengths)}


def _grads(out, module, feats):
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    tensors = list(feats.values()) + [p for _, p in module.named_parameters()]
    return torch.autograd.grad((out * weights).sum(), tensors, allow_unused=True)


# ----------------------------------------------------------------------------- batched == unbatched


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("lengths", ["aligned", "unaligned"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pool", ["last", "mean"])
@pytest.mark.parametrize("mode", ["eval", "train-no-dropout"])
def test_batched_equals_unbatched_outputs_and_gradients(m, lengths, causal, pool, mode):
    torch.manual_seed(1)
    mods = MODS[m]
    ts = [6] * m if lengths == "aligned" else [6, 1, 4][:m]
    mult = MulT(mods, d=8, heads=2, layers=2, memory_layers=2, causal=causal, pool=pool,
                attn_dropout=0.0, relu_dropout=0.0, res_dropout=0.0, embed_dropout=0.0).double()
    mult.train(mode != "eval")  # train mode without dropout takes the explicit (training) attention path
    feats = _inputs(mods, ts)
    out = mult(feats)
    ref = _unbatched_mult(mult, feats)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(out, mult, feats), _grads(ref, mult, feats)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_batched_equals_unbatched_with_absent_modalities():
    torch.manual_seed(2)
    mods = MODS[3]
    mult = MulT(mods, d=8, heads=4, layers=1).double().eval()
    feats = _inputs(mods, [5, 5, 5], batch=4)
    present = torch.tensor([[True, True, True], [False, True, True], [True, False, False], [True, True, False]])
    nan_feats = {k: torch.where(present[:, i].view(-1, 1, 1), x, float("nan")) for i, (k, x) in enumerate(feats.items())}
    out = mult(nan_feats, present)
    ref = _unbatched_mult(mult, feats, present)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(out, mult, feats), _grads(ref, mult, feats)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_mosi_preset_shapes_batched_equals_unbatched():
    """The shapes the benchmarks time: d 32, 8 heads (head width 4), memory width 64 (head width 8)."""
    torch.manual_seed(3)
    cfg = MulTConfig.mosi()
    mult = MulT.from_config(MODS[3], cfg).double().eval()
    feats = _inputs(MODS[3], [12, 12, 12], batch=2, d=32)
    out = mult(feats)
    ref = _unbatched_mult(mult, feats)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(_grads(out, mult, feats), _grads(ref, mult, feats)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- the attention kernel


def test_weights_times_values_gradcheck_and_double_backward():
    g = torch.Generator().manual_seed(4)
    w = torch.rand(3, 5, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    vt = torch.randn(3, 4, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    keep = torch.rand(3, 5, 7, generator=g) > 0.3
    plain = _WeightsTimesValues.apply(w, None, vt)
    torch.testing.assert_close(plain, w @ vt.transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(_WeightsTimesValues.apply(w, keep, vt), (w * keep) @ vt.transpose(1, 2), rtol=0, atol=0)
    for mask in (None, keep):
        fn = lambda a, b, mask=mask: _WeightsTimesValues.apply(a, mask, b)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (w, vt))
        assert torch.autograd.gradgradcheck(fn, (w, vt))
    # a transposed view as input (the layout _attention hands in) gets the right gradient too
    v = torch.randn(3, 7, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: _WeightsTimesValues.apply(a, keep, b.transpose(1, 2)), (w, v))


def test_relu_dropout_equals_relu_then_mask():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(4, 6, 8, generator=g, dtype=torch.float64).requires_grad_(True)
    x.data[0, 0, :3] = 0.0  # ReLU's kink: autograd's subgradient there is 0, and so is ours
    mask = (torch.rand(4, 6, 8, generator=g) > 0.25).to(torch.float64)
    scale = 1 / 0.75
    got = _ReluDropout.apply(x, mask * scale, scale)
    want = F.relu(x) * (mask * scale)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    w = torch.randn(4, 6, 8, generator=g, dtype=torch.float64)
    torch.testing.assert_close(torch.autograd.grad((got * w).sum(), x)[0], torch.autograd.grad((want * w).sum(), x)[0],
                               rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda a: _ReluDropout.apply(a, mask * scale, scale), (x.detach().clone().requires_grad_(True) + 0.01,))


@pytest.mark.parametrize("causal", ["none", "is_causal", "mask"])
def test_attention_transposed_layout_equals_plain(causal):
    g = torch.Generator().manual_seed(5)
    tk = 7 if causal == "mask" else 5
    q = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    k = torch.randn(2, 3, tk, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    v = torch.randn(2, 3, tk, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    mask = mult_module._causal_mask(5, 7, q.device) if causal == "mask" else None
    scores = q @ k.transpose(-1, -2) / 2
    if causal == "is_causal":
        scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    want = scores.softmax(-1) @ v
    for training in (False, True):
        got = _attention_t(q, k.transpose(-1, -2).contiguous(), v.transpose(-1, -2).contiguous(), mask,
                           causal == "is_causal", 0.0, training)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        gq, gk, gv = torch.autograd.grad(got.pow(2).sum(), (q, k, v))
        wq, wk, wv = torch.autograd.grad(want.pow(2).sum(), (q, k, v), retain_graph=True)
        for a, b in ((gq, wq), (gk, wk), (gv, wv)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_attention(q, k, v, mask, causal == "is_causal", 0.0, False), want,
                               rtol=1e-12, atol=1e-12)


def test_per_stream_dropout_equals_stream_by_stream(monkeypatch):
    """Streams with p = 0 draw nothing; the others get exactly the mask their own draws give, and the
    inverted-dropout factor of their own p: the batched result equals a loop over the streams."""
    streams, batch, heads, t, e = 4, 3, 2, 6, 4
    ps = [0.2, 0.0, 0.5, 0.0]
    g = torch.Generator().manual_seed(6)
    q = torch.randn(streams * batch, heads, t, e, generator=g, dtype=torch.float64).requires_grad_(True)
    kt = torch.randn(streams * batch, heads, e, t, generator=g, dtype=torch.float64).requires_grad_(True)
    vt = torch.randn(streams * batch, heads, e, t, generator=g, dtype=torch.float64).requires_grad_(True)
    calls = []

    def fixed_draws(shape, device):
        calls.append(tuple(shape))
        return torch.randint(-32768, 32768, tuple(shape), generator=torch.Generator().manual_seed(9), dtype=torch.int16)

    monkeypatch.setattr(mult_module, "_int16_draws", fixed_draws)
    got = _attention_t(q, kt, vt, None, False, ps, True)
    assert calls == [(2, batch, heads, t, t)], "draws only for the two streams with p > 0"
    draws = fixed_draws((2, batch, heads, t, t), None)
    want, j = [], 0
    for s, p in enumerate(ps):
        rows = slice(s * batch, (s + 1) * batch)
        w = (q[rows] @ kt[rows] / math.sqrt(e)).softmax(-1)
        if p > 0:
            k_thr = round(65536 * p)
            keep = (draws[j] >= k_thr - 32768).to(w.dtype)
            w = w * keep * (65536 / (65536 - k_thr))
            j += 1
        want.append(w @ vt[rows].transpose(-1, -2))
    want = torch.cat(want)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got.sum(), (q, kt, vt)), torch.autograd.grad(want.sum(), (q, kt, vt))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- checkpoints


#: the parameter layout MulT has had since its first version (63b2929): every saved checkpoint holds it
LAYOUT = {
    "crossmodal.layers.0.ln_q.weight": (6, 1, 8), "crossmodal.layers.0.ln_q.bias": (6, 1, 8),
    "crossmodal.layers.0.ln_kv.weight": (6, 1, 8), "crossmodal.layers.0.ln_kv.bias": (6, 1, 8),
    "crossmodal.layers.0.q.weight": (6, 8, 8), "crossmodal.layers.0.q.bias": (6, 1, 8),
    "crossmodal.layers.0.kv.weight": (6, 8, 16), "crossmodal.layers.0.kv.bias": (6, 1, 16),
    "crossmodal.layers.0.out.weight": (6, 8, 8), "crossmodal.layers.0.out.bias": (6, 1, 8),
    "crossmodal.layers.0.ln_ff.weight": (6, 1, 8), "crossmodal.layers.0.ln_ff.bias": (6, 1, 8),
    "crossmodal.layers.0.ff1.weight": (6, 8, 32), "crossmodal.layers.0.ff1.bias": (6, 1, 32),
    "crossmodal.layers.0.ff2.weight": (6, 32, 8), "crossmodal.layers.0.ff2.bias": (6, 1, 8),
    "crossmodal.ln_out.weight": (6, 1, 8), "crossmodal.ln_out.bias": (6, 1, 8),
    "memory.layers.0.ln_q.weight": (3, 1, 16), "memory.layers.0.ln_q.bias": (3, 1, 16),
    "memory.layers.0.qkv.weight": (3, 16, 48), "memory.layers.0.qkv.bias": (3, 1, 48),
    "memory.layers.0.out.weight": (3, 16, 16), "memory.layers.0.out.bias": (3, 1, 16),
    "memory.layers.0.ln_ff.weight": (3, 1, 16), "memory.layers.0.ln_ff.bias": (3, 1, 16),
    "memory.layers.0.ff1.weight": (3, 16, 64), "memory.layers.0.ff1.bias": (3, 1, 64),
    "memory.layers.0.ff2.weight": (3, 64, 16), "memory.layers.0.ff2.bias": (3, 1, 16),
    "memory.ln_out.weight": (3, 1, 16), "memory.ln_out.bias": (3, 1, 16),
}


def test_state_dict_layout_unchanged_and_round_trips(tmp_path):
    torch.manual_seed(8)
    mult = MulT(MODS[3], d=8, heads=2, layers=1, memory_layers=1).eval()
    state = mult.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == LAYOUT
    path = tmp_path / "mult.pt"
    torch.save(state, path)
    other = MulT(MODS[3], d=8, heads=2, layers=1, memory_layers=1).eval()
    other.load_state_dict(torch.load(path, weights_only=True), strict=True)
    feats = {m: torch.randn(2, 8, 5) for m in MODS[3]}
    with torch.no_grad():
        assert torch.equal(mult(feats), other(feats))
