"""The bundled RLVR trainer (``cppo-diag train``): see ``trainer.py`` for the algorithm and docs/trainer.md.

    from cppo_diag.train import build_config, train
    summary = train(build_config("demo", overrides={"steps": 20, "rule": {"name": "dppo"}}))
"""

from .config import PRESETS, TrainConfig, build_config
from .trainer import train

__all__ = ["PRESETS", "TrainConfig", "build_config", "train"]
