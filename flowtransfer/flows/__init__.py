"""The flow core: invertible layers on ``(batch, channels, time)``, a class-conditional prior, the
:class:`TemporalFlow`, and checks of invertibility and log-determinants.

Every layer is an nflows ``Transform`` (``forward``: data to noise, ``inverse``: noise to data, both
returning ``(outputs, logabsdet)`` with a ``(B,)`` log-det), so it composes with nflows' own.
"""

from __future__ import annotations

from .actnorm import ActNorm
from .checks import InvertibilityReport, LogdetReport, check_invertibility, check_logdet
from .coupling import SCALE_FUNCTIONS, AffineCoupling, PointwiseConv1d, coupling_network
from .linear import ChannelFlip, ChannelPermutation, InvertibleConv1x1
from .prior import ClassConditionalGaussian
from .temporal_flow import MIXINGS, FlowStep, TemporalFlow

__all__ = [
    "ActNorm",
    "AffineCoupling",
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
