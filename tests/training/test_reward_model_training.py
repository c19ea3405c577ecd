"""`jaxrl-llm train-rm`: the Bradley–Terry objective against its formula, a reward model that
learns a preference from pairs, and the directory transformers and the RL trainer load."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxrl_llm.errors import UserError
from jaxrl_llm.objectives import bradley_terry_loss
from jaxrl_llm.rewards import Sample, reward_model_term
from jaxrl_llm.tasks import ArithmeticTask
from jaxrl_llm.training.reward_model import load_rm_config, train_reward_model


def test_bradley_terry_loss_and_gradient_match_torch():
    rng = np.random.default_rng(0)
    chosen, rejected, margin = (rng.normal(size=6).astype(np.float32) for _ in range(3))
    weights = np.array([1, 1, 0, 1, 1, 1], np.float32)

    def ours(c, r):
        return bradley_terry_loss(c, r, margin=margin, center_coef=0.3, weights=weights)[0]

    c_t, r_t = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (chosen, rejected))
    keep = torch.tensor(weights, dtype=torch.float64) > 0
    # TRL's RewardTrainer: -logsigmoid(r_c - r_r - margin).mean() + coef * mean((r_c + r_r)^2), on the kept pairs.
    theirs = (-torch.nn.functional.logsigmoid(c_t - r_t - torch.tensor(margin, dtype=torch.float64))[keep].mean()
              + 0.3 * ((c_t + r_t) ** 2)[keep].mean())
    theirs.backward()
    np.testing.assert_allclose(float(ours(chosen, rejected)), theirs.item(), rtol=1e-6)
    grads = jax.grad(ours, argnums=(0, 1))(jnp.asarray(chosen), jnp.asarray(rejected))
    np.testing.assert_allclose(np.asarray(grads[0]), c_t.grad.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(grads[1]), r_t.grad.numpy(), rtol=1e-5, atol=1e-7)
    _, aux = bradley_terry_loss(chosen, rejected, weights=weights)
    assert float(aux["accuracy"].count) == 5
    assert float(aux["accuracy"].total) == float(((chosen > rejected) * weights).sum())
    with pytest.raises(ValueError, match="`rejected_rewards` must have shape"):
        bradley_terry_loss(chosen, rejected[:3])


def write_sevens_pairs(path, n, seed=0):
    """A preference a small model can learn from pairs: more sevens in the answer is better."""
    task, rng = ArithmeticTask(), np.random.default_rng(seed)
    with open(path, "w") as f:
        for i in range(n):
            digits = rng.choice(list("0123456789"), size=(2, 3))
            sevens = (digits == "7").sum(1)
            if sevens[0] == sevens[1]:
                digits[0, rng.integers(3)] = "7" if sevens[0] < 3 else "1"
                sevens = (digits == "7").sum(1)
            better = int(np.argmax(sevens))
            texts = ["".join(d) for d in digits]
            f.write(json.dumps({"prompt": task.train_example(i).prompt, "chosen": texts[better],
                                "rejected": texts[1 - better]}) + "\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    directory = tmp_path_factory.mktemp("rm")
    write_sevens_pairs(directory / "pairs.jsonl", 1200)
    (directory / "rm.yaml").write_text(
        "model: {path: 'builtin:tiny_arithmetic'}\n"
        "data: {path: pairs.jsonl, eval_fraction: 0.2}\n"
        f"train: {{epochs: 2, batch_size: 32, learning_rate: 1.0e-3, eval_every: 1000, output_dir: {directory / 'out'}}}\n")
    config = load_rm_config(directory / "rm.yaml")
    assert config.data.path == str(directory / "pairs.jsonl")  # relative to the config file
    return train_reward_model(config), directory


def test_the_reward_model_learns_the_preference_from_pairs(trained):
    summary, directory = trained
    assert summary["eval_pairs"] == 240 and summary["train_pairs"] == 960
    assert 0.35 <= summary["eval/accuracy_before"] <= 0.65  # a new head: chance
    assert summary["eval/accuracy"] >= 0.85, summary  # 35 points above chance after 60 updates
    rows = [json.loads(line) for line in (directory / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == summary["steps"] == 60


def test_transformers_and_the_trainer_load_it_with_our_scores(trained):
    summary, _ = trained
    model_dir = summary["model_dir"]
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = ["12+30=777", "12+30=42", "5+5=10", "99+1=7"]
    score = reward_model_term(model_dir, batch_size=4)  # what `reward.terms[].kind: reward_model` runs
    task = ArithmeticTask()
    ours = np.asarray(score([Sample(task.train_example(0)._replace(prompt=t.split("=")[0] + "="), t.split("=")[1],
                                     True, ()) for t in texts]))
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        theirs = [hf(input_ids=torch.tensor([tokenizer(t)["input_ids"] + [eos]])).logits[0, 0].item() for t in texts]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert ours[0] > ours[1]  # three sevens beat none


def test_bad_reward_model_configs_are_named(tmp_path):
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "1+1=", "good": "2", "rejected": "3"}) + "\n")
    config = load_rm_config(None, [f"data.path={tmp_path / 'pairs.jsonl'}", f"train.output_dir={tmp_path / 'o'}"])
    with pytest.raises(UserError, match=r"`data.chosen_field`: .* has no column 'chosen'; its columns are"):
        train_reward_model(config)
    with pytest.raises(UserError, match=r"`train.learning_rate`: got -1.0, expected > 0"):
        load_rm_config(None, ["data.path=x.jsonl", "train.learning_rate=-1.0"])
    with pytest.raises(UserError, match=r"`data.path`: got '', expected the path of a preference-pair file"):
        load_rm_config(None, [])


def test_the_cli_trains_and_prints_the_summary(tmp_path, capsys):
    from jaxrl_llm.cli import main

    write_sevens_pairs(tmp_path / "pairs.jsonl", 40)
    assert main(["train-rm", "--config", "configs/rm_arithmetic.yaml", f"data.path={tmp_path / 'pairs.jsonl'}",
                 "train.epochs=1", "train.batch_size=16", f"train.output_dir={tmp_path / 'out'}"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{"):])
    assert summary["steps"] == 3 and summary["train_pairs"] == 36 and summary["eval_pairs"] == 4
    assert (tmp_path / "out" / "model" / "config.json").is_file()
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_labels"] == 1


def test_margin_field_and_centring_reach_the_gradient(tmp_path):
    """`data.margin_field` and `train.center_rewards_coefficient` change the update as the
    formula says: the train-rm loss on a batch is bradley_terry_loss of the model's scores with
    them, and its gradient moves with each."""
    from flax import nnx

    from jaxrl_llm.training.reward_model import load_backbone, pair_loss, split_pairs

    rows = [{"prompt": f"{i}+1=", "chosen": "77", "rejected": "12", "m": float(i % 3)} for i in range(20)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_rm_config(None, [f"data.path={tmp_path / 'pairs.jsonl'}", "data.margin_field=m",
                                   "train.center_rewards_coefficient=0.5"])
    model, tokenizer = load_backbone(config)
    train, _ = split_pairs(config, tokenizer)
    ids, mask, margin, real = train.batch(np.arange(6), 8)  # 6 pairs and 2 fillers
    assert margin[:6].tolist() == [float(train.margin[i]) for i in range(6)] and real.tolist() == [1] * 6 + [0] * 2
    graphdef, params = nnx.split(model)
    scores = np.asarray(model(ids, mask))
    expected, _ = bradley_terry_loss(scores[:6], scores[8:14], margin=margin[:6], center_coef=0.5)
    loss, aux = pair_loss(graphdef, params, ids, mask, margin, real, center_coef=0.5)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-5)
    assert float(aux["accuracy"].count) == 6

    def grad_norm(margin, center_coef):
        grads = jax.grad(lambda p: pair_loss(graphdef, p, ids, mask, margin, real, center_coef=center_coef)[0])(params)
        return float(np.sqrt(sum(np.sum(np.square(np.asarray(g))) for g in jax.tree.leaves(grads))))

    base = grad_norm(np.zeros_like(margin), 0.0)
    assert abs(grad_norm(margin, 0.0) - base) > 1e-4 * base
    assert abs(grad_norm(np.zeros_like(margin), 0.5) - base) > 1e-4 * base


def test_bf16_compute_keeps_float32_masters_and_every_small_step_lands(tmp_path, tiny_policy_dir):
    """`model.dtype: bfloat16` computes in bfloat16 over float32 master weights (the policy
    trainer's mixed precision): at lr 1e-5, over 99% of the weights that get a gradient move in 3
    updates. Stored in bfloat16 (ulp ~1e-4 at 0.02), most such AdamW steps round away."""
    from flax import nnx

    from jaxrl_llm.models import reward_model_from_pretrained
    from jaxrl_llm.training.reward_model import load_backbone, pair_loss, split_pairs

    write_sevens_pairs(tmp_path / "pairs.jsonl", 30)  # 27 pairs to train on: 3 updates of 9
    overrides = [f"model.path={tiny_policy_dir}", f"data.path={tmp_path / 'pairs.jsonl'}", "train.batch_size=9",
                 "train.learning_rate=1e-5", "train.eval_every=1000", f"train.output_dir={tmp_path / 'out'}"]
    start, tokenizer = load_backbone(load_rm_config(None, overrides))  # float32: where training starts
    graphdef, start_params = nnx.split(start)
    pairs, _ = split_pairs(load_rm_config(None, overrides), tokenizer)
    batch = pairs.batch(np.arange(len(pairs)), len(pairs))
    grads = jax.jit(jax.grad(lambda p: pair_loss(graphdef, p, *batch, center_coef=0.0)[0]))(start_params)

    summary = train_reward_model(load_rm_config(None, [*overrides, "model.dtype=bfloat16"]))
    assert summary["steps"] == 3
    model_dir = summary["model_dir"]
    stored = json.loads((tmp_path / "out" / "model" / "config.json").read_text())["dtype"]
    trained = nnx.state(reward_model_from_pretrained(model_dir, dtype=stored))  # the saved weights as stored
    changed = touched = 0
    for old, new, g in zip(jax.tree.leaves(start_params), jax.tree.leaves(trained), jax.tree.leaves(grads)):
        got_gradient = np.asarray(g) != 0
        touched += got_gradient.sum()
        moved = np.asarray(new) != np.asarray(old.astype(new.dtype))
        changed += moved[got_gradient].sum()
    assert stored == "float32" and changed / touched > 0.99, (stored, changed / touched)


def test_an_export_whose_tokenizer_pads_with_eos_scores_as_our_term_in_transformers(tmp_path, tiny_policy_dir):
    """A tokenizer without a pad token pads with EOS, and train-rm appends EOS. transformers
    scores a sequence at its last token that is not the config's pad id: the exported directory
    declares another pad, so that transformers (saved tokenizer, padded batch) scores at the EOS
    as our reward_model term does."""
    import shutil

    from jaxrl_llm.training.reward_model import load_backbone, save_reward_model

    policy_dir = tmp_path / "policy"
    shutil.copytree(tiny_policy_dir, policy_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(policy_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(policy_dir)
    model, tokenizer = load_backbone(load_rm_config(None, [f"model.path={policy_dir}", "data.path=unused.jsonl"]))
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos  # how train-rm pads its batches
    save_reward_model(model, tmp_path / "rm", tokenizer)

    prompts, completions = ["12+30=", "5+5=", "99+1=", "7+7="], ["777", "10", "1000", "4"]
    task = ArithmeticTask()
    samples = [Sample(task.train_example(0)._replace(prompt=p), c, True, ()) for p, c in zip(prompts, completions)]
    ours = np.asarray(reward_model_term(str(tmp_path / "rm"), batch_size=4)(samples))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", dtype=torch.float32).eval()
    saved = transformers.AutoTokenizer.from_pretrained(tmp_path / "rm")
    rows = [saved(p + c)["input_ids"] + [eos] for p, c in zip(prompts, completions)]
    batch = saved.pad({"input_ids": rows}, padding=True, return_tensors="pt")
    assert len({len(r) for r in rows}) > 1  # padded
    with torch.no_grad():
        theirs = hf(**batch).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    assert hf.config.pad_token_id == saved.pad_token_id != eos


def test_the_exported_pad_is_a_new_id_inside_the_table_or_another_special_token():
    from jaxrl_llm.tasks.tokenizer import char_tokenizer
    from jaxrl_llm.training.reward_model import export_pad_token

    tokenizer = char_tokenizer()  # 16 tokens: <pad> 0, <bos> 1, <eos> 2, <unk> 3, ...
    tokenizer.pad_token = tokenizer.eos_token
    grown, pad = export_pad_token(tokenizer, num_embeddings=20)  # 4 rows past the vocabulary
    assert (pad, grown.pad_token, len(grown)) == (16, "<|pad|>", 17)
    assert tokenizer.pad_token_id == 2 and len(tokenizer) == 16  # the caller's tokenizer is untouched
    assert export_pad_token(tokenizer, num_embeddings=16)[1] == 1  # a full table: BOS
    tokenizer.bos_token = tokenizer.unk_token = None
    with pytest.raises(UserError, match="pads with EOS .* no special token other than EOS"):
        export_pad_token(tokenizer, num_embeddings=16)


def test_truncation_keeps_the_end_and_a_leading_bos():
    """`train.max_length` cuts a long prompt + response from the left as the policy's prompts are
    cut (`fit_prompts`): the end is kept, and so is the BOS the tokenizer put first (the
    reward_model term scores with it)."""
    import datasets
    from tokenizers import processors

    from jaxrl_llm.tasks.tokenizer import VOCAB, build_char_tokenizer
    from jaxrl_llm.training.reward_model import Pairs

    backend = build_char_tokenizer()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", VOCAB["<bos>"])])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                                     eos_token="<eos>", unk_token="<unk>")
    rows = datasets.Dataset.from_list([{"prompt": "12+30+45=", "chosen": "87", "rejected": "77"}])
    config = load_rm_config(None, ["data.path=unused.jsonl", "train.max_length=6"])
    pairs = Pairs(rows, config, tokenizer, source="rows")
    assert tokenizer("12+30+45=87")["input_ids"][0] == VOCAB["<bos>"]
    assert pairs.chosen == [[VOCAB["<bos>"], *(VOCAB[c] for c in "5=87"), VOCAB["<eos>"]]]
