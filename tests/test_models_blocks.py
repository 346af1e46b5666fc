"""Tests for flowtransfer.models: extractors, MulT, RCAB-1D, fusion modules, heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flowtransfer.models import (
    ChannelAttention1d,
    ClassificationHead,
    ConcatMLPFusion,
    LateFusion,
    ModalityExtractors,
    MulT,
    MulTConfig,
    MulTFusion,
    RCAB1d,
    Refiner,
    RegressionHead,
    ResidualGroup1d,
    TemporalExtractor,
    build_fusion,
    build_head,
    common_length,
    resample_time,
    sinusoidal_positions,
    task_loss,
)

MODS = {2: ("L", "A"), 3: ("text", "audio", "vision")}


def _grads_reach_all(module: torch.nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"


# ----------------------------------------------------------------------------- extractors


def test_common_length_rule():
    assert common_length({"a": 50, "b": 20, "c": 28}) == 20
    assert common_length({"a": 50, "b": 1}) == 1
    assert common_length({"a": 50, "b": 1}, target_length=7) == 7
    with pytest.raises(ValueError, match="at least one"):
        common_length({})
    with pytest.raises(ValueError, match="'b'"):
        common_length({"a": 3, "b": 0})


def test_resample_time_math():
    x = torch.arange(12, dtype=torch.float64).view(1, 2, 6)
    assert resample_time(x, 6) is x
    torch.testing.assert_close(resample_time(x, 1), x.mean(-1, keepdim=True))
    torch.testing.assert_close(resample_time(x, 3), (x[..., 0::2] + x[..., 1::2]) / 2)
    one = torch.randn(2, 3, 1, dtype=torch.float64)
    torch.testing.assert_close(resample_time(one, 4), one.expand(2, 3, 4))
    with pytest.raises(ValueError, match="time"):
        resample_time(torch.zeros(3, 4), 2)


@pytest.mark.parametrize("t", [1, 5, 50])
def test_temporal_extractor_keeps_length(t):
    ext = TemporalExtractor(7, 4, kernel_size=5)
    assert ext.conv.bias is None
    assert ext(torch.randn(3, 7, t)).shape == (3, 4, t)
    assert TemporalExtractor(7, 4, 5, target_length=2)(torch.randn(3, 7, t)).shape == (3, 4, 2)
    with pytest.raises(ValueError, match=r"\(batch, 7, time\)"):
        ext(torch.randn(3, 6, t))


def test_temporal_extractor_is_same_padded_convolution():
    torch.manual_seed(0)
    ext = TemporalExtractor(2, 3, kernel_size=5).double()
    x = torch.randn(1, 2, 9, dtype=torch.float64)
    expected = F.conv1d(F.pad(x, (2, 2)), ext.conv.weight)
    torch.testing.assert_close(ext(x), expected)


@pytest.mark.parametrize("lengths", [(1, 5, 50), (50, 50, 50), (5, 50, 1), (28, 20, 20)])
@pytest.mark.parametrize("target", [None, 10])
def test_modality_extractors_common_length(lengths, target):
    dims = {"L": 6, "A": 3, "V": 4}
    ext = ModalityExtractors(dims, d=8, kernel_size=5, target_length=target)
    feats = {m: torch.randn(2, c, t) for (m, c), t in zip(dims.items(), lengths)}
    out = ext(feats)
    want = target if target is not None else min(lengths)
    assert {m: tuple(h.shape) for m, h in out.items()} == {m: (2, 8, want) for m in dims}


def test_modality_extractors_mask_keeps_nan_out_of_gradients():
    dims = {"L": 6, "A": 3}
    ext = ModalityExtractors(dims, d=4)
    feats = {"L": torch.randn(3, 6, 5), "A": torch.randn(3, 3, 5)}
    feats["A"][1] = float("nan")
    present = torch.tensor([[True, True], [True, False], [True, True]])
    out = ext(feats, present)
    assert all(torch.isfinite(h).all() for h in out.values())
    sum(h.sum() for h in out.values()).backward()
    _grads_reach_all(ext)
    with pytest.raises(KeyError, match="unknown modalities"):
        ext({"X": torch.randn(3, 6, 5)})
    with pytest.raises(ValueError, match="present"):
        ext(feats, present[:, :1])


# ----------------------------------------------------------------------------- MulT


def _ref_transformer(stack, k, x, source, heads, causal):
    """Plain single-stream pre-LN transformer with stream k's parameters (float64 reference)."""
    d = x.shape[-1]

    def ln(y, norm):
        return F.layer_norm(y, (d,), norm.weight[k, 0], norm.bias[k, 0])

    def lin(y, layer):
        return y @ layer.weight[k] + layer.bias[k, 0]

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
            allowed = torch.tensor([[(j + 1) * tq <= (i + 1) * tk or j == 0 for j in range(tk)] for i in range(tq)])
            scores = scores.masked_fill(~allowed, float("-inf"))
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, tq, d)
        x = x + lin(a, layer.out)
        x = x + lin(F.relu(lin(ln(x, layer.ln_ff), layer.ff1)), layer.ff2)
    return ln(x, stack.ln_out)


