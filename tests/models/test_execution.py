"""Execution options (``layers.Execution``): blockwise / cuDNN attention, remat, scan over layers.

Every option must compute the same function as the default: blockwise attention equals dense
attention (outputs and gradients), whole models stay at transformers parity with blockwise
attention forced on, and remat / scan_layers leave logits and gradients unchanged. The memory
test compiles only (no large allocation).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from jaxrl_llm import models
from jaxrl_llm.lowering import kernels_of
from jaxrl_llm.models import layers
from tests._tolerances import float32_tolerance, model_reductions
from tests.models.conftest import CASES, build_hf_model, forward, hf_logits, left_padded_batch, max_real_diff

F32_TOL = 1e-4


# ----------------------------------------------------------------------------- attention functions


def _attention_inputs(*, batch=3, seq=13, kv_len=None, heads=4, kv_heads=2, head_dim=8, offset=0, seed=0):
    """q [B, S, H, Dh], k/v [B, K, Lk, Dh] and a Context: rows left-padded by 0, 3, 7 slots; queries at
    slots offset..offset+S-1 (offset > 0 reads a cache of Lk slots, as a chunked prefill)."""
    kv_len = seq + offset if kv_len is None else kv_len
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(batch, seq, heads, head_dim), jnp.float32)
    k = jnp.asarray(rng.randn(batch, kv_heads, kv_len, head_dim), jnp.float32)
    v = jnp.asarray(rng.randn(batch, kv_heads, kv_len, head_dim), jnp.float32)
    valid = np.ones((batch, kv_len), bool)
    for b, pad in enumerate((0, 3, 7)[:batch]):
        valid[b, :pad] = False
    ctx = layers.Context(
        q_slot=offset + jnp.arange(seq),
        kv_valid=jnp.asarray(valid),
        positions=jnp.zeros((batch, seq), jnp.int32),
        cache_index=None,
        attend_cache=offset > 0,
    )
    return q, k, v, ctx


def _value_and_grads(attention, q, k, v):
    """out and d(sum(out * w))/d(q, k, v) for a fixed random w: a scalar touching every output."""
    w = jnp.asarray(np.random.RandomState(9).randn(*q.shape), jnp.float32)
    loss = lambda q, k, v: jnp.sum(attention(q, k, v) * w)  # noqa: E731
    return attention(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


BLOCKWISE_CASES = {
    # name: (seq, block, sliding_window, softcap, offset)
    "seq_multiple_of_block": (12, 4, None, None, 0),
    "seq_not_multiple_of_block": (13, 4, None, None, 0),
    "sliding_window": (13, 8, 4, None, 0),
    "softcap": (13, 5, None, 5.0, 0),
    "window_and_softcap": (11, 3, 3, 2.0, 0),
    "block_larger_than_seq": (6, 8, None, None, 0),
    "reads_cache_chunk": (7, 4, 5, None, 6),
}


@pytest.mark.parametrize("name", sorted(BLOCKWISE_CASES))
def test_blockwise_attention_equals_dense_outputs_and_gradients(name, diff_report):
    seq, block, window, cap, offset = BLOCKWISE_CASES[name]
    q, k, v, ctx = _attention_inputs(seq=seq, offset=offset)
    options = dict(scale=0.3, sliding_window=window, softcap=cap)
    dense = jax.jit(functools.partial(layers.dense_attention, ctx=ctx, **options))
    blockwise = jax.jit(functools.partial(layers.blockwise_attention, ctx=ctx, block=block, **options))
    out_d, grads_d = _value_and_grads(dense, q, k, v)
    out_b, grads_b = _value_and_grads(blockwise, q, k, v)
    assert out_b.shape == out_d.shape == q.shape
    for x in (out_b, *grads_b):  # fully masked rows and blocks (left padding) stay finite
        assert bool(jnp.all(jnp.isfinite(x)))
    diffs = [float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip((out_b, *grads_b), (out_d, *grads_d))]
    diff_report[f"blockwise vs dense attention {name} (out, dq, dk, dv; relative)"] = max(diffs)
    # q.k over head_dim, softmax and p.v over the keys, the same again backwards (and over queries).
    assert max(diffs) < float32_tolerance(q.shape[-1], k.shape[2], k.shape[2], q.shape[1], q.shape[-1]), diffs


def test_cudnn_construction_equals_dense_with_the_xla_kernel():
    """The cuDNN path's row rotation + sequence lengths + is_causal/local_window_size, run through JAX's
    reference kernel on CPU: real rows equal dense attention (outputs and gradients), padding rows are 0,
    and a row whose real tokens are not contiguous gives NaN instead of wrong numbers."""
    for window in (None, 4):
        q, k, v, ctx = _attention_inputs(seq=12)
        options = dict(scale=0.3, sliding_window=window)
        dense = jax.jit(functools.partial(layers.dense_attention, ctx=ctx, **options))
        rotated = jax.jit(functools.partial(layers.cudnn_attention, ctx=ctx, implementation="xla", **options))
        real = np.asarray(ctx.kv_valid)[:, :, None, None]
        out_d, grads_d = _value_and_grads(lambda q, k, v: jnp.where(real, dense(q, k, v), 0), q, k, v)
        out_c, grads_c = _value_and_grads(rotated, q, k, v)
        lengths = (q.shape[-1], k.shape[2], k.shape[2], q.shape[1], q.shape[-1])  # as in the blockwise test
        np.testing.assert_allclose(out_c, out_d, atol=float32_tolerance(*lengths, scale=np.abs(out_d).max()))
        for a, b in zip(grads_c, grads_d):
            np.testing.assert_allclose(a, b, atol=float32_tolerance(*lengths, scale=np.abs(b).max()))
    holey = ctx._replace(kv_valid=ctx.kv_valid.at[0, 5].set(False))
    out = layers.cudnn_attention(q, k, v, holey, scale=0.3, implementation="xla")
    assert bool(jnp.all(jnp.isnan(out[0]))) and bool(jnp.all(jnp.isfinite(out[1:])))


@pytest.mark.gpu
@pytest.mark.skipif(not layers.on_cuda_gpu(), reason="cuDNN attention needs a CUDA GPU")
def test_cudnn_kernel_close_to_float32_dense_on_gpu():
    """cuDNN in bfloat16 against dense attention in float32 on the same (bfloat16-representable) inputs."""
    q, k, v, ctx = _attention_inputs(seq=64, heads=4, kv_heads=2, head_dim=16)
    q, k, v = (x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v))
    real = np.asarray(ctx.kv_valid)[:, :, None, None]
    for window in (None, 8):
        options = dict(ctx=ctx, scale=0.25, sliding_window=window)
        dense = jax.jit(lambda q, k, v: jnp.where(real, layers.dense_attention(q, k, v, **options), 0))  # noqa: B023
        cudnn = jax.jit(  # noqa: B023
            lambda q, k, v: layers.cudnn_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), **options)
        )
        out_d, grads_d = _value_and_grads(dense, q, k, v)
        out_c, grads_c = _value_and_grads(cudnn, q, k, v)
        for a, b in zip((out_c, *grads_c), (out_d, *grads_d)):
            b = np.asarray(b)
            np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.03 * max(1.0, np.abs(b).max()))


def test_attention_implementation_rules():
    pick = functools.partial(
        layers.attention_implementation, self_attention=True, head_dim=64, softcap=None, on_gpu=False
    )
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert pick("auto", seq=256, kv_len=256, dtype=f32) == "dense"
    assert pick("auto", seq=257, kv_len=257, dtype=f32) == "blockwise"
    assert pick("auto", seq=1, kv_len=100_000, dtype=f32, self_attention=False) == "dense"  # decode step
    assert pick("auto", seq=2048, kv_len=2048, dtype=bf16) == "blockwise"  # CPU: no cuDNN
    assert pick("auto", seq=2048, kv_len=2048, dtype=bf16, on_gpu=True) == "cudnn"
    assert pick("auto", seq=16, kv_len=16, dtype=bf16, on_gpu=True) == "cudnn"
    for no_flash in (
        dict(dtype=f32), dict(softcap=50.0), dict(head_dim=100), dict(head_dim=256), dict(self_attention=False)
    ):
        assert pick("auto", seq=2048, kv_len=2048, on_gpu=True, **{"dtype": bf16, **no_flash}) == "blockwise"
    assert pick("dense", seq=2048, kv_len=2048, dtype=f32) == "dense"
    assert pick("blockwise", seq=4, kv_len=4, dtype=f32) == "blockwise"
    # An explicit "cudnn": errors where it cannot run; a decode step falls back to dense.
    assert pick("cudnn", seq=2048, kv_len=2048, dtype=bf16, on_gpu=True) == "cudnn"
    assert pick("cudnn", seq=1, kv_len=64, dtype=bf16, on_gpu=True, self_attention=False) == "dense"
    with pytest.raises(ValueError, match="cudnn.*CUDA GPU"):
        pick("cudnn", seq=64, kv_len=64, dtype=bf16)
    with pytest.raises(ValueError, match="soft-capping.*cuDNN"):
        pick("cudnn", seq=64, kv_len=64, dtype=bf16, on_gpu=True, softcap=50.0)
    with pytest.raises(ValueError, match="float32.*bfloat16"):
        pick("cudnn", seq=64, kv_len=64, dtype=f32, on_gpu=True)


def test_blockwise_attention_compiles_to_less_memory_than_dense():
    """Forward + backward at S = 1024: dense keeps [H, S, S] float32 scores/probabilities for all heads,
    blockwise (block 128) one block's. Compile-only: memory_analysis of the compiled program."""
    batch, seq, heads, kv_heads, head_dim = 1, 1024, 4, 2, 16
    q = jax.ShapeDtypeStruct((batch, seq, heads, head_dim), jnp.float32)
    kv = jax.ShapeDtypeStruct((batch, kv_heads, seq, head_dim), jnp.float32)
    valid = jax.ShapeDtypeStruct((batch, seq), jnp.bool_)

    def temp_bytes(implementation):
        def loss(q, k, v, valid):
            execution = layers.Execution(attention=implementation, attention_block=128)
            ctx = layers.Context(jnp.arange(seq), valid, jnp.zeros((batch, seq), jnp.int32), None, execution=execution)
            return jnp.sum(layers.dot_product_attention(q, k, v, ctx, scale=0.25) ** 2)

        stats = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, valid).compile().memory_analysis()
        if stats is None:
            pytest.skip("memory_analysis() is not available on this backend")
        return stats.temp_size_in_bytes

    dense, blockwise = temp_bytes("dense"), temp_bytes("blockwise")
    one_score_matrix = heads * seq * seq * 4
    assert dense >= 2 * one_score_matrix, dense  # scores and probabilities, at least
    assert blockwise * 4 < dense, (blockwise, dense)


