"""The ``flowtransfer`` command: a thin layer over the Python API.

Subcommands::

    flowtransfer run        # the main job: train + evaluate methods under every missing setting
    flowtransfer train      # train one method, save it to one file
    flowtransfer evaluate   # evaluate a saved method under every missing setting
    flowtransfer transfer   # recover one modality from another (.npy in, .npy out)
    flowtransfer check      # invertibility and log-det checks of a saved model's flows

``flowtransfer run`` with no arguments trains DiCMoR on the embedded synthetic data, compares it with
zero filling and the full-modality bound at MR 0.0 ... 0.7 and every fixed pattern, prints a table
and writes results and plots to ``runs/latest``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["main", "build_parser"]


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in _csv(text))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(t) for t in _csv(text))


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="synthetic",
                   help="synthetic (embedded default), mmsa, avmnist or npz (default: synthetic)")
    p.add_argument("--data", default=None, help="path of the real data (MMSA pickle, AV-MNIST sources, .npz)")
    p.add_argument("--task", choices=["regression", "classification"], default=None,
                   help="task, where the dataset offers both (MMSA, npz)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="model size: small, mosi, mosei (default: small on synthetic, else mosi)")
    p.add_argument("--epochs", type=int, default=5, help="epochs per training stage (default 5)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--patience", type=int, default=4, help="early-stopping patience on validation (default 4)")
    p.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut epochs short (quick runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowtransfer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the main job: train and compare methods under missing modalities")
    _add_data_args(run)
    _add_train_args(run)
    run.add_argument("--methods", type=_csv, default=None,
                     help="comma-separated method names (default: dicmor,zero_fill,upper_bound)")
    run.add_argument("--seeds", type=_ints, default=(0, 1), help="comma-separated seeds (default 0,1)")
    run.add_argument("--rates", type=_floats, default=None, help="missing rates (default 0.0,0.1,...,0.7)")
    run.add_argument("--no-patterns", action="store_true", help="skip the fixed-pattern settings")
    run.add_argument("--out", default="runs/latest", help="output folder (default runs/latest)")

    train = sub.add_parser("train", help="train one method and save it to one file")
    _add_data_args(train)
    _add_train_args(train)
    train.add_argument("--method", default="dicmor", help="method name (default dicmor)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--valid-missing-rate", type=float, default=0.3)
    train.add_argument("--out", default="runs/model.pt", help="where to save the trained method")

    ev = sub.add_parser("evaluate", help="evaluate a saved method on the test split under every setting")
    _add_data_args(ev)
    ev.add_argument("model", help="a file written by `flowtransfer train`")
    ev.add_argument("--seed", type=int, default=0, help="seed of the test masks (default 0)")
    ev.add_argument("--rates", type=_floats, default=None)
    ev.add_argument("--out", default=None, help="folder for results.csv / results.json (optional)")

    tr = sub.add_parser("transfer", help="recover modality DST from SRC features stored in a .npy file")
    tr.add_argument("--src", required=True)
    tr.add_argument("--dst", required=True)
    tr.add_argument("--input", required=True, help=".npy of shape (batch, channels, time)")
    tr.add_argument("--output", required=True, help="where to write the recovered .npy")
    tr.add_argument("--model", default=None, help="a saved CrossModalFlows (default: the shipped model)")

    ck = sub.add_parser("check", help="invertibility and log-det checks of every flow in a saved model")
    ck.add_argument("model", nargs="?", default=None,
                    help="a saved CrossModalFlows or method file (default: the shipped transfer model)")
    ck.add_argument("--length", type=int, default=3, help="sequence length of the check inputs")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from flowtransfer.experiment import DEFAULT_METHODS, DEFAULT_RATES, ExperimentConfig, run_experiment

    cfg = ExperimentConfig(
        dataset=args.dataset, data=args.data, task=args.task,
        methods=args.methods or DEFAULT_METHODS, seeds=args.seeds, rates=args.rates or DEFAULT_RATES,
        patterns=not args.no_patterns, preset=args.preset, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, early_stop_patience=args.patience,
        max_steps_per_epoch=args.max_steps_per_epoch, out=args.out, progress=not args.no_progress,
    )
    run_experiment(cfg)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from flowtransfer.data import random_missing_mask
    from flowtransfer.data.summary import load_dataset
    from flowtransfer.experiment import COMPLETE_DATA_METHODS, ExperimentConfig, _fit
    from flowtransfer.methods import DatasetInfo, build_method
    from flowtransfer.methods.io import save_method
    from flowtransfer.training import is_main_process

    cfg = ExperimentConfig(dataset=args.dataset, data=args.data, task=args.task, preset=args.preset,
                           epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                           weight_decay=args.weight_decay, early_stop_patience=args.patience,
                           max_steps_per_epoch=args.max_steps_per_epoch, progress=not args.no_progress)
    splits = load_dataset(args.dataset, args.data, **({"task": args.task} if args.task else {}))
    train, valid = splits["train"], splits["valid"]
    method = build_method(args.method, DatasetInfo.from_dataset(train), preset=cfg.resolved_preset())
    valid_mask = None
    if args.method not in COMPLETE_DATA_METHODS:
        valid_mask = random_missing_mask(len(valid), valid.modalities, args.valid_missing_rate, seed=args.seed)
    out = Path(args.out)
    seconds = _fit(method, train, valid, valid_mask, cfg, args.seed, out.parent / f"{out.stem}_checkpoints")
    if is_main_process():
        save_method(method, out, extra={"dataset": args.dataset, "seed": args.seed, "train_seconds": seconds})
        print(f"trained {args.method} on {args.dataset} in {seconds:.0f} s; saved to {out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from flowtransfer.data import evaluation_settings
    from flowtransfer.data.summary import load_dataset
    from flowtransfer.experiment import DEFAULT_RATES, main_metrics, recovery_distances
    from flowtransfer.methods.io import load_method
    from flowtransfer.training import evaluate, format_table, result_row, summarise, write_results

    method = load_method(args.model)
    test = load_dataset(args.dataset, args.data, **({"task": args.task} if args.task else {}))["test"]
    rows = []
    for s in evaluation_settings(test.modalities, args.rates or DEFAULT_RATES):
        mask = s.mask(len(test), args.seed)
        metrics = evaluate(method, test.with_mask(mask))
        metrics.update(recovery_distances(method, test, mask))
        rows.append(result_row(method.name, args.dataset, s.name, args.seed, metrics,
                               realised_missing_rate=float(1 - mask.mean())))
    shown = [m for m in main_metrics(test.task) + ["fd_recovered"] if any(m in r for r in rows)]
    print(format_table(summarise(rows), metrics=shown))
    if args.out:
        write_results(rows, args.out)
    return 0


def _cmd_transfer(args: argparse.Namespace) -> int:
    import flowtransfer

    x = np.load(args.input, allow_pickle=False)
    y = flowtransfer.transfer(x.astype(np.float32), src=args.src, dst=args.dst, model=args.model)
    np.save(args.output, y)
    print(f"{args.src} {tuple(x.shape)} -> {args.dst} {tuple(y.shape)}: wrote {args.output}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    import torch

    from flowtransfer.api import default_model_path
    from flowtransfer.crossmodal import CrossModalFlows
    from flowtransfer.flows import TemporalFlow, check_invertibility, check_logdet
    from flowtransfer.io import safe_load

    path = Path(args.model) if args.model else default_model_path()
    payload = safe_load(path)
    if payload.get("format", "").startswith("flowtransfer.CrossModalFlows"):
        flows = dict(CrossModalFlows.load(path).flows.items())
    else:
        from flowtransfer.methods.io import load_method

        method = load_method(path)
        flows = {name: f for name, f in getattr(method, "flows", {}).items() if isinstance(f, TemporalFlow)}
    if not flows:
        print(f"{path}: no flows to check")
        return 1
    ok = True
    gen = torch.Generator().manual_seed(0)
    for name, flow in flows.items():
        x = torch.randn(4, flow.channels, args.length, generator=gen)
        inv = check_invertibility(flow, x)
        det = check_logdet(flow, x[:2, :, : min(args.length, 3)])
        ok &= inv.passed and det.passed
        print(f"flow {name}: {inv}")
        print(f"flow {name}: {det}")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Under ``torchrun --nproc_per_node N flowtransfer ...`` (``run``/``train``) the
    processes join one group and train with DDP; only the main process writes files."""
    args = build_parser().parse_args(argv)
    if args.command in ("run", "train"):
        from flowtransfer.training import init_distributed

        init_distributed()
    handler = {"run": _cmd_run, "train": _cmd_train, "evaluate": _cmd_evaluate,
               "transfer": _cmd_transfer, "check": _cmd_check}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
