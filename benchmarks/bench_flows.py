r"""Speed and memory of flowtransfer's flow designs against the same architectures built from nflows,
FrEIA, normflows and zuko (issue 10, "Speed").

Setting: batch 32, 32 channels, T = 50, 32 flow steps, conditioners of hidden width 64 (two hidden
layers), a class-conditional diagonal Gaussian prior with 7 classes, CPU, on ``--threads`` threads
(default: 1 and 2, reported one after the other).

Figures, per implementation:

- ``log_prob``: one ``log_prob(x, y)`` under ``no_grad``, eval mode;
- ``inverse``: one latent-to-data pass under ``no_grad``, eval mode, through each library's
  default latent-to-data call (the log-det of the inverse is computed wherever that call computes
  it; flowtransfer's ``from_latent``, what a transfer runs, computes none);
- ``train step``: ``log_prob`` -> bits/dim loss -> ``backward`` -> ``Adam.step`` (lr 1e-4), train
  mode;
- ``peak MB``: the increase of the process's peak resident set size (``VmHWM``) caused by 3
  training steps, measured in a fresh subprocess per implementation (and thread count) after the
  model and data are built, so it counts activations, gradients and optimiser state, not the
  Python/torch baseline.

Timings are wall-clock medians over ``--rounds`` rounds; ``IQR %`` is each row's largest
interquartile range over its three figures, in % of the median (a noise gauge). Within a round every figure is taken for
every implementation in turn, and the order of the implementations rotates from round to round,
so drifting machine load hits all of them alike. Before timing, each model gets one training-mode
``log_prob`` (data-dependent ActNorm initialisation where the library has one) and every trainable
parameter is perturbed by ``0.01 * randn`` (so zero-initialised last layers do not make couplings
trivially the identity). Ratios are implementation / reference: > 1 means the reference is faster.

Designs (flowtransfer)
    ``flowtransfer-spline``: the default ``TemporalFlow(C, 32, 64, 3, 7)``: one ActNorm at the
    data end, then 32 steps of a random channel permutation and a rational-quadratic spline coupling
    (4 bins, identity tails outside [-5, 5]). ``flowtransfer-affine``: ``coupling="affine",
    scale="softclamp", actnorm="every", mixing="conv1x1"`` (Glow steps: ActNorm -> LU 1x1 conv ->
    affine coupling, log-scale ``2 tanh(h / 2)``). ``flowtransfer-sigmoid``: the same with
    ``scale="sigmoid"`` (Glow's ``sigmoid(h + 2)``, the scale of nflows' and normflows'
    couplings). Every conditioner: ``Conv1d(k=3, same) -> ReLU -> 1x1 -> ReLU -> 1x1 (zero init)``,
    hidden 64, reading the first ``C // 2`` channels and predicting the other half's parameters.

How the libraries were made equal
    Temporal table (kernel 3 over time, data ``(B, C, T)``):

    - nflows: ``(B, C, T, 1)`` tensors; conditioners ``Conv2d((3, 1), same) -> ReLU -> 1x1 -> ReLU
      -> 1x1 (zero init)``, hidden 64. Spline: ``ActNorm`` once, then 32 x
      (``RandomPermutation`` over channels, ``PiecewiseRationalQuadraticCouplingTransform`` with
      ``tails="linear"``, ``tail_bound=5``, 4 bins, no unconditional transform). Affine: 32 x
      (``ActNorm``, ``OneByOneConvolution`` (LU), ``AffineCouplingTransform``, whose scale is
      ``sigmoid(h + 2) + 1e-3``). Prior: its ``ConditionalDiagonalNormal`` with a per-class table
      (one-hot @ table) of means and log-stds per channel, broadcast over time.
    - FrEIA 0.2: ``SequenceINN`` of 32 ``AllInOneBlock`` on ``(B, C, T)`` with a ``Conv1d(k=3) ->
      ReLU -> 1x1 -> ReLU -> 1x1 (zero init)`` subnet constructor, hidden 64, ``affine_clamping=2``
      (its soft clamp ``2 tanh(0.1 h)``). Each block is coupling -> learned per-channel global
      affine (its ActNorm, softplus scale, no data-dependent initialisation) -> a fixed random
      channel permutation applied as a dense C x C ``conv1d`` (the same arithmetic as a 1x1
      convolution, but not learned). FrEIA 0.2 has **no rational-quadratic spline coupling** (no
      ``RationalQuadraticSpline`` module), so there is no FrEIA spline row. FrEIA has no
      distributions: the prior is the per-class mean/log-std table below.
    - normflows: ``(B, C, T, 1)`` tensors; 32 x (``AffineCouplingBlock`` with ``scale_map="sigmoid"``,
      ``Invertible1x1Conv(use_lu=True)``, ``ActNorm``), i.e. its ``GlowBlock`` with the conditioner
      replaced by ``Conv2d((3, 1), same) -> ReLU -> 1x1 -> ReLU -> 1x1 (zero init)``, hidden 64
      (``GlowBlock`` itself hard-wires 3x3 / 1x1 / 3x3 kernels, which would do three times the
      work on a width-1 image and end in a temporal kernel). Prior: the per-class table below (its
      ``ClassCondDiagGaussian`` on ``(C, T, 1)`` would keep a separate mean per time step). Its
      spline coupling has no 1D-conv form: it is in the pointwise table.

    Pointwise table (kernel 1: each time step is one sample, ``(B*T, C)`` = 1600 vectors of 32;
    flowtransfer is timed at ``kernel_size=1`` on the same data as ``(B, C, T)``):

    - zuko (a vector library): transforms composed from ``zuko.flows.GeneralCouplingTransform``
      (a true coupling: zuko's ``NSF`` is a masked autoregressive flow, a coupling only with
      ``passes=2`` and then computed by a masked MLP over all C inputs, and its ``NICE`` /
      ``RealNVP`` chain couplings with alternating masks and no ActNorm, permutation or LU steps)
      with its ``MLP`` conditioner, hidden (64, 64), last layer zeroed.
      Spline: a learned per-channel ``MonotonicAffineTransform`` (ActNorm without data
      initialisation) once, then 32 x (``PermutationTransform``, coupling with
      ``MonotonicRQSTransform``, 4 bins, bound 5: identity tails). Affine: 32 x (per-channel
      affine, ``LULinearTransform``, coupling with ``MonotonicAffineTransform``, whose log-scale is
      soft-clipped at ``|log 1e-3|``). Prior: a zuko ``LazyDistribution`` returning ``DiagNormal``
      from the per-class table; each vector gets its sequence's class. Every zuko transform is
      rebuilt from its lazy module on each call, as zuko does.
    - normflows spline: 32 x (``Permute("shuffle")``, normflows' ``PiecewiseRationalQuadraticCoupling``
      with ``tails="linear"``, ``tail_bound=5``, 4 bins, ``apply_unconditional_transform=False``)
      after one ``ActNorm``, with an MLP ``Linear -> ReLU -> Linear -> ReLU -> Linear (zero init)``,
      hidden 64, wrapped in a ``normflows.flows.Flow`` exactly as ``CoupledRationalQuadraticSpline``
      wraps it (that wrapper hard-wires a ``ResidualNet`` conditioner, four linear layers with
      skips, and an extra unconditional spline on the identity half). Prior: normflows'
      ``ClassCondDiagGaussian(C, 7)`` (per class and channel: on vectors, shared over time).

    Per-class table (FrEIA, normflows temporal): a ``(7, 2, C)`` parameter of means and log-stds,
    gathered by label and broadcast over time, diagonal Gaussian log-density: the same computation
    as flowtransfer's ``ClassConditionalGaussian``.

Targets (issue 10), printed with PASS / FAIL from the measured medians, per thread count: the
spline flow within 1.5x of the affine flow (``flowtransfer-spline / flowtransfer-affine <= 1.5``
for log_prob, inverse and train step); flowtransfer's affine flow no slower than the fastest
library affine flow at equal architecture (ratio <= 1.00, temporal table: nflows, FrEIA,
normflows; pointwise table: zuko).

Every library import is optional: a missing library is reported as "not installed" and its rows
are skipped (``pip install -e '.[bench]'`` installs them all).

Run:  .venv/bin/python benchmarks/bench_flows.py [--rounds 15] [--threads 1,2] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
from einops import rearrange
from torch import Tensor, nn

__all__ = ["IMPLEMENTATIONS", "Built", "Implementation", "Setting", "TINY", "installed", "prepare"]

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

LOG_2PI = math.log(2.0 * math.pi)
FIGURES = ("log_prob", "inverse", "train step")
SPLINE_TARGET = 1.5  # spline / affine, every figure
AFFINE_TARGET = 1.0  # flowtransfer affine / fastest library affine, every figure


@dataclass(frozen=True)
class Setting:
    """Sizes of one benchmark: data ``(batch, channels, length)``, ``layers`` flow steps, conditioners
    of width ``hidden``, ``classes`` prior classes, splines of ``bins`` bins on ``[-tail_bound,
    tail_bound]``; ``kernel`` is the temporal kernel of the temporal table."""

    batch: int = 32
    channels: int = 32
    length: int = 50
    layers: int = 32
    hidden: int = 64
    kernel: int = 3
    classes: int = 7
    bins: int = 4
    tail_bound: float = 5.0


FULL = Setting()
#: the size of the smoke test (tests/test_bench_flows.py)
TINY = Setting(batch=2, channels=4, length=3, layers=2, hidden=8, kernel=3, classes=3)


@dataclass
class Built:
    """One implementation, built: its ``module`` (all parameters), ``log_prob(x, y) -> (B,)`` on
    data in its own layout, ``to_latent`` / ``from_latent`` in that layout, and ``layout`` that
    turns ``(B, C, T)`` data into it."""

    module: nn.Module
    log_prob: Callable[[Tensor, Tensor], Tensor]
    to_latent: Callable[[Tensor], Tensor]
    from_latent: Callable[[Tensor], Tensor]
    layout: Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Implementation:
    """A row of a table: ``library`` (its import name, or ``flowtransfer``), ``table``
    (``"temporal"`` or ``"pointwise"``), ``design`` (``"spline"`` or ``"affine"``) and ``build``."""

    name: str
    library: str
    table: str
    design: str
    build: Callable[[Setting], Built]


# ---------------------------------------------------------------------------- shared pieces
def _images(x: Tensor) -> Tensor:
    return x.unsqueeze(-1)  # (B, C, T) -> (B, C, T, 1)


def _vectors(x: Tensor) -> Tensor:
    return rearrange(x, "b c t -> (b t) c")


def _per_sequence(log_prob: Tensor, batch: int) -> Tensor:
    """Per-vector log-densities ``(B*T,)`` -> per-sequence ``(B,)``."""
    return log_prob.view(batch, -1).sum(1)


def _zero_last(net: nn.Sequential) -> nn.Sequential:
    nn.init.zeros_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def _conv_net(cin: int, cout: int, s: Setting, kernel: int, dims: int) -> nn.Sequential:
    """``Conv(kernel, same) -> ReLU -> 1x1 -> ReLU -> 1x1 (zero init)`` over time, as ``Conv1d`` on
    ``(B, C, T)`` (``dims=1``) or ``Conv2d`` with ``(kernel, 1)`` kernels on ``(B, C, T, 1)``."""
    if kernel % 2 != 1:
        raise ValueError("library conditioners use symmetric 'same' padding: odd kernels only")
    if dims == 1:
        first = nn.Conv1d(cin, s.hidden, kernel, padding=kernel // 2)
        conv = nn.Conv1d
    else:
        first = nn.Conv2d(cin, s.hidden, (kernel, 1), padding=(kernel // 2, 0))
        conv = nn.Conv2d
    return _zero_last(nn.Sequential(first, nn.ReLU(), conv(s.hidden, s.hidden, 1), nn.ReLU(), conv(s.hidden, cout, 1)))


def _mlp(cin: int, cout: int, s: Setting) -> nn.Sequential:
    return _zero_last(nn.Sequential(nn.Linear(cin, s.hidden), nn.ReLU(), nn.Linear(s.hidden, s.hidden), nn.ReLU(),
                                    nn.Linear(s.hidden, cout)))


class _ContextFree(nn.Module):
    """nflows and normflows call their coupling networks as ``net(x, context)``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.net(x)