# ----------------------------------------------------------------------------- whole models


BLOCKWISE_MODEL_CASES = ["llama", "qwen3_qknorm", "mistral_window_linear_rope", "gemma3_sliding", "gpt_neox_parallel"]


@pytest.fixture(scope="module", params=BLOCKWISE_MODEL_CASES)
def saved_case(request, tmp_path_factory):
    name = request.param
    hf = build_hf_model(name)
    path = tmp_path_factory.mktemp(f"exec_{name}")
    hf.save_pretrained(path)
    return name, hf, path


def test_blockwise_attention_keeps_transformers_parity(saved_case, diff_report):
    """Block 5 over 12 tokens: three blocks, the last one padded; rows left-padded by 0, 3, 6."""
    name, hf, path = saved_case
    ids, mask = left_padded_batch(hf.config.vocab_size)
    ref = hf_logits(hf, ids, mask)
    model = models.from_pretrained(path).set_execution(attention="blockwise", attention_block=5)
    diff = max_real_diff(forward(model, ids, mask), ref, mask)
    diff_report[f"{name} float32, blockwise attention (block 5)"] = diff
    assert diff < F32_TOL, diff


def test_remat_and_blockwise_keep_transformers_parity_in_every_family(saved_case):
    """remat under jit (a forward only: the checkpoint must not change the function)."""
    name, hf, path = saved_case
    ids, mask = left_padded_batch(hf.config.vocab_size, seed=1)
    model = models.from_pretrained(path).set_execution(remat="layer", attention="blockwise", attention_block=8)
    assert max_real_diff(forward(model, ids, mask), hf_logits(hf, ids, mask), mask) < F32_TOL


