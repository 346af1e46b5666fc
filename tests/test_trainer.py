"""The shared trainer on a toy method: learning, selection, schedule, clipping, checkpoints."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import flowtransfer.io
from flowtransfer.data.dataset import from_arrays
from flowtransfer.io import safe_load
from flowtransfer.training import (
    NonFinitePredictionError,
    Trainer,
    TrainConfig,
    evaluate,
    evaluate_loss,
    predict_dataset,
    seed_everything,
)
from flowtransfer.training.seeding import derive_seed, make_generator, rng_state, set_rng_state
from flowtransfer.training.trainer import load_checkpoint

DIMS = {"A": (3, 4), "V": (2, 5)}  # modality -> (channels, time)


def make_data(n: int, seed: int, task: str = "regression", num_classes: int = 3, mask=None):
    rng = np.random.default_rng(seed)
    feats = {m: rng.normal(size=(n, c, t)).astype(np.float32) for m, (c, t) in DIMS.items()}
    score = feats["A"].mean(-1) @ np.array([1.5, -1.0, 0.5]) + feats["V"].mean(-1) @ np.array([0.8, 0.4])
    if task == "regression":
        labels = (score + 0.05 * rng.normal(size=n)).astype(np.float32)
        return from_arrays(feats, labels, task, layout="NCT", mask=mask)
    edges = np.quantile(score, np.linspace(0, 1, num_classes + 1)[1:-1])
    labels = np.digitize(score, edges)
    return from_arrays(feats, labels, task, layout="NCT", num_classes=num_classes, mask=mask)


class PooledLinear(nn.Module):
    """Linear model on time-averaged, zero-filled features (a minimal Method)."""

    def __init__(self, task: str = "regression", num_classes: int = 3, dropout: float = 0.0, fill: bool = True):
        super().__init__()
        self.task = task
        out = 1 if task == "regression" else num_classes
        self.proj = nn.ModuleDict({m: nn.Linear(c, out) for m, (c, _) in DIMS.items()})
        self.dropout = nn.Dropout(dropout)
        self.fill = fill

    def predict(self, batch):
        feats = batch.filled(0.0).features if self.fill else batch.features
        out = sum(self.proj[m](self.dropout(feats[m].mean(-1))) for m in DIMS)
        return out.squeeze(-1) if self.task == "regression" else out

    def loss(self, batch):
        out = self.predict(batch)
        if self.task == "regression":
            loss = nn.functional.mse_loss(out, batch.labels)
        else:
            loss = nn.functional.cross_entropy(out, batch.labels)
        return loss, {"task": float(loss.detach())}


class Scripted(PooledLinear):
    """Trains normally, but its validation MAE follows ``script`` (valid labels are all zero)."""

    def __init__(self, script):
        super().__init__()
        self.script = list(script)
        self.register_buffer("epoch_seen", torch.tensor(0))

    def on_epoch_start(self, epoch, trainer):
        self.epoch_seen.fill_(epoch)

    def predict(self, batch):
        out = super().predict(batch)
        if self.training:
            return out
        return torch.zeros_like(out) + self.script[int(self.epoch_seen)]


def zero_label_valid(n: int = 16, seed: int = 7):
    ds = make_data(n, seed)
    return from_arrays({m: ds.features[m] for m in ds.modalities}, np.zeros(n, np.float32), "regression", layout="NCT")


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


QUIET = dict(progress=False, device="cpu")


# --------------------------------------------------------------------------------------------------


def test_loss_decreases_and_valid_metrics_recorded():
    train, valid = make_data(96, 0), make_data(48, 1)
    seed_everything(0)
    method = PooledLinear()
    result = Trainer(method, TrainConfig(epochs=5, batch_size=16, lr=0.1, **QUIET)).fit(train, valid)
    losses = [r["train/loss"] for r in result.history]
    assert losses[-1] < 0.2 * losses[0]
    assert result.history[-1]["valid/loss"] < result.history[0]["valid/loss"]
    for key in ("valid/mae", "valid/acc2_non0", "valid/corr", "train/loss/task", "valid/loss/task", "lr", "seconds"):
        assert key in result.history[0]
    assert result.history[-1]["valid/corr"] > 0.9
    assert result.monitor == "loss" and result.mode == "min"
    assert result.train_seconds == pytest.approx(sum(r["seconds"] for r in result.history))
    # evaluate() agrees with the recorded validation metrics of the best epoch
    scores = evaluate(method, valid, batch_size=7)
    assert scores["mae"] == pytest.approx(result.history[result.best_epoch]["valid/mae"], rel=1e-6)


def test_classification_monitor_accuracy_maximised():
    train, valid = make_data(90, 0, "classification"), make_data(45, 1, "classification")
    seed_everything(0)
    method = PooledLinear("classification")
    cfg = TrainConfig(epochs=5, batch_size=15, lr=0.1, monitor="acc", **QUIET)
    result = Trainer(method, cfg).fit(train, valid)
    assert result.mode == "max"
    accs = [r["valid/acc"] for r in result.history]
    assert result.best_score == max(accs)
    assert result.best_epoch == accs.index(max(accs))
    assert "valid/loss" not in result.history[0]  # loss pass only when monitoring a loss
    assert result.best_score > 0.6


def test_early_stopping_plateau_lr_and_best_restored(tmp_path):
    # validation MAE per epoch: best at epoch 1, then worse and worse
    script = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]
    train, valid = make_data(64, 0), zero_label_valid()
    seed_everything(0)
    method = Scripted(script)
    cfg = TrainConfig(
        epochs=8, batch_size=16, lr=0.01, monitor="mae", early_stop_patience=3,
        lr_plateau_patience=1, lr_plateau_factor=0.5, checkpoint_dir=str(tmp_path), **QUIET,
    )
    result = Trainer(method, cfg).fit(train, valid)
    assert result.mode == "min"
    assert [r["valid/mae"] for r in result.history] == pytest.approx(script[:5])
    assert result.best_epoch == 1 and result.best_score == pytest.approx(0.5)
    assert result.stopped_early and result.epochs_run == 5  # 3 bad epochs after epoch 1
    assert [r["improved"] for r in result.history] == [True, True, False, False, False]
    # ReduceLROnPlateau(patience 1): reduced after the 2nd bad epoch (epoch 3), seen from epoch 4
    assert [r["lr"] for r in result.history] == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.005])
    # the method holds the best epoch's weights: equal to best.pt, different from last.pt
    best = load_checkpoint(tmp_path / "best.pt")
    last = load_checkpoint(tmp_path / "last.pt")
    assert best["epoch"] == 2 and best["best_epoch"] == 1  # epochs completed when written
    assert_same(params_of(method), best["state_dict"])
    assert not torch.equal(method.proj["A"].weight, last["state_dict"]["proj.A.weight"])
    assert_same(best["state_dict"], last["best_state_dict"])
    assert last["epoch"] == 5 and last["bad_epochs"] == 3 and last["stopped_early"]
    assert isinstance(last["config"], dict) and last["config"]["monitor"] == "mae"
    assert set(last["rng"][0]) >= {"python", "numpy", "torch"}


def test_selection_uses_validation_only():
    params = list(inspect.signature(Trainer.fit).parameters)
    assert params == ["self", "train_dataset", "valid_dataset"]
    train = make_data(32, 0)
    method = PooledLinear()
    trainer = Trainer(method, TrainConfig(epochs=1, **QUIET))
    with pytest.raises(ValueError, match="validation"):
        trainer.fit(train, None)
    with pytest.raises(ValueError, match="same object"):
        trainer.fit(train, train)
    # the selected epoch is the validation optimum, whatever the training loss does
    script = [0.9, 0.8, 0.3, 0.7]
    result = Trainer(Scripted(script), TrainConfig(epochs=4, monitor="mae", early_stop_patience=None, **QUIET)).fit(
        make_data(32, 0), zero_label_valid()
    )
    assert result.best_epoch == 2


def test_unknown_monitor_is_named():
    method = PooledLinear()
    with pytest.raises(ValueError, match="monitor 'accuracy'.*mae"):
        Trainer(method, TrainConfig(epochs=1, monitor="accuracy", **QUIET)).fit(make_data(16, 0), make_data(8, 1))


def test_grad_clip_norm_is_applied():
    train, valid = make_data(32, 0), make_data(8, 1)
    method = PooledLinear()
    before = torch.cat([p.detach().flatten().clone() for p in method.parameters()])
    cfg = TrainConfig(
        epochs=1, batch_size=32, lr=1.0, optimizer="sgd", momentum=0.0, grad_clip_norm=1e-3,
        max_steps_per_epoch=1, **QUIET,
    )
    result = Trainer(method, cfg).fit(train, valid)
    after = torch.cat([p.detach().flatten() for p in method.parameters()])
    assert result.history[0]["train/grad_norm"] > 1e-2  # the raw gradient was larger
    assert torch.linalg.vector_norm(after - before).item() == pytest.approx(1e-3, rel=1e-4)


def test_grad_clip_value_is_applied():
    method = PooledLinear()
    before = [p.detach().clone() for p in method.parameters()]
    cfg = TrainConfig(epochs=1, batch_size=32, lr=1.0, optimizer="sgd", momentum=0.0, grad_clip_value=1e-3,
                      max_steps_per_epoch=1, **QUIET)
    Trainer(method, cfg).fit(make_data(32, 0), make_data(8, 1))
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(method.parameters(), before)])
    assert step.abs().max().item() == pytest.approx(1e-3, rel=1e-4)


class WithIdle(PooledLinear):
    """A parameter that gets an exactly-zero gradient: only weight decay can move it."""

    def __init__(self):
        super().__init__()
        self.idle = nn.Parameter(torch.full((4,), 2.0))

    def loss(self, batch):
        loss, parts = super().loss(batch)
        return loss + 0.0 * self.idle.sum(), parts


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_weight_decay_reaches_optimiser(optimizer):
    method = WithIdle()
    cfg = TrainConfig(epochs=1, batch_size=8, lr=0.01, weight_decay=0.1, optimizer=optimizer, momentum=0.0,
                      max_steps_per_epoch=3, lr_plateau_patience=None, **QUIET)
    trainer = Trainer(method, cfg)
    assert all(g["weight_decay"] == 0.1 for g in trainer.optimizer.param_groups)
    trainer.fit(make_data(32, 0), make_data(8, 1))
    idle = method.idle.detach()
    if optimizer in ("adamw", "sgd"):  # decoupled decay / plain L2 under SGD: p <- p (1 - lr wd) per step
        assert torch.allclose(idle, torch.full((4,), 2.0 * (1 - 0.01 * 0.1) ** 3))
    else:  # Adam's L2 term is the whole gradient: the normalised step moves p by ~lr toward 0
        assert torch.allclose(idle, torch.full((4,), 2.0 - 3 * 0.01), atol=1e-4)
    # without weight decay the idle parameter stays put
    method = WithIdle()
    Trainer(method, TrainConfig(epochs=1, batch_size=8, optimizer=optimizer, max_steps_per_epoch=3, **QUIET)).fit(
        make_data(32, 0), make_data(8, 1)
    )
    assert torch.equal(method.idle.detach(), torch.full((4,), 2.0))


class Grouped(PooledLinear):
    def parameter_groups(self):
        return [{"params": list(self.proj["A"].parameters()), "lr": 0.5}, {"params": list(self.proj["V"].parameters())}]


def test_parameter_groups_hook():
    trainer = Trainer(Grouped(), TrainConfig(lr=0.01, weight_decay=0.2, **QUIET))
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups] == [0.5, 0.01]
    assert [g["weight_decay"] for g in groups] == [0.2, 0.2]


def run_dropout(tmp_path: Path, epochs: int, resume: bool, init_seed: int = 3):
    torch.manual_seed(init_seed)
    method = PooledLinear(dropout=0.3)
    cfg = TrainConfig(epochs=epochs, batch_size=12, lr=0.3, lr_plateau_patience=0, early_stop_patience=None,
                      seed=5, checkpoint_dir=str(tmp_path), resume=resume, **QUIET)
    result = Trainer(method, cfg).fit(make_data(60, 0), make_data(24, 1))
    return method, result


def test_resume_matches_uninterrupted_run(tmp_path):
    straight, r_straight = run_dropout(tmp_path / "straight", 6, resume=False)
    run_dropout(tmp_path / "split", 3, resume=False)
    # a different initialisation: resume must overwrite it with the checkpoint
    resumed, r_resumed = run_dropout(tmp_path / "split", 6, resume=True, init_seed=99)
    assert_same(params_of(straight), params_of(resumed))
    assert r_straight.best_epoch == r_resumed.best_epoch and r_resumed.epochs_run == 6
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(r_straight.history) == strip(r_resumed.history)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert_same(a["state_dict"], b["state_dict"])  # current (not only best) weights agree
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    # the schedule acted right after the resume point (epoch 3 runs at a reduced lr), which only
    # happens if the scheduler's best score and counter were carried across the resume
    lrs = [r["lr"] for r in r_straight.history]
    assert lrs[3] < lrs[2] and not r_straight.history[3]["improved"]


def test_resume_after_completion_trains_nothing_more(tmp_path, caplog):
    method, first = run_dropout(tmp_path, 2, resume=False)
    again, second = run_dropout(tmp_path, 2, resume=True, init_seed=42)
    assert second.epochs_run == 2 and len(second.history) == 2
    assert_same(params_of(method), params_of(again))
    # resuming under different settings is allowed but said out loud
    cfg = TrainConfig(epochs=3, lr=0.01, checkpoint_dir=str(tmp_path), resume=True, **QUIET)
    with caplog.at_level("WARNING", logger="flowtransfer.training.trainer"):
        Trainer(PooledLinear(dropout=0.3), cfg).fit(make_data(60, 0), make_data(24, 1))
    assert "changed settings" in caplog.text and "'lr': (0.3, 0.01)" in caplog.text


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    run_dropout(tmp_path, 1, resume=False)
    before = {p: (tmp_path / p).read_bytes() for p in ("last.pt", "best.pt")}

    def killed(fd):
        raise KeyboardInterrupt("simulated kill during checkpoint write")

    monkeypatch.setattr(flowtransfer.io.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        run_dropout(tmp_path, 3, resume=True)
    monkeypatch.undo()
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]  # no temp files left behind
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    # and training resumes from the intact file to the same end as an uninterrupted run
    resumed, _ = run_dropout(tmp_path, 3, resume=True)
    straight, _ = run_dropout(tmp_path / "ref", 3, resume=False)
    assert_same(params_of(resumed), params_of(straight))


def test_checkpoint_is_plain_data(tmp_path):
    run_dropout(tmp_path, 1, resume=False)
    state = safe_load(tmp_path / "last.pt")  # weights_only=True accepts it
    assert state["format"] == "flowtransfer.trainer/1"
    flowtransfer.io.atomic_save({"format": "other"}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a trainer checkpoint"):
        load_checkpoint(tmp_path / "x.pt")


def test_nan_from_missing_modality_is_caught():
    n = 24
    mask = np.ones((n, 2), dtype=bool)
    mask[::3, 1] = False  # V missing for every third sample
    ds = make_data(n, 0, mask=mask)
    leaky = PooledLinear(fill=False)  # reads NaN slots without consulting the mask
    with pytest.raises(NonFinitePredictionError, match=r"8 of 24 samples.*batch.mask"):
        predict_dataset(leaky, ds)
    with pytest.raises(FloatingPointError, match="batch.mask"):
        Trainer(leaky, TrainConfig(epochs=1, **QUIET)).fit(ds, make_data(8, 1))
    pred, target = predict_dataset(PooledLinear(fill=True), ds, batch_size=5)
    assert pred.shape == (n,) and np.isfinite(pred).all()
    np.testing.assert_array_equal(target, ds.labels)


def test_predict_dataset_checks_shapes_and_restores_mode():
    ds = make_data(10, 0, "classification", num_classes=3)
    method = PooledLinear("classification", num_classes=3)
    method.train()
    pred, target = predict_dataset(method, ds, batch_size=4)
    assert pred.shape == (10, 3) and target.dtype == np.int64 and method.training
    assert set(evaluate(method, ds)) >= {"acc", "f1_macro", "f1_weighted"}
    wrong = PooledLinear("classification", num_classes=4)
    with pytest.raises(ValueError, match=r"logits must have shape \(4, 3\)"):
        predict_dataset(wrong, ds, batch_size=4)


def test_config_validation():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="resume"):
        TrainConfig(resume=True)
    with pytest.raises(ValueError, match="grad_clip_norm"):
        TrainConfig(grad_clip_norm=0.0)
    assert TrainConfig(monitor="acc2_non0").resolved_mode == "max"
    assert TrainConfig(monitor="loss/task").resolved_mode == "min"
    cfg = TrainConfig(epochs=3, checkpoint_dir=Path("x"))
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_seeding_helpers():
    seed_everything(11)
    a = (np.random.rand(), torch.rand(2), __import__("random").random())
    state = rng_state()
    b = (np.random.rand(), torch.rand(2), __import__("random").random())
    set_rng_state(state)
    c = (np.random.rand(), torch.rand(2), __import__("random").random())
    assert b[0] == c[0] and torch.equal(b[1], c[1]) and b[2] == c[2]
    seed_everything(11)
    assert a[0] == np.random.rand()
    g1, g2 = make_generator(5, 1), make_generator(5, 1)
    assert torch.equal(torch.randperm(10, generator=g1), torch.randperm(10, generator=g2))
    assert derive_seed(5, 0) != derive_seed(5, 1) and 0 <= derive_seed(5, 3) < 2**63
    with pytest.raises(TypeError):
        seed_everything(1.5)


class SometimesLogged(PooledLinear):
    """Logs an extra part only for batches whose first sample index is even."""

    def loss(self, batch):
        loss, parts = super().loss(batch)
        if int(batch.index[0]) % 2 == 0:
            parts["extra"] = 1.0
        return loss, parts


def test_evaluate_loss_weights_by_samples():
    ds = make_data(23, 0)
    method = PooledLinear()
    whole = evaluate_loss(method, ds, batch_size=64)
    assert evaluate_loss(method, ds, batch_size=5)["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    with torch.no_grad():
        direct = nn.functional.mse_loss(method.predict(ds.full_batch()), ds.full_batch().labels).item()
    assert whole["loss"] == pytest.approx(direct, rel=1e-6)
    # a part some batches do not log is averaged over the batches that do, not diluted
    assert evaluate_loss(SometimesLogged(), ds, batch_size=4)["loss/extra"] == pytest.approx(1.0)


def test_progress_bars_on_a_terminal(monkeypatch, capsys):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    cfg = TrainConfig(epochs=2, batch_size=8, progress=True, device="cpu")
    Trainer(PooledLinear(), cfg).fit(make_data(16, 0), make_data(8, 1))
    err = capsys.readouterr().err
    assert "train" in err and "2/2" in err
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False, device="cpu")
    Trainer(PooledLinear(), cfg).fit(make_data(16, 0), make_data(8, 1))
    assert capsys.readouterr().err == ""


class Prepared(PooledLinear):
    """Learns a residual around a training-set statistic computed in ``prepare``."""

    def __init__(self):
        super().__init__()
        self.register_buffer("label_mean", torch.tensor(float("nan")))
        self.calls = []

    def prepare(self, dataset):
        self.calls.append(dataset)
        self.label_mean.fill_(float(np.mean(dataset.labels)) + 0.0 * torch.rand(()).item())
        self.draw = torch.rand(()).item()  # global RNG inside prepare is seeded with config.seed

    def on_epoch_start(self, epoch, trainer):
        assert trainer.train_dataset is self.calls[0]

    def predict(self, batch):
        return super().predict(batch) + self.label_mean

    def loss(self, batch):
        loss, parts = super().loss(batch)
        parts["loss"] = float(loss.detach())  # the total, as methods.base documents it
        return loss, parts


def test_prepare_hook_runs_once_seeded_before_training():
    train, valid = make_data(32, 0), make_data(8, 1)
    a, b = Prepared(), Prepared()
    result = Trainer(a, TrainConfig(epochs=2, seed=9, **QUIET)).fit(train, valid)
    Trainer(b, TrainConfig(epochs=1, seed=9, **QUIET)).fit(train, valid)
    assert len(a.calls) == 1 and a.calls[0] is train
    assert a.label_mean.item() == pytest.approx(float(np.mean(train.labels)))
    assert a.draw == b.draw  # seeded with config.seed
    assert "train/loss/loss" not in result.history[0] and "train/loss/task" in result.history[0]


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_build_optimizer_uses_the_fused_kernel_with_the_reference_update(name):
    from flowtransfer.training import build_optimizer

    torch.manual_seed(30)
    nets = [nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    cfg = TrainConfig(optimizer=name, lr=1e-2, weight_decay=1e-3)
    fast = build_optimizer([{"params": list(nets[0].parameters())}], cfg)
    ref_cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    ref = ref_cls(nets[1].parameters(), lr=1e-2, weight_decay=1e-3, foreach=False)
    assert fast.defaults["fused"] is True
    start = [p.detach().clone() for p in nets[0].parameters()]
    x = torch.randn(16, 5)
    for _ in range(5):
        for net, opt in zip(nets, (fast, ref)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b, a0 in zip(nets[0].parameters(), nets[1].parameters(), start):
        assert not torch.allclose(a, a0)  # the optimisers did move the parameters
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_from_a_malformed_checkpoint_names_it(tmp_path):
    from flowtransfer.io import CheckpointError, atomic_save

    cfg = TrainConfig(epochs=2, lr=0.1, checkpoint_dir=str(tmp_path), resume=True, **QUIET)
    atomic_save({"format": "flowtransfer.trainer/1", "method": "PooledLinear"}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"cannot resume from .*last.pt: missing entry 'state_dict'"):
        Trainer(PooledLinear(), cfg).fit(make_data(20, 0), make_data(8, 1))
    atomic_save({"format": "something else"}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="cannot resume: .*is not a trainer checkpoint"):
        Trainer(PooledLinear(), cfg).fit(make_data(20, 0), make_data(8, 1))


# ------------------------------------------------------------------------------ the budget rule


class CountingSteps:
    """Counts the optimiser's ``step`` calls (the quantity the cap bounds)."""

    def __init__(self, trainer: Trainer) -> None:
        self.calls = 0
        original = trainer.optimizer.step

        def step(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        trainer.optimizer.step = step


def test_step_cap_is_exact_and_cuts_the_epoch():
    # 64 samples, batch 16: 4 steps per epoch; a cap of 10 cuts the third epoch after 2 steps
    script = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]  # always improving
    seed_everything(0)
    trainer = Trainer(Scripted(script), TrainConfig(epochs=6, batch_size=16, monitor="mae", max_steps=10,
                                                     early_stop_patience=3, **QUIET))
    counter = CountingSteps(trainer)
    result = trainer.fit(make_data(64, 0), zero_label_valid())
    assert counter.calls == 10 and result.steps == 10
    assert [r["steps"] for r in result.history] == [4, 8, 10]  # the cut epoch is validated too
    assert result.epochs_run == 3 and result.best_epoch == 2 and result.best_step == 10
    assert result.stop_reason == "cap" and result.improving_at_stop and not result.stopped_early
    assert result.budget() == {"steps": 10, "best_step": 10, "stop_reason": "cap", "improving_at_stop": True,
                               "valid_score": result.best_score, "valid_monitor": "mae"}