class ClassTablePrior(nn.Module):
    """Per-class diagonal Gaussian: means and log-stds ``(classes, 2, C)`` gathered by label and
    broadcast over every axis after the channels. ``log_prob(z (N, C, ...), y (N,)) -> (N,)``."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(classes, 2, channels))

    def params(self, y: Tensor) -> tuple[Tensor, Tensor]:
        loc, log_std = self.table[y].unbind(1)  # (N, C) each
        return loc, log_std

    def log_prob(self, z: Tensor, y: Tensor) -> Tensor:
        loc, log_std = self.params(y)
        shape = (*loc.shape, *([1] * (z.dim() - 2)))
        loc, log_std = loc.view(shape), log_std.view(shape)
        u = (z - loc) * torch.exp(-log_std)
        return -(0.5 * u * u + log_std + 0.5 * LOG_2PI).flatten(1).sum(1)


# ---------------------------------------------------------------------------- flowtransfer
def build_flowtransfer(s: Setting, design: str, kernel: int) -> Built:
    from flowtransfer.flows import TemporalFlow

    if design == "spline":
        flow = TemporalFlow(s.channels, s.layers, s.hidden, kernel, s.classes)  # the default design
        coupling = flow.steps[0].coupling
        if (coupling.num_bins, coupling.tail_bound, flow.config["actnorm"], flow.config["mixing"]) != (
            s.bins, s.tail_bound, "input", "permutation"
        ):
            raise RuntimeError("TemporalFlow's default changed: update the library rows of bench_flows.py to match")
    else:
        scale = {"affine": "softclamp", "sigmoid": "sigmoid"}[design]
        flow = TemporalFlow(s.channels, s.layers, s.hidden, kernel, s.classes, coupling="affine", scale=scale,
                            actnorm="every", mixing="conv1x1")
    # the calls a transfer runs: to_latent / from_latent (neither computes a log-det)
    return Built(flow, flow.log_prob, flow.to_latent, flow.from_latent, lambda x: x)


# ---------------------------------------------------------------------------- nflows
class _NflowsClassParams(nn.Module):
    """One-hot class -> (means, log-stds) for every (channel, time) of a ``(C, T, 1)`` latent."""

    def __init__(self, s: Setting):
        super().__init__()
        self.s = s
        self.table = nn.Parameter(torch.zeros(s.classes, 2, s.channels))

    def forward(self, onehot: Tensor) -> Tensor:
        s = self.s
        p = onehot @ self.table.reshape(s.classes, -1)  # (B, 2C)
        p = p.reshape(-1, 2, s.channels, 1, 1).expand(-1, -1, -1, s.length, 1)
        return p.reshape(onehot.shape[0], -1)


def build_nflows(s: Setting, design: str) -> Built:
    from nflows.distributions.normal import ConditionalDiagonalNormal
    from nflows.flows.base import Flow
    from nflows.transforms.base import CompositeTransform
    from nflows.transforms.conv import OneByOneConvolution
    from nflows.transforms.coupling import AffineCouplingTransform, PiecewiseRationalQuadraticCouplingTransform
    from nflows.transforms.normalization import ActNorm
    from nflows.transforms.permutations import RandomPermutation

    def net(cin: int, cout: int) -> nn.Module:
        return _ContextFree(_conv_net(cin, cout, s, s.kernel, dims=2))

    mask = torch.ones(s.channels)
    mask[: s.channels // 2] = -1  # -1: identity features, +1: transformed
    if design == "spline":
        steps = [ActNorm(s.channels)]
        for _ in range(s.layers):
            steps += [RandomPermutation(s.channels, dim=1), PiecewiseRationalQuadraticCouplingTransform(
                mask, net, num_bins=s.bins, tails="linear", tail_bound=s.tail_bound)]
    else:
        steps = []
        for _ in range(s.layers):
            steps += [ActNorm(s.channels), OneByOneConvolution(s.channels), AffineCouplingTransform(mask, net)]
    flow = Flow(CompositeTransform(steps), ConditionalDiagonalNormal([s.channels, s.length, 1], _NflowsClassParams(s)))
    eye = torch.eye(s.classes)
    return Built(flow, lambda x, y: flow.log_prob(x, context=eye[y]), lambda x: flow._transform(x)[0],
                 lambda z: flow._transform.inverse(z)[0], _images)


# ---------------------------------------------------------------------------- FrEIA
class _FreiaFlow(nn.Module):
    def __init__(self, s: Setting):
        super().__init__()
        import FrEIA.framework as Ff
        import FrEIA.modules as Fm

        self.inn = Ff.SequenceINN(s.channels, s.length)
        for _ in range(s.layers):
            self.inn.append(Fm.AllInOneBlock, subnet_constructor=partial(_conv_net, s=s, kernel=s.kernel, dims=1),
                            affine_clamping=2.0)
        self.prior = ClassTablePrior(s.channels, s.classes)

    def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
        z, log_jac = self.inn(x)
        return self.prior.log_prob(z, y) + log_jac


def build_freia(s: Setting, design: str) -> Built:
    if design != "affine":
        raise ValueError("FrEIA 0.2 has no rational-quadratic spline coupling")
    flow = _FreiaFlow(s)
    return Built(flow, flow.log_prob, lambda x: flow.inn(x)[0], lambda z: flow.inn(z, rev=True)[0], lambda x: x)


# ---------------------------------------------------------------------------- normflows
def _normflows_model(q0: nn.Module, flows: list[nn.Module], layout: Callable[[Tensor], Tensor],
                     per_vector: bool, s: Setting) -> Built:
    """normflows' ``ClassCondFlow``; its ``flows`` run latent -> data (``flow.inverse`` is data -> latent)."""
    import normflows as nf

    model = nf.ClassCondFlow(q0, flows)

    def log_prob(x: Tensor, y: Tensor) -> Tensor:
        if per_vector:
            return _per_sequence(model.log_prob(x, y.repeat_interleave(s.length)), y.shape[0])
        return model.log_prob(x, y)

    def to_latent(x: Tensor) -> Tensor:
        for flow in reversed(model.flows):
            x, _ = flow.inverse(x)
        return x

    def from_latent(z: Tensor) -> Tensor:
        for flow in model.flows:
            z, _ = flow(z)
        return z

    return Built(model, log_prob, to_latent, from_latent, layout)


