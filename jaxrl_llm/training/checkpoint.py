"""Orbax checkpoints of the whole TrainState, the data position and the config.

Orbax writes each step into a temporary directory and renames it when complete,
so a crash mid-save never corrupts the last good checkpoint; `max_to_keep` prunes
old ones only after a newer one is complete. What a crash leaves behind is
skipped with a warning naming it: a temporary directory (a save killed before its
rename), and a step directory that does not restore (damaged after the fact, or
on a filesystem without atomic renames), in which case the step before it is
used (`tests/training/test_interruptions.py`). The state is stored as a flat
`{"params/policy/...": array}` mapping (plain string keys, whatever pytree
classes the state uses), restored into the structure and shardings of a template.

`export` writes the policy of a checkpoint as a Hugging Face (or, with LoRA, PEFT) directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxrl_llm import models
from jaxrl_llm.errors import UserError
from jaxrl_llm.models import lora
from jaxrl_llm.training.config import Config
from jaxrl_llm.training.setup import resolve_model_path


TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's suffix for a step directory being written


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


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

    def incomplete(self) -> list[Path]:
        """Temporary directories of saves that never finished (the process died mid-write)."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if TMP_MARK in p.name)

    def restore(self, template, step: int | None = None, *, asked_by: str = "--resume"):
        """`(state, metadata)` of `step` (default: the latest that restores), shaped and sharded
        like `template`. `asked_by` is the flag or argument that asked for it, named in the error
        when there is none. Incomplete saves and damaged step directories are skipped with a
        warning naming them; an explicitly asked-for step that is damaged is an error."""
        for path in self.incomplete():
            _warn(f"{path} is an incomplete checkpoint (its save was interrupted); skipped.")
        steps = self.all_steps()
        if not steps:
            raise UserError(f"`{asked_by}`: no checkpoint under {str(self.directory)!r}; train first (the "
                            "checkpoints are written to train.run_dir), or point train.run_dir at the run.")
        if step is not None:
            if step not in steps:
                raise UserError(f"`{asked_by}`: got step {step}, but {str(self.directory)!r} has checkpoints of "
                                f"steps {sorted(steps)}.")
            try:
                return self._restore(template, step)
            except UserError:
                raise
            except Exception as e:
                raise UserError(f"`{asked_by}`: the checkpoint {self.directory / str(step)} does not restore "
                                f"({type(e).__name__}: {str(e)[:300]}).") from e
        failures = []
        for candidate in sorted(steps, reverse=True):
            try:
                return self._restore(template, candidate)
            except UserError:
                raise  # a checkpoint of another model or algorithm: not damage
            except Exception as e:  # damaged: name it, fall back to the step before
                failures.append(f"step {candidate}: {type(e).__name__}: {e}")
                _warn(f"the checkpoint {self.directory / str(candidate)} does not restore ({type(e).__name__}: "
                      f"{str(e)[:200]}); skipped, trying the one before.")
        raise UserError(f"`{asked_by}`: no checkpoint under {str(self.directory)!r} restores: {failures[0]}")

    def _restore(self, template, step: int):
        flat_template = _flat(template)
        # Another model or algorithm's checkpoint is a user error, told apart from damage by the
        # names stored in its metadata (damaged metadata raises here and counts as damage).
        stored = set(self.manager.item_metadata(step)["state"].keys())
        missing, extra = sorted(set(flat_template) - stored), sorted(stored - set(flat_template))
        if missing or extra:
            held = f"lacks {missing[:5]}" if missing else f"holds {extra[:5]}, which this run does not have"
            ours, theirs = (any("/lora/" in k for k in keys) for keys in (flat_template, stored))
            cause = ("written by another model or algorithm?" if ours == theirs else
                     "this run trains LoRA adapters (model.lora) and the checkpoint is of full fine-tuning" if ours
                     else "the checkpoint holds LoRA adapters and this run has no model.lora")
            raise UserError(f"checkpoint step {step} {held} ({cause}).")
        abstract = {
            key: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
            for key, x in flat_template.items()
        }
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        leaves = [restored.state[key] for key in flat_template]
        state = jax.tree.unflatten(jax.tree.structure(template), leaves)
        return state, dict(restored.meta)

    def stored_keys(self, step: int | None = None) -> list[str]:
        """Names of the arrays stored at `step` (for inspection and tests)."""
        step = self.latest_step() if step is None else step
        return sorted(self.manager.item_metadata(step)["state"].keys())

    def close(self) -> None:
        self.manager.close()


def export(config: Config, output: str | Path, *, step: int | None = None, merge: bool = False) -> tuple[Path, int]:
    """Write the policy of a run's checkpoint (`step`, default the latest); returns the directory
    and the step written.

    Full fine-tuning: a Hugging Face directory (`save_pretrained`). LoRA: a PEFT adapter directory
    (`adapter_config.json`, `adapter_model.safetensors`) for `peft.PeftModel.from_pretrained` on the
    base model, or with `merge` the base with the adapters folded in, as a Hugging Face directory.
    The tokenizer is written beside either."""
    from jaxrl_llm.training.trainer import Trainer  # it uses this module: imported here, no cycle

    trainer = Trainer(config)
    step = trainer.restore(step, asked_by="train.run_dir" if step is None else "--step")
    policy = trainer.policy_model()
    output = Path(output)
    if trainer.lora_spec is None:
        models.save_pretrained(policy, output)
    elif merge:
        models.save_pretrained(lora.merge_lora(policy), output)
    else:
        directory, _ = resolve_model_path(config)
        lora.save_peft_adapter(policy, output, base_model_name_or_path=str(Path(directory).absolute()))
    trainer.tokenizer.save_pretrained(str(output))
    return output, step