def _tiny_llama(num_layers=4):
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    return models.from_config(cfg, rngs=nnx.Rngs(0))


def _logits_and_grads(model, ids, mask):
    """Logits and d(sum of real logits * w)/d(params) as a flat {path: array}, jitted."""
    w = jnp.asarray(np.random.RandomState(3).randn(*ids.shape, model.unembedding_matrix().shape[1]), jnp.float32)

    def loss(model):
        logits = model(ids, mask)
        return jnp.sum(logits * w * mask[..., None]), logits

    (_, logits), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return logits, {p: np.asarray(x) for p, x in nnx.to_flat_state(grads)}


def _max_rel_diff(grads, ref):
    return max(float(np.abs(grads[p] - g).max() / max(np.abs(g).max(), 1e-30)) for p, g in ref.items())


def _model_tolerance(model, ids):
    """`float32_tolerance` (relative) of a model's logits and gradients on `ids`."""
    config = model.hf_config
    return float32_tolerance(*model_reductions(
        num_layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
        seq=ids.shape[1], vocab=config.vocab_size))


REMAT_SCAN_OPTIONS = [
    dict(remat="none"),
    dict(remat="layer"),
    dict(remat="dots_with_no_batch_dims_saveable"),
    dict(scan_layers=True),
    dict(scan_layers=True, remat="layer"),
    dict(scan_layers=True, remat="nothing_saveable", attention="blockwise", attention_block=4),
]