def test_stop_reason_in_each_case():
    train, valid = make_data(64, 0), zero_label_valid()

    def fit(script, **changes):
        seed_everything(0)
        settings = dict(epochs=len(script), batch_size=16, monitor="mae", early_stop_patience=2, **QUIET)
        settings.update(changes)
        return Trainer(Scripted(script), TrainConfig(**settings)).fit(train, valid)

    # plateau: best at epoch 1, two bad epochs, stopped before the epoch limit and the cap
    r = fit([1.0, 0.5, 0.6, 0.7, 0.8, 0.9], max_steps=100)
    assert (r.stop_reason, r.improving_at_stop, r.stopped_early) == ("plateau", False, True)
    assert r.epochs_run == 4 and r.steps == 16 and r.best_step == 8
    # epochs: the limit ends a run that improved in its last patience window
    r = fit([1.0, 0.9, 0.95])
    assert (r.stop_reason, r.improving_at_stop) == ("epochs", True) and r.steps == 12 and r.best_step == 8
    # epochs, but nothing improved for the last 2 epochs: the plateau criterion holds -> "plateau"
    r = fit([1.0, 1.1, 1.2])
    assert (r.stop_reason, r.improving_at_stop, r.stopped_early) == ("plateau", False, False)
    # the cap and the plateau at the same epoch: the plateau takes precedence
    r = fit([1.0, 1.1, 1.2, 0.1], max_steps=12)
    assert r.steps == 12 and (r.stop_reason, r.improving_at_stop) == ("plateau", False)
    # the cap while the last epoch did not improve but one in the window did: still improving
    r = fit([1.0, 0.9, 0.95, 0.1], max_steps=12)
    assert (r.stop_reason, r.improving_at_stop, r.best_step) == ("cap", True, 8)
    # early stopping off: the window is the last epoch
    r = fit([1.0, 0.9, 0.95], early_stop_patience=None)
    assert (r.stop_reason, r.improving_at_stop) == ("epochs", False)
    r = fit([1.0, 0.9, 0.8], early_stop_patience=None, max_steps=9)
    assert (r.stop_reason, r.improving_at_stop, r.steps) == ("cap", True, 9)