def _ref_mult(mult, feats, present=None):
    z0 = {}
    for i, m in enumerate(mult.modalities):
        x = feats[m] if present is None else feats[m] * present[:, i].view(-1, 1, 1)
        x = x.transpose(1, 2)
        z0[m] = x * math.sqrt(mult.d) + sinusoidal_positions(x.shape[1], mult.d, dtype=x.dtype)
    streams = [
        _ref_transformer(mult.crossmodal, k, z0[t], z0[s], mult.heads, mult.causal)
        for k, (t, s) in enumerate(mult.directions)
    ]
    m = len(mult.modalities)
    out = []
    for i in range(m):
        x = torch.cat(streams[i * (m - 1):(i + 1) * (m - 1)], -1)
        h = _ref_transformer(mult.memory, i, x, None, mult.heads, mult.causal)
        out.append(h[:, -1] if mult.pool == "last" else h.mean(1))
    return torch.cat(out, -1)


@pytest.mark.parametrize("m", [2, 3])
@pytest.mark.parametrize("lengths", ["aligned", "unaligned"])
@pytest.mark.parametrize("causal", [False, True])
def test_mult_matches_plain_reference(m, lengths, causal):
    torch.manual_seed(1)
    mods = MODS[m]
    ts = [6] * m if lengths == "aligned" else [6, 1, 4][:m]
    mult = MulT(mods, d=8, heads=2, layers=2, memory_layers=1, causal=causal,
                attn_dropout_by_source={mods[1]: 0.2}).double().eval()
    feats = {mod: torch.randn(3, 8, t, dtype=torch.float64) for mod, t in zip(mods, ts)}
    out = mult(feats)
    assert out.shape == (3, m * (m - 1) * 8) and mult.out_dim == m * (m - 1) * 8
    torch.testing.assert_close(out, _ref_mult(mult, feats))


def test_mult_pool_mean_and_presence_zero_fill():
    torch.manual_seed(2)
    mods = MODS[3]
    mult = MulT(mods, d=8, heads=4, layers=1, pool="mean").double().eval()
    feats = {mod: torch.randn(4, 8, 5, dtype=torch.float64) for mod in mods}
    present = torch.tensor([[True, True, True], [False, True, True], [True, False, False], [True, True, False]])
    nan_feats = {mod: torch.where(present[:, i].view(-1, 1, 1), x, torch.full_like(x, float("nan")))
                 for i, (mod, x) in enumerate(feats.items())}
    out = mult(nan_feats, present)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _ref_mult(mult, feats, present))
    # zero-filling by the mask equals passing zeros: exact zeros are not treated as padding
    zeros = {mod: x * present[:, i].view(-1, 1, 1) for i, (mod, x) in enumerate(feats.items())}
    torch.testing.assert_close(out, mult(zeros))


@pytest.mark.parametrize("m", [2, 3])
def test_mult_gradients_and_determinism(m):
    torch.manual_seed(3)
    mods = MODS[m]
    mult = MulT(mods, d=8, heads=2, layers=2, attn_dropout=0.3, relu_dropout=0.2, res_dropout=0.2,
                embed_dropout=0.2, out_dropout=0.1)
    feats = {mod: torch.randn(4, 8, 5) for mod in mods}
    mult.train()
    mult(feats).pow(2).sum().backward()
    _grads_reach_all(mult)
    assert not torch.equal(mult(feats), mult(feats)), "dropout configured but training output is deterministic"
    mult.eval()
    with torch.no_grad():
        assert torch.equal(mult(feats), mult(feats))