@pytest.fixture(scope="module")
def tiny_llama_reference():
    """A left-padded batch and the default execution's logits and gradients for ``_tiny_llama()``."""
    ids, mask = left_padded_batch(64, batch=2, seq=10, seed=2)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    return ids, mask, *_logits_and_grads(_tiny_llama(), ids, mask)


@pytest.mark.parametrize("options", REMAT_SCAN_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_remat_and_scan_layers_keep_logits_and_gradients(options, tiny_llama_reference, diff_report):
    """A 4-layer Llama: the same logits and gradients with scan_layers on/off and remat none/layer/a policy."""
    ids, mask, ref_logits, ref_grads = tiny_llama_reference
    model = _tiny_llama().set_execution(**options)
    logits, grads = _logits_and_grads(model, ids, mask)
    assert grads.keys() == ref_grads.keys()
    logit_diff = max_real_diff(logits, ref_logits, mask) / np.abs(ref_logits).max()
    grad_diff = _max_rel_diff(grads, ref_grads)
    diff_report[f"tiny llama {options}: logits / grads (relative)"] = max(logit_diff, grad_diff)
    tolerance = _model_tolerance(model, ids)
    assert logit_diff < tolerance, logit_diff
    assert grad_diff < tolerance, grad_diff


def _gemma3(layer_types):
    cls, kwargs = CASES["gemma3_sliding"]
    cfg = cls(**{**kwargs, "num_hidden_layers": len(layer_types), "layer_types": layer_types})
    return models.from_config(cfg, rngs=nnx.Rngs(0))


def test_remat_under_scan_layers_compiles_to_less_memory():
    """Forward + backward of a 6-layer Llama at S = 256 (dense attention): remat="layer" inside the scan
    keeps one layer's activations instead of six. Compile-only: memory_analysis of the compiled program."""
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=6, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512,
    )
    ids = jax.ShapeDtypeStruct((2, 256), jnp.int32)

    def temp_bytes(**options):
        graphdef, state = nnx.split(models.from_config(cfg).set_execution(attention="dense", **options))
        grad = jax.jit(jax.grad(lambda state, ids: jnp.sum(nnx.merge(graphdef, state)(ids))))
        stats = grad.lower(state, ids).compile().memory_analysis()
        if stats is None:
            pytest.skip("memory_analysis() is not available on this backend")
        return stats.temp_size_in_bytes

    plain, remat = temp_bytes(scan_layers=True), temp_bytes(scan_layers=True, remat="layer")
    assert remat * 2 < plain, (remat, plain)


