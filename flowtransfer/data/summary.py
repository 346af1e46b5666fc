"""Print a summary of a dataset: sizes, shapes, class balance, and the missing rates the protocols realise.

Usage::

    python -m flowtransfer.data.summary                                   # the embedded synthetic data
    python -m flowtransfer.data.summary --dataset mmsa --data ../shared/data/mosi_utterance/mosi_utterance_poria.pkl
    python -m flowtransfer.data.summary --dataset mmsa --fold 2                # held-out fold 2 of the MOSI file
    python -m flowtransfer.data.summary --dataset npz --data my_data.npz --task regression
    python -m flowtransfer.data.summary --dataset avmnist                 # when flowtransfer.data.avmnist is present

Datasets come from :data:`DATASETS`, a registry of name -> loader ``(path, **options) -> {split: dataset}``;
:func:`register_dataset` adds one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from flowtransfer.data.dataset import MultimodalDataset, load_npz
from flowtransfer.data.missing import DEFAULT_RATES, format_rate, random_missing_mask, realised_missing_rate
from flowtransfer.data.paths import require_data, shared_data_dir

__all__ = ["DATASETS", "register_dataset", "load_dataset", "summarize", "format_summary", "main"]

Loader = Callable[..., dict[str, MultimodalDataset]]


def _synthetic(path: str | None = None, task: str | None = None, **options: Any) -> dict[str, MultimodalDataset]:
    """The embedded data; ``options`` go to :func:`~flowtransfer.data.synthetic.make_synthetic`."""
    from flowtransfer.data.synthetic import make_synthetic

    if path is not None:
        raise ValueError("the synthetic dataset is generated in code and takes no data path")
    return make_synthetic(**options, **({"task": task} if task else {}))


def _mmsa(path: str | None = None, task: str | None = None, seed: int | None = None, fold: int | None = None,
          **options: Any) -> dict[str, MultimodalDataset]:
    """An MMSA pickle (default: the MOSI file in the shared data folder); ``seed`` is unused.

    ``fold=k`` loads held-out fold ``k`` of the MOSI file instead (``heldout_cv/fold{k}.pkl`` under
    ``path``, a data folder, default the shared ``mosi_utterance`` folder; without ``fold``,
    ``path`` may name a fold file directly). Options such as ``standardize`` go to :func:`~flowtransfer.data.mmsa.load_mmsa`
    (features are standardised on training statistics by default).
    """
    from flowtransfer.data.mmsa import heldout_fold_path, load_mmsa

    if fold is not None:
        root = path if path is not None else str(shared_data_dir() / "mosi_utterance")
        path = str(heldout_fold_path(fold, require_data(root, "the MOSI data folder")))
    elif path is None:
        path = str(shared_data_dir() / "mosi_utterance" / "mosi_utterance_poria.pkl")
    require_data(path, "the MMSA pickle")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cleaning is reported in the summary itself
        return load_mmsa(path, task=task or "regression", **options)


def _npz(path: str | None = None, task: str | None = None, seed: int | None = None) -> dict[str, MultimodalDataset]:
    """A user's ``.npz`` (see :func:`~flowtransfer.data.dataset.load_npz`); ``seed`` is unused."""
    if path is None:
        raise ValueError("--dataset npz needs --data FILE.npz")
    return load_npz(require_data(path, "the .npz data file"), task=task)


def _avmnist(path: str | None = None, task: str | None = None, **options: Any) -> dict[str, MultimodalDataset]:
    """AV-MNIST built from the sources folder; ``options`` go to ``load_avmnist``."""
    try:
        from flowtransfer.data.avmnist import load_avmnist
    except ImportError as err:
        raise RuntimeError(f"the AV-MNIST loader is not available: {err}") from err
    if task not in (None, "classification"):
        raise ValueError(f"AV-MNIST is a classification task, got task={task!r}")
    return load_avmnist(path, **options)


#: dataset name -> loader(path, **options) -> {split: MultimodalDataset}
DATASETS: dict[str, Loader] = {"synthetic": _synthetic, "mmsa": _mmsa, "npz": _npz, "avmnist": _avmnist}


def register_dataset(name: str, loader: Loader) -> None:
    """Add (or replace) a dataset loader under ``name``."""
    DATASETS[name] = loader


def load_dataset(name: str, path: str | os.PathLike | None = None, **options: Any) -> dict[str, MultimodalDataset]:
    """Load a registered dataset; an unknown name raises ``ValueError`` listing the known ones."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](None if path is None else str(path), **options)


def summarize(data: dict[str, MultimodalDataset], rates: Sequence[float] = DEFAULT_RATES, seed: int = 0) -> dict[str, Any]:
    """Per split: :meth:`MultimodalDataset.summary` plus the realised rate of each MR mask (for ``seed``)."""
    out: dict[str, Any] = {}
    for split, ds in data.items():
        info = ds.summary()
        info["preprocessing"] = dict(getattr(ds, "preprocessing", None) or {})
        realised = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for r in rates:
                realised[format_rate(r)] = realised_missing_rate(random_missing_mask(len(ds), ds.modalities, r, seed))
        info["mr_realised"] = realised
        out[split] = info
    return out


def format_summary(name: str, summary: dict[str, Any]) -> str:
    """A readable text block for :func:`summarize`'s output."""
    lines = [f"dataset: {name}"]
    for split, info in summary.items():
        shapes = ", ".join(f"{m}: C={c} T={t}" for m, (c, t) in info["shapes"].items())
        lines.append(f"[{split}] n={info['n']}  task={info['task']}  {shapes}")
        if info["num_classes"] is not None:
            lines.append(f"  classes ({info['num_classes']}): {info['class_balance']}")
        else:
            lab = info["labels"]
            lines.append(
                f"  labels: mean {lab['mean']:.3f} std {lab['std']:.3f} range [{lab['min']:.2f}, {lab['max']:.2f}]"
            )
            lines.append(f"  7-class balance (rounded, clipped): {info['class_balance']}")
        if info.get("lengths"):
            lines.append(f"  lengths (min, max): {info['lengths']}")
        if info["missing_rate"] > 0:
            lines.append(f"  missing in the data: {info['missing_rate']:.4f}  present per modality: {info['present_per_modality']}")
        if info["cleaning"]:
            lines.append(f"  non-finite values replaced with 0: {info['cleaning']}")
        std = (info.get("preprocessing") or {}).get("standardize")
        if std:
            lines.append(f"  standardised on {std['fit_split']} statistics: {', '.join(std['modalities'])}")
        pairs = "  ".join(f"{r}->{v:.4f}" for r, v in info["mr_realised"].items())
        lines.append(f"  MR requested->realised: {pairs}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowtransfer.data.summary", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic", help=f"one of {sorted(DATASETS)} (default: synthetic)")
    parser.add_argument("--data", default=None, help="path to the data (file or folder, as the dataset needs)")
    parser.add_argument("--task", choices=("classification", "regression"), default=None)
    parser.add_argument("--seed", type=int, default=0, help="seed of the MR masks (and of synthetic data)")
    parser.add_argument("--fold", type=int, default=None, help="mmsa: held-out fold k (0-4) of the MOSI file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    try:
        extra = {} if args.fold is None else {"fold": args.fold}
        if extra and args.dataset != "mmsa":
            raise ValueError("--fold is for --dataset mmsa (the held-out folds of the MOSI file)")
        data = load_dataset(args.dataset, args.data, task=args.task, seed=args.seed, **extra)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = summarize(data, seed=args.seed)
    print(json.dumps(summary, indent=2) if args.json else format_summary(args.dataset, summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
