"""One file per method; the engine builds them by name from the `model:` section of a job config.

    model = build_model({"name": "seqrec", "d": 64}, data, seed=0)

Each model class offers `from_data(cfg, data, seed)`; `data` is the `ModelData` the job prepared
(catalogue, domains, side tables), so the engine passes one object whatever the method.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from xdtrain.config import ConfigError, from_dict

# name -> (module, config class, model class)
MODELS: dict[str, tuple[str, str, str]] = {
    "seqrec": ("xdtrain.models.seqrec", "SeqRecConfig", "SeqRec"),
    "prerec": ("xdtrain.models.prerec", "PreRecConfig", "PreRec"),
    "adversarial_toy": ("xdtrain.models.adversarial_toy", "AdversarialToyConfig", "AdversarialToy"),
    "amid": ("xdtrain.models.amid", "AmidConfig", "Amid"),
    "recguru": ("xdtrain.models.recguru", "RecGuruConfig", "RecGuru"),
}


@dataclass
class ModelData:
    """What a model may know about its data when it is built (the same on every worker)."""

    item_ids: np.ndarray  # the catalogue: sorted raw item ids of every domain
    domains: list[str]
    item_domains: dict[str, np.ndarray] = field(default_factory=dict)  # domain -> its raw item ids
    tables: dict[str, str] = field(default_factory=dict)  # side tables by kind (items, users, ...) -> URL
    extras: dict = field(default_factory=dict)


def model_config(spec: dict, source: str = "model"):
    """The typed config of `spec` (its `name` picks the model)."""
    spec = dict(spec or {})
    name = spec.pop("name", None)
    if name not in MODELS:
        raise ConfigError(f"{source}: model.name {name!r} unknown; expected one of {sorted(MODELS)}")
    module, cfg_cls, _ = MODELS[name]
    return from_dict(getattr(importlib.import_module(module), cfg_cls), spec, source, prefix="model.")


def build_model(spec: dict, data: ModelData, seed: int = 0) -> nn.Module:
    """The model named by `spec['name']`, configured by the rest of `spec`."""
    cfg = model_config(spec)
    module, _, model_cls = MODELS[spec["name"]]
    return getattr(importlib.import_module(module), model_cls).from_data(cfg, data, seed)
