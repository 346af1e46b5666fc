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

Every argument and every input file is checked before any work starts. A problem with what the
user gave (an argument, a data file, a model file, an output path) prints ``error: <message>`` and
exits with status 2; ``--debug`` shows the traceback instead. Anything else is an internal failure
and shows its traceback. ``run --resume`` / ``train --resume`` continue an interrupted job (same
``--out``) from its last complete checkpoints, bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "build_parser", "USER_ERRORS"]

#: most time steps ``check`` feeds each flow (its inputs are 4 x channels x length)
MAX_CHECK_LENGTH = 4096


def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _numbers(text: str, flag: str) -> tuple[float, ...]:
    """Comma-separated numbers of an option read after parsing (an :class:`InputError` otherwise)."""
    from flowtransfer.io import InputError

    try:
        return _floats(text)
    except argparse.ArgumentTypeError as err:
        raise InputError(f"{flag}: {err}") from None


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    return parse


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the traceback of an input error instead of a one-line message")


def _add_data_args(p: argparse.ArgumentParser, dataset_default: str | None = "synthetic") -> None:
    p.add_argument("--dataset", default=dataset_default,
                   help="synthetic (embedded default), mmsa, avmnist or npz (default: "
                        f"{dataset_default or 'the one the model was trained on'})")
    p.add_argument("--data", default=None, help="path of the real data (MMSA pickle, AV-MNIST sources, .npz)")
    p.add_argument("--task", choices=["regression", "classification"], default=None,
                   help="task, where the dataset offers both (MMSA, npz)")
    p.add_argument("--fold", type=_int_at_least(0), default=None,
                   help="MMSA: held-out fold k of a folder of fold<k>.pkl files (the MOSI heldout_cv folds)")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None,
                   help="model size: small, avmnist, mosi, mosei (default: the dataset's: small on synthetic, "
                        "avmnist on AV-MNIST, else mosi)")
    p.add_argument("--epochs", type=_int_at_least(1), default=5, help="epochs per training stage (default 5)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--patience", type=_int_at_least(1), default=4, help="early-stopping patience on validation (default 4)")
    p.add_argument("--max-steps-per-epoch", type=_int_at_least(1), default=None, help="cut epochs short (quick runs)")
    p.add_argument("--max-steps", type=_int_at_least(2), default=None,
                   help="one cap on optimiser steps for every method (a two-stage method shares it); default none")
    p.add_argument("--lr-patience", type=_int_at_least(1), default=5,
                   help="epochs without validation improvement before the learning rate is halved (default 5)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to train and evaluate (default auto: CUDA when available, else CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted job with the same --out from its last complete checkpoints")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowtransfer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the main job: train and compare methods under missing modalities")
    _add_data_args(run)
    _add_train_args(run)
    run.add_argument("--methods", type=_csv, default=None,
                     help="comma-separated method names (default: dicmor,zero_fill,upper_bound)")
    run.add_argument("--seeds", type=_ints, default=(0, 1), help="comma-separated seeds (default 0,1)")
    run.add_argument("--protocol", default="random",
                     help="test-time missing protocol: random (default: per-sample MR and fixed patterns), steps "
                          "(time steps missing inside each modality), per_modality (one rate per modality), "
                          "cyin_instance, cyin_dataset")
    run.add_argument("--rates", default=None,
                     help="what the protocol sweeps, comma-separated (random: missing rates, default 0.0,...,0.7; "
                          "steps: step rates; cyin_instance: probabilities); per_modality: specifications "
                          "separated by ';' such as 'L0.1+A0.5+V0.3;L0.5+A0.1+V0.1'")
    run.add_argument("--cyin-batch-size", type=_int_at_least(1), default=None,
                     help="cyin_dataset: draw the rate exactly within random test batches of this size")
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
    _add_data_args(ev, dataset_default=None)
    ev.add_argument("model", help="a file written by `flowtransfer train`")
    ev.add_argument("--seed", type=int, default=0, help="seed of the test masks (default 0)")
    ev.add_argument("--rates", type=_floats, default=None)
    ev.add_argument("--out", default=None, help="folder for results.csv / results.json (optional)")

    tr = sub.add_parser("transfer", help="recover modality DST from SRC features stored in a .npy file")
    tr.add_argument("--src", required=True)
    tr.add_argument("--dst", required=True)
    tr.add_argument("--input", required=True, help=".npy of shape (batch, channels, time)")
    tr.add_argument("--output", required=True, help="where to write the recovered array (.npy format, this exact name)")
    tr.add_argument("--model", default=None, help="a saved CrossModalFlows (default: the shipped model)")

    ck = sub.add_parser("check", help="invertibility, log-det and inverse-stability checks of every flow in a saved model")
    ck.add_argument("model", nargs="?", default=None,
                    help="a saved CrossModalFlows or method file (default: the shipped transfer model)")
    ck.add_argument("--length", type=_int_at_least(1, MAX_CHECK_LENGTH), default=3,
                    help=f"sequence length of the check inputs (1 ... {MAX_CHECK_LENGTH}, default 3)")
    for p in (run, train, ev, tr, ck):
        _add_common(p)
    return parser


