"""Train the default transfer model that ships in ``flowtransfer/assets/default_transfer.pt``.

The model is a :class:`flowtransfer.CrossModalFlows` over the embedded synthetic L/A/V data
(``flowtransfer.data.make_synthetic(seed=0)``): one temporal flow per modality, one shared
class-conditional prior, trained by maximum likelihood on the training split with the model
selected on the validation split's NLL. Because the synthetic data's true conditionals are known, the
script also reports how good the transfers are on the test split, against exact references:

- ``mse``: mean squared error of the transfer against the real ``dst`` features;
- ``bayes_mse``: the same for the true conditional mean ``E[x_dst | x_src]`` (the lowest MSE any
  method can reach; a *distribution-consistent* recovery, like a sample of the true conditional,
  sits near ``2 * bayes_mse``, since it adds the conditional variance once more);
- ``mean_fill_mse``: filling with the training mean of ``dst``;
- ``fd``: Fréchet distance (whole sequences flattened) between recovered and real ``dst`` features,
  beside the same for a sample of the true conditional (the floor from finite samples), the true
  conditional mean and mean filling.

Usage::

    python scripts/train_default_model.py            # writes the shipped files (about a minute)
    python scripts/train_default_model.py --out /tmp/model.pt --epochs 5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from flowtransfer.crossmodal import CrossModalFlows
from flowtransfer.data import make_synthetic
from flowtransfer.io import atomic_write_json
from flowtransfer.metrics import frechet_distance

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "flowtransfer" / "assets" / "default_transfer.pt"

#: architecture of the shipped model (small: well under 1 MB)
ARCHITECTURE = dict(num_layers=8, hidden=48, kernel_size=3, seed=0)  # the bounded default: spline couplings, permutations, data-end ActNorm


def dataset_nll(model: CrossModalFlows, ds, batch_size: int = 500) -> float:
    """Mean bits/dim over modalities and samples (one augmentation draw per sample)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in ds.loader(batch_size):
            y = torch.as_tensor(ds.class_labels()[batch.index.numpy()])
            loss = sum(model.nll(batch.features[m], m, y) for m in model.modalities) / len(model.modalities)
            total += float(loss) * len(batch)
            count += len(batch)
    return total / count


def train(epochs: int, seed: int, lr: float, batch_size: int) -> tuple[CrossModalFlows, dict]:
    torch.manual_seed(seed)
    data = make_synthetic(seed=0)
    train_ds, valid_ds = data["train"], data["valid"]
    model = CrossModalFlows(train_ds.input_dims, num_classes=train_ds.prior_classes, **ARCHITECTURE)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    labels = torch.as_tensor(train_ds.class_labels())
    best = (float("inf"), None, -1)
    history = []
    for epoch in tqdm(range(epochs), desc="default model", unit="epoch"):
        model.train()
        for batch in train_ds.loader(batch_size, shuffle=True, seed=seed * 1000 + epoch):
            y = labels[batch.index]
            loss = sum(model.nll(batch.features[m], m, y) for m in model.modalities) / len(model.modalities)
            optimiser.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimiser.step()
        model.eval()
        valid = dataset_nll(model, valid_ds)
        history.append({"epoch": epoch, "valid_bits_per_dim": valid})
        if valid < best[0]:
            best = (valid, {k: v.clone() for k, v in model.state_dict().items()}, epoch)
    model.load_state_dict(best[1])
    model.eval()
    return model, {"best_epoch": best[2], "valid_bits_per_dim": best[0], "history": history}


def evaluate(model: CrossModalFlows) -> list[dict]:
    """Transfer quality on the synthetic test split for every ordered pair of modalities."""
    data = make_synthetic(seed=0)
    test, train_ds = data["test"], data["train"]
    gen = test.generator
    rows = []
    for src in model.modalities:
        for dst in model.modalities:
            if src == dst:
                continue
            x_src, x_dst = test.features[src], test.features[dst]
            with torch.no_grad():
                rec = model.transfer(torch.from_numpy(x_src), src, dst).numpy()
            bayes = gen.true_conditional_mean(x_src, src, dst)
            sample = gen.sample_conditional(x_src, src, dst, seed=1)
            fill = np.broadcast_to(train_ds.features[dst].mean(0), x_dst.shape)
            rows.append(
                {
                    "src": src,
                    "dst": dst,
                    "mse": float(np.mean((rec - x_dst) ** 2)),
                    "bayes_mse": float(np.mean((bayes - x_dst) ** 2)),
                    "mean_fill_mse": float(np.mean((fill - x_dst) ** 2)),
                    "fd": frechet_distance(rec, x_dst),
                    "fd_true_sample": frechet_distance(sample, x_dst),
                    "fd_bayes_mean": frechet_distance(bayes, x_dst),
                    "fd_mean_fill": frechet_distance(fill + 0.0, x_dst),
                }
            )
    return rows


def stability(model: CrossModalFlows) -> dict[str, dict]:
    """:func:`~flowtransfer.check_inverse_stability` of each modality's flow over the prior's 6-sigma
    box, against the largest |value| of that modality's (padded) training features."""
    from flowtransfer.data import make_synthetic
    from flowtransfer.flows import check_inverse_stability

    train_ds = make_synthetic(seed=0)["train"]
    out = {}
    for m in model.modalities:
        x = torch.from_numpy(train_ds.features[m][:500])
        padded = torch.cat([x, torch.zeros(len(x), model.width - x.shape[1], x.shape[2])], dim=1)
        rep = check_inverse_stability(model.flows[m], padded, k=6.0)
        out[m] = {"worst_abs": rep.worst_abs, "data_max": rep.data_max, "ratio": rep.ratio,
                  "certificate": rep.certificate, "passed": rep.passed}
    return out


def format_rows(rows: list[dict]) -> str:
    cols = ["mse", "bayes_mse", "mean_fill_mse", "fd", "fd_true_sample", "fd_bayes_mean", "fd_mean_fill"]
    lines = ["src->dst " + " ".join(f"{c:>14}" for c in cols)]
    for r in rows:
        lines.append(f"{r['src']}->{r['dst']:<5} " + " ".join(f"{r[c]:14.3f}" for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the model (.pt)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, report = train(args.epochs, args.seed, args.lr, args.batch_size)
    seconds = time.perf_counter() - start
    model.save(args.out)
    rows = evaluate(model)
    report["inverse_stability"] = stability(model)
    report.update(
        data="flowtransfer.data.make_synthetic(seed=0): synthetic L/A/V, train/valid/test 2000/500/1000",
        architecture=ARCHITECTURE,
        seed=args.seed,
        epochs=args.epochs,
        train_seconds=round(seconds, 1),
        test_transfer=rows,
        parameters=sum(p.numel() for p in model.parameters()),
    )
    atomic_write_json(args.out.with_suffix(".json"), report)
    print(f"trained in {seconds:.0f} s; best epoch {report['best_epoch']}, "
          f"valid {report['valid_bits_per_dim']:.3f} bits/dim; {report['parameters']} parameters")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) and {args.out.with_suffix('.json').name}")
    print("test split, transfer quality (synthetic data, true conditionals known):")
    print(format_rows(rows))


if __name__ == "__main__":
    main()
