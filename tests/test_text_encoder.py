"""Tests for flowtransfer.models.text: BERT over MMSA token rows, alone and inside the extractors.

A tiny randomly initialised BERT is built from a config; nothing is downloaded.
"""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from flowtransfer.models.extractors import ModalityExtractors  # noqa: E402
from flowtransfer.models.text import BertTextEncoder, text_encoder_from_options  # noqa: E402

VOCAB = 50


def tiny_config() -> "transformers.BertConfig":
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )


def tokens(batch: int, t: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MMSA-style ``(B, 3, T)`` rows: ids (0 after the valid part), 0/1 mask, segment ids 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (batch,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (batch, t), generator=g) * mask
    return torch.stack([ids, mask, torch.zeros_like(ids)], dim=1).to(dtype)


@pytest.fixture(scope="module")
def encoder() -> BertTextEncoder:
    torch.manual_seed(0)
    return BertTextEncoder(config=tiny_config())


class CountingEncoder(nn.Module):
    """Wraps an encoder and records the rows it is given."""

    def __init__(self, inner: BertTextEncoder) -> None:
        super().__init__()
        self.inner = inner
        self.in_channels = inner.in_channels
        self.out_channels = inner.out_channels
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


@pytest.mark.parametrize("t", [1, 7])
def test_output_shape_and_layout(encoder, t):
    x = tokens(4, t)
    out = encoder(x)
    assert out.shape == (4, 16, t) and encoder.out_channels == 16 and out.dtype == torch.float32
    # (B, C, T) is the transposed last hidden state of the BERT model fed with long ids
    ref = encoder.bert(
        input_ids=x[:, 0].long(), attention_mask=x[:, 1].long(), token_type_ids=x[:, 2].long()
    ).last_hidden_state
    torch.testing.assert_close(out, ref.transpose(1, 2))
    # integer input gives the same result as MMSA's float rows
    torch.testing.assert_close(encoder(x.long()), out)


def test_layer_selection():
    torch.manual_seed(1)
    enc = BertTextEncoder(config=tiny_config(), layer=0)
    x = tokens(2, 5)
    emb = enc.bert.embeddings(input_ids=x[:, 0].long(), token_type_ids=x[:, 2].long())
    torch.testing.assert_close(enc(x), emb.transpose(1, 2))
    enc.layer = -1
    enc_last = enc(x)
    enc.layer = "last"
    torch.testing.assert_close(enc(x), enc_last)
    with pytest.raises(ValueError, match="layer"):
        BertTextEncoder(config=tiny_config(), layer=3)
    with pytest.raises(ValueError, match="layer"):
        BertTextEncoder(config=tiny_config(), layer="first")


def test_bad_inputs_raise_clear_errors(encoder):
    with pytest.raises(ValueError, match=r"\(batch, 3, time\)"):
        encoder(torch.zeros(2, 2, 5))
    with pytest.raises(ValueError, match=r"\(batch, 3, time\)"):
        encoder(torch.zeros(2, 5))
    x = tokens(2, 5)
    for where, value, message in [((0, 0, 0), float("nan"), "NaN"), ((0, 0, 0), 1.5, "whole numbers"),
                                  ((1, 0, 0), VOCAB, "token ids"), ((1, 1, 0), 2, "attention mask")]:
        bad = x.clone()
        bad[where] = value
        with pytest.raises(ValueError, match=message):
            encoder(bad)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        encoder(tokens(1, 65))
    with pytest.raises(ValueError, match="exactly one"):
        BertTextEncoder()
    with pytest.raises(ValueError, match="exactly one"):
        BertTextEncoder(model_path="x", config=tiny_config())


def test_frozen_encoder_gets_no_gradients_and_stays_in_eval_mode():
    torch.manual_seed(2)
    enc = BertTextEncoder(config=tiny_config(), finetune=False)
    head = nn.Conv1d(16, 1, 1)
    enc.train()
    assert not enc.training and not enc.bert.training
    assert not any(p.requires_grad for p in enc.parameters())
    x = tokens(3, 6)
    out = enc(x)
    assert not out.requires_grad
    # dropout is off: two calls agree even after .train()
    torch.testing.assert_close(enc(x), out)
    head(out).sum().backward()
    assert all(p.grad is None for p in enc.parameters())
    # a parent that turns every requires_grad on still cannot train a frozen encoder
    enc.requires_grad_(True)
    assert not enc(x).requires_grad

    enc.set_finetune(True)
    enc.train()
    assert enc.training and enc.bert.training
    assert all(p.requires_grad for p in enc.parameters())
    enc.eval()  # deterministic forward; gradients still flow
    head(enc(x)).sum().backward()
    grads = {n: p.grad for n, p in enc.named_parameters()}
    assert grads["bert.embeddings.word_embeddings.weight"] is not None
    assert grads["bert.encoder.layer.1.output.dense.weight"].abs().sum() > 0
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)

    enc.set_finetune(False)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())


