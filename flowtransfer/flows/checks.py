r"""Checks to run on any flow or transform, trained or not: round trip, log-determinant, and the
stability of the inverse over the prior's range (:func:`check_inverse_stability`).

Both accept a :class:`~flowtransfer.flows.TemporalFlow`, any nflows ``Transform`` (``forward`` and
``inverse`` returning ``(outputs, logabsdet)``), or an nflows ``Flow`` (its transform is checked).

Example:
    >>> flow = TemporalFlow(4, num_layers=2)
    >>> check_invertibility(flow, torch.randn(8, 4, 20)).passed
    True
    >>> check_logdet(flow, torch.randn(2, 4, 3)).passed
    True
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = [
    "InvertibilityReport",
    "LogdetReport",
    "StabilityReport",
    "check_inverse_stability",
    "check_invertibility",
    "check_logdet",
]


@dataclass
class InvertibilityReport:
    """Result of :func:`check_invertibility`.

    Attributes:
        max_abs_error: :math:`\\max |f^{-1}(f(x)) - x|`.
        max_rel_error: ``max_abs_error`` divided by :math:`\\max |x|` (error relative to the scale
            of the data).
        tolerance: the absolute tolerance ``atol`` used.
        rtol: the relative tolerance; an element passes if ``|err| <= atol + rtol * |x|``.
        max_logdet_sum: :math:`\\max_b |\\log|\\det J_f| + \\log|\\det J_{f^{-1}}||` (0 exactly
            for a consistent transform).
        logdet_tolerance: bound on ``max_logdet_sum``: ``atol * dims + rtol * max |log-det|``
            (``atol`` per dimension of a sample, to allow float rounding across many layers).
        passed: all elements within tolerance and the log-dets consistent.
    """

    max_abs_error: float
    max_rel_error: float
    tolerance: float
    rtol: float
    max_logdet_sum: float
    logdet_tolerance: float
    passed: bool

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (
            f"invertibility {verdict}: max abs error {self.max_abs_error:.3e} "
            f"(atol {self.tolerance:.1e}, rtol {self.rtol:.1e}), max rel error {self.max_rel_error:.3e}, "
            f"|logdet fwd + inv| {self.max_logdet_sum:.3e} (tol {self.logdet_tolerance:.1e})"
        )


@dataclass
class LogdetReport:
    """Result of :func:`check_logdet`.

    Attributes:
        max_abs_error: :math:`\\max_b |\\text{logdet}_b - \\log|\\det J_b||` against autograd.
        tolerance: the absolute tolerance ``atol``.
        passed: ``max_abs_error <= tolerance``.
        logdet: the transform's own log-dets, per sample (float64).
        reference: :math:`\\log|\\det J|` from ``torch.autograd.functional.jacobian``, per sample.
        dims: dimensions per sample (size of each Jacobian).
    """

    max_abs_error: float
    tolerance: float
    passed: bool
    logdet: list[float]
    reference: list[float]
    dims: int

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        return (
            f"log-det {verdict}: max abs error {self.max_abs_error:.3e} vs autograd Jacobian "
            f"(atol {self.tolerance:.1e}; {len(self.logdet)} samples of {self.dims} dims, float64)"
        )


def _as_transform(flow: nn.Module) -> nn.Module:
    """The object whose ``forward``/``inverse`` give ``(outputs, logabsdet)``."""
    from nflows.flows.base import Flow

    from .temporal_flow import TemporalFlow

    if isinstance(flow, TemporalFlow):
        return flow
    if isinstance(flow, Flow):
        return flow._transform
    if not (callable(getattr(flow, "forward", None)) and callable(getattr(flow, "inverse", None))):
        raise TypeError(f"expected a flow or transform with forward and inverse, got {type(flow).__name__}")
    return flow


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's own mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _check_batch(x: Tensor, who: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"{who}: x must be batched, shape (batch, ...), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{who}: x contains NaN or inf")


def check_invertibility(
    flow: nn.Module,
    x: Tensor,
    context: Tensor | None = None,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> InvertibilityReport:
    """Round-trip ``x -> f(x) -> f^{-1}(f(x))`` and compare with ``x``.

    Runs in eval mode under ``no_grad`` (each submodule's mode is restored afterwards) and at the
    dtype of ``x``. Passes when every element satisfies ``|err| <= atol + rtol * |x|`` and the
    forward and inverse log-dets cancel.

    Arguments:
        flow: a TemporalFlow, an nflows Transform or an nflows Flow.
        x: a batch of inputs, e.g. ``(B, C, T)``.
        context: conditioning input passed to both directions.
    """
    _check_batch(x, "check_invertibility")
    transform = _as_transform(flow)
    with _eval_mode(flow), torch.no_grad():
        z, ld_fwd = transform.forward(x, context)
        x_rec, ld_inv = transform.inverse(z, context)
    if x_rec.shape != x.shape:
        raise ValueError(f"inverse returned shape {tuple(x_rec.shape)}, input had {tuple(x.shape)}")
    err = (x_rec - x).abs()
    max_abs = float(err.max()) if torch.isfinite(err).all() else float("inf")
    scale = float(x.abs().max())
    max_rel = max_abs / scale if scale > 0 else max_abs
    ok_elems = bool((err <= atol + rtol * x.abs()).all())
    ld_sum = (ld_fwd + ld_inv).abs()
    max_ld = float(ld_sum.max()) if torch.isfinite(ld_sum).all() else float("inf")
    dims = x[0].numel()
    ld_tol = atol * dims + rtol * float(ld_fwd.abs().max()) if torch.isfinite(ld_fwd).all() else 0.0
    return InvertibilityReport(
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        tolerance=float(atol),
        rtol=float(rtol),
        max_logdet_sum=max_ld,
        logdet_tolerance=float(ld_tol),
        passed=ok_elems and max_ld <= ld_tol,
    )


def check_logdet(
    flow: nn.Module,
    x: Tensor,
    context: Tensor | None = None,
    atol: float = 1e-6,
    max_dims: int = 512,
) -> LogdetReport:
    """Compare the flow's log-det with :math:`\\log|\\det J|` of the autograd Jacobian, in float64.

    A float64 copy of ``flow`` (the original is untouched) maps each sample of ``x`` separately; its
    Jacobian comes from ``torch.autograd.functional.jacobian`` and ``torch.linalg.slogdet``. The copy
    runs in eval mode, so an uninitialised ActNorm stays as it is. Use a small input: at most
    ``max_dims`` dimensions per sample (e.g. 4 channels x 3 steps), a few samples.

    Arguments:
        flow: a TemporalFlow, an nflows Transform or an nflows Flow.
        x: a small batch, e.g. ``(B, C, T)``.
        context: conditioning input (per sample rows are used).
        atol: absolute tolerance on the log-det difference.
        max_dims: refuse inputs with more dimensions per sample than this.
    """
    _check_batch(x, "check_logdet")
    dims = x[0].numel()
    if dims > max_dims:
        raise ValueError(
            f"check_logdet: each sample has {dims} dimensions (shape {tuple(x.shape[1:])}), more than "
            f"max_dims={max_dims}; the Jacobian is dims x dims, so pass a small slice "
            f"(e.g. x[:4, :, :3]) or raise max_dims"
        )
    work = copy.deepcopy(flow).double()
    transform = _as_transform(work)
    x64 = x.detach().double()
    ctx64 = None
    if context is not None:
        ctx64 = context.detach().double() if context.dtype.is_floating_point else context.detach()
    work.eval()
    mine, ref = [], []
    for b in range(x64.shape[0]):
        xb = x64[b : b + 1]
        cb = None if ctx64 is None else ctx64[b : b + 1]
        with torch.no_grad():
            out, ld = transform.forward(xb, cb)
        if out.numel() != xb.numel():
            raise ValueError(f"the map changes dimension ({xb.numel()} -> {out.numel()}); no square Jacobian")

        def f(v: Tensor, cb=cb) -> Tensor:
            return transform.forward(v.reshape(xb.shape), cb)[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(f, xb.reshape(-1))
        sign, logabs = torch.linalg.slogdet(jac)
        mine.append(float(ld.reshape(-1)[0]))
        ref.append(float(logabs) if float(sign) != 0 else float("-inf"))
    diffs = [abs(a - r) if abs(r) != float("inf") else float("inf") for a, r in zip(mine, ref)]
    max_err = max(diffs)
    return LogdetReport(
        max_abs_error=max_err,
        tolerance=float(atol),
        passed=max_err <= atol,
        logdet=mine,
        reference=ref,
        dims=dims,
    )


@dataclass
class StabilityReport:
    r"""Result of :func:`check_inverse_stability`.

    Attributes:
        worst_abs: the largest :math:`|f^{-1}(z)|` found over the searched latents (``inf`` if an
            output was non-finite).
        worst_class: the class of the box in which it was found (``None`` for an unconditional prior).
        worst_latent: that latent, ``(C, T)``.
        data_max: :math:`\max|x|` of the given data (``None`` without data).
        ratio: ``worst_abs / data_max`` (``None`` without data).
        max_ratio: the ratio above which the check fails.
        certificate: the design's bound :meth:`~flowtransfer.flows.TemporalFlow.inverse_bound`
            (largest channel; ``inf`` when the design gives none; ``None`` for other flows).
        k: the box's half-width in prior standard deviations.
        starts, steps: random starts and gradient-ascent steps of the search.
        finite: every searched output was finite.
        passed: finite, within ``max_ratio`` of the data (when data is given) and within the
            certificate (when one is finite).
    """

    worst_abs: float
    worst_class: int | None
    worst_latent: Tensor
    data_max: float | None
    ratio: float | None
    max_ratio: float
    certificate: float | None
    k: float
    starts: int
    steps: int
    finite: bool
    passed: bool

    def __str__(self) -> str:
        verdict = "PASSED" if self.passed else "FAILED"
        data = "" if self.data_max is None else (
            f" = {self.ratio:.3g}x the data's largest |value| {self.data_max:.4g} (limit {self.max_ratio:g}x)")
        cert = "" if self.certificate is None else f"; design bound {self.certificate:.4g}"
        return (f"inverse stability {verdict}: largest |inverse(z)| over the prior's {self.k:g}-sigma box "
                f"{self.worst_abs:.4g}{data}{cert} ({self.starts} starts x {self.steps} ascent steps)")


def check_inverse_stability(
    flow: nn.Module,
    data: Tensor | None = None,
    *,
    k: float = 6.0,
    length: int | None = None,
    starts: int = 64,
    steps: int = 30,
    step_size: float = 0.05,
    max_ratio: float = 10.0,
    context: Tensor | None = None,
    seed: int = 0,
) -> StabilityReport:
    r"""Search the prior's ``k``-sigma box for the latent whose inverse output is largest.

    Transfer runs a flow backwards on latents from *another* modality's flow, i.e. anywhere the
    prior puts mass, not only where this flow's own data lands: a round trip on data can pass while
    the inverse over the prior's range explodes. This check starts from ``starts`` latents in the
    box :math:`|z_{c,t} - \mu_{y,c}| \le k\sigma_{y,c}` (classes ``y`` spread over the starts; half at
    random vertices of the box, half uniform inside), then climbs :math:`\max |f^{-1}(z)|` by
    projected sign-gradient ascent (``steps`` steps of ``step_size`` times the box's half-width,
    clipped back into the box), and reports the largest output met on the way.

    Arguments:
        flow: a :class:`~flowtransfer.flows.TemporalFlow` (its ``prior`` defines the box).
        data: real data ``(B, C, T)`` setting the scale (``max |x|``) and, by default, the length.
        k: half-width of the box in prior standard deviations.
        length: time steps of the searched latents (default: the data's, else 1).
        starts, steps, step_size: the search (cost: ``starts * (steps + 1)`` inverse passes).
        max_ratio: the check fails when the worst output exceeds ``max_ratio * max|data|``.
        context: coupling context ``(starts, cond, T)`` for conditional flows.
        seed: seed of the starting points (the flow's RNG state is untouched).

    Runs in eval mode in the flow's dtype; the flow's parameters get no gradients.
    """
    from .temporal_flow import TemporalFlow

    if not isinstance(flow, TemporalFlow):
        raise TypeError(f"check_inverse_stability needs a TemporalFlow (its prior defines the box), got {type(flow).__name__}")
    if not (k > 0 and starts >= 1 and steps >= 0 and step_size > 0 and max_ratio > 0):
        raise ValueError("check_inverse_stability: k, starts, step_size and max_ratio must be positive, steps >= 0")
    if data is not None:
        _check_batch(data, "check_inverse_stability")
    t = int(length) if length is not None else (int(data.shape[-1]) if data is not None else 1)
    prior = flow.prior
    dtype, device = prior.loc.dtype, prior.loc.device
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    c = flow.channels
    classes = None if prior.num_classes is None else torch.arange(starts) % prior.num_classes
    with torch.no_grad():
        mean, log_std = prior.params(None if classes is None else classes.to(device), starts)
        half = (k * torch.exp(log_std)).unsqueeze(-1).expand(starts, c, t)
        centre = mean.unsqueeze(-1).expand(starts, c, t)
        vertices = torch.randint(0, 2, (starts, c, t), generator=gen).to(dtype) * 2 - 1
        inside = torch.rand(starts, c, t, generator=gen).to(dtype) * 2 - 1
        u = torch.where(torch.arange(starts)[:, None, None] % 2 == 0, vertices, inside).to(device)
    worst, worst_i, worst_z, finite = -1.0, 0, None, True
    params = [p for p in flow.parameters()]
    flags = [p.requires_grad for p in params]
    with _eval_mode(flow):
        try:
            for p in params:
                p.requires_grad_(False)
            for step in range(steps + 1):
                z = (centre + half * u).detach().requires_grad_(steps > step)
                x = flow.inverse(z, context)[0]
                per = x.detach().abs().flatten(1).amax(1)
                bad = ~torch.isfinite(per)
                if bool(bad.any()):
                    finite = False
                    per = torch.where(bad, torch.full_like(per, float("inf")), per)
                best = int(per.argmax())
                if float(per[best]) > worst:
                    worst, worst_i, worst_z = float(per[best]), best, z[best].detach().clone()
                if step == steps:
                    break
                score = torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x)).flatten(1).amax(1).sum()
                (grad,) = torch.autograd.grad(score, z)
                with torch.no_grad():
                    u = (u + step_size * torch.sign(torch.nan_to_num(grad))).clamp(-1.0, 1.0)
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
    data_max = None if data is None else float(data.detach().abs().max())
    ratio = None if data_max is None else (worst / data_max if data_max > 0 else float("inf"))
    cert = float(flow.inverse_bound(k).max())
    passed = finite and (ratio is None or ratio <= max_ratio) and (not math.isfinite(cert) or worst <= cert * (1 + 1e-4) + 1e-6)
    return StabilityReport(
        worst_abs=worst, worst_class=None if classes is None else int(classes[worst_i]),
        worst_latent=worst_z, data_max=data_max, ratio=ratio, max_ratio=float(max_ratio), certificate=cert,
        k=float(k), starts=int(starts), steps=int(steps), finite=finite, passed=bool(passed),
    )