# ------------------------------------------------------------------------------------------ helpers


def _explicit_list(value: tuple[Any, ...] | None, flag: str) -> tuple[Any, ...] | None:
    """An option given as a comma-separated list must name at least one item (``--seeds ,``)."""
    from flowtransfer.io import InputError

    if value is not None and len(value) == 0:
        raise InputError(f"{flag}: no values given (expected a comma-separated list)")
    return value


def _experiment_config(args: argparse.Namespace, **fields: Any) -> Any:
    from flowtransfer.experiment import ExperimentConfig

    if args.fold is not None:
        fields["dataset_options"] = {**fields.get("dataset_options", {}), "fold": args.fold}
    return ExperimentConfig(
        dataset=args.dataset, data=args.data, task=args.task, preset=args.preset, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        early_stop_patience=args.patience, max_steps_per_epoch=args.max_steps_per_epoch,
        max_steps=args.max_steps, lr_plateau_patience=args.lr_patience, device=args.device,
        progress=not args.no_progress, resume=args.resume, **fields,
    )


def _print_data_report(splits: Any, out: Callable[[str], None] = print) -> None:
    from flowtransfer.data.dataset import nonfinite_lines

    for line in nonfinite_lines(splits):
        out(f"data: {line}")


def _load_method_checked(path: Path) -> tuple[Any, dict[str, Any]]:
    """A saved method and its file's ``extra`` entry; clear errors for malformed files."""
    from flowtransfer.io import CheckpointError, check_finite_state, safe_load
    from flowtransfer.methods.io import load_method

    payload = safe_load(path)  # config sizes checked before anything is built
    if not isinstance(payload, dict) or not str(payload.get("format", "")).startswith("flowtransfer.Method"):
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a saved flowtransfer method (found {found!r}); "
                              "`flowtransfer train` writes those")
    try:
        method = load_method(path)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        detail = f"missing entry {err}" if isinstance(err, KeyError) else str(err)
        raise CheckpointError(f"{path} is a malformed method file: {detail}") from None
    check_finite_state(method.state_dict(), where=str(path))
    extra = payload.get("extra") if isinstance(payload.get("extra"), dict) else {}
    return method, extra


# ------------------------------------------------------------------------------------------ commands


