"""Speed and memory of the flow core against the same architecture built from nflows (and zuko).

Setting (issue 2): batch 32, 32 channels, T = 50, 32 flow steps (ActNorm -> LU 1x1 conv -> affine
coupling with a Conv1d(k=3) -> 1x1 -> 1x1 network, hidden 64), a class-conditional diagonal Gaussian
prior with 7 classes, CPU, ``torch.set_num_threads(2)``.

Figures, per implementation:
- ``log_prob``: one ``log_prob(x, y)`` under ``no_grad``, eval mode;
- ``inverse``: one latent-to-data pass under ``no_grad``, eval mode;
- ``train step``: ``log_prob`` -> bits/dim loss -> ``backward`` -> ``Adam.step``, train mode;
- ``peak MB``: the increase of the process's peak resident set size (``VmHWM``) caused by 3
  training steps, measured in a fresh subprocess per implementation after the model and data are
  built (so it counts activations, gradients and optimiser state, not the Python/torch baseline).

Timings are medians over rounds in which the implementations alternate (so drifting machine load
hits all alike); ratios are other / flowtransfer (> 1 means flowtransfer is faster).

nflows carries ``(B, C, T, 1)`` tensors: its ``ActNorm``, ``OneByOneConvolution`` and
``AffineCouplingTransform`` with ``Conv2d`` networks of kernel ``(3, 1)``; its prior is
``ConditionalDiagonalNormal`` with a per-class embedding broadcast over time. nflows' coupling uses
``sigmoid(h + 2) + 1e-3`` as scale, so flowtransfer is timed with ``scale="sigmoid"`` (and its
default ``"softclamp"`` as a second row).

Run:  .venv/bin/python benchmarks/bench_flows.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

B, C, T, LAYERS, HIDDEN, K, CLASSES = 32, 32, 50, 32, 64, 3, 7


# ---------------------------------------------------------------------------- implementations
def build_flowtransfer(scale: str = "sigmoid"):
    from flowtransfer.flows import TemporalFlow

    flow = TemporalFlow(C, LAYERS, HIDDEN, K, num_classes=CLASSES, scale=scale)

    def log_prob(x, y):
        return flow.log_prob(x, y)

    def inverse(z):
        return flow.inverse(z)[0]

    return flow, log_prob, inverse, lambda x: x


class _ClassParams(nn.Module):
    """One-hot class -> (means, log-stds) for every (channel, time) of a (C, T, 1) latent."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(CLASSES, 2, C))

    def forward(self, onehot):
        p = onehot @ self.table.reshape(CLASSES, -1)  # (B, 2C)
        p = p.reshape(-1, 2, C, 1, 1).expand(-1, -1, -1, T, 1)
        return p.reshape(onehot.shape[0], -1)


class _ContextFree(nn.Sequential):
    """nflows calls its coupling networks as ``net(x, context)``."""

    def forward(self, x, context=None):
        return super().forward(x)


def build_nflows():
    from nflows.distributions.normal import ConditionalDiagonalNormal
    from nflows.flows.base import Flow
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.conv import OneByOneConvolution
    from nflows.transforms.coupling import AffineCouplingTransform
    from nflows.transforms.normalization import ActNorm

    def net(cin, cout):
        last = nn.Conv2d(HIDDEN, cout, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return _ContextFree(
            nn.Conv2d(cin, HIDDEN, (K, 1), padding=(K // 2, 0)), nn.ReLU(),
            nn.Conv2d(HIDDEN, HIDDEN, 1), nn.ReLU(), last,
        )

    mask = torch.ones(C)
    mask[: C // 2] = -1  # -1: identity features, +1: transformed
    steps = []
    for _ in range(LAYERS):
        steps += [ActNorm(C), OneByOneConvolution(C), AffineCouplingTransform(mask, net)]
    flow = Flow(CompositeTransform(steps), ConditionalDiagonalNormal([C, T, 1], _ClassParams()))
    eye = torch.eye(CLASSES)

    def log_prob(x, y):
        return flow.log_prob(x, eye[y])

    def inverse(z):
        return flow._transform.inverse(z)[0]

    return flow, log_prob, inverse, lambda x: x.unsqueeze(-1)


IMPLS = {
    "flowtransfer": lambda: build_flowtransfer("sigmoid"),
    "flowtransfer-softclamp": lambda: build_flowtransfer("softclamp"),
    "nflows": build_nflows,
}


def prepare(name):
    torch.manual_seed(0)
    flow, log_prob, inverse, shape = IMPLS[name]()
    x = shape(torch.randn(B, C, T))
    y = torch.randint(CLASSES, (B,))
    flow.train()
    with torch.no_grad():
        log_prob(x, y)  # data-dependent ActNorm init
        for p in flow.parameters():
            p.add_(0.01 * torch.randn_like(p))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = -log_prob(x, y).mean() / (C * T * 0.6931471805599453)
        loss.backward()
        opt.step()

    def run_log_prob():
        flow.eval()
        with torch.no_grad():
            log_prob(x, y)

    def run_inverse():
        flow.eval()
        with torch.no_grad():
            inverse(x)

    def run_step():
        flow.train()
        step()

    return {"log_prob": run_log_prob, "inverse": run_inverse, "train step": run_step}


def _peak_rss_mb() -> float:
    """This process's peak resident set size (``VmHWM``; unlike ``ru_maxrss`` it is not inherited
    from the parent across ``exec``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def peak_memory_child(name):
    torch.set_num_threads(2)
    fns = prepare(name)
    before = _peak_rss_mb()
    for _ in range(3):
        fns["train step"]()
    print(json.dumps({"peak_mb": _peak_rss_mb() - before}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--only", default=",".join(IMPLS))
    ap.add_argument("--_memory_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._memory_child:
        return peak_memory_child(args._memory_child)
    torch.set_num_threads(2)
    names = args.only.split(",")
    mem = {}
    for n in names:  # one fresh subprocess each, before the parent grows
        out = subprocess.run([sys.executable, __file__, "--_memory_child", n], capture_output=True, text=True)
        mem[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"] if out.returncode == 0 else float("nan")
    fns = {n: prepare(n) for n in names}
    figures = ["log_prob", "inverse", "train step"]
    times = {n: {f: [] for f in figures} for n in names}
    for n in names:  # warm-up
        for f in figures:
            fns[n][f]()
    for _ in range(args.rounds):
        for f in figures:
            for n in names:  # alternate implementations within each round
                t0 = time.perf_counter()
                fns[n][f]()
                times[n][f].append(time.perf_counter() - t0)
    med = {n: {f: 1e3 * statistics.median(times[n][f]) for f in figures} for n in names}
    print(f"B={B} C={C} T={T} steps={LAYERS} hidden={HIDDEN} kernel={K} classes={CLASSES}, "
          f"CPU threads={torch.get_num_threads()}, torch {torch.__version__}, {args.rounds} alternating rounds")
    head = f"{'implementation':<24}" + "".join(f"{f + ' ms':>15}" for f in figures) + f"{'peak MB':>10}"
    print(head)
    print("-" * len(head))
    for n in names:
        print(f"{n:<24}" + "".join(f"{med[n][f]:>15.1f}" for f in figures) + f"{mem[n]:>10.1f}")
    ref = names[0]
    print(f"\nratios other / {ref} (> 1: {ref} faster / smaller)")
    for n in names[1:]:
        print(f"{n:<24}" + "".join(f"{med[n][f] / med[ref][f]:>15.2f}" for f in figures)
              + f"{mem[n] / mem[ref] if mem[ref] else float('nan'):>10.2f}")


if __name__ == "__main__":
    main()
