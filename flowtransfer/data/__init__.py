"""Data layer: datasets, batches, loaders, missing-modality protocols, the embedded synthetic data.

Every method sees the same :class:`MultimodalDataset`, the same :class:`Batch` (features by
modality with NaN in absent slots, a presence mask, labels) and the same missing-modality masks.

Names are imported lazily (module ``__getattr__``), so an optional loader whose module is absent
(e.g. AV-MNIST) never breaks ``import flowtransfer.data``.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

#: public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    # dataset.py
    "Batch": "dataset",
    "MultimodalDataset": "dataset",
    "from_arrays": "dataset",
    "load_npz": "dataset",
    # mmsa.py
    "load_mmsa": "mmsa",
    "UnsafePickleError": "mmsa",
    "restricted_load": "mmsa",
    # missing.py
    "random_missing_mask": "missing",
    "fixed_pattern_mask": "missing",
    "all_patterns": "missing",
    "pattern_name": "missing",
    "realised_missing_rate": "missing",
    "dicmor_batch_schedule": "missing",
    "training_missing_mask": "missing",
    "MissingSetting": "missing",
    "MissingRateCapped": "missing",
    "evaluation_settings": "missing",
    "schedule_to_mask": "missing",
    "save_masks": "missing",
    "load_masks": "missing",
    "format_rate": "missing",
    "DEFAULT_RATES": "missing",
    "valid_steps": "missing",
    "step_missing_masks": "missing",
    "realised_step_rates": "missing",
    "per_modality_missing_mask": "missing",
    "parse_modality_rates": "missing",
    "cyin_instance_mask": "missing",
    "cyin_dataset_mask": "missing",
    "Setting": "missing",
    "StepSetting": "missing",
    "PerModalitySetting": "missing",
    "CyINInstanceSetting": "missing",
    "CyINDatasetSetting": "missing",
    "PROTOCOLS": "missing",
    "register_protocol": "missing",
    "protocol_settings": "missing",
    # synthetic.py
    "make_synthetic": "synthetic",
    "SyntheticLAV": "synthetic",
    # paths.py
    "shared_data_dir": "paths",
    "require_data": "paths",
    # avmnist.py (written separately; optional)
    "load_avmnist": "avmnist",
}

# optional modules stay out of ``__all__`` when absent, so ``from flowtransfer.data import *`` never fails
__all__ = [
    name
    for name, module in _EXPORTS.items()
    if module != "avmnist" or importlib.util.find_spec(f"{__name__}.{module}") is not None
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flowtransfer.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
