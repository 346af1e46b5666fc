"""DiCMoR's optional input-space decoders: shapes, masking, losses, gradients, save/load, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flowtransfer.data import from_arrays
from flowtransfer.data.dataset import Batch
from flowtransfer.methods import DiCMoR, DiCMoRConfig, build_method
from flowtransfer.methods.dicmor import InputDecoder
from flowtransfer.methods.io import load_method, save_method

TINY = dict(d=8, flow_layers=2, flow_hidden=8, refiner_blocks=1, refiner_hidden=8, refiner_reduction=4,
            mult={"d": 8, "heads": 2, "layers": 1, "memory_layers": 1})
# different widths and lengths per modality; "V" is longer than the common length (image rows vs frames)
DIMS = {"A": (5, 4), "V": (6, 7), "L": (3, 1)}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_ds(dims=DIMS, n: int = 10, seed: int = 0, mask=None):
    rng = np.random.default_rng(seed)
    feats = {m: rng.standard_normal((n, c, t)).astype(np.float32) for m, (c, t) in dims.items()}
    return from_arrays(feats, rng.integers(0, 3, n), "classification", layout="NCT", mask=mask, num_classes=3)


def tiny(ds, variant: str = "paper", **kw) -> DiCMoR:
    torch.manual_seed(0)
    return build_method("dicmor", ds, preset="small", variant=variant, input_decoder=True, **{**TINY, **kw})


def full_batch(ds) -> Batch:
    return ds.batch(np.arange(len(ds)))


def test_config_flag_defaults_off_and_validates():
    assert DiCMoRConfig().input_decoder is False
    cfg = DiCMoRConfig.preset("small", input_decoder=True, input_decoder_weight=0.5)
    assert DiCMoRConfig(**cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="input_decoder_weight"):
        DiCMoRConfig.preset("small", input_decoder_weight=-1.0)


def test_off_by_default_adds_nothing():
    ds = make_ds()
    torch.manual_seed(0)
    plain = build_method("dicmor", ds, preset="small", **TINY)
    assert len(plain.decoders) == 0
    assert not any(k.startswith("decoders.") for k in plain.state_dict())
    assert "dec" not in plain.loss(full_batch(ds))[1]
    x = torch.randn(2, 5, 4)
    with pytest.raises(RuntimeError, match="input_decoder=True"):
        plain.transfer_input(x, "A", "V")
    with pytest.raises(RuntimeError, match="input_decoder=True"):
        plain.decode(torch.randn(2, 8, 1), "V")


def test_input_decoder_module_shapes():
    dec = InputDecoder(d=4, channels=3, length=9, hidden=6, kernel_size=3)
    assert dec(torch.randn(2, 4, 5)).shape == (2, 3, 9)  # upsampled in time
    assert dec(torch.randn(2, 4, 12)).shape == (2, 3, 9)  # window means
    assert dec(torch.randn(2, 4, 1)).shape == (2, 3, 9)  # a single vector
    with pytest.raises(ValueError, match=r"\(batch, 4, time\)"):
        dec(torch.randn(2, 5, 5))
    with pytest.raises(ValueError, match="must be >= 1"):
        InputDecoder(d=4, channels=0, length=3)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_transfer_input_shapes_and_space_argument(variant):
    ds = make_ds()
    model = tiny(ds, variant)
    model.loss(full_batch(ds))  # initialise ActNorm as training would
    model.eval()
    b = full_batch(ds)
    with torch.no_grad():
        for src in DIMS:
            for dst in DIMS:
                if src == dst:
                    continue
                out = model.transfer_input(b.features[src], src, dst)
                c, t = DIMS[dst]
                assert out.shape == (len(ds), c, t) and torch.isfinite(out).all()
                same = model.transfer(b.features[src], src, dst, space="input")
                assert torch.equal(out, same)
        # the feature-space transfer is unchanged and stays the default
        h = model.encode(b)["A"]
        assert model.transfer(h, "A", "V").shape == h.shape
        assert torch.equal(model.transfer(h, "A", "V"), model.transfer(h, "A", "V", space="feature"))
    with pytest.raises(ValueError, match="unknown space"):
        model.transfer(h, "A", "V", space="pixels")


def test_transfer_input_equals_the_composition():
    ds = make_ds()
    model = tiny(ds).double()
    model.eval()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        h = model.extractors["A"](x, 1)  # common length = the shortest, "L" with T = 1
        expect = model.decoders["V"](model.refiners["V"](model.flows["V"].from_latent(model.flows["A"].to_latent(h))))
        got = model.transfer_input(x, "A", "V")
        raw = model.transfer_input(x, "A", "V", refine=False)
        expect_raw = model.decode(model.transfer(h, "A", "V"), "V")
    torch.testing.assert_close(got, expect, rtol=0, atol=1e-12)
    torch.testing.assert_close(raw, expect_raw, rtol=0, atol=1e-12)


def test_batch_input_masks_absent_sources_and_ignores_labels():
    ds = make_ds()
    mask = np.ones((len(ds), 3), dtype=bool)
    mask[[1, 4], 0] = False  # A absent
    b = ds.with_mask(mask).batch(np.arange(len(ds)))
    assert torch.isnan(b.features["A"][1]).all()
    model = tiny(ds)
    model.eval()
    with torch.no_grad():
        out = model.transfer_input(b, "A", "V")
        rows = torch.from_numpy(mask[:, 0])
        assert torch.isnan(out[~rows]).all() and torch.isfinite(out[rows]).all()
        direct = model.transfer_input(b.features["A"][rows], "A", "V")
        torch.testing.assert_close(out[rows], direct)
        b2 = Batch(features=b.features, mask=b.mask, labels=torch.full_like(b.labels, 2), modalities=b.modalities)
        assert torch.equal(torch.nan_to_num(out, nan=5.0), torch.nan_to_num(model.transfer_input(b2, "A", "V"), nan=5.0))


def test_transfer_input_errors():
    ds = make_ds()
    model = tiny(ds)
    with pytest.raises(ValueError, match=r"expected input features \(batch, 5, time\)"):
        model.transfer_input(torch.randn(2, 4, 4), "A", "V")
    with pytest.raises(ValueError, match="NaN or inf"):
        model.transfer_input(torch.full((2, 5, 4), float("nan")), "A", "V")
    with pytest.raises(ValueError, match="must differ"):
        model.transfer_input(torch.randn(2, 5, 4), "A", "A")
    with pytest.raises(KeyError, match="unknown modality 'X'"):
        model.transfer_input(torch.randn(2, 5, 4), "A", "X")
    with pytest.raises(KeyError, match="unknown modality 'X'"):
        model.decode(torch.randn(2, 8, 1), "X")


@pytest.mark.parametrize("stage", ["complete", "recovery", "joint"])
def test_decoder_loss_in_every_stage_trains_only_the_decoders(stage):
    ds = make_ds()
    model = tiny(ds)
    model.set_stage(stage)
    b = full_batch(ds)
    loss, parts = model.loss(b)
    assert "dec" in parts and parts["dec"] > 0
    loss.backward()
    for name, p in model.decoders.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert any(g["name"] == "decoders" for g in model.parameter_groups())
    # the decoder reads detached features: its loss alone reaches no other parameter
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        h = model.extractors(b.features, b.mask)
    h = {m: v.requires_grad_(False) for m, v in h.items()}
    model._decoder_loss(b, h).backward()
    for name, p in model.named_parameters():
        if not name.startswith("decoders."):
            assert p.grad is None, name


def test_decoder_loss_value_and_weight():
    ds = make_ds()
    model = tiny(ds, input_decoder_weight=0.0)
    model.set_stage("complete")
    b = full_batch(ds)
    with torch.no_grad():
        h = model.extractors(b.features, b.mask)
        expect = np.mean([float(torch.mean((model.decoders[m](h[m]) - b.features[m]) ** 2)) for m in DIMS])
        loss, parts = model.loss(b)
        parts = {k: float(v) for k, v in parts.items()}
    assert parts["dec"] == pytest.approx(expect, rel=1e-5)
    assert float(loss) == pytest.approx(parts["task"], rel=1e-6)  # weight 0: the total is the task loss
    model2 = tiny(ds, input_decoder_weight=2.0)
    model2.set_stage("complete")
    with torch.no_grad():
        loss2, parts2 = model2.loss(b)
        parts2 = {k: float(v) for k, v in parts2.items()}
    assert float(loss2) == pytest.approx(parts2["task"] + 2.0 * parts2["dec"], rel=1e-5)


def test_decoder_learns_to_reconstruct():
    ds = make_ds(n=16)
    model = tiny(ds)
    model.set_stage("recovery")  # extractors frozen: the decoders chase a fixed target
    b = full_batch(ds)
    opt = torch.optim.Adam(model.decoders.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        with torch.no_grad():
            h = model.extractors(b.features, b.mask)
        loss = model._decoder_loss(b, h)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.7 * first


def test_save_load_round_trip(tmp_path):
    ds = make_ds()
    model = tiny(ds)
    model.loss(full_batch(ds))
    model.eval()
    path = save_method(model, tmp_path / "m.pt")
    back = load_method(path)
    back.eval()
    assert back.config.input_decoder and len(back.decoders) == 3
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        assert torch.equal(model.transfer_input(x, "A", "V"), back.transfer_input(x, "A", "V"))


def test_token_id_text_gets_no_decoder():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16).to_dict()
    ds = make_ds()
    torch.manual_seed(0)
    model = build_method("dicmor", ds, preset="small", input_decoder=True, text_encoder_config=cfg,
                         text_modality="L", **TINY)
    assert set(model.decoders) == {"A", "V"}  # "L" arrives as token ids: nothing to decode onto
    with pytest.raises(KeyError, match="token ids"):
        model.decode(torch.randn(2, 8, 1), "L")
    with pytest.raises(ValueError, match="token ids"):
        model.transfer_input(torch.randn(2, 3, 1), "L", "A")
