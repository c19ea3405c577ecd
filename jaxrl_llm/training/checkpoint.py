"""Orbax checkpoints of the whole TrainState, the data position and the config.

Orbax writes each step into a temporary directory and renames it when complete,
so a crash mid-save never corrupts the last good checkpoint; `max_to_keep` prunes
old ones only after a newer one is complete. The state is stored as a flat
`{"params/policy/...": array}` mapping (plain string keys, whatever pytree
classes the state uses), restored into the structure and shardings of a template.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxrl_llm.errors import UserError


def _flat(tree) -> dict[str, jax.Array]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in leaves}


class Checkpointer:
    """Save and restore `(TrainState, metadata)` under `directory`, keeping the newest `keep`."""

    def __init__(self, directory: str | Path, *, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
        )

    def save(self, step: int, state, metadata: dict) -> None:
        self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(_flat(state)), meta=ocp.args.JsonSave(metadata)),
        )
        self.manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def restore(self, template, step: int | None = None, *, asked_by: str = "--resume"):
        """`(state, metadata)` of `step` (default: the latest), shaped and sharded like `template`.
        `asked_by` is the flag or argument that asked for it, named in the error when there is none."""
        steps = self.all_steps()
        if not steps:
            raise UserError(f"`{asked_by}`: no checkpoint under {str(self.directory)!r}; train first (the "
                            "checkpoints are written to train.run_dir), or point train.run_dir at the run.")
        if step is None:
            step = self.latest_step()
        elif step not in steps:
            raise UserError(f"`{asked_by}`: got step {step}, but {str(self.directory)!r} has checkpoints of "
                            f"steps {sorted(steps)}.")
        flat_template = _flat(template)
        abstract = {
            key: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
            for key, x in flat_template.items()
        }
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        missing = sorted(set(flat_template) - set(restored.state))
        if missing:
            raise UserError(f"checkpoint step {step} lacks {missing[:5]} (written by another model or algorithm?).")
        leaves = [restored.state[key] for key in flat_template]
        state = jax.tree.unflatten(jax.tree.structure(template), leaves)
        return state, dict(restored.meta)

    def stored_keys(self, step: int | None = None) -> list[str]:
        """Names of the arrays stored at `step` (for inspection and tests)."""
        step = self.latest_step() if step is None else step
        return sorted(self.manager.item_metadata(step)["state"].keys())

    def close(self) -> None:
        self.manager.close()
