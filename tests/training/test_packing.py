"""`train.packing`: packed sequences give the unpacked loss and every parameter gradient.

Each case runs `prepare` and one update's `value_and_grad` on the same rollout twice, with one
sequence per row and packed (`training.packing.plan`), and compares: the loss, every metric and
every parameter's gradient to float32 rounding, and what `prepare` fixes (reference and old
log-probabilities, old values, advantages) at every completion token. The rollout's completions
are cut to varied lengths so rows really hold several sequences.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.errors import UserError
from jaxrl_llm.objectives.aggregation import LOSS_AGGREGATIONS
from jaxrl_llm.training import ALGORITHMS, Trainer
from jaxrl_llm.training import packing
from jaxrl_llm.training.algorithms import RolloutBatch

MAX_NEW = 12


def _varied_lengths(batch: RolloutBatch) -> RolloutBatch:
    """Completion n keeps 1 + (5n mod T) tokens (the rest masked, as after a stop token)."""
    n, t = batch.tokens.shape
    keep = 1 + (5 * np.arange(n)) % t
    mask = (np.arange(t)[None, :] < keep[:, None]).astype(np.float32)
    return batch._replace(mask=jnp.asarray(mask * np.asarray(batch.mask)))


def _layout(trainer, batch, num_sequences):
    algorithm = trainer.algorithm
    rows = packing.micro_batch_rows(num_sequences, algorithm.num_micro_batches(num_sequences),
                                    trainer.config.algo.num_samples)
    host = [np.asarray(x) for x in (batch.prompt_ids, batch.prompt_mask, batch.tokens, batch.mask)]
    return packing.plan(*host, rows=rows, pack_length=packing.default_pack_length(host[1], host[3], None))


def _prepare_and_grads(trainer, batch, layout):
    algorithm = trainer.algorithm
    state, train_batch, metrics = jax.jit(algorithm.prepare)(trainer.state, batch, layout)
    key = trainer._dropout_key(jax.random.PRNGKey(1), 0)
    (loss, (aux, _)), grads = jax.jit(algorithm.value_and_grad)(state.params, train_batch, state.base_params,
                                                                key, layout)
    return train_batch, metrics, loss, aux, grads


def _assert_close(a, b, what, rtol=1e-5):
    """|a - b| <= rtol * max|b|; a scalar (a loss, a metric's sum) is a sum of O(1) terms that can
    cancel to ~0 (a policy loss at ratio 1), so its scale is at least 1."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(initial=0.0), 1.0 if b.ndim == 0 else 1e-6)
    assert np.abs(a - b).max(initial=0.0) <= rtol * scale, (what, np.abs(a - b).max(), scale)


def check_packing_is_exact(toy_config, *overrides, algo):
    trainer = Trainer(toy_config(f"rollout.max_new_tokens={MAX_NEW}", *overrides, algo=algo))
    batch = _varied_lengths(trainer.collect()[0])
    n = batch.tokens.shape[0]
    layout = _layout(trainer, batch, n)
    assert layout.ids.shape[0] * layout.ids.shape[1] < n  # fewer rows than sequences: packed
    assert (layout.segment_ids.max(-1) >= 2).any()  # some row holds several sequences
    unpacked = _prepare_and_grads(trainer, batch, None)
    packed = _prepare_and_grads(trainer, batch, layout)
    mask = np.asarray(batch.mask) > 0
    for field in ("old_logprobs", "ref_logprobs", "old_values", "advantages", "returns"):
        a, b = getattr(packed[0], field), getattr(unpacked[0], field)
        assert (a is None) == (b is None), field
        if a is not None:
            a, b = np.asarray(a), np.asarray(b)
            _assert_close(a[mask] if a.shape == mask.shape else a, b[mask] if b.shape == mask.shape else b, field)
    for key in unpacked[1]:
        _assert_close(packed[1][key], unpacked[1][key], key)
    _assert_close(packed[2], unpacked[2], "loss")
    for key, stat in unpacked[3].items():
        _assert_close(packed[3][key].total, stat.total, key)
        assert float(packed[3][key].count) == float(stat.count), key
    flat_packed, flat_unpacked = jax.tree.leaves(packed[4]), jax.tree.leaves(unpacked[4])
    assert len(flat_packed) == len(flat_unpacked) > 0
    assert max(float(jnp.abs(g).max()) for g in flat_unpacked) > 0
    for i, (a, b) in enumerate(zip(flat_packed, flat_unpacked)):
        _assert_close(a, b, f"gradient leaf {i}")


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_packed_update_equals_unpacked_for_every_algorithm(toy_config, algo):
    check_packing_is_exact(toy_config, algo=algo)


# Every algorithm x aggregation mode; in CI RLOO's four (the test above has each algorithm's own).
@pytest.mark.parametrize("algo,aggregation", [
    pytest.param(algo, aggregation, marks=() if algo == "rloo" else pytest.mark.slow)
    for algo in ALGORITHMS for aggregation in LOSS_AGGREGATIONS])
def test_packed_update_equals_unpacked_in_every_aggregation(toy_config, algo, aggregation):
    check_packing_is_exact(toy_config, f"algo.aggregation={aggregation}", algo=algo)


@pytest.mark.parametrize("algo,extra", [
    ("rloo", ["algo.update_epochs=2"]),  # prepare's old forward, the clipped ratio
    ("ppo", ["algo.critic=separate"]), ("ppo", ["algo.critic=shared"]),  # the critic's values
    ("rloo", ["train.micro_batch_size=8"]), ("ppo", ["train.micro_batch_size=8", "algo.update_epochs=2"]),
    # Adapters over a frozen base. (With LoRA dropout the masks are drawn for the packed shape: the
    # same distribution, other draws, as micro-batching already does.)
    ("rloo", ["model.lora={rank: 4, alpha: 8}"]),
])
def test_packed_update_equals_unpacked_with_old_forwards_critics_micro_batches_and_lora(toy_config, algo, extra):
    check_packing_is_exact(toy_config, *extra, algo=algo)


def test_plan_places_every_completion_token_once():
    rng = np.random.default_rng(0)
    n, width, slots = 12, 6, 8
    prompt_mask = (np.arange(width)[None] >= rng.integers(0, 5, n)[:, None]).astype(np.int32)
    completion_mask = (np.arange(slots)[None] < rng.integers(0, slots + 1, n)[:, None]).astype(np.float32)
    prompt_ids = np.where(prompt_mask > 0, rng.integers(3, 50, (n, width)), 0)
    tokens = rng.integers(3, 50, (n, slots))
    rows = packing.micro_batch_rows(n, 3, 2)
    layout = packing.plan(prompt_ids, prompt_mask, tokens, completion_mask, rows=rows, pack_length=16)
    for m, micro in enumerate(rows):
        sources = layout.token_source[m][layout.token_source[m] < len(micro) * slots]
        expected = [i * slots + t for i, row in enumerate(micro) for t in range(slots) if completion_mask[row, t]]
        assert sorted(sources) == expected
        flat_ids = layout.ids[m].reshape(-1)
        for index, source in zip(layout.token_index[m], layout.token_source[m]):
            if source < len(micro) * slots:  # the next token after the predicting position is the completion's
                row, t = micro[source // slots], source % slots
                assert flat_ids[index + 1] == tokens[row, t]


def test_rows_split_over_devices_come_in_multiples_of_them():
    """10 sequences of 8 tokens, two to a row of 16: 5 rows; split over 4 devices, 8 (3 of padding)."""
    ids, prompt_mask = np.full((10, 3), 5), np.ones((10, 3), np.int32)
    tokens, completion_mask = np.full((10, 5), 6), np.ones((10, 5), np.float32)
    rows = np.arange(10)[None]
    one = packing.plan(ids, prompt_mask, tokens, completion_mask, rows=rows, pack_length=16)
    four = packing.plan(ids, prompt_mask, tokens, completion_mask, rows=rows, pack_length=16, row_multiple=4)
    assert one.ids.shape[1] == 5 and four.ids.shape[1] == 8
    np.testing.assert_array_equal(four.ids[:, :5], one.ids)
    assert not four.segment_ids[:, 5:].any()


def test_bucket_rounds_to_four_values_per_octave():
    assert [packing.bucket(x) for x in (0, 3, 5, 9, 11, 17, 33, 100)] == [1, 3, 5, 10, 12, 20, 40, 112]
    assert len({packing.bucket(x) for x in range(65, 129)}) == 4


def test_pack_length_errors_name_the_key():
    prompt_mask, completion_mask = np.ones((2, 5)), np.ones((2, 7))
    assert packing.default_pack_length(prompt_mask, completion_mask, None) == 16
    with pytest.raises(UserError, match=r"`train.pack_length`: got 8, expected at least 12"):
        packing.default_pack_length(prompt_mask, completion_mask, 8)


@pytest.mark.parametrize("algo,extra", [
    ("rloo", ["algo.update_epochs=2", "algo.num_minibatches=2", "train.micro_batch_size=8"]),
    pytest.param("ppo", ["algo.num_minibatches=2"], marks=pytest.mark.slow),
])
def test_trainer_step_with_packing_logs_what_it_logs_without(toy_config, plain_sgd, algo, extra):
    """The trainer plans a layout for prepare and one per shuffled minibatch (its rows, its
    micro-batches): a step logs the same metrics packed and unpacked, and the parameters after its
    four updates agree to the float32 rounding of the gradients (SGD steps: Adam's would turn a
    rounding difference of a near-zero gradient into a step of up to the learning rate)."""
    results = []
    for packed in (False, True):
        trainer = Trainer(toy_config(f"rollout.max_new_tokens={MAX_NEW}", f"train.packing={str(packed).lower()}",
                                     *extra, algo=algo))
        metrics = trainer.step()
        results.append((metrics, jax.tree.leaves(trainer.state.params)))
    (plain, plain_params), (packed, packed_params) = results
    assert 0 < packed["train/packed_fill"] <= 1 and "train/packed_fill" not in plain
    for key in ("loss/total", "kl", "entropy", "reward/mean", "grad_norm", "loss/policy"):
        if key in plain:
            _assert_close(packed[key], plain[key], key, rtol=1e-4)
    for a, b in zip(packed_params, plain_params):  # lr 0.01 times gradients equal to ~1e-5
        np.testing.assert_allclose(a, b, atol=2e-7, rtol=1e-5)


def test_the_trainer_reads_pack_length(toy_config):
    """`train.pack_length` reaches the plan: rows too short for the batch's sequences are refused."""
    trainer = Trainer(toy_config("train.packing=true", "train.pack_length=4"))
    with pytest.raises(UserError, match=r"`train.pack_length`: got 4, expected at least \d+, the longest"):
        trainer.step()