def test_planned_steps_match_the_loader():
    cfg = TrainConfig(epochs=3, batch_size=16, max_steps=20, **QUIET)
    assert cfg.steps_per_epoch(70) == 5 and cfg.planned_steps(70) == 15
    assert TrainConfig(epochs=9, batch_size=16, max_steps=20).planned_steps(70) == 20
    assert TrainConfig(batch_size=16, drop_last=True).steps_per_epoch(70) == 4
    assert TrainConfig(batch_size=16, max_steps_per_epoch=2).steps_per_epoch(70) == 2
    assert TrainConfig(batch_size=16).steps_per_epoch(70, world_size=2) == 3  # 35 per rank
    result = Trainer(PooledLinear(), TrainConfig(epochs=2, batch_size=16, early_stop_patience=None, **QUIET)).fit(
        make_data(70, 0), make_data(8, 1))
    assert result.steps == 2 * TrainConfig(batch_size=16).steps_per_epoch(70)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=0)


def test_on_epoch_end_callback_sees_every_epoch():
    seen = []
    trainer = Trainer(PooledLinear(), TrainConfig(epochs=3, batch_size=16, max_steps=10, **QUIET),
                      on_epoch_end=lambda t, record: seen.append((t.steps, record["steps"], record["epoch"])))
    trainer.fit(make_data(64, 0), make_data(8, 1))
    assert seen == [(4, 4, 0), (8, 8, 1), (10, 10, 2)]
    with pytest.raises(TypeError, match="on_epoch_end"):
        Trainer(PooledLinear(), TrainConfig(**QUIET), on_epoch_end=3)


