"""TrainState, algorithm step functions, the trainer loop and Orbax checkpoints."""

from jaxrl_llm.training.algorithms import ALGORITHMS, Algorithm, RolloutBatch, TrainBatch
from jaxrl_llm.training.checkpoint import Checkpointer, export
from jaxrl_llm.training.config import Config, load_config
from jaxrl_llm.training.host_memory import tune_glibc_malloc
from jaxrl_llm.training.state import TrainState
from jaxrl_llm.training.trainer import Trainer, train

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Checkpointer",
    "Config",
    "RolloutBatch",
    "TrainBatch",
    "TrainState",
    "Trainer",
    "export",
    "load_config",
    "train",
    "tune_glibc_malloc",
]