def build_normflows(s: Setting, design: str) -> Built:
    import normflows as nf

    c = s.channels
    if design == "affine":  # Glow blocks on (B, C, T, 1), temporal conditioner
        flows: list[nn.Module] = []
        for _ in range(s.layers):  # each triple is normflows' GlowBlock, latent -> data order
            net = _conv_net((c + 1) // 2, 2 * (c // 2), s, s.kernel, dims=2)
            flows += [nf.flows.AffineCouplingBlock(net, scale=True, scale_map="sigmoid", split_mode="channel"),
                      nf.flows.Invertible1x1Conv(c, use_lu=True), nf.flows.ActNorm((c, 1, 1))]
        return _normflows_model(ClassTablePrior(c, s.classes), flows, _images, False, s)

    from normflows.flows.neural_spline.coupling import PiecewiseRationalQuadraticCoupling

    class SplineCoupling(nf.flows.Flow):
        """As ``nf.flows.CoupledRationalQuadraticSpline``, around a coupling with an equal conditioner."""

        def __init__(self) -> None:
            super().__init__()
            mask = torch.ones(c)
            mask[: c // 2] = -1  # <= 0: identity features
            self.prqct = PiecewiseRationalQuadraticCoupling(
                mask, lambda cin, cout: _ContextFree(_mlp(cin, cout, s)), num_bins=s.bins, tails="linear",
                tail_bound=s.tail_bound, apply_unconditional_transform=False)

        def forward(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
            z, log_det = self.prqct.inverse(z, context)
            return z, log_det.view(-1)

        def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
            z, log_det = self.prqct(z, context)
            return z, log_det.view(-1)

    flows = []
    for _ in range(s.layers):  # latent -> data order: the data end (ActNorm) comes last
        flows += [SplineCoupling(), nf.flows.Permute(c, mode="shuffle")]
    flows.append(nf.flows.ActNorm((c,)))
    return _normflows_model(nf.distributions.ClassCondDiagGaussian(c, s.classes), flows, _vectors, True, s)


# ---------------------------------------------------------------------------- zuko
def build_zuko(s: Setting, design: str) -> Built:
    import zuko
    from zuko.flows import GeneralCouplingTransform
    from zuko.lazy import LazyComposedTransform, LazyDistribution, UnconditionalTransform
    from zuko.transforms import LULinearTransform, MonotonicAffineTransform, MonotonicRQSTransform, PermutationTransform

    c = s.channels
    mask = torch.arange(c) < c // 2  # True: the constant half x_a

    def actnorm() -> nn.Module:
        return UnconditionalTransform(MonotonicAffineTransform, torch.zeros(c), torch.zeros(c))

    def coupling(univariate: Callable, shapes: Sequence[tuple[int, ...]]) -> nn.Module:
        t = GeneralCouplingTransform(c, 0, mask, univariate=univariate, shapes=shapes, hidden_features=(s.hidden,) * 2)
        _zero_last(t.hyper)
        return t

    if design == "spline":
        rqs = partial(MonotonicRQSTransform, bound=s.tail_bound)
        transforms = [actnorm()]
        for _ in range(s.layers):
            transforms += [UnconditionalTransform(PermutationTransform, torch.randperm(c), buffer=True),
                           coupling(rqs, [(s.bins,), (s.bins,), (s.bins - 1,)])]
    else:
        transforms = []
        for _ in range(s.layers):
            transforms += [actnorm(), UnconditionalTransform(LULinearTransform, torch.eye(c)),
                           coupling(MonotonicAffineTransform, [(), ()])]

    class ClassPrior(LazyDistribution):
        def __init__(self) -> None:
            super().__init__()
            self.table = ClassTablePrior(c, s.classes)

        def forward(self, y: Tensor) -> torch.distributions.Distribution:
            loc, log_std = self.table.params(y)
            return zuko.distributions.DiagNormal(loc, torch.exp(log_std))

    class ZukoFlow(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transform = LazyComposedTransform(*transforms)
            self.base = ClassPrior()

        def log_prob(self, x: Tensor, y: Tensor) -> Tensor:
            dist = zuko.distributions.NormalizingFlow(self.transform(), self.base(y.repeat_interleave(s.length)))
            return _per_sequence(dist.log_prob(x), y.shape[0])

    flow = ZukoFlow()
    return Built(flow, flow.log_prob, lambda x: flow.transform()(x), lambda z: flow.transform().inv(z), _vectors)


# ---------------------------------------------------------------------------- the rows
def _impl(name: str, library: str, table: str, design: str, build: Callable[..., Built], **kw) -> Implementation:
    return Implementation(name, library, table, design, partial(build, design=design, **kw))


def _ft_build(s: Setting, design: str, pointwise: bool) -> Built:
    return build_flowtransfer(s, design, 1 if pointwise else s.kernel)


IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in [
        _impl("flowtransfer-spline", "flowtransfer", "temporal", "spline", _ft_build, pointwise=False),
        _impl("flowtransfer-affine", "flowtransfer", "temporal", "affine", _ft_build, pointwise=False),
        _impl("flowtransfer-sigmoid", "flowtransfer", "temporal", "sigmoid", _ft_build, pointwise=False),
        _impl("nflows-spline", "nflows", "temporal", "spline", build_nflows),
        _impl("nflows-affine", "nflows", "temporal", "affine", build_nflows),
        _impl("FrEIA-allinone", "FrEIA", "temporal", "affine", build_freia),
        _impl("normflows-affine", "normflows", "temporal", "affine", build_normflows),
        _impl("flowtransfer-spline-k1", "flowtransfer", "pointwise", "spline", _ft_build, pointwise=True),
        _impl("flowtransfer-affine-k1", "flowtransfer", "pointwise", "affine", _ft_build, pointwise=True),
        _impl("flowtransfer-sigmoid-k1", "flowtransfer", "pointwise", "sigmoid", _ft_build, pointwise=True),
        _impl("zuko-spline", "zuko", "pointwise", "spline", build_zuko),
        _impl("zuko-affine", "zuko", "pointwise", "affine", build_zuko),
        _impl("normflows-spline", "normflows", "pointwise", "spline", build_normflows),
    ]
}

#: per table: the flowtransfer default (spline) and affine rows the ratios refer to
REFERENCES = {"temporal": ("flowtransfer-spline", "flowtransfer-affine"),
              "pointwise": ("flowtransfer-spline-k1", "flowtransfer-affine-k1")}
NOT_AVAILABLE = ["FrEIA spline: FrEIA 0.2 has no rational-quadratic spline coupling (no RationalQuadraticSpline module)"]


def installed(library: str) -> bool:
    return library == "flowtransfer" or importlib.util.find_spec(library) is not None


def _version(library: str) -> str:
    dist = {"flowtransfer": "flowtransfer", "FrEIA": "FrEIA"}.get(library, library)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# ---------------------------------------------------------------------------- measuring
def initialise(built: Built, x: Tensor, y: Tensor, seed: int = 0) -> None:
    """One training-mode ``log_prob`` (data-dependent ActNorm initialisation), then every trainable
    floating-point parameter perturbed by ``0.01 * randn`` (fixed permutations stay permutations)."""
    built.module.train()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        built.log_prob(x, y)
        for p in built.module.parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(0.01 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def prepare(name: str, s: Setting = FULL) -> dict[str, tuple[Callable[[], None], Callable[[], None]]]:
    """Build ``name`` with its data and optimiser; per figure a ``(setup, run)`` pair: ``setup`` sets
    the module's mode (not timed), ``run`` is the timed work."""
    import numpy as np

    torch.manual_seed(0)
    np.random.seed(0)  # FrEIA draws its permutations from numpy
    built = IMPLEMENTATIONS[name].build(s)
    x = built.layout(torch.randn(s.batch, s.channels, s.length))
    z = built.layout(torch.randn(s.batch, s.channels, s.length))
    y = torch.randint(s.classes, (s.batch,))
    initialise(built, x, y)
    module = built.module
    opt = torch.optim.Adam(module.parameters(), lr=1e-4)
    dims = s.channels * s.length * math.log(2.0)

    def train() -> None:
        module.train()

    def evaluate() -> None:
        module.eval()

    def run_log_prob() -> None:
        with torch.no_grad():
            built.log_prob(x, y)

    def run_inverse() -> None:
        with torch.no_grad():
            built.from_latent(z)

    def run_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = -built.log_prob(x, y).mean() / dims
        loss.backward()
        opt.step()

    return {"log_prob": (evaluate, run_log_prob), "inverse": (evaluate, run_inverse), "train step": (train, run_step)}


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


def _memory_child(name: str, threads: int, s: Setting) -> None:
    torch.set_num_threads(threads)
    setup, step = prepare(name, s)["train step"]
    setup()
    before = _peak_rss_mb()
    for _ in range(3):
        step()
    print(json.dumps({"peak_mb": _peak_rss_mb() - before}))


def peak_memory(name: str, threads: int, tiny: bool) -> float:
    """``VmHWM`` growth over 3 training steps of ``name``, in a fresh subprocess (NaN if it fails)."""
    cmd = [sys.executable, __file__, "--_memory_child", name, "--threads", str(threads)] + (["--tiny"] if tiny else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(f"memory child {name} failed:\n{out.stderr[-2000:]}\n")
        return float("nan")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


def train_step_gflop(name: str, s: Setting) -> float:
    """Matrix arithmetic of one training step of ``name`` (forward + backward), in GFLOP, counted
    by ``torch.utils.flop_counter`` (products and convolutions only; elementwise work is not
    counted). A floor on the time any implementation of that architecture needs."""
    from torch.utils.flop_counter import FlopCounterMode

    setup, step = prepare(name, s)["train step"]
    setup()
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


def arithmetic_lines(names: list[str], s: Setting) -> list[str]:
    """One line per implementation: its training step's matrix GFLOP and the ratio to the
    flowtransfer affine flow of its table (what a time ratio cannot go below at equal efficiency)."""
    gflop = {n: train_step_gflop(n, s) for n in names}
    lines = ["matrix arithmetic of one training step (torch.utils.flop_counter: products and convolutions, "
             "forward + backward; elementwise work not counted)"]
    for n in names:
        ref = REFERENCES[IMPLEMENTATIONS[n].table][1]
        ratio = f"   {gflop[n] / gflop[ref]:.2f}x {ref}" if ref in gflop and n != ref and gflop[ref] else ""
        lines.append(f"{n:<26}{gflop[n]:>10.4g} GFLOP{ratio}")
    return lines


def time_rounds(names: list[str], fns: dict, rounds: int) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Median ms per implementation and figure over ``rounds`` interleaved rounds (one untimed
    warm-up round first; the implementations' order rotates by one each round), and per
    implementation the spread: the largest interquartile range over its figures, in % of the median
    (NaN under 2 rounds)."""
    times = {n: {f: [] for f in FIGURES} for n in names}
    for r in range(rounds + 1):
        order = names[r % len(names):] + names[: r % len(names)]
        for f in FIGURES:
            for n in order:
                setup, run = fns[n][f]
                setup()
                t0 = time.perf_counter()
                run()
                if r > 0:
                    times[n][f].append(time.perf_counter() - t0)
    med = {n: {f: 1e3 * statistics.median(times[n][f]) for f in FIGURES} for n in names}

    def iqr_percent(xs: list[float]) -> float:
        if len(xs) < 2:
            return float("nan")
        q1, _, q3 = statistics.quantiles(xs, n=4)
        return 100.0 * (q3 - q1) / statistics.median(xs)

    spread = {n: max(iqr_percent(times[n][f]) for f in FIGURES) for n in names}
    return med, spread


# ---------------------------------------------------------------------------- reporting
def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else float("nan")


def table_lines(table: str, names: list[str], med: dict, mem: dict, spread: dict) -> list[str]:
    lines = []
    head = f"{'implementation':<26}" + "".join(f"{f + ' ms':>15}" for f in FIGURES) + f"{'peak MB':>10}" + f"{'IQR %':>8}"
    lines += [head, "-" * len(head)]
    for n in names:
        lines.append(f"{n:<26}" + "".join(f"{med[n][f]:>15.1f}" for f in FIGURES) + f"{mem.get(n, float('nan')):>10.1f}"
                     + f"{spread.get(n, float('nan')):>8.0f}")
    for ref in REFERENCES[table]:
        if ref not in med:
            continue
        lines += ["", f"ratios / {ref} (> 1: {ref} faster / smaller)"]
        for n in names:
            if n != ref:
                lines.append(f"{n:<26}" + "".join(f"{_ratio(med[n][f], med[ref][f]):>15.2f}" for f in FIGURES)
                             + f"{_ratio(mem.get(n, float('nan')), mem.get(ref, float('nan'))):>10.2f}")
    return lines


def _verdict(label: str, ratios: dict[str, float], limit: float) -> list[str]:
    ok = all(r <= limit for r in ratios.values())
    parts = ", ".join(f"{f} {r:.2f}" for f, r in ratios.items())
    return [f"  {'PASS' if ok else 'FAIL'}  {label} (<= {limit:.2f}): {parts}"]


def target_lines(med: dict) -> list[str]:
    """The issue's targets from the measured medians of one thread count."""
    lines = ["targets (issue 10):"]
    for table, (spline, affine) in REFERENCES.items():
        suffix = "" if table == "temporal" else " [pointwise, not the issue's target]"
        if spline in med and affine in med:
            lines += _verdict(f"{spline} / {affine}{suffix}",
                              {f: _ratio(med[spline][f], med[affine][f]) for f in FIGURES}, SPLINE_TARGET)
    for table, (_, affine) in REFERENCES.items():
        libs = [n for n, impl in IMPLEMENTATIONS.items()
                if n in med and impl.table == table and impl.library != "flowtransfer" and impl.design == "affine"]
        for ours in [affine, affine.replace("affine", "sigmoid")]:
            if ours not in med or not libs:
                continue
            fastest = {f: min(libs, key=lambda n: med[n][f]) for f in FIGURES}
            ratios = {f"{f} vs {fastest[f]}": _ratio(med[ours][f], med[fastest[f]][f]) for f in FIGURES}
            note = "" if ours == affine else " [the sigmoid variant, informative]"
            lines += _verdict(f"{ours} / fastest library affine ({table}){note}", ratios, AFFINE_TARGET)
    return lines


def _equal_section() -> str:
    """The docstring's account of the designs and of how each library was made equal."""
    doc = __doc__ or ""
    start, end = doc.find("Designs (flowtransfer)"), doc.find("Targets (issue 10)")
    return doc[start:end].rstrip() if 0 <= start < end else "(docstring unavailable)"


def main(argv: Sequence[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, each reported (default 1,2)")
    ap.add_argument("--only", default=None, help="comma-separated implementation names (default: all installed)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "bench_flows.txt"),
                    help="where to write the report ('' or '-': nowhere)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--tiny", action="store_true", help="the smoke-test size (C 4, T 3, 2 steps), not the benchmark")
    ap.add_argument("--load-note", default=None, help="a line on the machine's load, written into the report")
    ap.add_argument("--_memory_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    with warnings.catch_warnings():
        # the libraries' own deprecation and initialisation warnings (torch.lu, unscaled softmax inputs)
        warnings.simplefilter("ignore", UserWarning)
        return _run(args, ap)


def _run(args: argparse.Namespace, ap: argparse.ArgumentParser) -> list[str]:
    s = TINY if args.tiny else FULL
    thread_counts = [int(t) for t in args.threads.split(",")]
    if args._memory_child:
        _memory_child(args._memory_child, thread_counts[0], s)
        return []

    wanted = args.only.split(",") if args.only else list(IMPLEMENTATIONS)
    unknown = sorted(set(wanted) - set(IMPLEMENTATIONS))
    if unknown:
        ap.error(f"unknown implementations {unknown}; choose from {list(IMPLEMENTATIONS)}")
    libraries = sorted({IMPLEMENTATIONS[n].library for n in IMPLEMENTATIONS} - {"flowtransfer"}, key=str.lower)
    missing = {lib for lib in libraries if not installed(lib)}
    names = [n for n in wanted if IMPLEMENTATIONS[n].library not in missing]

    out: list[str] = []

    def emit(line: str = "") -> None:
        print(line, flush=True)
        out.append(line)

    emit(f"bench_flows: B={s.batch} C={s.channels} T={s.length} steps={s.layers} hidden={s.hidden} "
         f"kernel={s.kernel} (temporal table) / 1 (pointwise table) classes={s.classes} "
         f"spline bins={s.bins} tail bound={s.tail_bound}")
    emit(f"torch {torch.__version__}, CPU, {os.cpu_count()} logical cores; {args.rounds} interleaved rounds "
         f"(+1 warm-up), medians; wall-clock ms")
    emit("libraries: " + ", ".join(
        f"{lib} {'not installed (rows skipped)' if lib in missing else _version(lib)}" for lib in libraries))
    for line in NOT_AVAILABLE:
        emit(f"not available: {line}")
    if args.load_note:
        emit(f"machine: {args.load_note}")
    emit("how each implementation was made equal: at the end of this report (and in the script's docstring)")

    emit()
    for line in arithmetic_lines(names, s):
        emit(line)
    for threads in thread_counts:
        torch.set_num_threads(threads)
        load0 = os.getloadavg()
        mem = {} if args.no_memory else {n: peak_memory(n, threads, args.tiny) for n in names}
        fns = {n: prepare(n, s) for n in names}
        med, spread = time_rounds(names, fns, args.rounds)
        load1 = os.getloadavg()
        emit()
        emit(f"=== {threads} thread(s); 1-min load average {load0[0]:.2f} before, {load1[0]:.2f} after "
             f"(on {os.cpu_count()} cores: > 0 means other jobs were running) ===")
        for table in ("temporal", "pointwise"):
            rows = [n for n in names if IMPLEMENTATIONS[n].table == table]
            if not rows:
                continue
            title = {"temporal": f"temporal table: (B, C, T), temporal kernel {s.kernel}",
                     "pointwise": f"pointwise table: (B*T, C) vectors / flowtransfer at kernel_size=1"}[table]
            emit()
            emit(title)
            for line in table_lines(table, rows, med, mem, spread):
                emit(line)
        emit()
        for line in target_lines(med):
            emit(line)
        busiest = max(load0[0], load1[0])
        if busiest > (os.cpu_count() or 1):
            emit(f"  caveat: the 1-min load average reached {busiest:.2f} on {os.cpu_count()} cores: other jobs "
                 "shared the cores, so these verdicts are indicative only (the issue asks for an idle machine); "
                 "see the IQR column")

    emit()
    emit("how each implementation was made equal (from the script's docstring):")
    for line in _equal_section().splitlines():
        emit(line)

    if args.out not in ("", "-"):
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(out) + "\n")
        print(f"\nwritten to {path}")
    return out


if __name__ == "__main__":
    main()