def test_resume_under_a_cap_matches_uninterrupted_run(tmp_path):
    def run(folder, epochs, resume, init_seed=3):
        torch.manual_seed(init_seed)
        method = PooledLinear(dropout=0.3)
        cfg = TrainConfig(epochs=epochs, batch_size=12, lr=0.3, lr_plateau_patience=0, early_stop_patience=None,
                          seed=5, max_steps=13, checkpoint_dir=str(folder), resume=resume, **QUIET)
        return method, Trainer(method, cfg).fit(make_data(60, 0), make_data(24, 1))

    straight, a = run(tmp_path / "straight", 6, False)
    run(tmp_path / "split", 2, False)  # 10 steps, killed
    resumed, b = run(tmp_path / "split", 6, True, init_seed=99)
    assert_same(params_of(straight), params_of(resumed))
    assert a.steps == b.steps == 13 and a.stop_reason == b.stop_reason == "cap"
    assert (a.best_step, a.improving_at_stop) == (b.best_step, b.improving_at_stop)
    assert [r["steps"] for r in b.history] == [5, 10, 13]
    assert load_checkpoint(tmp_path / "split" / "last.pt")["steps"] == 13
    # resuming a capped, finished run trains nothing more
    again, c = run(tmp_path / "split", 6, True, init_seed=7)
    assert c.steps == 13 and len(c.history) == 3
    assert_same(params_of(straight), params_of(again))


