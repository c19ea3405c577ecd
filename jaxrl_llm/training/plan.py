"""`jaxrl-llm plan`: how much memory each device needs for a run, before anything is allocated.

The trainer's own programs (the sampler, `prepare`, one update) are compiled ahead of time for
abstract inputs (`jax.ShapeDtypeStruct`: shapes, dtypes and shardings, no data) on a mesh of N
fake CPU devices, and XLA's memory analysis of each compiled program is read per device:

    arguments + outputs - donated (aliased) + temporaries = the program's peak

`model.path` may be a directory that holds only `config.json`: no weights are read.

`platform` is the machine the run is planned for (`cuda` by default: plans are for
accelerators). Every kernel that picks its form by the lowering platform (`jaxrl_llm.lowering`:
the log-prob kernel's blocking, fused or separate projections, `remat: auto`) is traced as that
machine runs it, into a program lowered for the CPU and compiled by XLA:CPU, whose memory
analysis is read. A module lowered for CUDA is never handed to XLA:CPU: it compiles CPU modules
only (jax 0.12's XLA:CPU aborts on such a module). cuDNN's attention has no CPU
compiler: the blockwise attention, which like it keeps no `[S, S]` scores for all heads at
once, stands in for it. The peaks are XLA:CPU's buffer assignment of that program; an
accelerator's compiler fuses and schedules differently (and CPU may hold bfloat16 intermediates
in float32), so read them as a plan with a margin, not a guarantee.

`compare_remat` also compiles the update under each remat policy, from the least recomputation
to the most (`REMAT_BY_COST`), and recommends the first whose peak fits the device.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrl_llm import models, parallel
from jaxrl_llm.errors import UserError
from jaxrl_llm.lowering import kernels_of
from jaxrl_llm.rollout import generate
from jaxrl_llm.training import packing
from jaxrl_llm.training.algorithms import Algorithm, RolloutBatch, get_spec
from jaxrl_llm.training.config import Config
from jaxrl_llm.training.setup import compute_dtype, make_optimizer, policy_dtype, resolve_model_path, split_policy
from jaxrl_llm.training.state import TrainState, update_step

GiB = 1024**3
PLATFORMS = ("cuda", "rocm", "tpu", "cpu")
# Remat policies from the least recomputation to the most: none keeps every activation, the
# selective policy keeps the matmul outputs and recomputes the elementwise ops between them,
# layer keeps only each decoder layer's input.
REMAT_BY_COST = ("none", "dots_with_no_batch_dims_saveable", "layer")


@dataclasses.dataclass
class ProgramMemory:
    """XLA's per-device memory analysis of one compiled program, in bytes."""

    name: str
    arguments: int
    outputs: int
    aliased: int
    temporaries: int

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries


def use_fake_cpu_devices(count: int) -> None:
    """Make JAX start with `count` CPU devices and no accelerator: call before any JAX computation."""
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)


def _hf_config(config: Config):
    directory, gguf_file = resolve_model_path(config)
    if gguf_file is None and not os.path.isfile(os.path.join(directory, "config.json")):
        raise UserError(f"`model.path`: {directory!r} has no config.json (the plan reads only the model's shape).")
    return transformers.AutoConfig.from_pretrained(directory, gguf_file=gguf_file)


def _planned_attention(attention: str) -> str:
    """The attention option to compile here: cuDNN's flash kernel, which XLA:CPU cannot compile, is
    planned as the blockwise attention, which holds no more ("auto" already picks it on this host)."""
    return "blockwise" if attention == "cudnn" else attention


def abstract_setup(config: Config, mesh):
    """`(algorithm, optimizer, abstract TrainState with shardings, graphdef)` with nothing allocated."""
    c = config
    hf_config = _hf_config(c)
    policy = nnx.eval_shape(lambda: models.from_config(hf_config, dtype=policy_dtype(c)))
    m = c.model
    policy.set_execution(remat=m.remat, scan_layers=m.scan_layers, attention=_planned_attention(m.attention),
                         attention_block=m.attention_block)
    critic_graphdef = critic_params = None
    spec = get_spec(c.algo.name)
    if spec.critic:
        critic = nnx.eval_shape(lambda: models.make_critic(
            models.from_config(hf_config, dtype=jnp.dtype(m.param_dtype)), c.algo.critic, rngs=nnx.Rngs(0)))
        if c.algo.critic == "separate":
            critic.set_execution(**policy.execution._asdict())
        critic_graphdef, critic_params = nnx.split(critic)
    # LoRA: adapters (small, initialised for real) on the abstract base.
    graphdef, policy_params, base_params, reference_graphdef = split_policy(policy, c)
    dtype = compute_dtype(c)
    algorithm = Algorithm(c.algo, graphdef=graphdef, critic_graphdef=critic_graphdef,
                          temperature=c.rollout.temperature, chunk_size=c.train.logprob_chunk_size,
                          vocab_chunk_size=c.train.logprob_vocab_chunk_size, top_k=c.rollout.top_k, top_p=c.rollout.top_p, compute_dtype=dtype,
                          micro_batch_size=c.train.micro_batch_size, reference_graphdef=reference_graphdef,
                          dropout=bool(m.lora is not None and m.lora.dropout))
    optimizer = make_optimizer(c)
    state = jax.eval_shape(lambda p, q, b: TrainState.create(
        policy_params=p, critic_params=q, optimizer=optimizer, seed=c.train.seed,
        ema_baseline=spec.uses_ema_baseline(c.algo),
        reference=algorithm.uses_reference, reference_dtype=dtype, base_params=b), policy_params, critic_params,
        base_params)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.param_sharding(x, mesh)),
                         state)
    return algorithm, optimizer, state, graphdef


