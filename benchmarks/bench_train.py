"""Speed and memory of one DiCMoR training step and one inference batch at MOSI shapes (issue 4, "Speed").

Setting: text 768, audio 5, vision 20 channels, T = 50 for every modality, batch 32, regression,
preset ``mosi`` (d 32; flows 32 steps, hidden 64; 20 RCAB, hidden 64; MulT 32 wide, 8 heads, 4
layers), stage ``joint`` (everything trains), CPU, ``torch.set_num_threads(2)`` (``--threads``).
Random features (the figures do not depend on the values), fixed seeds.

Missing situations. DiCMoR's ``loss`` draws its own training-time missingness; for a timed step it is
forced to a fixed pattern (``simulate_missing`` in ``flowtransfer.methods.dicmor`` is replaced, in
this process only, by the same function called with a fixed per-sample ``pattern``):

* ``all``: nothing missing (flows still run forward for the NLL; no transfer, no refiner);
* ``one(V)``: every sample misses vision (L and A available);
* ``one(mix)``: sample ``b`` misses modality ``b mod 3`` (all three targets recovered);
* ``two(L)``: every sample keeps text only;
* ``two(mix)``: sample ``b`` keeps only modality ``b mod 3``.

Inference: ``predict`` under ``no_grad`` in eval mode on a batch whose data mask is ``one(V)`` or
``one(mix)``.

Figures:

* ``median ms``: median over ``--rounds`` rounds after ``--warmup`` untimed steps per configuration;
  every round runs every configuration once, in turn, so that drifting machine load hits all alike.
  A training step = ``loss`` (forward) + ``backward`` + ``Adam.step`` (the trainer's optimiser,
  :func:`flowtransfer.training.build_optimizer`: fused Adam).
* ``peak MB``: the process's peak resident set size (``ru_maxrss``) after 2 steps of that
  configuration alone, in a fresh subprocess (``VmHWM``: Python + torch + model + data +
  activations + gradients + Adam state, the whole process, comparable with a ``max RSS`` figure),
  and ``+MB``, its increase over the peak right before the first step (activations, gradients,
  optimiser state). Measured before the timings, so the parent process is still small.
* ``ref``: the released DiCMoR implementation measured by someone else on this kind of machine
  (2 threads, BERT excluded, batch 32; figures quoted in issue 4, not re-measured here): 1.0 s per
  step with all modalities, 1.17 s with one missing, 1.28 s with two, 366 ms for inference with one
  missing, 0.95 GB peak. ``speed-up`` = ref / ours (> 1: ours is faster). The issue's target is a
  speed-up of at least 2 for the ``paper`` variant.

Breakdown (``--breakdown``): one profiled run of steps per variant and situation. Every component
call (extractors, flow forward, flow inverse, prior log-density, combiners, refiners, MulT fusion,
head) is wrapped in a ``torch.profiler.record_function`` range; forward time is the ranges'
self-inclusive CPU time, and backward time is attributed to a component through the autograd
sequence number that links each backward node to the forward op that created it. The profiler adds
per-op overhead, so read the shares, not the absolute numbers.

Run::

    .venv/bin/python benchmarks/bench_train.py                    # timings + memory + breakdown
    .venv/bin/python benchmarks/bench_train.py --rounds 15 --no-memory
"""

from __future__ import annotations

import argparse
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

ROOT = Path(__file__).resolve().parents[1]
MODALITIES = ("L", "A", "V")
DIMS = {"L": 768, "A": 5, "V": 20}
T, BATCH = 50, 32
VARIANTS = {"paper": "dicmor", "official": "dicmor_official"}
TRAIN_SITUATIONS = ("all", "one(V)", "one(mix)", "two(L)", "two(mix)")
INFER_SITUATIONS = ("one(V)", "one(mix)")
#: the released implementation (issue 4): seconds per training step / inference batch, GB peak
REF_TRAIN = {"all": 1.0, "one": 1.17, "two": 1.28}
REF_INFER = 0.366
REF_PEAK_GB = 0.95


def keep_mask(situation: str, b: int = BATCH) -> torch.Tensor:
    """``(b, 3)`` bool: which modalities each sample keeps in ``situation``."""
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
    raise ValueError(f"unknown situation {situation!r}; expected one of {TRAIN_SITUATIONS}")