def test_planned_epochs_follow_the_cap():
    trainer = Trainer(PooledLinear(), TrainConfig(epochs=9, batch_size=16, max_steps=10, **QUIET))
    assert trainer.planned_epochs is None  # no training set yet
    seen = []

    class Hooked(PooledLinear):
        def on_epoch_start(self, epoch, trainer):
            seen.append(trainer.planned_epochs)

    Trainer(Hooked(), TrainConfig(epochs=9, batch_size=16, max_steps=10, **QUIET)).fit(make_data(64, 0), make_data(8, 1))
    assert seen == [3, 3, 3]  # 4 steps per epoch: ceil(10 / 4)


# ------------------------------------------------------------------------------------------ method hooks (issue 11)


class Hooked(Scripted):
    """Records the order of the hooks; ``after_train_epoch`` sets what validation then scores:
    the validation MAE of epoch e is ``script[e] + shift`` with ``shift`` set after training."""

    def __init__(self, script, vetoes=()):
        super().__init__(script)
        self.vetoes = set(vetoes)
        self.calls: list[str] = []
        self.register_buffer("shift", torch.tensor(0.0))
        self.seen_at_end: dict | None = None

    def _log(self, name):
        if not self.calls or self.calls[-1] != name:
            self.calls.append(name)

    def on_epoch_start(self, epoch, trainer):
        super().on_epoch_start(epoch, trainer)
        self._log(f"start{epoch}")

    def loss(self, batch):
        self._log("loss")
        return super().loss(batch)

    def after_train_epoch(self, epoch, trainer):
        assert trainer.valid_dataset is not None
        self._log(f"after{epoch}")
        self.shift.fill_(100.0 * (epoch + 1))

    def predict(self, batch):
        out = super().predict(batch)
        if not self.training:
            self._log("validate")
            out = out + self.shift
        return out

    def selection_veto(self, dataset):
        self._log("veto")
        epoch = int(self.epoch_seen)
        return f"epoch {epoch} is in the warm-up" if epoch in self.vetoes else None

    def on_fit_end(self, trainer):
        self._log("end")
        self.seen_at_end = {"now": params_of(self), "last": dict(trainer.last_state)}