def _rows(x, rows: int, mesh):
    """An abstract `[rows, ...]` array split over the mesh (scalars replicated)."""
    if not x.shape:
        return jax.ShapeDtypeStruct((), x.dtype, sharding=parallel.replicated(mesh))
    return jax.ShapeDtypeStruct((rows, *x.shape[1:]), x.dtype, sharding=parallel.batch_sharding(mesh))


def _memory(name: str, compiled) -> ProgramMemory:
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise RuntimeError("this JAX backend gives no memory analysis of compiled programs")
    return ProgramMemory(name, int(analysis.argument_size_in_bytes), int(analysis.output_size_in_bytes),
                         int(analysis.alias_size_in_bytes), int(analysis.temp_size_in_bytes))


PROGRAMS = ("generate", "prepare", "update")


def _compile(jitted, *args):
    """`jitted` lowered for this host's CPU devices and compiled by XLA:CPU (inside `plan`, with
    the kernels of the planned platform)."""
    return jitted.trace(*args).lower().compile()


def plan(config: Config, *, devices: int, programs=PROGRAMS, platform: str = "cuda",
         compare_remat: bool = False) -> dict:
    """Compile the run's sampler, `prepare` and update (or the named `programs`) for `devices`
    devices, with the kernels `platform` runs; returns `{"programs": [ProgramMemory, ...],
    "state_bytes": per-device train state, ...}`, and with `compare_remat` also
    `"remat": {policy: update ProgramMemory}`."""
    unknown = sorted(set(programs) - set(PROGRAMS))
    if unknown:
        raise UserError(f"`programs`: got unknown {unknown}, expected some of {list(PROGRAMS)}.")
    if platform not in PLATFORMS:
        raise UserError(f"`--platform`: got {platform!r}, expected one of {list(PLATFORMS)}.")
    with kernels_of(platform):
        return _plan(config, devices=devices, programs=programs, platform=platform, compare_remat=compare_remat)