def make_info():
    from flowtransfer.methods import DatasetInfo

    return DatasetInfo(MODALITIES, dict(DIMS), {m: T for m in MODALITIES}, "regression")


def make_batch(seed: int = 0):
    from flowtransfer.data.dataset import Batch

    g = torch.Generator().manual_seed(seed)
    feats = {m: torch.randn(BATCH, c, T, generator=g) for m, c in DIMS.items()}
    labels = torch.rand(BATCH, generator=g) * 6 - 3
    return Batch(features=feats, mask=torch.ones(BATCH, 3, dtype=torch.bool), labels=labels,
                 modalities=MODALITIES, index=torch.arange(BATCH))


def build(variant: str):
    from flowtransfer.methods import build_method
    from flowtransfer.training import TrainConfig, build_optimizer

    torch.manual_seed(0)
    model = build_method(VARIANTS[variant], make_info(), preset="mosi")
    model.set_stage("joint")
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
            return orig(batch, pattern=keep)

        dm.simulate_missing = forced
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mod.simulate_missing = self._orig


def make_callable(model, opt, kind: str, situation: str) -> tuple[Callable[[], None], ForcedMissing | None]:
    """A no-argument function running one training step or one inference batch."""
    from flowtransfer.methods.base import simulate_missing

    batch = make_batch()
    keep = keep_mask(situation)
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


def run_one(model, opt, kind: str, situation: str) -> tuple[float, float]:
    """``(wall seconds, process CPU seconds)`` of one step (CPU time sums every thread)."""
    fn, ctx = make_callable(model, opt, kind, situation)
    if ctx is None:
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w0, time.process_time() - c0
    with ctx:
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w0, time.process_time() - c0


def configs(variants=tuple(VARIANTS), train=TRAIN_SITUATIONS, infer=INFER_SITUATIONS) -> list[tuple[str, str, str]]:
    return [(v, "train", s) for v in variants for s in train] + [(v, "infer", s) for v in variants for s in infer]


def time_all(cfgs: list[tuple[str, str, str]], rounds: int, warmup: int) -> dict[tuple[str, str, str], list[tuple[float, float]]]:
    models = {v: build(v) for v in {c[0] for c in cfgs}}
    for v, kind, s in cfgs:
        for _ in range(warmup):
            run_one(*models[v], kind, s)
    times: dict[tuple[str, str, str], list[tuple[float, float]]] = defaultdict(list)
    for r in range(rounds):
        for v, kind, s in cfgs:
            times[(v, kind, s)].append(run_one(*models[v], kind, s))
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return times


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


def memory_child(variant: str, kind: str, situation: str) -> dict[str, float]:
    model, opt = build(variant)
    fn, ctx = make_callable(model, opt, kind, situation)
    before = peak_rss_mb()
    if ctx is None:
        for _ in range(MEMORY_STEPS):
            fn()
    else:
        with ctx:
            for _ in range(MEMORY_STEPS):
                fn()
    after = peak_rss_mb()
    return {"peak_mb": after, "delta_mb": after - before}


def memory_all(cfgs: list[tuple[str, str, str]], threads: int, parallel: int = 1) -> dict[tuple[str, str, str], dict[str, float]]:
    """One fresh subprocess per configuration (``parallel`` at a time: peak RSS is per process)."""
    out = {}
    for i in range(0, len(cfgs), parallel):
        procs = []
        for v, kind, s in cfgs[i:i + parallel]:
            cmd = [sys.executable, __file__, "--memory-child", v, kind, s, "--threads", str(threads)]
            procs.append(((v, kind, s), subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                          text=True, cwd=ROOT)))
        for key, proc in procs:
            stdout, _ = proc.communicate()
            if proc.returncode:
                raise RuntimeError(f"memory measurement of {key} failed (exit {proc.returncode})")
            out[key] = json.loads(stdout.strip().splitlines()[-1])
    return out