def test_method_hooks_run_in_order_and_after_train_epoch_precedes_validation():
    method = Hooked([0.5, 1.0, 1.0])
    trainer = Trainer(method, TrainConfig(epochs=3, batch_size=16, monitor="mae", early_stop_patience=None,
                                          lr_plateau_patience=None, **QUIET))
    result = trainer.fit(make_data(32, 0), zero_label_valid())
    per_epoch = lambda e: [f"start{e}", "loss", f"after{e}", "validate", "veto"]  # noqa: E731
    assert method.calls == per_epoch(0) + per_epoch(1) + per_epoch(2) + ["end"]
    # validation scored what after_train_epoch set: 100 (epoch+1) + script
    assert [r["valid/mae"] for r in result.history] == pytest.approx([100.5, 201.0, 301.0])
    # on_fit_end ran with the best epoch's state loaded and the last epoch's in trainer.last_state
    assert result.best_epoch == 0
    assert float(method.seen_at_end["now"]["shift"]) == 100.0 and float(method.seen_at_end["last"]["shift"]) == 300.0
    assert trainer.last_state is None  # dropped after the hook
    assert not torch.equal(method.seen_at_end["now"]["proj.A.weight"], method.seen_at_end["last"]["proj.A.weight"])


def test_vetoed_warmup_epochs_use_no_patience_and_no_schedule_step():
    # epochs 0-2 vetoed (a warm-up) with excellent scores; epoch 5 vetoed after a best: counts as bad
    script = [0.1, 0.1, 0.1, 1.0, 0.8, 0.01, 0.9, 0.7, 0.6, 0.5]
    seed_everything(0)
    method = Hooked(script, vetoes={0, 1, 2, 5})
    method.after_train_epoch = lambda epoch, trainer: None  # shift stays 0: the score is the script
    trainer = Trainer(method, TrainConfig(epochs=10, batch_size=16, lr=0.1, monitor="mae", early_stop_patience=2,
                                          lr_plateau_patience=0, **QUIET))
    assert trainer.exempts_warmup is True
    result = trainer.fit(make_data(32, 0), zero_label_valid())
    h = result.history
    # patience 2 <= warm-up 3, yet the warm-up did not stop the run; the plateau did after epoch 6
    assert result.epochs_run == 7 and result.stopped_early and result.stop_reason == "plateau"
    assert result.best_epoch == 4 and result.best_score == pytest.approx(0.8)
    assert [r.get("patience_exempt", False) for r in h] == [True, True, True, False, False, False, False]
    assert "veto" in h[5] and not h[5]["improved"]
    # the schedule never saw the warm-up; the vetoed epoch 5 counted as bad (its 0.01 not trusted)
    assert [r["lr"] for r in h] == pytest.approx([0.1] * 6 + [0.05])
    assert not result.improving_at_stop