def test_auto_remat_is_chosen_by_the_platform_the_program_is_lowered_for():
    """remat="auto" compiles to the accelerator policy's program when lowered for cuda (from this CPU
    host) and to no remat when lowered for cpu: the same temporaries as the explicit choices."""
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=512,
    )
    ids = jax.ShapeDtypeStruct((2, 128), jnp.int32)

    def temp_bytes(platform, remat):
        graphdef, state = nnx.split(models.from_config(cfg).set_execution(attention="dense", scan_layers=True,
                                                                           remat=remat))
        grad = jax.jit(jax.grad(lambda state, ids: jnp.sum(nnx.merge(graphdef, state)(ids))))
        with kernels_of(platform):  # the platform's kernels, in a program XLA:CPU compiles
            stats = grad.trace(state, ids).lower().compile().memory_analysis()
        if stats is None:
            pytest.skip("memory_analysis() is not available on this backend")
        return stats.temp_size_in_bytes

    assert layers.Execution().remat == "auto"
    assert temp_bytes("cuda", "auto") == temp_bytes("cuda", layers.ACCELERATOR_REMAT)
    assert temp_bytes("cpu", "auto") == temp_bytes("cpu", "none")
    assert temp_bytes("cuda", layers.ACCELERATOR_REMAT) < temp_bytes("cuda", "none")