# --------------------------------------------------------------------------------------------------
# breakdown
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
        _wrap(model.flows[m], "forward", "flow fwd")
        _wrap(model.flows[m], "inverse", "flow inv")
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
        batch = make_batch()

        def fn() -> None:  # the same step, with phases marked
            model.train()
            with record_function("phase::forward"):
                loss, _ = model.loss(batch)
            opt.zero_grad(set_to_none=True)
            with record_function("phase::backward"):
                loss.backward()
            with record_function("phase::optimizer"):
                opt.step()

    def go(n: int) -> None:
        for _ in range(n):
            fn()

    def run(n: int) -> None:
        if ctx is None:
            go(n)
        else:
            with ctx:
                go(n)

    run(1)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
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
    scale = 1e-3 / steps  # us -> ms per step
    return {
        "wall_ms": wall * 1e3,
        "forward": {k: v * scale for k, v in fwd.items()},
        "backward": {k: v * scale for k, v in bwd.items()},
        "backward_unattributed": unattributed * scale,
        "matrix_products": gemm * scale,
        "phases": {k: v * scale for k, v in phases.items()},
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
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------


def ref_for(kind: str, situation: str) -> float:
    return REF_INFER if kind == "infer" else REF_TRAIN[situation.split("(")[0]]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="paper,official")
    p.add_argument("--train", default=",".join(TRAIN_SITUATIONS), help="training situations (comma list)")
    p.add_argument("--infer", default=",".join(INFER_SITUATIONS), help="inference situations (comma list)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--memory-parallel", type=int, default=1, help="memory subprocesses at a time")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--memory-child", nargs=3, metavar=("VARIANT", "KIND", "SITUATION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return 0

    split = lambda text: tuple(x for x in text.split(",") if x)  # noqa: E731
    cfgs = configs(split(args.variants), split(args.train), split(args.infer))
    load = os.getloadavg()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    mem = {} if args.no_memory else memory_all(cfgs, args.threads, args.memory_parallel)
    load_mid = os.getloadavg()
    times = time_all(cfgs, args.rounds, args.warmup) if args.rounds > 0 else {}
    load_after = os.getloadavg()

    header = (f"{'variant':<9} {'kind':<6} {'situation':<9} {'wall ms':>8} {'cpu ms':>8} {'ref ms':>7} "
              f"{'ref/wall':>8} {'ref/cpu':>8} {'peak MB':>8} {'+MB':>6}")
    lines = [header, "-" * len(header)]
    record = []
    for v, kind, s in cfgs:
        t = times.get((v, kind, s), [(float("nan"), float("nan"))])
        wall = statistics.median(x[0] for x in t) * 1e3
        cpu = statistics.median(x[1] for x in t) * 1e3
        ref = ref_for(kind, s) * 1e3
        mm = mem.get((v, kind, s), {})
        lines.append(f"{v:<9} {kind:<6} {s:<9} {wall:>8.0f} {cpu:>8.0f} {ref:>7.0f} {ref / wall:>8.2f} "
                     f"{ref / cpu:>8.2f} {mm.get('peak_mb', float('nan')):>8.0f} {mm.get('delta_mb', float('nan')):>6.0f}")
        record.append({"variant": v, "kind": kind, "situation": s, "wall_ms": wall, "cpu_ms": cpu,
                       "ref_ms": ref, **mm, "samples_wall_cpu_ms": [(a * 1e3, b * 1e3) for a, b in t]})
    table = "\n".join(lines)
    print(table)
    print(f"wall/cpu: medians over {args.rounds} rounds ({args.warmup} warm-up steps each); cpu = process CPU "
          f"time (all threads). ref = released DiCMoR, measured by someone else on this kind of machine "
          f"(issue 4), 2 threads, wall; its peak {REF_PEAK_GB * 1024:.0f} MB. ref/x > 1: ours faster. "
          f"Load average: before {load[0]:.1f}, after memory {load_mid[0]:.1f}, after timing {load_after[0]:.1f}.",
          flush=True)

    bds = {}
    if not args.no_breakdown:
        for v in split(args.variants):
            for kind, s in (("train", "all"), ("train", "one(V)"), ("infer", "one(V)")):
                b = breakdown(v, kind, s)
                bds[f"{v} {kind} {s}"] = b
                print()
                print(format_breakdown(f"{v} {kind} {s}", b), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": args.threads, "load_before": load, "load_mid": load_mid,
                                                "load_after": load_after, "rows": record, "breakdown": bds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