def test_vetoed_warmup_and_the_cap_say_improving():
    seed_everything(0)
    method = Hooked([0.1, 0.1, 1.0, 0.9], vetoes={0, 1})
    method.after_train_epoch = lambda epoch, trainer: None
    # 32 samples, batch 16: 2 steps an epoch; the cap of 8 ends epoch 3
    result = Trainer(method, TrainConfig(epochs=10, batch_size=16, monitor="mae", early_stop_patience=1, max_steps=8,
                                         **QUIET)).fit(make_data(32, 0), zero_label_valid())
    assert (result.stop_reason, result.improving_at_stop, result.best_epoch, result.best_step) == ("cap", True, 3, 8)
    # vetoed to the end: an error naming the vetoes, never a silent result
    method = Hooked([0.1] * 3, vetoes={0, 1, 2})
    with pytest.raises(RuntimeError, match="vetoed every one"):
        Trainer(method, TrainConfig(epochs=3, batch_size=16, monitor="mae", early_stop_patience=1,
                                    **QUIET)).fit(make_data(32, 0), zero_label_valid())


def _specialists_run(folder, epochs, resume, init_seed=3):
    from flowtransfer.methods.base import DatasetInfo, build_method

    rng = np.random.default_rng(0)
    mask = rng.random((48, 2)) < 0.7
    mask[~mask.any(1), 0] = True
    train = make_data(48, 0, mask=mask)
    vmask = np.array([[True, True], [True, False], [False, True]] * 8)
    valid = make_data(24, 1, mask=vmask)
    torch.manual_seed(init_seed)
    method = build_method("specialists", DatasetInfo.from_dataset(train), preset="small", fusion="concat", d=8)
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=0.02, monitor="mae", early_stop_patience=None,
                      lr_plateau_patience=1, seed=5, checkpoint_dir=str(folder), resume=resume, **QUIET)
    return method, Trainer(method, cfg).fit(train, valid)


