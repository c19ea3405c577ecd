"""jaxrl_llm: online RL for LLMs in JAX/Flax (REINFORCE, RLOO, PPO, GRPO, RAFT).

The objectives are pure functions of arrays; see `jaxrl_llm.objectives`.
"""

from jaxrl_llm.objectives import *  # noqa: F401,F403  (re-exported by name below)
from jaxrl_llm.objectives import __all__ as _objective_names

__version__ = "0.1.0"
__all__ = list(_objective_names)