@pytest.mark.parametrize("finetune", [False, True])
def test_extractors_with_encoder_skip_absent_rows(finetune):
    torch.manual_seed(3)
    counting = CountingEncoder(BertTextEncoder(config=tiny_config(), finetune=finetune))
    ext = ModalityExtractors({"L": 3, "A": 5}, d=8, kernel_size=3, encoders={"L": counting}).eval()
    assert ext["L"].conv.in_channels == 16 and ext["A"].conv.in_channels == 5
    assert set(ext.encoders) == {"L"} and ext.encoders["L"] is counting
    feats = {"L": tokens(4, 7), "A": torch.randn(4, 5, 7)}
    feats["L"][1] = float("nan")  # absent rows of a batch hold NaN
    feats["L"][3] = float("nan")
    present = torch.tensor([[True, True], [False, True], [True, False], [False, True]])
    out = ext(feats, present)
    assert {m: tuple(h.shape) for m, h in out.items()} == {"L": (4, 8, 7), "A": (4, 8, 7)}
    assert all(torch.isfinite(h).all() for h in out.values())
    # BERT saw exactly the present rows 0 and 2, once
    assert len(counting.seen) == 1
    torch.testing.assert_close(counting.seen[0], feats["L"][[0, 2]])
    # absent rows are zeros before the (bias-free) convolution, so they come out as zeros
    assert torch.equal(out["L"][[1, 3]], torch.zeros(2, 8, 7))
    # present rows equal the conv over the encoder output of the row alone
    alone = ext["L"].conv(counting.inner(feats["L"][[2]]))
    torch.testing.assert_close(out["L"][[2]], alone)

    (out["L"].sum() + out["A"].sum()).backward()
    assert ext["L"].conv.weight.grad is not None and torch.isfinite(ext["L"].conv.weight.grad).all()
    bert_grads = [p.grad for p in counting.inner.parameters()]
    if finetune:
        assert all(g is not None and torch.isfinite(g).all() for g in bert_grads[:3])
    else:
        assert all(g is None for g in bert_grads)

    # no present row: the encoder is not called at all
    counting.seen.clear()
    none = ext({"L": torch.full((2, 3, 7), float("nan"))}, torch.tensor([[False, True], [False, True]]))
    assert counting.seen == [] and torch.equal(none["L"], torch.zeros(2, 8, 7))
    # without a mask every row goes through, and NaN there is a clear error
    with pytest.raises(ValueError, match="NaN"):
        ext(feats)


def test_extractors_encoder_validation(encoder):
    with pytest.raises(KeyError, match="unknown modalities"):
        ModalityExtractors({"L": 3}, d=4, encoders={"V": encoder})
    with pytest.raises(ValueError, match="in_channels"):
        ModalityExtractors({"L": 768}, d=4, encoders={"L": encoder})
    with pytest.raises(TypeError, match="out_channels"):
        ModalityExtractors({"L": 3}, d=4, encoders={"L": nn.Identity()})
    plain = ModalityExtractors({"L": 3, "A": 5}, d=4)
    assert plain.encoders == {} and all(ext.encoder is None for ext in plain.values())
    assert not any("encoder" in k for k in plain.state_dict())