def test_projections_unfused_on_accelerators_give_the_same_gradient():
    """q/k/v and gate/up: one concatenated matmul on CPU, one matmul each on a GPU for training-size
    inputs (lowered for cuda, run here); the same loss and gradients to float32 rounding."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                                   attention_bias=True)
    graphdef, state = nnx.split(models.from_config(cfg, rngs=nnx.Rngs(0)))
    ids = jax.random.randint(jax.random.key(0), (4, layers._UNFUSED_MIN_ROWS // 4), 0, 64)
    loss = jax.jit(jax.value_and_grad(lambda state: jnp.sum(nnx.merge(graphdef, state)(ids) ** 2)))
    program = {p: loss.trace(state).lower(lowering_platforms=(p,)) for p in ("cpu", "cuda")}
    assert program["cpu"].as_text().count("stablehlo.concatenate") > program["cuda"].as_text().count(
        "stablehlo.concatenate")  # the kernels' concatenation is gone
    with kernels_of("cuda"):  # the same kernels in a CPU program: XLA:CPU compiles CPU modules only
        gpu_program = loss.trace(state).lower()
    assert gpu_program.as_text().count("stablehlo.concatenate") == program["cuda"].as_text().count(
        "stablehlo.concatenate")
    (cpu_loss, cpu_grads), (gpu_loss, gpu_grads) = (p.compile()(state) for p in (program["cpu"], gpu_program))
    np.testing.assert_allclose(gpu_loss, cpu_loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(gpu_grads), jax.tree.leaves(cpu_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))


def test_scan_layers_over_a_repeating_pattern_with_leftover_layers():
    """Gemma 3 alternating sliding/global layers, 5 of them: two scanned groups of 2, one layer after."""
    types = ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
    assert layers.layer_period([nnx.graphdef(layer) for layer in _gemma3(types).model.layers]) == 2
    ids, mask = left_padded_batch(160, batch=2, seq=10, seed=3)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    ref_logits, ref_grads = _logits_and_grads(_gemma3(types), ids, mask)
    model = _gemma3(types).set_execution(scan_layers=True, remat="layer")
    logits, grads = _logits_and_grads(model, ids, mask)
    tolerance = _model_tolerance(model, ids)
    assert max_real_diff(logits, ref_logits, mask) / np.abs(ref_logits).max() < tolerance
    assert _max_rel_diff(grads, ref_grads) < tolerance


def test_scan_layers_rejects_layers_that_do_not_repeat():
    model = _gemma3(["sliding_attention", "full_attention"]).set_execution(scan_layers=True)
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="scan_layers.*identical decoder layers.*layer 1 differs"):
        model(ids)


def test_cached_calls_ignore_remat_and_scan():
    """A prefill + decode with a KV cache runs the plain layer loop: same logits as the full forward."""
    model = _tiny_llama().set_execution(remat="layer", scan_layers=True, attention="blockwise", attention_block=3)
    ids, mask = left_padded_batch(64, batch=2, seq=9, seed=4)
    mask[:, 6:] = 1
    ids = np.where(mask == 1, np.maximum(ids, 1), 0)
    full = np.asarray(forward(model, ids, mask))
    step = nnx.jit(lambda model, ids, mask, cache: model(ids, mask, cache=cache))
    logits, cache = step(model, jnp.asarray(ids[:, :6]), jnp.asarray(mask[:, :6]), model.init_cache(2, 9))
    pieces = [np.asarray(logits)]
    for t in range(6, 9):
        logits, cache = step(model, jnp.asarray(ids[:, t : t + 1]), jnp.ones((2, 1), jnp.int32), cache)
        pieces.append(np.asarray(logits))
    assert max_real_diff(np.concatenate(pieces, axis=1), full, mask) < 1e-5
    hidden, _ = model.hidden_states(jnp.asarray(ids), jnp.asarray(mask), last_position_only=True)
    np.testing.assert_allclose(model.unembed(hidden)[:, 0], full[:, -1], atol=1e-5)


# ----------------------------------------------------------------------------- the option itself


def test_set_execution_validates_every_option():
    model = _tiny_llama(1)
    assert model.execution == layers.Execution()
    with pytest.raises(ValueError, match=r"remat: got 'everything'.*'none', 'layer', .*'nothing_saveable'"):
        model.set_execution(remat="everything")
    with pytest.raises(ValueError, match="remat"):
        model.set_execution(remat="save_only_these_names")  # a policy factory, not a policy
    with pytest.raises(ValueError, match="attention: got 'flash'"):
        model.set_execution(attention="flash")
    with pytest.raises(ValueError, match="attention_block"):
        model.set_execution(attention_block=0)
    with pytest.raises(ValueError, match="scan_layers"):
        model.set_execution(scan_layers=1)
    with pytest.raises(ValueError, match=r"unknown \['remat_policy'\]"):
        model.set_execution(remat_policy="layer")
    if not layers.on_cuda_gpu():
        with pytest.raises(ValueError, match="cudnn.*CUDA GPU"):
            model.set_execution(attention="cudnn")
    assert model.execution == layers.Execution()  # a failed call changes nothing
    model.set_execution(remat="dots_saveable").set_execution(attention_block=np.int64(64))
    assert model.execution == layers.Execution(remat="dots_saveable", attention_block=64)


def test_execution_lives_in_the_graphdef_and_jit_caches():
    model = _tiny_llama(2)
    default_graphdef = nnx.graphdef(model)
    model.set_execution(scan_layers=True, remat="layer")
    graphdef, state = nnx.split(model)
    assert graphdef != default_graphdef
    assert nnx.merge(graphdef, state).execution == layers.Execution(remat="layer", scan_layers=True)

    @jax.jit
    def logits(state, ids):
        return nnx.merge(graphdef, state)(ids)

    ids = jnp.ones((2, 5), jnp.int32)
    reference = forward(model, ids, jnp.ones_like(ids))
    np.testing.assert_allclose(logits(state, ids), reference,
                               atol=_model_tolerance(model, ids) * float(np.abs(reference).max()))
    logits(state, ids + 1)
    assert logits._cache_size() == 1  # the options are static, the state is all arrays: one compile


def test_reward_model_and_critic_backbones_take_the_options():
    hf = build_hf_model("llama", cls=transformers.AutoModelForSequenceClassification, num_labels=1)
    rm = models.RewardModel(hf.config, rngs=nnx.Rngs(0))
    ids, mask = left_padded_batch(hf.config.vocab_size, seed=6)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    before = np.asarray(rm(ids, mask))
    rm.set_execution(attention="blockwise", attention_block=5, remat="layer", scan_layers=True)
    assert rm.backbone.execution.scan_layers
    np.testing.assert_allclose(rm(ids, mask), before, atol=1e-5)

    policy = _tiny_llama(2)
    separate = models.make_critic(policy, layout="separate", rngs=nnx.Rngs(1))
    values = np.asarray(separate(ids % 64, mask))
    separate.set_execution(scan_layers=True, attention="blockwise", attention_block=4)
    np.testing.assert_allclose(separate(ids % 64, mask), values, atol=1e-5)
    with pytest.raises(ValueError, match="shared critic"):
        models.make_critic(policy, layout="shared").set_execution(remat="layer")