def test_resume_with_specialists_matches_uninterrupted_run(tmp_path):
    straight, a = _specialists_run(tmp_path / "straight", 6, False)
    # the selection is checkpointed: selected copies and per-pattern scores/epochs
    saved = load_checkpoint(tmp_path / "straight" / "last.pt")["state_dict"]
    assert {"selection_score", "selection_epoch"} <= set(saved) and any(k.startswith("selected.") for k in saved)
    # a specialist selected after the trainer's best epoch: on_fit_end must keep it
    assert int(straight.selection_epoch.max()) > a.best_epoch
    _specialists_run(tmp_path / "split", 3, False)
    resumed, b = _specialists_run(tmp_path / "split", 6, True, init_seed=99)
    assert_same(params_of(straight), params_of(resumed))
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history) and a.best_epoch == b.best_epoch
    # resuming the finished run trains nothing and still ends on the latest selection
    again, c = _specialists_run(tmp_path / "split", 6, True, init_seed=7)
    assert c.epochs_run == 6 and len(c.history) == 6
    assert_same(params_of(straight), params_of(again))


class TensorParts(PooledLinear):
    """Logs its parts as detached tensors (the contract's sync-free form)."""

    def loss(self, batch):
        out = self.predict(batch)
        loss = nn.functional.mse_loss(out, batch.labels)
        return loss, {"task": loss.detach(), "half": 0.5 * loss.detach()}


#: where batches are assembled on the host before ``batch.to(device)``: reads there touch no device
_HOST_SIDE = (os.sep + os.path.join("flowtransfer", "data") + os.sep, os.path.join("torch", "utils", "data"))


def _host_reads_in_one_epoch(monkeypatch, n: int, batch_size: int) -> tuple[int, dict]:
    """Count Tensor -> Python conversions (``float``, ``int``, ``bool``, ``item``, ``tolist``) in one
    epoch, outside the host-side batch assembly (the optimiser's CPU step counters included)."""
    import sys

    reads = {"count": 0}
    for name in ("__float__", "__int__", "__bool__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if not any(part in caller for part in _HOST_SIDE):
                reads["count"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    seed_everything(0)
    trainer = Trainer(TensorParts(), TrainConfig(epochs=1, batch_size=batch_size, lr=0.05, **QUIET))
    trainer.check_loss_every_step = False  # what an accelerator gets (on the CPU a read costs nothing)
    train = make_data(n, 0)
    trainer.method.train()
    record = trainer.train_epoch(train, 0)
    monkeypatch.undo()
    return reads["count"], record


def test_a_training_epoch_reads_the_device_a_fixed_number_of_times(monkeypatch):
    """No host synchronisation per step: 2 steps and 12 steps read the device equally often, and the
    logged means equal the per-step losses averaged on the host."""
    few, _ = _host_reads_in_one_epoch(monkeypatch, 16, 8)
    many, record = _host_reads_in_one_epoch(monkeypatch, 96, 8)
    assert few == many and many <= 4
    seed_everything(0)
    method = TensorParts()
    trainer = Trainer(method, TrainConfig(epochs=1, batch_size=8, lr=0.05, **QUIET))
    losses, weights = [], []
    batches, count = trainer._train_batches(make_data(96, 0), 0)
    for _, batch in zip(range(count), batches):
        trainer.optimizer.zero_grad()
        loss, _ = method.loss(batch)
        losses.append(float(loss.detach()))
        weights.append(len(batch.labels))
        loss.backward()
        trainer._clip()
        trainer.optimizer.step()
    expected = sum(v * w for v, w in zip(losses, weights)) / sum(weights)
    assert record["loss"] == pytest.approx(expected, rel=1e-6)
    assert record["loss/half"] == pytest.approx(0.5 * expected, rel=1e-6)


class NanAtStep(PooledLinear):
    """A loss that turns NaN at the ``bad``-th call."""

    def __init__(self, bad: int):
        super().__init__()
        self.bad, self.calls = bad, 0

    def loss(self, batch):
        loss, parts = super().loss(batch)
        self.calls += 1
        return (loss * float("nan") if self.calls == self.bad + 1 else loss), parts


@pytest.mark.parametrize("every_step", [True, False])
def test_a_nonfinite_loss_is_named_by_its_step_either_way(every_step):
    """Checked each step (the CPU default): raised before that step's update, weights finite.
    Checked at the end of the epoch (accelerators): the same step is named."""
    seed_everything(0)
    method = NanAtStep(bad=3)
    trainer = Trainer(method, TrainConfig(epochs=1, batch_size=8, lr=0.05, **QUIET))
    trainer.check_loss_every_step = every_step
    with pytest.raises(FloatingPointError, match=r"epoch 0, step 3 of NanAtStep"):
        trainer.train_epoch(make_data(96, 0), 0)
    finite = all(torch.isfinite(p).all() for p in method.parameters())
    assert finite == every_step and method.calls == (4 if every_step else 12)


class VectorPart(PooledLinear):
    def loss(self, batch):
        loss, _ = super().loss(batch)
        return loss, {"pair": torch.stack([loss.detach(), loss.detach()])}


def test_a_logged_part_must_be_a_scalar():
    trainer = Trainer(VectorPart(), TrainConfig(epochs=1, batch_size=8, **QUIET))
    with pytest.raises(ValueError, match=r"part 'loss/pair' has shape \(2,\)"):
        trainer.train_epoch(make_data(16, 0), 0)
