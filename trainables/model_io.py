"""Save and load (pruned) models as ``weights.pt`` (a plain state dict, read back with
``torch.load(weights_only=True)``) plus ``spec.json`` (builder name and arguments, and every
layer's width from ``methods.spec``). No module is ever pickled."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from methods.manidp_gates import apply_gating, gating_spec
from methods.spec import apply_architecture, architecture_spec

from methods.errors import MissingFileError

from .models import create_model

__all__ = ["save_model", "load_model", "model_spec"]

WEIGHTS, SPEC = "weights.pt", "spec.json"


def model_spec(model: nn.Module, name: str, num_classes: int, **model_kwargs: Any) -> dict[str, Any]:
    spec = {"format": 1, "model": name, "num_classes": num_classes, "kwargs": model_kwargs,
            "layers": architecture_spec(model)}
    gating = gating_spec(model)  # dynamic (manidp) models: which blocks carry channel gates
    if gating is not None:
        spec["gating"] = gating
    return spec


def save_model(model: nn.Module, directory: str | Path, spec: dict[str, Any]) -> Path:
    """Write weights and spec into ``directory`` (created). ``spec`` comes from ``model_spec``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, directory / WEIGHTS)
    (directory / SPEC).write_text(json.dumps(spec, indent=1))
    return directory


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by ``save_model``; returns ``(model, spec)``."""
    directory = Path(directory)
    for f in (WEIGHTS, SPEC):
        if not (directory / f).is_file():
            raise MissingFileError(f"not a saved prunetune model: {directory / f} is missing")
    spec = json.loads((directory / SPEC).read_text())
    kwargs = {k: v for k, v in spec["kwargs"].items() if k != "weights"}
    model = create_model(spec["model"], spec["num_classes"], **kwargs)
    if spec.get("gating"):
        apply_gating(model, spec["gating"])  # insert the gates before their widths and weights
    apply_architecture(model, spec["layers"])
    state = torch.load(directory / WEIGHTS, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval(), spec
