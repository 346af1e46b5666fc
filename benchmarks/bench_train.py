"""DiCMoR training steps and inference batches at MOSI shapes, timed beside the released code (issue 12).

What runs, in **one process, interleaved round by round, at one thread count** (``--threads``) and on
one device (``--device``, ``cpu`` by default, ``cuda`` where one exists):

* ``paper`` and ``official``: flowtransfer's DiCMoR variants, preset ``mosi`` (d 32; flows of 32
  steps, hidden 64; three refiners of 20 RCAB, hidden 64; MulT 32 wide, 8 heads, 4 layers), stage
  ``joint`` (everything trains). A training step is ``loss`` + ``backward`` + ``Adam.step`` (the
  trainer's optimiser, :func:`flowtransfer.training.build_optimizer`: fused Adam); inference is
  ``predict`` under ``no_grad`` in eval mode.
* ``released``: the released DiCMoR code (mdswyz/DiCMoR), imported at run time from
  ``../shared/reference/DiCMoR`` next to the repository (``--reference PATH`` to point elsewhere;
  nothing of it is copied here, see :mod:`bench_train_reference`), built with its own MOSI
  configuration and ``use_bert=False``. Its training step is its trainer's: L1 + 0.1 x (the three
  NLL terms + rec), ``backward``, ``clip_grad_value_(0.6)``, ``Adam(lr 1e-4).step()``; its inference
  is its trainer's evaluation call (``eval``, ``no_grad``, the forward with labels). When the folder
  is absent the script says so and times ours alone.

Data: random features (the figures do not depend on the values), text 768 / audio 5 / vision 20
channels, T = 50, batch 32 (``--batch``), labels uniform in [-3, 3]; the same tensors for every
implementation (the released code reads them as ``(B, T, C)``).

Missing situations (same for both codes): ``all`` (nothing missing; released ``num_modal=3``),
``one(V)`` (every sample misses vision; ``num_modal=2`` keeping text and audio), ``two(L)`` (every
sample keeps only text; ``num_modal=1``). Ours draws its training-time missingness inside
``DiCMoR.loss``; for a timed step it is forced to the fixed pattern (``simulate_missing`` in
``flowtransfer.methods.dicmor`` is replaced, in this process only, by the same function called with a
fixed ``pattern``); the released forward draws which modalities survive with ``random.sample``, which
is replaced the same way (:class:`bench_train_reference.ForcedChoice`). ``--train``/``--infer`` also
take ``one(mix)`` (sample ``b`` misses modality ``b mod 3``) and ``two(mix)`` (sample ``b`` keeps only
``b mod 3``) for ours; the released code has no per-sample missingness.

Figures:

* ``ms``: median over ``--rounds`` rounds after ``--warmup`` untimed runs per configuration; every
  round runs every configuration once (the order rotates by one each round), so drifting load hits
  all alike; ``cpu ms`` is the process CPU time (all threads). On CUDA every run is bracketed by
  ``torch.cuda.synchronize()``.
* ``peak MB``: a fresh subprocess per configuration runs 2 of its steps; on CPU its peak resident set
  (``VmHWM``: Python + torch + model + data + activations + gradients + optimiser state) and ``+MB``,
  the growth over the peak right before the first step; on CUDA ``torch.cuda.max_memory_allocated``
  (and its growth over the allocation before the first step).
* ``GFLOP``: floating-point operations of one run counted by ``torch.utils.flop_counter.FlopCounterMode``
  (matrix products, convolutions, attention kernels: what it counts; elementwise work is not counted).
  ``mm GFLOP/s``: the machine's matrix-product throughput, the best of several timed
  ``torch.mm`` of two ``--mm-size`` square float32 matrices at the same thread count and device,
  measured before and after the rounds (the larger is used). ``bound ms`` = GFLOP / that rate: the
  time the run would take if it were nothing but large matrix products; ``bound %`` = bound ms / ms,
  the fraction of the compute-bound time each run reaches.
* ``epoch s`` (``--epoch``): the training pass of one epoch on MOSI-shaped data (1284 training
  samples) at each implementation's own defaults: the released trainer (batch 4, gradients
  accumulated over 8 batches, its per-batch missing schedule at ``--epoch-mr``), and ours through
  :class:`flowtransfer.training.Trainer` with the settings ``flowtransfer run`` gives a stage
  (:class:`flowtransfer.experiment.ExperimentConfig`: batch 64, lr 1e-3, gradient-norm clip 5),
  both stages (``complete``, then ``recovery`` with per-sample missingness). Validation is not
  included. ``--epoch-batches N`` times N batches and scales to the epoch (spread evenly over the
  released schedule; the first N of ours, whose batches all look alike).

Breakdown (``--breakdown``, for ``--breakdown-variants``): one profiled run of steps per situation;
every component call (extractors, flow forward, flow inverse, prior, combiners, refiners, MulT,
head) is wrapped in a ``torch.profiler.record_function`` range; backward time is attributed to a
component through the autograd sequence number linking each backward node to its forward op; the
operators with the most self time are listed. The profiler adds per-op overhead: read the shares.

Run (the side-by-side table with epochs and breakdown: about 17 minutes on one thread of a busy 2-core
machine; on an idle one, ``--threads 2``)::

    .venv/bin/python benchmarks/bench_train.py --threads 1 --rounds 10 --breakdown
    .venv/bin/python benchmarks/bench_train.py --threads 2 --rounds 10
    .venv/bin/python benchmarks/bench_train.py --rounds 3 --no-memory --no-epoch     # quick look
    .venv/bin/python benchmarks/bench_train.py --device cuda --threads 16            # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train_reference as reference  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = ("L", "A", "V")
DIMS = {"L": 768, "A": 5, "V": 20}
T, BATCH = 50, 32
VARIANTS = {"paper": "dicmor", "official": "dicmor_official"}
RELEASED = "released"
TRAIN_SITUATIONS = ("all", "one(V)", "two(L)")
INFER_SITUATIONS = ("all", "one(V)", "two(L)")
MIX_SITUATIONS = ("one(mix)", "two(mix)")
#: where tensors and models go; set by ``main`` from ``--device`` (``build``/``make_callable`` read it)
DEVICE = "cpu"


def keep_mask(situation: str, b: int | None = None) -> torch.Tensor:
    """``(b, 3)`` bool (``b`` default: ``BATCH``): which modalities each sample keeps in ``situation``."""
    b = BATCH if b is None else b
    idx = torch.arange(b)
    col = torch.arange(3)[None, :]
    if situation == "all":
        return torch.ones(b, 3, dtype=torch.bool)
    if situation == "one(V)":
        return torch.tensor([True, True, False]).expand(b, 3).clone()
    if situation == "one(mix)":
        return col != (idx % 3)[:, None]
    if situation == "two(L)":
        return torch.tensor([True, False, False]).expand(b, 3).clone()
    if situation == "two(mix)":
        return col == (idx % 3)[:, None]
    raise ValueError(f"unknown situation {situation!r}; expected one of {TRAIN_SITUATIONS + MIX_SITUATIONS}")


def make_info():
    from flowtransfer.methods import DatasetInfo

    return DatasetInfo(MODALITIES, dict(DIMS), {m: T for m in MODALITIES}, "regression")


def make_batch(seed: int = 0, batch: int | None = None):
    """A complete batch of random MOSI-shaped features (CPU; move it with ``.to``)."""
    from flowtransfer.data.dataset import Batch

    b = BATCH if batch is None else batch
    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(b, c, T, generator=g) for m, c in DIMS.items()}
    labels = torch.rand(b, generator=g) * 6 - 3
    return Batch(features=feats, mask=torch.ones(b, 3, dtype=torch.bool), labels=labels,
                 modalities=MODALITIES, index=torch.arange(b))


def build(variant: str, *, device: str | None = None):
    """flowtransfer's DiCMoR ``variant`` (``paper``/``official``), preset ``mosi``, stage ``joint``, on
    ``device`` (default: the module's ``DEVICE``), and the trainer's optimiser: ``(model, opt)``."""
    from flowtransfer.methods import build_method
    from flowtransfer.training import TrainConfig, build_optimizer

    torch.manual_seed(0)
    model = build_method(VARIANTS[variant], make_info(), preset="mosi")
    model.set_stage("joint")
    model.to(device or DEVICE)
    opt = build_optimizer(model.parameter_groups(), TrainConfig(lr=1e-3))  # the trainer's optimiser
    return model, opt


class ForcedMissing:
    """Context manager: DiCMoR's training-time ``simulate_missing`` keeps exactly ``keep``."""

    def __init__(self, keep: torch.Tensor) -> None:
        self.keep = keep

    def __enter__(self) -> ForcedMissing:
        import flowtransfer.methods.dicmor as dm

        self._mod, self._orig = dm, dm.simulate_missing
        orig, keep = self._orig, self.keep

        def forced(batch, rate=None, pattern=None, generator=None):
            return orig(batch, pattern=keep.to(batch.mask.device))

        dm.simulate_missing = forced
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mod.simulate_missing = self._orig


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_callable(model, opt, kind: str, situation: str) -> tuple[Callable[[], None], ForcedMissing | None]:
    """A no-argument function running one training step or one inference batch of ours, on the
    model's device, and the context manager (or ``None``) to run it in."""
    from flowtransfer.methods.base import simulate_missing

    batch = make_batch().to(_device_of(model))
    keep = keep_mask(situation).to(batch.mask.device)
    if kind == "train":
        def step() -> None:
            model.train()
            loss, _ = model.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step, ForcedMissing(keep)
    data = simulate_missing(batch, pattern=keep)

    def infer() -> None:
        model.eval()
        with torch.no_grad():
            model.predict(data)

    return infer, None


# --------------------------------------------------------------------------------------------------
# the implementations side by side
# --------------------------------------------------------------------------------------------------


class Runner:
    """Builds each implementation once and hands out ``(fn, context)`` per configuration."""

    def __init__(self, impls: tuple[str, ...], ref_module: Any = None) -> None:
        self.models: dict[str, tuple] = {}
        self.ref_module = ref_module
        for impl in impls:
            if impl == RELEASED:
                self.models[impl] = reference.build_reference(ref_module, DEVICE)
            else:
                self.models[impl] = build(impl)
        self._cache: dict[tuple[str, str, str], tuple[Callable[[], None], Any]] = {}

    def callable(self, impl: str, kind: str, situation: str) -> tuple[Callable[[], None], Any]:
        key = (impl, kind, situation)
        if key not in self._cache:
            if impl == RELEASED:
                model, opt, args = self.models[impl]
                self._cache[key] = reference.make_reference_callable(
                    self.ref_module, model, opt, args, make_batch(), kind, situation, DEVICE)
            else:
                self._cache[key] = make_callable(*self.models[impl], kind, situation)
        return self._cache[key]


def _progress(text: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def _sync() -> None:
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], None], ctx: Any) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one call of ``fn`` inside ``ctx``."""
    with ctx if ctx is not None else contextlib.nullcontext():
        _sync()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync()
        return time.perf_counter() - w0, time.process_time() - c0


def configs(impls: tuple[str, ...], train: tuple[str, ...], infer: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """``(implementation, kind, situation)``, kind-major; the released code only in its situations."""
    out = []
    for kind, situations in (("train", train), ("infer", infer)):
        for s in situations:
            for impl in impls:
                if impl == RELEASED and s not in reference.NUM_MODAL:
                    continue
                out.append((impl, kind, s))
    return out


def time_all(runner: Runner, cfgs: list[tuple[str, str, str]], rounds: int, warmup: int) -> dict[tuple[str, str, str], list[tuple[float, float]]]:
    for cfg in cfgs:
        fn, ctx = runner.callable(*cfg)
        for _ in range(warmup):
            timed(fn, ctx)
    times: dict[tuple[str, str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in range(rounds):
        shift = r % len(cfgs)
        for cfg in cfgs[shift:] + cfgs[:shift]:
            times[cfg].append(timed(*runner.callable(*cfg)))
        _progress(f"round {r + 1}/{rounds} done")
    return times


# --------------------------------------------------------------------------------------------------
# FLOPs and the machine's matrix-product rate
# --------------------------------------------------------------------------------------------------


def count_flops(fn: Callable[[], None], ctx: Any) -> float:
    """Floating-point operations of one call (``FlopCounterMode``; forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with ctx if ctx is not None else contextlib.nullcontext():
        with counter:
            fn()
    return float(counter.get_total_flops())


def mm_throughput(size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` timed ``torch.mm`` of two ``size x size`` float32 matrices on
    ``DEVICE`` at the current thread count."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(DEVICE)
    b = torch.randn(size, size, generator=g).to(DEVICE)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size ** 3 / best


# --------------------------------------------------------------------------------------------------
# memory (fresh subprocess per configuration)
# --------------------------------------------------------------------------------------------------

MEMORY_STEPS = 2


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MB: ``VmHWM`` from ``/proc/self/status`` (reset by
    ``exec``, unlike ``ru_maxrss``, which a child inherits from the parent it was forked from), else
    ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _peak_mb() -> float:
    if torch.device(DEVICE).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return peak_rss_mb()


def memory_child(impl: str, kind: str, situation: str, ref_path: str | None) -> dict[str, float]:
    module = reference.load_reference(ref_path) if impl == RELEASED else None
    runner = Runner((impl,), module)
    fn, ctx = runner.callable(impl, kind, situation)
    _sync()
    before = _peak_mb()
    with ctx if ctx is not None else contextlib.nullcontext():
        for _ in range(MEMORY_STEPS):
            fn()
    _sync()
    after = _peak_mb()
    return {"peak_mb": after, "delta_mb": after - before}


def memory_all(cfgs: list[tuple[str, str, str]], threads: int, ref_path: str | None) -> dict[tuple[str, str, str], dict[str, float]]:
    out = {}
    for n, (impl, kind, s) in enumerate(cfgs):
        _progress(f"memory {n + 1}/{len(cfgs)}: {impl} {kind} {s}")
        cmd = [sys.executable, __file__, "--memory-child", impl, kind, s, "--threads", str(threads), "--device", DEVICE]
        if ref_path:
            cmd += ["--reference", ref_path]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise RuntimeError(f"memory measurement of {(impl, kind, s)} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        out[(impl, kind, s)] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# --------------------------------------------------------------------------------------------------
# one epoch at each implementation's own defaults
# --------------------------------------------------------------------------------------------------

EPOCH_SAMPLES = 1284  # MOSI's training split (the released config.json's train_samples)


def epoch_data(n: int = EPOCH_SAMPLES, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random MOSI-shaped training data, ``(N, C, T)`` per modality, labels ``(N,)`` in [-3, 3]."""
    g = torch.Generator().manual_seed(seed)
    data = {m: torch.randn(n, c, T, generator=g) for m, c in DIMS.items()}
    data["labels"] = torch.rand(n, generator=g) * 6 - 3
    return data


def released_epoch(module: Any, data: dict[str, torch.Tensor], mr: float, max_batches: int | None) -> dict[str, Any]:
    import random

    model, opt, args = reference.build_reference(module, DEVICE)
    random.seed(1111)
    ref_data = {"text": data["L"].transpose(1, 2), "audio": data["A"].transpose(1, 2),
                "vision": data["V"].transpose(1, 2), "labels": data["labels"].view(-1, 1)}
    return reference.reference_epoch(module, model, opt, args, ref_data, mr, DEVICE, max_batches)


def our_epoch(variant: str, data: dict[str, torch.Tensor], max_batches: int | None) -> dict[str, Any]:
    """Seconds of the training pass of one epoch of each stage, through our Trainer with the settings
    ``flowtransfer run`` gives a stage."""
    from flowtransfer.data.dataset import MultimodalDataset
    from flowtransfer.experiment import ExperimentConfig
    from flowtransfer.training import Trainer

    train = MultimodalDataset({m: data[m].numpy() for m in MODALITIES}, data["labels"].numpy(), "regression")
    model, _ = build(variant)
    out: dict[str, Any] = {}
    for stage in ("complete", "recovery"):
        model.set_stage(stage)
        cfg = ExperimentConfig(dataset="mmsa", preset="mosi").train_config(
            "regression", seed=0, progress=False, device=DEVICE, max_steps_per_epoch=max_batches)
        trainer = Trainer(model, cfg)
        batches = -(-len(train) // cfg.batch_size)
        timed_batches = min(batches, max_batches or batches)
        _sync()
        t0 = time.perf_counter()
        trainer.train_epoch(train, 0)
        _sync()
        out[stage] = {"seconds": (time.perf_counter() - t0) * batches / timed_batches, "batches": batches,
                      "timed_batches": timed_batches, "batch_size": cfg.batch_size}
    return out


# --------------------------------------------------------------------------------------------------
# breakdown (ours, profiled)
# --------------------------------------------------------------------------------------------------

COMPONENTS = ("extractors", "flow fwd", "flow inv", "prior", "combiners", "refiners", "fusion (MulT)", "head")


def _wrap(obj: Any, attr: str, label: str) -> None:
    fn = getattr(obj, attr)

    def wrapped(*a: Any, **k: Any) -> Any:
        with torch.profiler.record_function("comp::" + label):
            return fn(*a, **k)

    setattr(obj, attr, wrapped)  # instance attribute shadows the class method


def instrument(model) -> None:
    _wrap(model.extractors, "forward", "extractors")
    for m in model.modalities:
        for attr, label in (("forward", "flow fwd"), ("forward_nologdet", "flow fwd"),
                            ("inverse", "flow inv"), ("inverse_nologdet", "flow inv")):
            if hasattr(model.flows[m], attr):  # the log-det-free maps: to_latent / from_latent
                _wrap(model.flows[m], attr, label)
        _wrap(model.refiners[m], "forward", "refiners")
        if m in model.combiners:
            _wrap(model.combiners[m], "forward", "combiners")
    _wrap(model.prior, "log_prob", "prior")
    _wrap(model.fusion, "forward", "fusion (MulT)")
    _wrap(model.head, "forward", "head")


#: profiler names of the kernels that do the matrix products
GEMM_OPS = frozenset({
    "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::mkldnn_convolution",
    "aten::convolution_backward", "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
})


def _component_of(ev: Any) -> str | None:
    p = ev
    while p is not None:
        if p.name.startswith("comp::"):
            return p.name[6:]
        p = p.cpu_parent
    return None


def breakdown(variant: str, kind: str, situation: str, steps: int = 3) -> dict[str, Any]:
    """Forward / backward milliseconds per component, per step (profiled; read the shares)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    model, opt = build(variant)
    instrument(model)
    fn, ctx = make_callable(model, opt, kind, situation)
    if kind == "train":
        batch = make_batch().to(_device_of(model))

        def fn() -> None:  # the same step, with phases marked
            model.train()
            with record_function("phase::forward"):
                loss, _ = model.loss(batch)
            opt.zero_grad(set_to_none=True)
            with record_function("phase::backward"):
                loss.backward()
            with record_function("phase::optimizer"):
                opt.step()

    def run(n: int) -> None:
        with ctx if ctx is not None else contextlib.nullcontext():
            for _ in range(n):
                fn()
        _sync()

    run(1)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.device(DEVICE).type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        run(steps)
        wall = (time.perf_counter() - t0) / steps
    events = prof.events()
    fwd: dict[str, float] = defaultdict(float)
    bwd: dict[str, float] = defaultdict(float)
    phases: dict[str, float] = defaultdict(float)
    seq_comp: dict[int, str] = {}
    for ev in events:
        if ev.name.startswith("comp::"):
            parent = ev.cpu_parent
            nested = False
            while parent is not None:
                if parent.name.startswith("comp::"):
                    nested = True
                    break
                parent = parent.cpu_parent
            if not nested:
                fwd[ev.name[6:]] += ev.cpu_time_total
        elif ev.name.startswith("phase::"):
            phases[ev.name[7:]] += ev.cpu_time_total
        if getattr(ev, "sequence_nr", -1) >= 0 and not ev.name.startswith("autograd::engine"):
            comp = _component_of(ev)
            if comp is not None:
                seq_comp.setdefault(ev.sequence_nr, comp)
    # time inside the matrix-product kernels (self time, forward and backward): what remains of a step
    # if everything else (elementwise work, copies, dispatch, Python) cost nothing
    gemm = sum(ev.self_cpu_time_total for ev in events if ev.name in GEMM_OPS)
    unattributed = 0.0
    for ev in events:
        if ev.name.startswith("autograd::engine::evaluate_function"):
            comp = seq_comp.get(getattr(ev, "sequence_nr", -1))
            if comp is None:
                unattributed += ev.cpu_time_total
            else:
                bwd[comp] += ev.cpu_time_total
    ops: dict[str, float] = defaultdict(float)
    for ev in prof.key_averages():
        if ev.key.startswith("aten::"):
            ops[ev.key] += ev.self_cpu_time_total
    scale = 1e-3 / steps  # us -> ms per step
    return {
        "wall_ms": wall * 1e3,
        "forward": {k: v * scale for k, v in fwd.items()},
        "backward": {k: v * scale for k, v in bwd.items()},
        "backward_unattributed": unattributed * scale,
        "matrix_products": gemm * scale,
        "phases": {k: v * scale for k, v in phases.items()},
        "top_ops": dict(sorted(((k, v * scale) for k, v in ops.items()), key=lambda kv: -kv[1])[:12]),
    }


def format_breakdown(name: str, b: dict[str, Any]) -> str:
    ph = b["phases"]
    total_fwd = ph.get("forward", sum(b["forward"].values()))
    total_bwd = ph.get("backward", 0.0)
    total = total_fwd + total_bwd + ph.get("optimizer", 0.0) if ph else total_fwd
    lines = [f"{name}: profiled step {b['wall_ms']:.0f} ms (profiler overhead included); "
             f"forward {total_fwd:.0f} ms, backward {total_bwd:.0f} ms, Adam {ph.get('optimizer', 0.0):.0f} ms"]
    lines.append(f"  {'component':<14} {'fwd ms':>8} {'bwd ms':>8} {'share':>6}")
    rest_f = total_fwd - sum(b["forward"].values())
    rest_b = total_bwd - sum(b["backward"].values())
    rows = [(c, b["forward"].get(c, 0.0), b["backward"].get(c, 0.0)) for c in COMPONENTS]
    rows.append(("other", rest_f, rest_b))
    if ph.get("optimizer"):
        rows.append(("Adam step", 0.0, 0.0))
    for c, f, bw in rows:
        extra = ph.get("optimizer", 0.0) if c == "Adam step" else 0.0
        share = 100.0 * (f + bw + extra) / total if total else 0.0
        if c == "Adam step":
            lines.append(f"  {c:<14} {extra:>8.0f} {'':>8} {share:>5.0f}%")
        else:
            lines.append(f"  {c:<14} {f:>8.0f} {bw:>8.0f} {share:>5.0f}%")
    if "matrix_products" in b and total:
        lines.append(f"  matrix products (mm/bmm/addmm/baddbmm/convolution/fused attention kernels, self time): "
                     f"{b['matrix_products']:.0f} ms = {100.0 * b['matrix_products'] / total:.0f}% of the step")
    if b.get("top_ops"):
        lines.append("  operators by self time (ms per step): "
                     + ", ".join(f"{k[6:]} {v:.0f}" for k, v in b["top_ops"].items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def _median(samples: list[tuple[float, float]], i: int) -> float:
    return statistics.median(x[i] for x in samples) * 1e3 if samples else float("nan")


def format_rows(cfgs, times, mem, flops, rate) -> tuple[str, list[dict[str, Any]]]:
    header = (f"{'impl':<9} {'kind':<6} {'situation':<9} {'ms':>7} {'min ms':>7} {'cpu ms':>7} {'peak MB':>8} "
              f"{'+MB':>6} {'GFLOP':>7} {'bound ms':>8} {'bound %':>7}")
    lines = [header, "-" * len(header)]
    record = []
    nan = float("nan")
    for cfg in cfgs:
        impl, kind, s = cfg
        t = times.get(cfg, [])
        wall, cpu = _median(t, 0), _median(t, 1)
        low = min((x[0] for x in t), default=nan) * 1e3
        mm = mem.get(cfg, {})
        gf = flops.get(cfg, nan) / 1e9
        bound = gf * 1e9 / rate * 1e3 if rate else nan
        lines.append(f"{impl:<9} {kind:<6} {s:<9} {wall:>7.0f} {low:>7.0f} {cpu:>7.0f} {mm.get('peak_mb', nan):>8.0f} "
                     f"{mm.get('delta_mb', nan):>6.0f} {gf:>7.2f} {bound:>8.1f} {100 * bound / wall:>6.1f}%")
        record.append({"impl": impl, "kind": kind, "situation": s, "ms": wall, "min_ms": low, "cpu_ms": cpu, **mm,
                       "gflop": gf, "bound_ms": bound, "samples_wall_cpu_ms": [(a * 1e3, b * 1e3) for a, b in t]})
    return "\n".join(lines), record


def format_side_by_side(cfgs, times, mem) -> str:
    """Per kind and situation: the released code's median, ours, and released / ours (> 1: ours faster)."""
    impls = [i for i in ("paper", "official") if any(c[0] == i for c in cfgs)]
    header = f"{'kind':<6} {'situation':<9} {'released ms':>11}" + "".join(
        f" {i + ' ms':>12} {'speed-up':>8}" for i in impls) + f" {'rel. +MB':>8}" + "".join(f" {i + ' +MB':>12}" for i in impls)
    lines = [header, "-" * len(header)]
    nan = float("nan")
    for kind in ("train", "infer"):
        for s in dict.fromkeys(c[2] for c in cfgs if c[1] == kind and c[0] == RELEASED):
            ref = _median(times.get((RELEASED, kind, s), []), 0)
            row = f"{kind:<6} {s:<9} {ref:>11.0f}"
            for i in impls:
                ours = _median(times.get((i, kind, s), []), 0)
                row += f" {ours:>12.0f} {ref / ours:>7.2f}x"
            row += f" {mem.get((RELEASED, kind, s), {}).get('delta_mb', nan):>8.0f}"
            for i in impls:
                row += f" {mem.get((i, kind, s), {}).get('delta_mb', nan):>12.0f}"
            lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global DEVICE, BATCH
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    p.add_argument("--batch", type=int, default=BATCH, help="batch size of the timed steps")
    p.add_argument("--variants", default="paper,official", help="ours (comma list of paper, official)")
    p.add_argument("--reference", default=None,
                   help=f"folder of the released DiCMoR code (default {reference.default_reference_path()})")
    p.add_argument("--no-reference", action="store_true", help="time ours alone")
    p.add_argument("--train", default=",".join(TRAIN_SITUATIONS), help="training situations (comma list)")
    p.add_argument("--infer", default=",".join(INFER_SITUATIONS), help="inference situations (comma list)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-flops", action="store_true")
    p.add_argument("--mm-size", type=int, default=2048, help="side of the timed square torch.mm")
    p.add_argument("--no-epoch", action="store_true", help="skip the seconds-per-epoch measurement")
    p.add_argument("--epoch-mr", type=float, default=0.1,
                   help="missing rate of the released per-batch schedule (its train.py uses 0.1)")
    p.add_argument("--epoch-batches", type=int, default=None, help="time this many batches per epoch and scale")
    p.add_argument("--breakdown", action="store_true", help="profile ours (component shares, top operators)")
    p.add_argument("--breakdown-variants", default="paper")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--memory-child", nargs=3, metavar=("IMPL", "KIND", "SITUATION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    BATCH = args.batch
    DEVICE = args.device
    if torch.device(DEVICE).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {DEVICE}: this torch ({torch.__version__}) sees no CUDA device")
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child, args.reference)))
        return 0

    split = lambda text: tuple(x for x in text.split(",") if x)  # noqa: E731
    variants = split(args.variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; expected {sorted(VARIANTS)}")
    module = None
    ref_path = args.reference
    if not args.no_reference:
        try:
            module = reference.load_reference(ref_path)
        except FileNotFoundError as err:
            print(f"released code not found ({err}): timing flowtransfer alone", flush=True)
    impls = (RELEASED,) * (module is not None) + variants
    cfgs = configs(impls, split(args.train), split(args.infer))
    load = os.getloadavg()
    dev_name = torch.cuda.get_device_name(torch.device(DEVICE)) if torch.device(DEVICE).type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {DEVICE} ({dev_name}), threads {torch.get_num_threads()}, cpus "
          f"{os.cpu_count()}, batch {BATCH}, T {T}; load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
          flush=True)
    if module is not None:
        print(f"released code: {module.__reference_root__}", flush=True)

    mem = {} if args.no_memory else memory_all(cfgs, args.threads, ref_path)
    runner = Runner(impls, module)
    rates = [mm_throughput(args.mm_size)]
    _progress("counting FLOPs")
    flops = {} if args.no_flops else {cfg: count_flops(*runner.callable(*cfg)) for cfg in cfgs}
    _progress("warm-up and timed rounds")
    load_mid = os.getloadavg()
    times = time_all(runner, cfgs, args.rounds, args.warmup) if args.rounds > 0 else {}
    rates.append(mm_throughput(args.mm_size))
    load_after = os.getloadavg()
    rate = max(rates)

    table, record = format_rows(cfgs, times, mem, flops, rate)
    print(table)
    print(f"ms / min ms / cpu ms: median, minimum and median process CPU time over {args.rounds} interleaved rounds "
          f"({args.warmup} warm-up runs each). mm: {rates[0] / 1e9:.1f} GFLOP/s before the rounds, "
          f"{rates[1] / 1e9:.1f} after ({args.mm_size}^2 float32, {args.threads} threads); bound ms = GFLOP at "
          f"{rate / 1e9:.1f} GFLOP/s. Load average: before {load[0]:.1f}, before the rounds {load_mid[0]:.1f}, "
          f"after {load_after[0]:.1f}.", flush=True)
    if module is not None and times:
        print()
        print("released code / ours, same process, same data, same threads (speed-up > 1: ours faster):")
        print(format_side_by_side(cfgs, times, mem), flush=True)

    epochs: dict[str, Any] = {}
    if not args.no_epoch:
        data = epoch_data()
        print()
        print(f"seconds per epoch (training pass, {EPOCH_SAMPLES} MOSI-shaped samples, each at its own defaults):",
              flush=True)
        _progress("epochs")
        if module is not None:
            r = released_epoch(module, data, args.epoch_mr, args.epoch_batches)
            epochs[RELEASED] = r
            print(f"  released  batch {r['batch_size']}, {r['accumulate']}-batch accumulation ({r['batches']} batches, "
                  f"{r['optimizer_steps']} Adam steps; num_modal 1/2/3 in {r['num_modal_counts'][1]}/"
                  f"{r['num_modal_counts'][2]}/{r['num_modal_counts'][3]} batches at mr {args.epoch_mr}): "
                  f"{r['seconds']:.1f} s (timed {r['timed_batches']} batches)", flush=True)
        for v in variants:
            r = our_epoch(v, data, args.epoch_batches)
            epochs[v] = r
            c, rc = r["complete"], r["recovery"]
            print(f"  {v:<9} batch {c['batch_size']} ({c['batches']} batches): stage complete {c['seconds']:.1f} s, "
                  f"stage recovery {rc['seconds']:.1f} s (timed {rc['timed_batches']} batches)"
                  + (f"; released / recovery {epochs[RELEASED]['seconds'] / rc['seconds']:.2f}x" if RELEASED in epochs else ""),
                  flush=True)

    bds = {}
    if args.breakdown:
        for v in split(args.breakdown_variants):
            for kind, s in (("train", "all"), ("train", "one(V)"), ("infer", "one(V)")):
                _progress(f"breakdown {v} {kind} {s}")
                b = breakdown(v, kind, s)
                bds[f"{v} {kind} {s}"] = b
                print()
                print(format_breakdown(f"{v} {kind} {s}", b), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "threads": args.threads, "device": DEVICE, "batch": BATCH, "load_before": load, "load_mid": load_mid,
            "load_after": load_after, "mm_flops_per_s": rates, "rows": record, "epochs": epochs, "breakdown": bds,
        }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
