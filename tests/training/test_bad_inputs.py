"""Bad input, end to end: the config loader, model loading, tasks, rewards and checkpoints each
answer with a `UserError` naming the cause (never a silent NaN or a traceback from inside JAX).
The objectives' own argument checks are in tests/test_errors.py."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from jaxrl_llm import UserError, models
from jaxrl_llm.rewards import RewardFunction, Sample, python_term
from jaxrl_llm.tasks import Example, get_task
from jaxrl_llm.tasks.tokenizer import save_char_tokenizer
from jaxrl_llm.training import Checkpointer, Trainer, load_config

# -- the config loader -------------------------------------------------------------------------

CONFIG_CASES = [
    ("algo.nme=rloo", r"`algo`: unknown key\(s\) \['nme'\]; valid keys are"),
    ("train.steps=ten", r"`train.steps`: got 'ten' \(str\), expected int"),
    ("optim.learning_rate=-1e-3", r"`optim.learning_rate`: got -0.001, expected > 0"),
    ("algo.name=dpo", r"`algo.name`: got 'dpo', expected one of"),
    ("algo.num_samples=1", r"`algo.num_samples`: got 1, expected >= 2 for rloo"),
    ("train.micro_batch_size=6", r"`train.micro_batch_size`: got 6, expected a multiple of algo.num_samples=4"),
    ("reward.terms=[]", r"`reward.terms`: got \[\], expected at least one reward term"),
    ("reward.terms=[{kind: regex, pattern: '[a-'}]", r"`reward.terms\[0\].pattern`: '\[a-' is not a regular"),
    ("reward.terms=[{kind: python}]", r"`reward.terms\[0\].target`: got None"),
    ("rollout.temperature=0", r"`rollout.temperature`: got 0.0, expected > 0"),
    ("rollout.long_prompts=cut", r"`rollout.long_prompts`: got 'cut', expected one of \['truncate', 'skip'\]"),
    ("train.on_nonfinite=ignore", r"`train.on_nonfinite`: got 'ignore', expected one of \['stop', 'skip'\]"),
    ("reward.max_invalid_steps=0", r"`reward.max_invalid_steps`: got 0, expected >= 1"),
    ("rollout.top_p=1.5", r"`rollout.top_p`: got 1.5, expected in \(0, 1\]"),
    ("train.steps", r"override 'train.steps': expected the form section.key=value"),
]


@pytest.mark.parametrize("override,message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_config_file_errors_name_the_file(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match=r"list.yaml' holds a list, expected a mapping of sections"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(UserError, match=r"`--config`: no file at '.*missing.yaml'"):
        load_config(tmp_path / "missing.yaml")


# -- model loading ---------------------------------------------------------------------------


def tiny_llama(path, *, vocab_size=16, max_positions=32, model_type=None):
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_positions,
                                   tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    models.save_pretrained(models.from_config(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)), path)
    save_char_tokenizer(path)
    if model_type is not None:
        config = json.loads((path / "config.json").read_text())
        config["model_type"] = model_type
        (path / "config.json").write_text(json.dumps(config))
    return path


def damaged_model(kind, tmp_path):
    path = tiny_llama(tmp_path / "model", vocab_size=8 if kind == "vocab" else 16,
                      model_type="t5" if kind == "architecture" else None)
    if kind == "weights":
        (path / "model.safetensors").unlink()
    elif kind == "tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (path / name).unlink(missing_ok=True)
    elif kind == "config":
        (path / "config.json").unlink()
    return path


MODEL_CASES = [
    ("weights", r"has neither model.safetensors nor model.safetensors.index.json"),
    ("tokenizer", r"`model.path`: no tokenizer could be loaded from .* \(tokenizer files there: none\)"),
    ("config", r"`model.path`: '.*model' has no config.json"),
    ("architecture", r"model_type: got 't5', expected one of"),
    ("vocab", r"`model.path`: the tokenizer in .* has 16 tokens, but the model's embedding table has 8 rows"),
]


@pytest.mark.parametrize("kind,message", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_model_loading_errors_name_the_cause(toy_config, tmp_path, kind, message):
    with pytest.raises(UserError, match=message):
        Trainer(toy_config(f"model.path={damaged_model(kind, tmp_path)}"))


def test_a_missing_model_path(toy_config, tmp_path):
    with pytest.raises(UserError, match=r"`model.path`: got '.*nowhere', which does not exist"):
        Trainer(toy_config(f"model.path={tmp_path / 'nowhere'}"))


@pytest.mark.parametrize("overrides,message", [
    (["rollout.prompt_length=30", "rollout.max_new_tokens=4"],
     r"`rollout.prompt_length`: got 30, and with rollout.max_new_tokens=4 a sequence exceeds the model's context "
     r"of 32 tokens"),
    (["rollout.max_new_tokens=40"], r"`rollout.max_new_tokens`: got 40, but the model's context is 32 tokens"),
])
def test_sequences_longer_than_the_context(toy_config, overrides, message):
    with pytest.raises(UserError, match=message):
        Trainer(toy_config(*overrides))


def test_prompts_longer_than_the_context_are_fitted_to_it(toy_config, tmp_path):
    """Without rollout.prompt_length, the context minus max_new_tokens bounds the prompts."""
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "1+" * 20 + "1="}) + "\n")
    trainer = Trainer(toy_config("task.name=dataset", f"task.options.path={data}", "rollout.prompts_per_step=1",
                                 "rollout.max_new_tokens=4"))
    assert trainer.prompt_limit == 28
    batch, *_, data_metrics = trainer.collect()
    assert batch.prompt_ids.shape[1] == 28 and data_metrics["data/truncated"] == 1


# -- tasks ------------------------------------------------------------------------------------

TASK_CASES = [
    ("empty prompt", [{"prompt": ""}], {}, r"row 0 of .* has an empty prompt"),
    ("number prompt", [{"prompt": 7}], {}, r"row 0 of .* has the prompt 7 \(int\)"),
    ("missing field", [{"question": "1+1="}], {}, r"`task.options.prompt_field`: got 'prompt', but"),
    ("missing answers", [{"prompt": "1+1=", "answer": None}, {"prompt": "2+2=", "answer": "4"}],
     {"answer_field": "answer"}, r"`task.options.answer_field`: 1 row\(s\) of .* have no 'answer' \(the first is "
                                 r"row 0\)"),
    ("bad eval fraction", [{"prompt": "1+1="}], {"eval_fraction": 1.5}, r"`task.options.eval_fraction`: got 1.5"),
]


@pytest.mark.parametrize("name,rows,options,message", TASK_CASES, ids=[c[0] for c in TASK_CASES])
def test_task_errors_name_the_file_and_field(tmp_path, name, rows, options, message):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=message):
        get_task("dataset", path=str(path), **options)


def test_unknown_task_and_option():
    with pytest.raises(UserError, match=r"name: unknown task 'gsm8k', expected one of \['arithmetic', 'dataset', 'tool_arithmetic'\]"):
        get_task("gsm8k")
    with pytest.raises(UserError, match=r"`task.options`: unknown option\(s\) \['max_operands'\]"):
        get_task("arithmetic", max_operands=9)


# -- rewards ----------------------------------------------------------------------------------

REWARDS = '''
import math
def raises(completions, **kw):
    raise KeyError("no such field")
def nan(completions, **kw):
    return [math.nan] * len(completions)
def short(completions, **kw):
    return [1.0]
def words(completions, **kw):
    return ["good"] * len(completions)
'''


@pytest.mark.parametrize("function,message", [
    ("raises", r"reward term .*rewards.py:raises raised KeyError: 'no such field' on sample 0 \(prompt '1\+1=', "
               r"completion '2'\)"),
    ("nan", r"reward term .*rewards.py:nan returned nan for sample 0 .* Set reward.on_error=mask"),
    ("short", r"reward term .*rewards.py:short returned shape \(1,\), expected \(2,\)"),
    ("words", r"reward term .*rewards.py:words raised ValueError: could not convert string to float"),
])
def test_reward_errors_name_the_function_and_sample(tmp_path, function, message):
    (tmp_path / "rewards.py").write_text(REWARDS)
    samples = [Sample(Example("1+1=", "2"), text, True, (5, 2)) for text in ("2", "3")]
    with pytest.raises(UserError, match=message):
        RewardFunction([(1.0, python_term(f"{tmp_path}/rewards.py:{function}"))])(samples)


@pytest.mark.parametrize("target,message", [
    ("no_such_module_xyz:f", r"cannot import 'no_such_module_xyz:f'"),
    ("json:no_such_function", r"'json' has no function 'no_such_function'"),
    ("{tmp}/missing.py:f", r"no file at '.*missing.py'"),
    ("{tmp}/broken.py:f", r"importing '.*broken.py' raised SyntaxError"),
    ("no_colon", r"expected 'package.module:function' or 'path/to/file.py:function'"),
])
def test_reward_targets_that_do_not_load(tmp_path, target, message):
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(UserError, match=message):
        python_term(target.format(tmp=tmp_path))


# -- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_errors_name_the_flag(toy_config, tmp_path):
    trainer = Trainer(toy_config("train.steps=1", f"train.run_dir={tmp_path / 'run'}"))
    with pytest.raises(UserError, match=r"`--resume`: no checkpoint under '.*checkpoints'; train first"):
        trainer.restore()
    trainer.run()
    with pytest.raises(UserError, match=r"`--step`: got step 7, but .* has checkpoints of steps \[1\]"):
        trainer.restore(7, asked_by="--step")
    ppo = Trainer(toy_config("train.steps=1", f"train.run_dir={tmp_path / 'run'}", algo="ppo"))
    with pytest.raises(UserError, match=r"checkpoint step 1 lacks .*critic.* \(written by another model or "
                                        r"algorithm\?\)"):
        ppo.restore()
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == []
    assert np.isfinite(trainer.evaluate()["eval/reward"])
