"""Make the README's figures (``docs/figures/*.png``) from the embedded synthetic data only.

Command (from the repository root; a few minutes on 2 CPU cores)::

    python scripts/make_figures.py                      # all three figures into docs/figures/
    python scripts/make_figures.py --results runs/latest/results.csv   # curve from an existing run

Figures (nothing here reads ``../shared/data``: every picture comes from data generated in code or
is a result curve):

- ``recovery_projection.png``: text features ``L`` of the synthetic test split, real vs recovered
  from audio ``A`` by the cross-modal flows vs zero filling vs the exact conditional mean
  ``E[x_L | x_A]``, on the two linear discriminant axes of the real features, coloured by class;
- ``channel_densities.png``: per-channel densities of the same real and recovered features;
- ``missing_rate_curves.png``: accuracy against missing rate for DiCMoR, zero filling and the
  complete-data upper bound (mean ± std over seeds) from a small run of the main job, or from
  ``--results``.

The transfer model is the shipped default (``flowtransfer.load()``) when it exists, otherwise a
small :class:`~flowtransfer.CrossModalFlows` trained here with the default model's recipe.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flowtransfer import plots

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "figures"
DPI = 110


def transfer_model():
    """The shipped default model (``scripts/train_default_model.py`` re-trains it)."""
    import flowtransfer

    if not flowtransfer.default_model_path().exists():
        raise SystemExit("no shipped default model: run `python scripts/train_default_model.py` first")
    return flowtransfer.load()


def recovery_figures(out: Path, src: str = "A", dst: str = "L") -> None:
    import flowtransfer
    from flowtransfer.data import make_synthetic

    model = transfer_model()
    test = make_synthetic(seed=0)["test"]
    x_src, x_dst = test.features[src], test.features[dst]
    recovered = flowtransfer.transfer(x_src, src=src, dst=dst, model=model)
    exact = test.generator.true_conditional_mean(x_src, src, dst)
    labels = test.class_labels()
    fig = plots.plot_recovery_projection(
        x_dst, recovered, labels, zero_filled=np.zeros_like(x_dst), others={"exact cond. mean": exact},
        method="lda", max_points=600,
        title=f"Synthetic test set: modality {dst} recovered from {src} "
              f"(axes: linear discriminants of the real {dst} features)",
    )
    fig.savefig(out / "recovery_projection.png", dpi=DPI, bbox_inches="tight")
    fig = plots.plot_channel_densities(
        x_dst, recovered, zero_filled=True, others={"exact cond. mean": exact}, n_channels=6,
        title=f"Synthetic test set: per-channel densities of {dst}, real vs recovered from {src}\n"
              "(W1: Wasserstein distance to the real values, in each line's colour)",
    )
    fig.savefig(out / "channel_densities.png", dpi=DPI, bbox_inches="tight")


def curve_rows(results: str | None, epochs: int, seeds: tuple[int, ...]) -> list[dict]:
    from flowtransfer.data import make_synthetic
    from flowtransfer.data.summary import register_dataset
    from flowtransfer.experiment import ExperimentConfig, run_experiment
    from flowtransfer.training.results import read_results

    if results:
        return read_results(results)
    register_dataset("synthetic_figures",
                     lambda path=None, task=None, **kw: make_synthetic(seed=0, n_train=1000, n_valid=300, n_test=600))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExperimentConfig(dataset="synthetic_figures", methods=("dicmor", "zero_fill", "upper_bound"), seeds=seeds,
                               rates=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7), patterns=False, epochs=epochs,
                               batch_size=32, lr=2e-3, preset="small", out=tmp, progress=False)
        return run_experiment(cfg, log=lambda msg: print(msg.splitlines()[0]))


def curve_figure(out: Path, rows: list[dict]) -> None:
    metric = "acc" if any("acc" in r for r in rows) else "acc2_non0"
    seeds = len({r["seed"] for r in rows})
    fig = plots.plot_missing_rate_curves(
        rows, metric, title=f"Synthetic L/A/V: test accuracy against missing rate ({seeds} seeds)"
    )
    fig.savefig(out / "missing_rate_curves.png", dpi=DPI, bbox_inches="tight")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT), help="folder for the PNGs (default: docs/figures)")
    parser.add_argument("--results", help="plot the curve from this results.csv instead of running the job")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each training (default 6)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of the small run (default 2)")
    parser.add_argument("--only", choices=["recovery", "curves"], help="make only these figures")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: small models gain little from more)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.only in (None, "recovery"):
        recovery_figures(out)
        print(f"recovery figures done ({time.perf_counter() - start:.0f} s)")
    if args.only in (None, "curves"):
        curve_figure(out, curve_rows(args.results, args.epochs, tuple(range(args.seeds))))
        print(f"curve done ({time.perf_counter() - start:.0f} s)")
    print(f"figures in {out}")


if __name__ == "__main__":
    main()
