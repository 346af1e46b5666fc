"""flowtransfer: recover a missing modality from the ones at hand with normalizing flows.

Public entry points::

    import flowtransfer
    x_L = flowtransfer.transfer(x_A, src="A", dst="L")      # (batch, channels, time) in and out
    model = flowtransfer.load()                             # the shipped default CrossModalFlows
    flow = flowtransfer.TemporalFlow(channels=32, num_classes=7)
    flowtransfer.check_invertibility(flow, x).passed

Sub-packages: :mod:`flowtransfer.flows` (the flow core), :mod:`flowtransfer.data` (datasets,
loaders, missing-modality protocols), :mod:`flowtransfer.metrics`, :mod:`flowtransfer.models`
(fusion blocks), :mod:`flowtransfer.methods` (DiCMoR and the baselines),
:mod:`flowtransfer.training` (the trainer), :mod:`flowtransfer.experiment` (the main job).
"""

from __future__ import annotations

from flowtransfer.api import NonFiniteOutputError, default_model_path, load, transfer
from flowtransfer.crossmodal import CrossModalFlows, ModalityError
from flowtransfer.flows import (
    ClassConditionalGaussian,
    InvertibilityReport,
    LogdetReport,
    StabilityReport,
    TemporalFlow,
    check_inverse_stability,
    check_invertibility,
    check_logdet,
)

__version__ = "0.1.0"

__all__ = [
    "ClassConditionalGaussian",
    "CrossModalFlows",
    "InvertibilityReport",
    "LogdetReport",
    "ModalityError",
    "NonFiniteOutputError",
    "StabilityReport",
    "TemporalFlow",
    "check_inverse_stability",
    "check_invertibility",
    "check_logdet",
    "default_model_path",
    "load",
    "transfer",
]