def test_mult_config_and_errors():
    assert MulT(("a", "b"), d=8, heads=2, layers=2).memory_layers == 3
    assert MulT(("a", "b"), d=8, heads=2, layers=5).memory_layers == 5
    mosi, mosei = MulTConfig.mosi(), MulTConfig.mosei()
    assert (mosi.d, mosi.heads, mosi.layers) == (32, 8, 4)
    assert (mosei.d, mosei.heads, mosei.layers) == (64, 8, 6)
    mult = MulT.from_config(("L", "A", "V"), mosi)
    assert mult.out_dim == 192 and mult.memory_layers == 4
    assert mult._dir_attn_p == [0.2, 0.0, 0.3, 0.0, 0.3, 0.2]  # by source: L->.3, A->.2, V->0
    fusion = MulTFusion.from_config(("L", "A", "V"), MulTConfig.mosei())
    assert fusion.out_dim == 384 and fusion.mult.memory_layers == 6 and fusion.mult.embed_dropout == 0.0
    with pytest.raises(ValueError, match="unknown modalities"):
        MulT.from_config(("image", "audio"), mosi)
    with pytest.raises(ValueError, match="divisible"):
        MulT(("a", "b"), d=10, heads=4)
    with pytest.raises(ValueError, match="2 or more"):
        MulT(("a",), d=8, heads=2)
    mult = MulT(("a", "b"), d=8, heads=2, layers=1)
    with pytest.raises(KeyError, match="missing"):
        mult({"a": torch.randn(2, 8, 3)})
    with pytest.raises(ValueError, match="'b'"):
        mult({"a": torch.randn(2, 8, 3), "b": torch.randn(2, 7, 3)})


def test_sinusoidal_positions():
    pe = sinusoidal_positions(5, 6, dtype=torch.float64)
    assert pe is sinusoidal_positions(5, 6, dtype=torch.float64)  # cached
    omega = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3)], dtype=torch.float64)
    t = torch.arange(5, dtype=torch.float64).unsqueeze(1)
    torch.testing.assert_close(pe, torch.cat([torch.sin(t * omega), torch.cos(t * omega)], 1))
    assert sinusoidal_positions(3, 5).shape == (3, 5)


# ----------------------------------------------------------------------------- RCAB


def test_channel_attention_hand_computation():
    torch.manual_seed(4)
    ca = ChannelAttention1d(32, reduction=16).double()
    assert ca.bottleneck == 2
    x = torch.randn(3, 32, 7, dtype=torch.float64)
    wd, bd = ca.down.weight[:, :, 0], ca.down.bias
    wu, bu = ca.up.weight[:, :, 0], ca.up.bias
    out = torch.empty_like(x)
    for b in range(3):
        z = x[b].sum(dim=1) / 7
        s = torch.sigmoid(wu @ torch.clamp(wd @ z + bd, min=0) + bu)
        out[b] = x[b] * s.unsqueeze(1)
    torch.testing.assert_close(ca(x), out)
    assert ChannelAttention1d(4, reduction=16).bottleneck == 1


def test_rcab_residual_form():
    torch.manual_seed(5)
    block = RCAB1d(8, kernel_size=3, reduction=4).double()
    x = torch.randn(2, 8, 6, dtype=torch.float64)
    conv1, _, conv2, ca = block.body
    h = F.conv1d(F.relu(F.conv1d(x, conv1.weight, conv1.bias, padding=1)), conv2.weight, conv2.bias, padding=1)
    torch.testing.assert_close(block(x), x + ca(h))


@pytest.mark.parametrize("t", [1, 7])
def test_refiner_keeps_shape_and_trains(t):
    torch.manual_seed(12)
    refiner = Refiner(d=4, num_blocks=3, reduction=2)  # 4-channel bottleneck: no dead-ReLU flake
    assert refiner.hidden == 8 and len(refiner.group.body) == 4
    x = torch.randn(6, 4, t)
    y = refiner(x)
    assert y.shape == x.shape
    y.pow(2).sum().backward()
    _grads_reach_all(refiner)
    assert len(Refiner(d=4).group.body) == 21  # 20 RCABs + the group's conv
    assert ResidualGroup1d(8, num_blocks=2)(torch.randn(1, 8, 1)).shape == (1, 8, 1)
    with pytest.raises(ValueError, match="odd"):
        RCAB1d(8, kernel_size=2)
    with pytest.raises(ValueError, match=r"\(batch, 4, time\)"):
        refiner(torch.randn(2, 5, t))


