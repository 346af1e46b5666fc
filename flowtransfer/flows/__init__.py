"""The flow core: invertible layers on ``(batch, channels, time)``, a class-conditional prior, the
:class:`TemporalFlow`, and checks of invertibility and log-determinants.

Every layer is an nflows ``Transform`` (``forward``: data to noise, ``inverse``: noise to data, both
returning ``(outputs, logabsdet)`` with a ``(B,)`` log-det), so it composes with nflows' own.
"""

from __future__ import annotations

from .actnorm import ActNorm
from .checks import (
    InvertibilityReport,
    LogdetReport,
    StabilityReport,
    check_inverse_stability,
    check_invertibility,
    check_logdet,
)
from .conditioner import ConditionerFactory, TemporalConditioner, temporal_conditioner
from .coupling import (
    COUPLINGS,
    SCALE_FUNCTIONS,
    AffineCoupling,
    Coupling,
    PointwiseConv1d,
    build_coupling,
    coupling_network,
    register_coupling,
)
from .linear import ChannelFlip, ChannelPermutation, InvertibleConv1x1
from .prior import ClassConditionalGaussian
from .spline import RationalQuadraticCoupling, rational_quadratic_spline
from .temporal_flow import ACTNORM_PLACEMENTS, MIXINGS, FlowStep, TemporalFlow, resolve_coupling

__all__ = [
    "ACTNORM_PLACEMENTS",
    "COUPLINGS",
    "ActNorm",
    "AffineCoupling",
    "ConditionerFactory",
    "Coupling",
    "RationalQuadraticCoupling",
    "TemporalConditioner",
    "StabilityReport",
    "build_coupling",
    "check_inverse_stability",
    "rational_quadratic_spline",
    "register_coupling",
    "resolve_coupling",
    "temporal_conditioner",
    "ChannelFlip",
    "ChannelPermutation",
    "ClassConditionalGaussian",
    "FlowStep",
    "InvertibilityReport",
    "InvertibleConv1x1",
    "LogdetReport",
    "MIXINGS",
    "PointwiseConv1d",
    "SCALE_FUNCTIONS",
    "TemporalFlow",
    "check_invertibility",
    "check_logdet",
    "coupling_network",
]