def test_state_dict_round_trip():
    torch.manual_seed(4)
    ext = ModalityExtractors(
        {"L": 3, "A": 5}, d=8, encoders={"L": text_encoder_from_options(config=tiny_config(), finetune=True)}
    )
    assert any(k.startswith("L.encoder.bert.") for k in ext.state_dict())
    buf = io.BytesIO()
    torch.save(ext.state_dict(), buf)
    torch.manual_seed(5)  # a different random init, overwritten by the load
    other = ModalityExtractors(
        {"L": 3, "A": 5}, d=8, encoders={"L": text_encoder_from_options(config=tiny_config().to_dict())}
    )
    buf.seek(0)
    other.load_state_dict(torch.load(buf, weights_only=True))
    ext.eval()
    other.eval()
    feats = {"L": tokens(3, 6), "A": torch.randn(3, 5, 6)}
    present = torch.tensor([[True, True], [False, True], [True, True]])
    a, b = ext(feats, present), other(feats, present)
    for m in a:
        torch.testing.assert_close(a[m], b[m], rtol=0, atol=0)


def test_local_model_path(tmp_path, encoder):
    with pytest.raises(FileNotFoundError, match="not found"):
        BertTextEncoder(model_path=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertTextEncoder(model_path=tmp_path)
    encoder.bert.save_pretrained(tmp_path / "tiny")
    loaded = BertTextEncoder(model_path=tmp_path / "tiny", finetune=False)
    assert loaded.out_channels == 16 and not loaded.bert.training
    x = tokens(2, 7)
    torch.testing.assert_close(loaded(x), encoder(x), rtol=0, atol=0)
    via_options = text_encoder_from_options(path=str(tmp_path / "tiny"), finetune=True)
    assert via_options.finetune and all(p.requires_grad for p in via_options.parameters())
    assert text_encoder_from_options() is None


# ------------------------------------------------------------------ wired into the methods


def _token_dataset(n: int = 8, t: int = 6):
    import numpy as np

    from flowtransfer.data import from_arrays

    ids = tokens(n, t).numpy()
    audio = np.random.default_rng(0).normal(size=(n, 4, t)).astype("float32")
    labels = np.linspace(-2, 2, n).astype("float32")
    return from_arrays({"L": ids, "A": audio}, labels, "regression", layout="NCT")


@pytest.mark.parametrize("name", ["dicmor", "zero_fill", "mean_fill"])
def test_methods_read_text_through_bert(name: str) -> None:
    import numpy as np

    from flowtransfer.methods import DatasetInfo, build_method

    ds = _token_dataset()
    method = build_method(name, DatasetInfo.from_dataset(ds), preset="small",
                          text_encoder_config=tiny_config().to_dict())
    assert isinstance(method.extractors.encoders["L"], BertTextEncoder)
    method.prepare(ds)
    method.eval()
    absent_text = ds.with_mask(np.array([[False, True], [True, True]] * 4))
    pred = method.predict(absent_text.full_batch())  # NaN token rows never reach BERT
    assert pred.shape == (8,) and torch.isfinite(pred).all()


def test_dicmor_stages_freeze_or_finetune_bert() -> None:
    from flowtransfer.methods import DatasetInfo, build_method

    ds = _token_dataset()
    method = build_method("dicmor", DatasetInfo.from_dataset(ds), preset="small",
                          text_encoder_config=tiny_config().to_dict(), text_finetune=True)
    bert = method.extractors.encoders["L"]
    method.set_stage("complete")
    assert all(p.requires_grad for p in bert.parameters())
    method.set_stage("recovery")
    assert not any(p.requires_grad for p in bert.parameters())
    method.set_stage("joint")
    assert all(p.requires_grad for p in bert.parameters())
