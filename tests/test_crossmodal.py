"""CrossModalFlows: shared prior, augmentation for narrow modalities, transfer, save/load, errors."""

from __future__ import annotations

import math

import pytest
import torch

from flowtransfer import CrossModalFlows, ModalityError
from flowtransfer.io import CheckpointError


def perturbed(model: CrossModalFlows, scale: float = 0.05) -> CrossModalFlows:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


@pytest.fixture
def model() -> CrossModalFlows:
    torch.manual_seed(0)
    m = CrossModalFlows({"A": 3, "L": 5}, num_classes=3, num_layers=3, hidden=8, kernel_size=3, seed=0)
    m.train()
    m.nll(torch.randn(16, 3, 4), "A", torch.randint(0, 3, (16,)))  # data-dependent init
    m.nll(torch.randn(16, 5, 4), "L", torch.randint(0, 3, (16,)))
    return perturbed(m).eval()


def test_flows_share_one_prior(model: CrossModalFlows) -> None:
    assert model.flows["A"].prior is model.prior and model.flows["L"].prior is model.prior
    names = [n for n, _ in model.named_parameters() if n.endswith("loc") or "prior" in n]
    assert len({id(p) for p in model.prior.parameters()}) == len(list(model.prior.parameters()))
    # the prior's parameters appear once in the model's parameter list
    assert len(list(model.parameters())) == len(set(map(id, model.parameters())))
    assert names


def test_transfer_shapes_and_composition(model: CrossModalFlows) -> None:
    x = torch.randn(6, 3, 7)
    out = model.transfer(x, "A", "L")
    assert out.shape == (6, 5, 7)
    z = model.flows["A"].to_latent(torch.cat([x, torch.zeros(6, 2, 7)], 1))
    expected = model.flows["L"].from_latent(z)[:, :5]
    torch.testing.assert_close(out, expected)


def test_widest_modality_log_prob_is_exact(model: CrossModalFlows) -> None:
    x = torch.randn(4, 5, 2)
    y = torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(model.log_prob(x, "L", y), model.flows["L"].log_prob(x, y))


def test_narrow_modality_bound_is_a_lower_bound_on_average() -> None:
    """For an untrained (identity-like) flow with a standard prior, the augmented bound equals
    log N(x) exactly in expectation, since log p([x; e]) - log q(e) = log N(x) when q = N(0, I)."""
    torch.manual_seed(0)
    m = CrossModalFlows({"A": 2, "L": 4}, num_classes=None, num_layers=1, hidden=4, mixing=None, actnorm=False,
                        scale="additive")
    m.eval()
    x = torch.randn(3, 2, 5)
    exact = -0.5 * (x**2).sum((1, 2)) - 0.5 * 2 * 5 * math.log(2 * math.pi)
    torch.testing.assert_close(m.log_prob(x, "A"), exact, atol=1e-4, rtol=1e-4)


def test_nll_has_gradients_for_flow_and_prior(model: CrossModalFlows) -> None:
    model.train()
    loss = model.nll(torch.randn(8, 3, 4), "A", torch.randint(0, 3, (8,)))
    loss.backward()
    assert model.prior.loc.grad is not None and model.prior.loc.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.flows["A"].parameters() if p.requires_grad)


def test_save_load_identical(model: CrossModalFlows, tmp_path) -> None:
    path = model.save(tmp_path / "m.pt")
    again = CrossModalFlows.load(path)
    x = torch.randn(5, 3, 6)
    torch.testing.assert_close(again.transfer(x, "A", "L"), model.transfer(x, "A", "L"), rtol=0, atol=0)
    assert again.input_dims == model.input_dims


def test_load_refuses_code(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "flowtransfer.CrossModalFlows/1", "config": Evil(), "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="refusing"):
        CrossModalFlows.load(path)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a saved CrossModalFlows"):
        CrossModalFlows.load(tmp_path / "other.pt")


@pytest.mark.parametrize(
    "x, src, dst, error, match",
    [
        (torch.randn(2, 3, 4), "X", "L", ModalityError, "unknown modality 'X'.*'A', 'L'"),
        (torch.randn(2, 3, 4), "A", "Q", ModalityError, "unknown modality 'Q'"),
        (torch.randn(2, 4, 4), "A", "L", ModalityError, "expects 3 channels, got 4"),
        (torch.randn(3, 4), "A", "L", ModalityError, "batch, channels, time"),
        (torch.full((2, 3, 4), float("nan")), "A", "L", ValueError, "non-finite"),
        (torch.randn(2, 3, 4), "A", "A", ModalityError, "nothing to transfer"),
    ],
)
def test_transfer_errors(model: CrossModalFlows, x, src, dst, error, match) -> None:
    with pytest.raises(error, match=match):
        model.transfer(x, src, dst)


def test_constructor_errors() -> None:
    with pytest.raises(ModalityError, match="at least two"):
        CrossModalFlows({"A": 3})
    with pytest.raises(ModalityError, match="smaller than"):
        CrossModalFlows({"A": 3, "L": 5}, width=4)
