"""emloc: fine-tune a large model inside the memory its inference needs.

Stages (each a function taking paths and a config dataclass):
    build_emulator -> train_adapter -> correct_adapter -> merge_adapter, plus evaluate and run_pipeline.
"""

__version__ = "0.1.0"

from .correct import CorrectConfig, correct_adapter, correct_layer
from .emulator import EmulatorConfig, build_emulator, load_emulator, parse_ratio_table
from .errors import EmlocError
from .evaluate import EvalConfig, evaluate
from .lowrank import LowRankLinear, factorize, rank_for_ratio, whitening_factor
from .merge import merge_adapter
from .pipeline import RunConfig, run_pipeline
from .train import TrainConfig, train_adapter

__all__ = [
    "CorrectConfig", "EmlocError", "EmulatorConfig", "EvalConfig", "LowRankLinear", "RunConfig", "TrainConfig",
    "build_emulator", "correct_adapter", "correct_layer", "evaluate", "factorize", "load_emulator", "merge_adapter",
    "parse_ratio_table", "rank_for_ratio", "run_pipeline", "train_adapter", "whitening_factor",
]