# ----------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("name", ["mult", "concat", "late"])
@pytest.mark.parametrize("m", [2, 3])
def test_fusion_shapes_and_gradients(name, m):
    torch.manual_seed(6)
    mods = MODS[m]
    kwargs = {"heads": 2, "layers": 1} if name == "mult" else {}
    fusion = build_fusion(name, mods, d=8, **kwargs)
    feats = {mod: torch.randn(4, 8, t) for mod, t in zip(mods, [5, 5, 5])}
    present = torch.ones(4, m, dtype=torch.bool)
    out = fusion(feats, present)
    assert out.shape == (4, fusion.out_dim)
    out.pow(2).sum().backward()
    _grads_reach_all(fusion)
    with pytest.raises(ValueError, match="present"):
        fusion(feats, present.int())


def test_fusion_pipeline_from_raw_features_of_different_lengths():
    torch.manual_seed(7)
    dims = {"text": 12, "audio": 5, "vision": 7}
    ext = ModalityExtractors(dims, d=8, kernel_size=5)
    fusion = MulTFusion(tuple(dims), d=8, heads=2, layers=1)
    head = build_head("classification", fusion.out_dim, num_classes=3)
    for lengths in [(1, 5, 50), (50, 5, 50)]:
        feats = {m: torch.randn(4, c, t) for (m, c), t in zip(dims.items(), lengths)}
        logits = head(fusion(ext(feats)))
        assert logits.shape == (4, 3)


def test_late_fusion_ignores_absent_modalities():
    torch.manual_seed(8)
    mods = MODS[3]
    fusion = LateFusion(mods, d=8, hidden=16, out_dim=6).double()
    feats = {mod: torch.randn(3, 8, 4, dtype=torch.float64, requires_grad=True) for mod in mods}
    present = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    out = fusion(feats, present)
    changed = {mod: x.detach().clone() for mod, x in feats.items()}
    changed["audio"][0] = float("nan")
    changed["text"][1] = 1e3
    changed["vision"][1] = -7.0
    torch.testing.assert_close(fusion(changed, present), out, rtol=0, atol=0)
    # the average over present modalities, by hand
    reps = {mod: fusion.mlps[mod](feats[mod].mean(-1)) for mod in mods}
    torch.testing.assert_close(out[0], (reps["text"][0] + reps["vision"][0]) / 2)
    torch.testing.assert_close(out[1], reps["audio"][1])
    torch.testing.assert_close(out[2], sum(r[2] for r in reps.values()) / 3)
    # absent slots get no gradient; NaN there keeps gradients finite
    fusion.zero_grad()
    fusion(changed, present).sum().backward()
    _grads_reach_all(fusion)
    out.sum().backward()
    assert feats["audio"].grad[0].abs().sum() == 0 and feats["audio"].grad[1].abs().sum() > 0
    with pytest.raises(ValueError, match="no present modality"):
        fusion(feats, torch.tensor([[True, False, True], [False, False, False], [True, True, True]]))


def test_concat_fusion_zero_fills_absent():
    torch.manual_seed(9)
    fusion = ConcatMLPFusion(MODS[2], d=4, hidden=5, out_dim=3).double()
    feats = {mod: torch.randn(2, 4, 3, dtype=torch.float64) for mod in MODS[2]}
    present = torch.tensor([[True, False], [True, True]])
    nan = dict(feats, A=feats["A"].clone())
    nan["A"][0] = float("nan")
    zero = dict(feats, A=feats["A"].clone())
    zero["A"][0] = 0.0
    torch.testing.assert_close(fusion(nan, present), fusion(zero))
    assert fusion.out_dim == 3
    with pytest.raises(ValueError, match="unknown fusion"):
        build_fusion("gated", MODS[2], d=4)
    with pytest.raises(KeyError, match="missing"):
        fusion({"L": feats["L"]})


# ----------------------------------------------------------------------------- heads


def test_heads_residual_form_and_losses():
    torch.manual_seed(10)
    head = RegressionHead(6, hidden=4).double().eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    h = x + head.proj2(F.relu(head.proj1(x)))
    torch.testing.assert_close(head(x), head.out(h).squeeze(-1))
    assert head(x).shape == (5,)
    cls = build_head("classification", 6, num_classes=4, dropout=0.5)
    assert isinstance(cls, ClassificationHead) and cls(x.float()).shape == (5, 4)
    assert isinstance(build_head("regression", 6), RegressionHead)
    assert isinstance(task_loss("regression"), torch.nn.L1Loss)
    assert isinstance(task_loss("classification"), torch.nn.CrossEntropyLoss)
    with pytest.raises(ValueError, match="num_classes"):
        build_head("classification", 6)
    with pytest.raises(ValueError, match="unknown task"):
        task_loss("ranking")
    with pytest.raises(ValueError, match=r"\(batch, 6\)"):
        head(torch.randn(5, 7, dtype=torch.float64))


