"""Two speed levers for DiCMoR's flows, measured before building them (issues 10 and 12).

1. **Grouped flows.** DiCMoR runs three flows of one width (one per modality). Running them as one
   grouped flow (one batched product per layer instead of three) can save at most what one flow on
   a ``3B`` batch saves over three flows on ``B`` each: the same arithmetic, a third of the
   operator calls. This probe times exactly that upper bound: one flow runs the ``3B`` pass, while
   a real grouped flow would add stacking and indexing work, so its gain can only be smaller.
2. **``torch.compile``** of the whole ``log_prob`` (training) and of ``from_latent`` (transfer):
   compile seconds, then compiled against eager, interleaved.

Setting: the ``mosi`` preset's flows (``TemporalFlow(32, 32 steps, hidden 64, kernel 3)``, the
default spline design), batch ``--batch`` per modality, T = 50. Each figure is the median over
``--rounds`` interleaved rounds (the two sides alternate within a round). Ratios > 1: the
lever is faster.

Run::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_speed_levers.py --threads 1 --rounds 7
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/probe_speed_levers.py --threads 1 --no-compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def _median_pair(a: Callable[[], None], b: Callable[[], None], rounds: int) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b`` over ``rounds`` rounds, alternating which goes first."""
    ta, tb = [], []
    for r in range(rounds):
        for fn, out in ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta)):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def grouped_upper_bound(batch: int, rounds: int) -> list[str]:
    """Three flows on ``batch`` each against one flow on ``3 * batch``: training (log_prob + backward)
    and transfer (``from_latent`` under ``no_grad``)."""
    from flowtransfer.flows import TemporalFlow

    torch.manual_seed(0)
    flows = [TemporalFlow(32, 32, 64, 3, 2) for _ in range(3)]
    xs = [torch.randn(batch, 32, 50) for _ in range(3)]
    y = torch.randint(0, 2, (batch,))
    x3, y3 = torch.cat(xs), y.repeat(3)
    for f in flows:
        f.train()
        f.log_prob(xs[0], y)  # ActNorm's data-dependent initialisation

    def three_train() -> None:
        sum(-f.log_prob(x, y).mean() for f, x in zip(flows, xs)).backward()

    def one_train() -> None:
        (-flows[0].log_prob(x3, y3).mean()).backward()

    def three_inverse() -> None:
        with torch.no_grad():
            for f, x in zip(flows, xs):
                f.from_latent(x)

    def one_inverse() -> None:
        with torch.no_grad():
            flows[0].from_latent(x3)

    lines = []
    for name, a, b in (("train (log_prob + backward)", three_train, one_train),
                       ("transfer (from_latent)", three_inverse, one_inverse)):
        a(), b()  # warm-up
        t3, t1 = _median_pair(a, b, rounds)
        lines.append(f"| {name} | {1e3 * t3:.0f} | {1e3 * t1:.0f} | {t3 / t1:.2f}x |")
    return ["| pass | 3 flows x B ms | 1 flow x 3B ms | upper bound of grouping |", "|---|---:|---:|---:|", *lines]


def compiled_against_eager(batch: int, rounds: int) -> list[str]:
    """``torch.compile`` of ``log_prob`` (a training step: loss, backward, Adam) and of ``from_latent``."""
    from flowtransfer.flows import TemporalFlow

    torch.manual_seed(0)
    flow = TemporalFlow(32, 32, 64, 3, 7)
    x, y = torch.randn(batch, 32, 50), torch.randint(0, 7, (batch,))
    flow.train()
    flow.log_prob(x, y)
    opt = torch.optim.Adam(flow.parameters(), 1e-4)
    compiled_lp = torch.compile(flow.log_prob)

    def step(log_prob: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            loss = -log_prob(x, y).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return run

    t = time.perf_counter()
    step(compiled_lp)()
    compile_train = time.perf_counter() - t
    eager_t, comp_t = _median_pair(step(flow.log_prob), step(compiled_lp), rounds)
    flow.eval()
    compiled_inv = torch.compile(flow.from_latent)
    z = torch.randn(batch, 32, 50)
    with torch.no_grad():
        t = time.perf_counter()
        compiled_inv(z)
        compile_inv = time.perf_counter() - t
        eager_i, comp_i = _median_pair(lambda: flow.from_latent(z), lambda: compiled_inv(z), rounds)
    return ["| pass | compile s | eager ms | compiled ms | compiled speed-up |", "|---|---:|---:|---:|---:|",
            f"| train step | {compile_train:.0f} | {1e3 * eager_t:.0f} | {1e3 * comp_t:.0f} | {eager_t / comp_t:.2f}x |",
            f"| transfer (from_latent) | {compile_inv:.0f} | {1e3 * eager_i:.0f} | {1e3 * comp_i:.0f} | "
            f"{eager_i / comp_i:.2f}x |"]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--batch", type=int, default=32, help="samples per modality")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile probe (minutes of compiling)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, threads {args.threads}, batch {args.batch}, rounds {args.rounds}, "
          f"1-min load average {load:.1f} on {os.cpu_count()} cpus\n")
    print("\n".join(grouped_upper_bound(args.batch, args.rounds)) + "\n", flush=True)
    if not args.no_compile:
        print("\n".join(compiled_against_eager(args.batch, args.rounds)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