def _plan(config: Config, *, devices: int, programs, platform: str, compare_remat: bool) -> dict:
    c = config
    if c.rollout.prompt_length is None:
        raise UserError("`rollout.prompt_length`: got None, expected the prompt width in tokens (the plan has "
                         "no data to measure it from).")
    available = jax.devices()
    if len(available) < devices:
        raise UserError(f"`--devices`: got {devices}, but JAX has {len(available)} devices "
                         "(call use_fake_cpu_devices before JAX starts).")
    mesh = parallel.make_mesh(c.mesh.data, c.mesh.fsdp, devices=available[:devices])
    n = c.rollout.prompts_per_step * c.algo.num_samples
    parallel.check_batch_divisible(n, mesh, "rollout.prompts_per_step * algo.num_samples")
    algorithm, optimizer, state, graphdef = abstract_setup(c, mesh)
    p, t = c.rollout.prompt_length, c.rollout.max_new_tokens
    split = parallel.batch_sharding(mesh)
    rollout = RolloutBatch(
        prompt_ids=jax.ShapeDtypeStruct((n, p), jnp.int32, sharding=split),
        prompt_mask=jax.ShapeDtypeStruct((n, p), jnp.int32, sharding=split),
        tokens=jax.ShapeDtypeStruct((n, t), jnp.int32, sharding=split),
        mask=jax.ShapeDtypeStruct((n, t), jnp.int32, sharding=split),
        scores=jax.ShapeDtypeStruct((n,), jnp.float32, sharding=split),
        valid=jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=split),
        finished=jax.ShapeDtypeStruct((n,), jnp.bool_, sharding=split),
    )
    measured = []
    layouts = {rows: _worst_packing(c, algorithm, rows, mesh) for rows in {n, n // c.algo.num_minibatches}}
    if "generate" in programs:
        measured.append(_memory("generate", _compile(*_generate_program(c, graphdef, state, mesh))))
    if "prepare" in programs:
        prepare = jax.jit(algorithm.prepare, donate_argnums=0)
        measured.append(_memory("prepare", _compile(prepare, state, rollout, layouts[n])))
    update_rows = n // (1 if algorithm.single_update else c.algo.num_minibatches)
    _, train_batch, _ = jax.eval_shape(algorithm.prepare, state, rollout)
    train_batch = jax.tree.map(lambda x: _rows(x, update_rows, mesh), train_batch)

    def update_memory(algorithm) -> ProgramMemory:
        update = jax.jit(lambda s, b, layout: update_step(algorithm, optimizer, s, b, packing=layout),
                         donate_argnums=0)
        return _memory("update", _compile(update, state, train_batch, layouts[update_rows]))

    if "update" in programs:
        measured.append(update_memory(algorithm))
    result = {"programs": measured, "state_bytes": sum(_per_device_bytes(x) for x in jax.tree.leaves(state)),
              "mesh": dict(mesh.shape), "sequences": n, "update_sequences": update_rows, "platform": platform}
    if compare_remat:
        result["remat"] = {}
        for remat in REMAT_BY_COST:
            other = dataclasses.replace(c, model=dataclasses.replace(c.model, remat=remat))
            result["remat"][remat] = update_memory(abstract_setup(other, mesh)[0])
    return result


def _worst_packing(c: Config, algorithm, rows: int, mesh):
    """With `train.packing`, the shapes of the largest packed layout of `rows` sequences: every
    sequence at its full `prompt_length + max_new_tokens` (what a batch can hold at most), so the
    plan bounds any step's memory; None without packing."""
    if not c.train.packing:
        return None
    length = c.rollout.prompt_length + c.rollout.max_new_tokens
    pack_length = packing.row_length(length, c.train.pack_length,
                                     longest_is="rollout.prompt_length + rollout.max_new_tokens, for the plan")
    num_micro = algorithm.num_micro_batches(rows)
    per_micro = rows // num_micro
    packed_rows = packing.bucket(-(-per_micro // (pack_length // length)))
    packed_rows = -(-packed_rows // mesh.size) * mesh.size  # split over the devices, as the trainer does
    tokens = packing.bucket(per_micro * c.rollout.max_new_tokens)
    whole = parallel.replicated(mesh)
    split_rows = NamedSharding(mesh, P(None, parallel.BATCH_AXES))
    grid = jax.ShapeDtypeStruct((num_micro, packed_rows, pack_length), jnp.int32, sharding=split_rows)
    index = jax.ShapeDtypeStruct((num_micro, tokens), jnp.int32, sharding=whole)
    return packing.PackedLayout(grid, grid, index, index)


def _per_device_bytes(x) -> int:
    shard = x.sharding.shard_shape(x.shape)
    return int(np.prod(shard, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize


def _generate_program(c: Config, graphdef, state, mesh):
    """`(jitted sampler, its abstract arguments)` for one call (`rollout.micro_batch_size` sequences, or all):
    on one device the rollout engine's decode chunk at the largest shapes it reaches, on several
    the one-loop sampler each device runs on its rows."""
    r, k = c.rollout, c.algo.num_samples
    sequences = r.micro_batch_size or r.prompts_per_step * k
    prompts = max(sequences // k, 1)
    hf_config = _hf_config(c)
    eos = hf_config.eos_token_id if hf_config.eos_token_id is not None else 0
    dtype = compute_dtype(c)
    if mesh.size == 1:
        return _engine_decode_program(c, graphdef, state, prompts, eos, dtype)
    # As the trainer: prompts split over every device (each samples its own rows) when they divide.
    split_rows = prompts % mesh.size == 0
    split = parallel.batch_sharding(mesh) if split_rows else parallel.replicated(mesh)

    def sample(params, base_params, ids, mask, key):
        policy = nnx.merge(graphdef, models.cast_floating(params, dtype), *([] if base_params is None else [base_params]))
        out = generate(policy, ids, mask, max_new_tokens=r.max_new_tokens, rng=key, num_samples=k,
                       temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, eos_token_id=eos,
                       pad_token_id=0, cache_dtype=dtype, mesh=mesh if split_rows else None)
        return out.tokens, out.mask, out.logprobs

    ids = jax.ShapeDtypeStruct((prompts, r.prompt_length), jnp.int32, sharding=split)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P()))
    return jax.jit(sample), state.params["policy"], state.base_params, ids, ids, key


def _engine_decode_program(c: Config, graphdef, state, prompts: int, eos: int, dtype):
    """The engine's decode chunk (``rollout/engine.py``) at its largest shapes: ``rollout.slots``
    slots (all of a call's rows by default) with completion caches of ``max_new_tokens - 1``
    tokens, and the prompt pool its slots share (each prompt's keys and values once, not K times)."""
    from jaxrl_llm.rollout import engine, sampler

    r, k = c.rollout, c.algo.num_samples
    rows, steps = prompts * k, r.max_new_tokens
    slots = min(r.slots or rows, rows)
    entries = engine.pool_entries(slots, k, prompts)

    def policy(params, base_params):  # inside a trace: the model's arrays are tracers, not shapes
        return nnx.merge(graphdef, models.cast_floating(params, dtype), *([] if base_params is None else [base_params]))

    def options(model):
        return sampler.check_sampling_arguments(dict(
            model=model, prompt_ids=np.zeros((1, 1), np.int32), prompt_mask=np.ones((1, 1), np.int32),
            max_new_tokens=steps, rng=jax.random.key(0), num_samples=k, temperature=r.temperature, top_k=r.top_k,
            top_p=r.top_p, eos_token_id=eos, pad_token_id=0, cache_dtype=dtype, mesh=None, row_offset=0, slots=None))

    def empty(params, base_params):
        model = policy(params, base_params)
        return (engine._empty_pool(model, entries, r.prompt_length, dtype),
                engine._empty_slots(model, slots, max(steps - 1, 1), dtype))

    pool, chunk = jax.eval_shape(empty, state.params["policy"], state.base_params)
    spec = jax.ShapeDtypeStruct
    out = engine.Outputs(spec((rows, steps), jnp.int32), spec((rows, steps), jnp.float32), spec((rows,), jnp.int32))
    per_slot = spec((slots,), jnp.int32)

    def decode(params, base_params, pool, chunk, out, uniforms, admit, members):
        model = policy(params, base_params)
        checked = options(model)
        return engine._decode_impl(checked.opts, model, pool, chunk, out, uniforms, checked.params, admit, members,
                                   jnp.int32(0))

    return (jax.jit(decode, donate_argnums=(3, 4)), state.params["policy"], state.base_params, pool, chunk, out,
            spec((steps, rows), jnp.float32), (per_slot,) * 3, spec((entries, k), jnp.int32))


def format_plan(result: dict, *, device_memory_gb: float | None = None) -> str:
    """The plan as a table: one row per program, bytes per device."""
    lines = [f"{result.get('platform', 'cpu')}'s kernels compiled by XLA:CPU, mesh {result['mesh']}, {result['sequences']} sequences per step "
             f"({result['update_sequences']} per update); per-device train state "
             f"{result['state_bytes'] / GiB:.2f} GiB",
             f"{'program':<10}{'arguments':>12}{'outputs':>12}{'donated':>12}{'temporaries':>14}{'peak':>12}  (GiB per device)"]
    for m in result["programs"]:
        lines.append(f"{m.name:<10}{m.arguments / GiB:>12.2f}{m.outputs / GiB:>12.2f}{m.aliased / GiB:>12.2f}"
                     f"{m.temporaries / GiB:>14.2f}{m.peak / GiB:>12.2f}")
    peak = max((m.peak for m in result["programs"]), default=result["state_bytes"])
    if device_memory_gb is not None:
        verdict = "fits" if peak <= device_memory_gb * 1e9 else "does NOT fit"
        lines.append(f"largest peak {peak / GiB:.2f} GiB: {verdict} in {device_memory_gb:g} GB per device")
        sampler = [m for m in result["programs"] if m.name == "generate"]
        if sampler and sampler[0].peak > device_memory_gb * 1e9:
            lines.append("the sampler does NOT fit: lower rollout.slots (the rows each device decodes at once; "
                         "the others wait in its queue) or rollout.micro_batch_size")
    if "remat" in result:
        lines.append("the update under each model.remat, from the least recomputation to the most:")
        fitting = None
        for remat, m in result["remat"].items():
            fits = device_memory_gb is not None and m.peak <= device_memory_gb * 1e9
            fitting = fitting or (remat if fits else None)
            lines.append(f"  {remat:<34}{m.temporaries / GiB:>10.2f} GiB temporaries{m.peak / GiB:>10.2f} GiB peak"
                         + ("" if device_memory_gb is None else "  fits" if fits else "  does NOT fit"))
        if device_memory_gb is not None:
            lines.append(f"recommended: model.remat={fitting} (the least recomputation that fits)" if fitting else
                         "no remat policy fits: add train.micro_batch_size, mesh.fsdp or devices")
    return "\n".join(lines)


__all__ = ["ProgramMemory", "format_plan", "plan", "use_fake_cpu_devices"]