def test_tiny_mult_overfits_sixteen_samples():
    torch.set_num_threads(1)  # tiny tensors: threads only add sync cost (the fixture resets it)
    torch.manual_seed(11)
    mods = MODS[3]
    feats = {mod: torch.randn(16, 8, 6) for mod in mods}
    target = torch.randn(16)
    fusion = MulTFusion(mods, d=8, heads=2, layers=1, memory_layers=1, attn_dropout=0.0, relu_dropout=0.0,
                        res_dropout=0.0, embed_dropout=0.0)
    head = build_head("regression", fusion.out_dim)
    loss_fn = task_loss("regression")
    params = list(fusion.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = loss_fn(head(fusion(feats)), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_fast_dropout_statistics():
    from flowtransfer.models.mult import _dropout

    torch.manual_seed(13)
    x = torch.ones(400_000, dtype=torch.float64)
    assert _dropout(x, 0.3, training=False) is x and _dropout(x, 0.0, training=True) is x
    y = _dropout(x, 0.3, training=True)
    kept = y != 0
    assert abs(kept.double().mean().item() - 0.7) < 4e-3  # about 5 standard deviations
    k = round(65536 * 0.3)
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 65536 / (65536 - k)))


def test_int16_draws_are_uniform_over_the_full_range():
    from flowtransfer.models.mult import _int16_draws

    torch.manual_seed(16)
    d = _int16_draws((1001, 999), torch.device("cpu")).long()  # not a multiple of 4 elements
    assert d.shape == (1001, 999)
    # every 16-bit piece of a word must be uniform: the sign bit included (a draw from [0, 2^63)
    # would leave one piece in four non-negative)
    for piece in range(4):
        part = d.flatten()[piece::4]
        assert abs((part < 0).double().mean().item() - 0.5) < 0.01
        assert abs(part.double().mean().item()) < 0.01 * 32768
    counts = torch.bincount(((d.flatten() + 32768) // 4096), minlength=16).double()
    assert (counts / counts.mean() - 1).abs().max() < 0.02


@pytest.mark.parametrize("causal", ["none", "is_causal", "mask"])
def test_attention_dropout_path_matches_fused_kernel(causal):
    from flowtransfer.models.mult import _attention, _causal_mask

    torch.manual_seed(14)
    tk = 5 if causal != "mask" else 7
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, tk, 4), torch.randn(2, 3, tk, 4)
    mask = _causal_mask(5, 7, q.device) if causal == "mask" else None
    is_causal = causal == "is_causal"
    # p below 1/131072 rounds to no drop, but still takes the explicit softmax path
    manual = _attention(q, k, v, mask, is_causal, p=1e-9, training=True)
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    torch.testing.assert_close(manual, fused)


def test_attention_dropout_per_stream():
    from flowtransfer.models.mult import _attention

    torch.manual_seed(15)
    p_streams, batch, heads, t = 2, 50, 2, 16
    q, k = torch.randn(p_streams * batch, heads, t, 4), torch.randn(p_streams * batch, heads, t, 4)
    v = torch.eye(t).expand(p_streams * batch, heads, t, t)  # output = (dropped) attention weights
    weights = (q @ k.transpose(-1, -2) / 2).softmax(-1)
    out = _attention(q, k, v, None, False, p=[0.0, 0.5], training=True).view(p_streams, batch, heads, t, t)
    torch.testing.assert_close(out[0], weights.view(p_streams, batch, heads, t, t)[0])
    kept = out[1] != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.02
    torch.testing.assert_close(out[1][kept], 2 * weights.view(p_streams, batch, heads, t, t)[1][kept])


@pytest.mark.parametrize("p", [1 - 2.0**-18, 0.9999])
def test_dropout_close_to_one_drops_nearly_everything(p):
    from flowtransfer.models.mult import _attention, _dropout

    torch.manual_seed(17)
    x = torch.ones(200_000)
    y = _dropout(x, p, training=True)
    assert torch.isfinite(y).all() and (y != 0).double().mean().item() < 1e-3
    q = torch.randn(4, 1, 6, 2)
    out = _attention(q, q, q, None, False, p=[p, 0.0], training=True)  # per-stream path
    assert torch.isfinite(out).all()
    assert out[:2].abs().sum() < out[2:].abs().sum()  # the first stream's weights are (nearly) all dropped
