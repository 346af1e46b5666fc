"""The released DiCMoR code (mdswyz/DiCMoR), loaded from outside this repository for side-by-side timing.

Nothing of the released code lives in this project: :func:`load_reference` imports it at run time
from a folder (by default ``../shared/reference/DiCMoR`` next to the repository, see
:func:`default_reference_path`), without running its packages' ``__init__`` files (they import its
trainer, pynvml, sklearn and a BERT download). Its folders ``trains``, ``trains/singleTask``,
``trains/singleTask/model`` and ``trains/subNets`` are registered as empty packages under the private
name ``_dicmor_released`` (so no module called ``trains`` is shadowed) whose ``__path__`` points at
the folders, and ``subNets.BertTextEncoder`` is a placeholder class (the model is built with
``use_bert=False``: text arrives as the ``(B, 50, 768)`` features BERT would give). Nothing is put in
``sys.modules`` under a public name (no fake ``transformers``).

The model is built with the MOSI values of the released ``config/config.json`` (``dicmor``
commonParams + datasetParams.mosi, read from the folder itself), ``feature_dims`` (768, 5, 20),
regression with one output.

Its training step is what ``trains/singleTask/DICMOR.py`` (``do_train``) runs for one batch:
``model(text, audio, vision, labels, num_modal)``; loss = L1 + 0.1 x (log_p_l + log_p_v + log_p_a +
loss_rec); ``backward``; ``clip_grad_value_(0.6)`` over the parameters that require gradients;
``loss.item()`` and ``outputs['M'].cpu()`` (the trainer logs both); ``Adam(lr 1e-4).step()`` and
``zero_grad``. Inference is ``do_test``'s call: ``eval()``, ``no_grad``, the same forward (it needs the
labels). ``num_modal`` 3 / 2 / 1 is "nothing / one / two missing"; which modalities survive is drawn
by ``random.sample`` inside the forward, which :class:`ForcedChoice` replaces (in the loaded module
only) by the fixed choice of our situation: ``one(V)`` keeps text and audio, ``two(L)`` keeps text.
All of the released flows, refiners and transformers have width 32, so the choice does not change
the amount of work.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "default_reference_path", "load_reference", "reference_args", "build_reference",
    "make_reference_callable", "reference_epoch", "NUM_MODAL", "ForcedChoice",
]

ROOT = Path(__file__).resolve().parents[1]
_PKG = "_dicmor_released"
#: our situation -> (num_modal, available modalities in the released order 0 text, 1 vision, 2 audio)
NUM_MODAL = {"all": (3, [0, 1, 2]), "one(V)": (2, [0, 2]), "two(L)": (1, [0])}


def default_reference_path() -> Path:
    """``<repository>/../shared/reference/DiCMoR``."""
    return (ROOT / ".." / "shared" / "reference" / "DiCMoR").resolve()


def load_reference(path: str | Path | None = None) -> types.ModuleType:
    """The released ``trains/singleTask/model/dicmor.py`` module (class ``DICMOR``), imported from
    ``path``. Raises ``FileNotFoundError`` naming the folder when it does not hold the released code."""
    root = Path(path) if path is not None else default_reference_path()
    model_file = root / "trains" / "singleTask" / "model" / "dicmor.py"
    if not model_file.is_file():
        raise FileNotFoundError(f"no released DiCMoR code at {root} (expected {model_file.relative_to(root)})")
    name = f"{_PKG}.singleTask.model.dicmor"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(model_file):
        return sys.modules[name]
    trains = root / "trains"
    for pkg, folder in ((_PKG, trains), (f"{_PKG}.singleTask", trains / "singleTask"),
                        (f"{_PKG}.singleTask.model", trains / "singleTask" / "model"),
                        (f"{_PKG}.subNets", trains / "subNets")):
        mod = types.ModuleType(pkg)
        mod.__path__ = [str(folder)]  # a package whose __init__ is never run
        mod.__package__ = pkg
        sys.modules[pkg] = mod

    class BertTextEncoder(nn.Module):  # placeholder: the model is built with use_bert=False
        def __init__(self, *a: Any, **k: Any) -> None:
            raise RuntimeError("the released DiCMoR is loaded without BERT (use_bert=False)")

    sys.modules[f"{_PKG}.subNets"].BertTextEncoder = BertTextEncoder
    module = importlib.import_module(name)
    module.__reference_root__ = str(root)
    return module


class _Args(dict):
    """The attribute-style dict (``easydict``) the released code reads its settings from."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def reference_args(root: str | Path) -> _Args:
    """The released MOSI configuration (``config/config.json`` of ``root``), text as features."""
    cfg = json.loads((Path(root) / "config" / "config.json").read_text())
    args = _Args(cfg["datasetCommonParams"]["mosi"]["aligned"])
    args.update(cfg["dicmor"]["commonParams"])
    args.update(cfg["dicmor"]["datasetParams"]["mosi"])
    args.update(use_bert=False, train_mode="regression", num_classes=1, model_name="dicmor", dataset_name="mosi")
    return args


def build_reference(module: types.ModuleType, device: str | torch.device = "cpu") -> tuple[nn.Module, torch.optim.Optimizer, _Args]:
    """The released model (seed 0) and its trainer's optimiser, ``Adam(model.parameters(), lr)``."""
    args = reference_args(module.__reference_root__)
    torch.manual_seed(0)
    model = module.DICMOR(args).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    return model, opt, args


class ForcedChoice:
    """Context manager: the released forward's ``sample(modal_idx, num_modal)`` returns ``keep``."""

    def __init__(self, module: types.ModuleType, keep: list[int]) -> None:
        self.module, self.keep = module, list(keep)

    def __enter__(self) -> ForcedChoice:
        self._orig = self.module.sample
        keep = self.keep
        self.module.sample = lambda population, k: list(keep[:k])
        return self

    def __exit__(self, *exc: Any) -> None:
        self.module.sample = self._orig