def _cmd_run(args: argparse.Namespace) -> int:
    from flowtransfer.experiment import DEFAULT_METHODS, DEFAULT_RATES, run_experiment

    methods = _explicit_list(args.methods, "--methods")
    seeds = _explicit_list(args.seeds, "--seeds")
    protocol_fields: dict[str, Any] = {"protocol": args.protocol}
    if args.protocol == "random":
        rates = _explicit_list(_numbers(args.rates, "--rates"), "--rates") if args.rates is not None else None
        protocol_fields["rates"] = rates or DEFAULT_RATES
    elif args.rates is not None:
        if args.protocol == "per_modality":
            specs = tuple(part.strip() for part in args.rates.split(";") if part.strip())
        else:
            specs = _numbers(args.rates, "--rates")
        protocol_fields["protocol_rates"] = _explicit_list(specs, "--rates")
    if args.cyin_batch_size is not None:
        protocol_fields["protocol_options"] = {"batch_size": args.cyin_batch_size}
    cfg = _experiment_config(args, methods=methods or DEFAULT_METHODS, seeds=seeds,
                             patterns=not args.no_patterns, out=args.out, **protocol_fields)
    run_experiment(cfg)  # validates everything before training
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from flowtransfer.experiment import data_report, load_splits, train_method
    from flowtransfer.io import clean_stale_temp_files, ensure_writable_file
    from flowtransfer.methods.io import save_method
    from flowtransfer.training import is_main_process

    cfg = _experiment_config(args, methods=(args.method,), seeds=(args.seed,),
                             valid_missing_rate=args.valid_missing_rate)
    cfg.validate()
    out = Path(args.out)
    checkpoints = out.parent / f"{out.stem}_checkpoints"
    if is_main_process():
        ensure_writable_file(out, "--out")
        clean_stale_temp_files(checkpoints, recursive=True)  # left by a killed training
    splits = load_splits(args.dataset, args.data, args.task, cfg.dataset_options, required=("train", "valid"))
    if is_main_process():
        _print_data_report(splits)
    method, seconds = train_method(args.method, splits["train"], splits["valid"], cfg, args.seed, checkpoints)
    if is_main_process():
        extra = {"dataset": args.dataset, "data": None if args.data is None else str(Path(args.data).resolve()),
                 "task": splits["train"].task, "seed": args.seed, "train_seconds": seconds,
                 "data_report": data_report(splits)}
        save_method(method, out, extra=extra)
        print(f"trained {args.method} on {args.dataset} in {seconds:.0f} s; saved to {out}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from flowtransfer.data import evaluation_settings
    from flowtransfer.experiment import (
        DEFAULT_RATES,
        ExperimentConfig,
        check_compatible,
        evaluate_method,
        load_splits,
        main_metrics,
    )
    from flowtransfer.io import InputError, ensure_writable_dir
    from flowtransfer.training import format_table, summarise, write_results

    rates = _explicit_list(args.rates, "--rates") or DEFAULT_RATES
    if args.out:
        ensure_writable_dir(args.out, "--out folder")
    method, extra = _load_method_checked(Path(args.model))
    task = method.info.task  # the model decides the task
    if args.task is not None and args.task != task:
        raise InputError(f"--task {args.task} does not match the model, which was trained for {task}")
    dataset = args.dataset or extra.get("dataset") or "synthetic"
    data = args.data
    if data is None and dataset == extra.get("dataset"):
        data = extra.get("data")
    ExperimentConfig(dataset=dataset, data=data, task=task, seeds=(args.seed,), rates=rates).validate(train=False)
    fold = {"fold": args.fold} if args.fold is not None else None
    test = load_splits(dataset, data, task, fold, required=("test",))["test"]
    _print_data_report({"test": test})
    check_compatible(method.info, test, what=f"the model in {args.model}")
    masks = {s.name: s.mask(len(test), args.seed) for s in evaluation_settings(test.modalities, rates)}
    rows = evaluate_method(method, method.name, dataset, test, masks, args.seed)
    shown = [m for m in main_metrics(test.task) + ["fd_recovered"] if any(m in r for r in rows)]
    print(format_table(summarise(rows), metrics=shown))
    if args.out:
        write_results(rows, args.out)
    return 0


def _cmd_transfer(args: argparse.Namespace) -> int:
    import flowtransfer
    from flowtransfer.io import InputError, atomic_write_bytes, check_npy_size, ensure_writable_file

    output = ensure_writable_file(args.output, "--output")
    path = Path(args.input)
    if not path.is_file():
        raise InputError(f"--input {path} not found" if not path.exists() else f"--input {path} is not a file")
    if path.suffix != ".npz":
        with open(path, "rb") as f:
            check_npy_size(f, path.stat().st_size, f"--input {path}")  # before numpy allocates what it declares
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"cannot read --input {path} as a .npy array (pickled objects are refused): {err}") from None
    if not isinstance(x, np.ndarray):
        raise InputError(f"--input {path} is an .npz archive; give one array saved with numpy.save")
    if x.dtype.kind not in "biuf":
        raise InputError(f"--input {path} holds {x.dtype} values; expected real numbers")
    if not np.isfinite(x).all():
        raise InputError(f"--input {path} holds {int((~np.isfinite(x)).sum())} NaN/inf values")
    x32 = x.astype(np.float32)
    if not np.isfinite(x32).all():
        raise InputError(f"--input {path} holds values beyond the float32 range (largest |x| {float(np.abs(x).max()):.3g})")
    model = flowtransfer.load(args.model) if args.model else None
    y = flowtransfer.transfer(x32, src=args.src, dst=args.dst, model=model)
    buffer = io.BytesIO()
    np.save(buffer, y)
    atomic_write_bytes(output, buffer.getvalue())  # exactly --output: no .npy appended
    print(f"{args.src} {tuple(x.shape)} -> {args.dst} {tuple(y.shape)}: wrote {output}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    import torch

    from flowtransfer.api import default_model_path, load
    from flowtransfer.flows import TemporalFlow, check_inverse_stability, check_invertibility, check_logdet
    from flowtransfer.io import CheckpointError, safe_load

    path = Path(args.model) if args.model else default_model_path()
    payload = safe_load(path)
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if not isinstance(fmt, str):
        raise CheckpointError(f"{path} is not a flowtransfer model file (it has no 'format' entry)")
    if fmt.startswith("flowtransfer.CrossModalFlows"):
        flows = dict(load(path).flows.items())
    elif fmt.startswith("flowtransfer.Method"):
        method, _ = _load_method_checked(path)
        flows = {name: f for name, f in getattr(method, "flows", {}).items() if isinstance(f, TemporalFlow)}
    else:
        raise CheckpointError(f"{path} is a {fmt!r} file; `check` needs a saved CrossModalFlows or method")
    if not flows:
        print(f"{path}: no flows to check")
        return 1
    ok = True
    gen = torch.Generator().manual_seed(0)
    for name, flow in flows.items():
        x = torch.randn(4, flow.channels, args.length, generator=gen)
        inv = check_invertibility(flow, x)
        det = check_logdet(flow, x[:2, :, : min(args.length, 3)])
        # the inverse over the prior's 6-sigma box, against the scale of the flow's own samples
        # (no data is at hand here; transfer feeds the inverse latents from other modalities)
        with torch.no_grad():
            classes = None if flow.num_classes is None else torch.arange(256) % flow.num_classes
            own = flow.eval().sample(256, classes, length=args.length, generator=gen)
        stab = check_inverse_stability(flow, own, k=6.0, length=args.length)
        ok &= inv.passed and det.passed and stab.passed
        print(f"flow {name}: {inv}")
        print(f"flow {name}: {det}")
        print(f"flow {name}: {stab} (scale: the flow's own samples)")
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------ entry


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "what you gave cannot be used" (message, exit 2), not a bug."""
    from flowtransfer.api import NonFiniteOutputError
    from flowtransfer.crossmodal import ModalityError
    from flowtransfer.data.mmsa import UnsafePickleError
    from flowtransfer.io import CheckpointError, InputError

    return (InputError, CheckpointError, UnsafePickleError, ModalityError, NonFiniteOutputError,
            FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


#: filled on first use (importing them imports torch)
USER_ERRORS: tuple[type[BaseException], ...] = ()


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    return str(err) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Under ``torchrun --nproc_per_node N flowtransfer ...`` (``run``/``train``) the
    processes join one group and train with DDP; only the main process writes files.

    Returns 0 on success, 1 when ``check`` finds a failing flow, 2 for a user error (after printing
    ``error: <message>`` on stderr; ``--debug`` re-raises it instead)."""
    global USER_ERRORS
    args = build_parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    if not USER_ERRORS:
        USER_ERRORS = _user_errors()
    handler = {"run": _cmd_run, "train": _cmd_train, "evaluate": _cmd_evaluate,
               "transfer": _cmd_transfer, "check": _cmd_check}[args.command]
    try:
        if args.command in ("run", "train"):
            from flowtransfer.training import init_distributed

            init_distributed()
        return handler(args)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"error: {_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
