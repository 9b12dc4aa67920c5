"""What a trial needs to know about the sweep, as one picklable frozen dataclass (the driver
builds it from the sweep config; ``trainables`` never imports ``search``)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["TrainSettings", "TrialSettings"]


@dataclass(frozen=True)
class TrainSettings:
    """An SGD training schedule (``base``: the shared dense model; ``finetune``: after surgery). The
    sweep config's ``base`` and ``finetune`` sections are this type (``search.config`` validates them)."""

    epochs: int = 15
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64


@dataclass(frozen=True)
class TrialSettings:
    model: str = "resnet20"
    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    image_size: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    base: TrainSettings = field(default_factory=TrainSettings)
    finetune: TrainSettings = field(default_factory=lambda: TrainSettings(epochs=5, lr=0.01))
    latency_batch_size: int = 1
    calibration_batches: int = 4
    #: Folder (shared by every node on a cluster) where the dense base models are cached.
    base_dir: str = "./ray_results/base_models"
    use_gpu: bool | None = None
    #: torch.compile the pruned model for its fine-tune (compiled again after the cut).
    compile: bool = False

    def base_key(self) -> str:
        """Hash of everything that determines the dense base model: one base per distinct key."""
        parts = {k: v for k, v in asdict(self).items()
                 if k in ("model", "dataset", "image_size", "model_kwargs", "seed", "base")}
        blob = json.dumps(parts, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