def _inputs(batch: Any, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our ``Batch`` (``(B, C, T)`` features) as the released inputs: ``(B, T, C)`` text, audio,
    vision and ``(B, 1)`` labels."""
    f = batch.features
    text, audio, vision = (f[m].transpose(1, 2).contiguous().to(device) for m in ("L", "A", "V"))
    return text, audio, vision, batch.labels.view(-1, 1).to(device)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, args: _Args, inputs: tuple, num_modal: int,
               step: bool = True, zero: bool = True) -> float:
    """One batch of ``do_train``: forward, loss, backward, value clipping, ``item``/``cpu`` as logged,
    and (``step``) the Adam step; ``zero`` clears the gradients first."""
    text, audio, vision, labels = inputs
    if zero:
        opt.zero_grad()
    model.train()
    out = model(text, audio, vision, labels, num_modal=num_modal)
    task = nn.functional.l1_loss(out["M"], labels)
    loss = task + 0.1 * (out["log_p_l"] + out["log_p_v"] + out["log_p_a"] + out["loss_rec"])
    loss.backward()
    if args.grad_clip != -1.0:
        nn.utils.clip_grad_value_([p for p in model.parameters() if p.requires_grad], args.grad_clip)
    value = loss.item()
    out["M"].cpu()
    if step:
        opt.step()
    return value


def make_reference_callable(module: types.ModuleType, model: nn.Module, opt: torch.optim.Optimizer, args: _Args,
                            batch: Any, kind: str, situation: str,
                            device: str | torch.device = "cpu") -> tuple[Callable[[], None], ForcedChoice]:
    """A no-argument function running one released training step (``kind="train"``) or inference
    batch (``"infer"``) on ``batch`` in ``situation`` (``all``, ``one(V)``, ``two(L)``), and the
    context that forces the situation's modality choice."""
    if situation not in NUM_MODAL:
        raise ValueError(f"the released code has no situation {situation!r}; it runs {sorted(NUM_MODAL)}")
    num_modal, keep = NUM_MODAL[situation]
    inputs = _inputs(batch, device)
    if kind == "train":
        return (lambda: train_step(model, opt, args, inputs, num_modal)), ForcedChoice(module, keep)

    text, audio, vision, labels = inputs

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            out = model(text, audio, vision, labels, num_modal=num_modal)
            out["M"].cpu()

    return infer, ForcedChoice(module, keep)


def released_schedule(batches: int, mr: float) -> list[int]:
    """``num_modal`` of each training batch of one epoch under the released per-batch schedule
    (``do_train``: the first batches miss two modalities, then one, then none, in the proportions of
    its ``miss_2``/``miss_1`` tables at missing rate ``mr``)."""
    miss_2 = [0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]
    miss_1 = [0.1, 0.2, 0.3, 0.2, 0.1, 0.0, 0.0]
    k = int(mr * 10 - 1)
    if not 0 <= k < len(miss_2):
        raise ValueError(f"the released schedule takes mr in 0.1 .. 0.7, got {mr}")
    scale = round(batches / 10) * 10
    out, two, one = [], 0, 0
    for _ in range(batches):
        if two / scale < miss_2[k]:
            out.append(1)
            two += 1
        elif one / scale < miss_1[k]:
            out.append(2)
            one += 1
        else:
            out.append(3)
    return out


def reference_epoch(module: types.ModuleType, model: nn.Module, opt: torch.optim.Optimizer, args: _Args,
                    data: dict[str, torch.Tensor], mr: float, device: str | torch.device = "cpu",
                    max_batches: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The training pass of one released epoch (``do_train``'s inner loop) at its own defaults: batch
    ``args.batch_size`` (4), a shuffled order, gradients accumulated over ``args.update_epochs`` (8)
    batches, the per-batch missing schedule at ``mr``, and the trailing ``optimizer.step()`` after the
    loop. ``data``: ``text``/``audio``/``vision`` ``(N, T, C)`` and ``labels`` ``(N, 1)``.

    ``max_batches`` runs only that many batches, spread evenly over the epoch (so that the mix of
    missing cases is the epoch's), and reports ``seconds`` scaled to the full epoch.
    """
    import time

    n = data["labels"].shape[0]
    bs, accumulate = int(args.batch_size), int(args.update_epochs)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    chunks = list(torch.split(order, bs))
    schedule = released_schedule(len(chunks), mr)
    picked = list(range(len(chunks)))
    if max_batches is not None and max_batches < len(chunks):
        stride = len(chunks) / max_batches
        picked = sorted({int(i * stride) for i in range(max_batches)})
    timer = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    timer()
    t0 = time.perf_counter()
    left = accumulate
    for i in picked:  # which modalities survive: the released code's own random.sample
        idx = chunks[i]
        inputs = tuple(data[k].index_select(0, idx).to(device) for k in ("text", "audio", "vision", "labels"))
        zero = left == accumulate
        left -= 1
        train_step(model, opt, args, inputs, schedule[i], step=False, zero=zero)
        if not left:
            opt.step()
            left = accumulate
    timer()
    seconds = time.perf_counter() - t0
    return {"batches": len(chunks), "timed_batches": len(picked), "batch_size": bs, "accumulate": accumulate,
            "optimizer_steps": len(chunks) // accumulate, "seconds": seconds * len(chunks) / len(picked),
            "mr": mr, "num_modal_counts": {k: schedule.count(k) for k in (1, 2, 3)}}
