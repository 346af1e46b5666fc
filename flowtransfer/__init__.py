"""flowtransfer: recover a missing modality from the ones at hand with normalizing flows.

Public entry points::

    import flowtransfer
    x_L = flowtransfer.transfer(x_A, src="A", dst="L")      # (batch, channels, time) in, out
    flow = flowtransfer.TemporalFlow(channels=32, num_classes=7)
    flowtransfer.check_invertibility(flow, x).passed
"""

from __future__ import annotations

__version__ = "0.1.0"
