"""Train the shipped tiny arithmetic policy from scratch, and stop it early on purpose.

    python scripts/train_tiny_policy.py                          # writes jaxrl_llm/assets/tiny_arithmetic/
    python scripts/train_tiny_policy.py --task tool_arithmetic   # writes jaxrl_llm/assets/tiny_tool_arithmetic/

What it does, top to bottom:
  1. builds a ~0.66M-parameter Llama (hidden 128, 4 layers, 4 heads, MLP 256, tied embeddings)
     over the 16-token character vocabulary, with fixed seeds;
  2. supervised fine-tuning on the arithmetic task's training stream: sequences
     ``prompt + answer + <eos>``, cross-entropy on the answer tokens and the EOS only;
  3. greedy held-out accuracy every ``--coarse-eval-every`` steps, and every
     ``--fine-eval-every`` steps once it passes ``--fine-eval-from``;
  4. stops at the FIRST evaluation where the accuracy lies in ``[--band-low, --band-high]``
     (default 35-45%) both on the task's 200-pair eval set (what trainers report) and on all
     ~1000 held-out pairs (so a lucky draw on the small set does not decide), leaving the policy
     competent but with clear room for RL to improve it;
  5. saves config.json + model.safetensors + tokenizer files + training_log.json + README.md,
     and checks that transformers' LlamaForCausalLM gives the same logits (max |diff| < 1e-4).

Deterministic: the model init, the data stream (``ArithmeticTask(seed=...)``) and the optimizer
have no other source of randomness, so a rerun on the same machine reproduces the checkpoint.
If accuracy jumps over the band between two evaluations, the script restarts from the last
evaluated state with fine-grained evaluation (exact replay: the data position is one integer).

``--task tool_arithmetic`` makes the tiny *tool-aware* policy instead: the same Llama over the
23-token tool vocabulary (``char_tokenizer(tools=True)``, 64 positions), SFT on four-digit sums
(``ToolArithmeticTask``) where a ``--tool-fraction`` of the examples take the tool path
``<call>calc(a+b)</call><result>s</result>s<eos>`` (a ``--corrupt-fraction`` of those with one
operand digit miscopied in the call, the result and answer then those of the miscopied sum) and
the rest answer directly. The observation ``<result>...</result>`` carries no loss. Training stops
at the first evaluation where held-out accuracy with the tool path forced (first token ``<call>``,
greedy otherwise, the tool run on the call) reaches ``--target-forced-accuracy`` AND greedy
decoding left alone starts with ``<call>`` on at most ``--max-greedy-call-rate`` of the prompts.
Early in training that rate swings widely (the model is unsure of the answer's first digit, so a
30% ``<call>`` can win the argmax), and later the model learns to add directly; the second
condition picks the window in between: the tool works when called but is rarely chosen, and the
direct answers are poor, which is what multi-turn RL is then to teach.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxrl_llm.assets import tiny_arithmetic_path, tiny_tool_arithmetic_path  # noqa: E402
from jaxrl_llm.environments.formats import CALL_CLOSE, CALL_OPEN  # noqa: E402
from jaxrl_llm.models import from_config, from_pretrained, save_pretrained  # noqa: E402
from jaxrl_llm.rollout.padding import left_pad  # noqa: E402
from jaxrl_llm.tasks import ArithmeticTask, ToolArithmeticTask  # noqa: E402
from jaxrl_llm.tasks.evaluate import encode_prompts, greedy_accuracy  # noqa: E402
from jaxrl_llm.tasks.tokenizer import (  # noqa: E402
    BOS, EOS, PAD, TOOL_VOCAB, VOCAB, char_tokenizer, save_char_tokenizer)
from jaxrl_llm.tasks.tool_arithmetic import calc, tool_call, tool_observation  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=("arithmetic", "tool_arithmetic"), default="arithmetic")
    p.add_argument("--out", type=Path, default=None,
                   help="default: jaxrl_llm/assets/tiny_arithmetic/ or tiny_tool_arithmetic/ (by --task)")
    p.add_argument("--seed", type=int, default=0, help="model init and training-stream seed")
    p.add_argument("--max-operand", type=int, default=None, help="default 99 (arithmetic), 9999 (tool_arithmetic)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--band-low", type=float, default=0.35)
    p.add_argument("--band-high", type=float, default=0.45)
    p.add_argument("--coarse-eval-every", type=int, default=10)
    p.add_argument("--fine-eval-every", type=int, default=1)
    p.add_argument("--fine-eval-from", type=float, default=0.2, help="accuracy where evaluation becomes fine")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=256)
    tool = p.add_argument_group("tool_arithmetic")
    tool.add_argument("--tool-fraction", type=float, default=0.3, help="share of examples on the tool path")
    tool.add_argument("--corrupt-fraction", type=float, default=0.1,
                      help="share of tool-path examples with one operand digit miscopied in the call")
    tool.add_argument("--target-forced-accuracy", type=float, default=0.9,
                      help="stop once held-out accuracy with the tool path forced reaches this")
    tool.add_argument("--max-greedy-call-rate", type=float, default=0.1,
                      help="and stop only where greedy decoding starts with <call> on at most this share of prompts")
    tool.add_argument("--tool-eval-every", type=int, default=50)
    tool.add_argument("--tool-max-steps", type=int, default=3000)
    args = p.parse_args(argv)
    if not 0.0 <= args.band_low < args.band_high <= 1.0:
        p.error(f"--band-low/--band-high: got {args.band_low}, {args.band_high}; expected 0 <= low < high <= 1")
    for name in ("tool_fraction", "corrupt_fraction", "target_forced_accuracy", "max_greedy_call_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}, expected a fraction in [0, 1]")
    tool_task = args.task == "tool_arithmetic"
    if args.out is None:
        args.out = tiny_tool_arithmetic_path() if tool_task else tiny_arithmetic_path()
    if args.max_operand is None:
        args.max_operand = 9999 if tool_task else 99
    return args


def llama_config(args, vocab=VOCAB, max_positions: int = 32):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=VOCAB[PAD],
        bos_token_id=VOCAB[BOS],
        eos_token_id=VOCAB[EOS],
    )


def sft_batch(examples, width: int):
    """Right-padded ``prompt + answer + <eos>``: (tokens, attention_mask, loss_mask) int32 [B, width].

    ``loss_mask[b, t] = 1`` where token ``t + 1`` is an answer token or the EOS (next-token targets).
    """
    tokens = np.full((len(examples), width), VOCAB[PAD], np.int32)
    attention = np.zeros_like(tokens)
    loss_mask = np.zeros_like(tokens)
    for i, ex in enumerate(examples):
        ids = [VOCAB[c] for c in ex.prompt + ex.answer] + [VOCAB[EOS]]
        tokens[i, : len(ids)] = ids
        attention[i, : len(ids)] = 1
        loss_mask[i, len(ex.prompt) - 1 : len(ids) - 1] = 1
    return tokens, attention, loss_mask


def make_train_step(graphdef, optimizer):
    @jax.jit
    def train_step(params, rest, opt_state, tokens, attention, loss_mask):
        def loss_fn(params):
            logits = nnx.merge(graphdef, params, rest)(tokens, attention_mask=attention)
            logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
            mask = loss_mask[:, :-1].astype(jnp.float32)
            return (nll * mask).sum() / mask.sum()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def check_transformers_parity(out: Path, task: ArithmeticTask) -> float:
    """Max |logit difference| between our loader and transformers on the eval prompts + answers."""
    width = max(len(e.prompt) + len(e.answer) + 1 for e in task.eval_examples())
    tokens, attention, _ = sft_batch(task.eval_examples(), width)
    return max_logit_diff(out, tokens, attention)


def max_logit_diff(out: Path, tokens: np.ndarray, attention: np.ndarray) -> float:
    """Max |logit difference| between our loader and transformers' on ``tokens`` where ``attention`` is 1."""
    import torch
    from transformers import AutoModelForCausalLM

    ours = np.asarray(from_pretrained(out)(tokens, attention_mask=attention))
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(attention).long()).logits.numpy()
    valid = attention.astype(bool)
    return float(np.abs(ours - theirs)[valid].max())


def held_out_examples(task: ArithmeticTask):
    """Every held-out pair of the task's operand range."""
    r = range(task.min_operand, task.max_operand + 1)
    return [task.make_example(a, b) for a in r for b in r if task.is_held_out(a, b)]


def write_readme(out: Path, log: dict) -> None:
    c = log["model"]
    (out / "README.md").write_text(
        f"""# tiny_arithmetic — the quick-start policy

A {c['num_parameters'] / 1e6:.2f}M-parameter Llama (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers,
{c['num_attention_heads']} heads, MLP {c['intermediate_size']}, tied embeddings, float32) over a 16-token
character vocabulary (`<pad>` `<bos>` `<eos>` `<unk>` `0`-`9` `+` `=`), trained from scratch by
supervised fine-tuning on `jaxrl_llm.tasks.ArithmeticTask()` (`23+58=` -> `81<eos>`) and
**stopped early on purpose**: at the first evaluation where greedy held-out accuracy lay in
[{log['band'][0]:.0%}, {log['band'][1]:.0%}] both on the task's eval set and on all held-out pairs,
so that RL has room to improve it.

* held-out greedy accuracy at the stop: **{log['heldout_accuracy']:.1%}** ({log['num_eval']} held-out pairs,
  never in the training stream); {log['all_heldout_pairs_accuracy']:.1%} on all {log['num_heldout_pairs']} held-out pairs
* SFT steps: {log['steps']} x batch {log['batch_size']} (Adam lr {log['lr']}, seed {log['seed']}),
  {log['wall_seconds']:.0f} s on {log['machine']}
* reproduce: `{log['command']}`

Load with `jaxrl_llm.models.from_pretrained(jaxrl_llm.tasks.default_policy_path())`, or with
transformers' `AutoModelForCausalLM` / `AutoTokenizer` (same logits within 1e-4). The tokenizer adds
no special tokens on encode; prompts are left-padded with `<pad>`, completions end with `<eos>`.
`training_log.json` holds the full evaluation history.
"""
    )


def main(argv=None) -> dict:
    args = parse_args(argv)
    return main_tool(args, argv) if args.task == "tool_arithmetic" else main_arithmetic(args, argv)


def main_arithmetic(args, argv) -> dict:
    """The tiny arithmetic policy, stopped inside the accuracy band (see the module docstring)."""
    started = time.perf_counter()
    task = ArithmeticTask(max_operand=args.max_operand, seed=args.seed)
    tokenizer = char_tokenizer()
    width = len(f"{args.max_operand}+{args.max_operand}=") + len(str(2 * args.max_operand)) + 1

    model = from_config(llama_config(args), dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    num_parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    schedule = optax.linear_schedule(0.0, args.lr, max(args.warmup_steps, 1))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(params)
    train_step = make_train_step(graphdef, optimizer)
    print(f"model: {num_parameters:,} parameters; band [{args.band_low:.0%}, {args.band_high:.0%}]", flush=True)

    all_held_out = held_out_examples(task)

    def in_band(a: float) -> bool:
        return args.band_low <= a <= args.band_high

    def evaluate(params):
        """Greedy accuracy on the eval set, and on every held-out pair when the first is in band."""
        model = nnx.merge(graphdef, params, rest)
        accuracy = greedy_accuracy(model, tokenizer, task)[0]
        return accuracy, greedy_accuracy(model, tokenizer, task, all_held_out)[0] if in_band(accuracy) else None

    history = []
    step, fine = 0, False
    checkpoint = (0, params, opt_state)  # state at the last evaluation below the band, for replay
    accuracy, all_accuracy = evaluate(params)
    while True:
        history.append({"step": step, "heldout_accuracy": accuracy, "all_heldout_accuracy": all_accuracy})
        if in_band(accuracy) and in_band(all_accuracy):
            break
        if accuracy > args.band_high and not fine:
            print(f"step {step}: {accuracy:.1%} overshot the band; replaying from step {checkpoint[0]}", flush=True)
            step, params, opt_state = checkpoint
            fine = True
        elif accuracy <= args.band_high:
            checkpoint = (step, params, opt_state)
            fine = fine or accuracy >= args.fine_eval_from
        if step >= args.max_steps:
            sys.exit(f"no evaluation landed in the band within --max-steps {args.max_steps}; try another --lr")
        every = args.fine_eval_every if fine else args.coarse_eval_every
        for _ in range(every):
            batch = sft_batch(task.train_batch(step * args.batch_size, args.batch_size), width)
            params, opt_state, loss = train_step(params, rest, opt_state, *batch)
            step += 1
        accuracy, all_accuracy = evaluate(params)
        detail = "" if all_accuracy is None else f" (all held-out pairs {all_accuracy:.1%})"
        print(f"step {step:4d}  loss {float(loss):.4f}  held-out acc {accuracy:.1%}{detail}", flush=True)

    wall = time.perf_counter() - started
    print(f"stop at step {step}: held-out accuracy {accuracy:.1%} after {wall:.0f} s", flush=True)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = nnx.merge(graphdef, params, rest)
    save_pretrained(model, out)
    save_char_tokenizer(out)
    reloaded, _, _ = greedy_accuracy(from_pretrained(out), tokenizer, task)
    if reloaded != accuracy:
        sys.exit(f"reloaded checkpoint scores {reloaded:.1%}, trained model {accuracy:.1%}")
    parity = check_transformers_parity(out, task)
    if parity > 1e-4:
        sys.exit(f"transformers logits differ by {parity:.2e} (> 1e-4)")
    cfg = llama_config(args)
    log = {
        "script": "scripts/train_tiny_policy.py",
        "command": " ".join(["python scripts/train_tiny_policy.py", *(argv if argv is not None else sys.argv[1:])]),
        "task": {"name": "arithmetic", "min_operand": 0, "max_operand": args.max_operand, "seed": args.seed},
        "seed": args.seed,
        "steps": step,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "band": [args.band_low, args.band_high],
        "heldout_accuracy": accuracy,
        "num_eval": task.num_eval,
        "all_heldout_pairs_accuracy": all_accuracy,
        "num_heldout_pairs": len(all_held_out),
        "max_abs_logit_diff_vs_transformers": parity,
        "wall_seconds": round(wall, 1),
        "machine": f"{os.cpu_count()} CPU cores, jax {jax.__version__}",
        "model": model_summary(cfg, num_parameters),
        "history": history,
    }
    return save_log(out, log, write_readme, parity)


def model_summary(cfg, num_parameters: int) -> dict:
    """The model's shape, as training_log.json records it."""
    return {"num_parameters": num_parameters, "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "intermediate_size": cfg.intermediate_size}


def save_log(out: Path, log: dict, write_readme, parity: float) -> dict:
    """training_log.json and the asset's README.md."""
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    write_readme(out, log)
    print(f"saved {out} (transformers parity {parity:.1e})", flush=True)
    return log

# ------------------------------------------------------------------------------ tool_arithmetic
_TOOL_DATA_SALT = 0x7001  # keeps the tool/direct and miscopy draws apart from the task's operand draws
_CALL = re.compile(re.escape(CALL_OPEN) + r"calc\((.*)\)" + re.escape(CALL_CLOSE))


def miscopy_digit(operands: list[str], rng) -> list[str]:
    """``operands`` (decimal strings) with one digit replaced by a different one, never a leading ``0``."""
    operands = list(operands)
    which = int(rng.integers(len(operands)))
    digits = list(operands[which])
    pos = int(rng.integers(len(digits)))
    choices = [d for d in "0123456789" if d != digits[pos] and not (pos == 0 and d == "0")]
    digits[pos] = choices[int(rng.integers(len(choices)))]
    operands[which] = "".join(digits)
    return operands


def tool_segments(example, index: int, args) -> list[tuple[str, bool]]:
    """Training completion ``index`` as ``(text, written by the policy)`` segments, EOS excluded.

    A pure function of ``(args.seed, index)``: the direct answer, or with probability
    ``--tool-fraction`` the call, the observation and the tool's result as the answer (the call
    miscopied with probability ``--corrupt-fraction``: the tool computes what it was given).
    """
    rng = np.random.default_rng([args.seed, index, _TOOL_DATA_SALT])
    if rng.random() >= args.tool_fraction:
        return [(example.answer, True)]
    operands = example.prompt.removesuffix("=").split("+")
    if rng.random() < args.corrupt_fraction:
        operands = miscopy_digit(operands, rng)
    expression = "+".join(operands)
    return [(tool_call(expression), True), (tool_observation(expression), False), (calc(expression), True)]


def tool_sft_batch(tokenizer, rows: list[list[tuple[str, bool]]], width: int):
    """Right-padded segment rows -> (tokens, attention_mask, loss_mask) int32 [B, width].

    ``loss_mask[b, t] = 1`` where token ``t + 1`` was written by the policy (call, answer, EOS);
    prompt and observation tokens are context only.
    """
    tokens = np.full((len(rows), width), TOOL_VOCAB[PAD], np.int32)
    attention = np.zeros_like(tokens)
    loss_mask = np.zeros_like(tokens)
    for i, segments in enumerate(rows):
        ids, written = [], []
        for text, by_policy in segments:
            piece = tokenizer.encode(text, add_special_tokens=False)
            ids += piece
            written += [by_policy] * len(piece)
        tokens[i, : len(ids)] = ids
        attention[i, : len(ids)] = 1
        loss_mask[i, : len(ids) - 1] = written[1:]
    return tokens, attention, loss_mask


def training_rows(task, start_index: int, args) -> list[list[tuple[str, bool]]]:
    """Segment rows ``prompt + completion + <eos>`` of the stream positions ``start_index, ...``."""
    examples = task.train_batch(start_index, args.batch_size)
    return [[(e.prompt, False), *tool_segments(e, start_index + i, args), (EOS, True)] for i, e in enumerate(examples)]


def run_call(completion_text: str) -> str | None:
    """The observation for the policy's last call in ``completion_text``, or None when it is no valid call."""
    calls = _CALL.findall(completion_text[completion_text.rfind(CALL_OPEN):])
    try:
        return tool_observation(calls[0]) if calls else None
    except ValueError:
        return None


def make_last_logits(graphdef, rest):
    """Jitted ``(params, ids, mask) -> logits [B, V]`` at the last position (left-padded rows)."""
    @jax.jit
    def last_logits(params, ids, mask):
        return nnx.merge(graphdef, params, rest)(ids, attention_mask=mask)[:, -1]

    return last_logits


def tool_rollout(last_logits, tokenizer, examples, *, force_call: bool, width: int):
    """Greedy completions in the tool environment, on the host: one full forward per token, no cache.

    ``force_call`` makes the first token ``<call>``. When the policy writes ``</call>`` the call is
    run and the observation appended; an invalid call, or a row reaching ``width`` tokens, ends
    the episode unfinished. Returns (texts without EOS, finished [B] bool, first tokens [B]).
    """
    ids_of = {t: TOOL_VOCAB[t] for t in (CALL_OPEN, CALL_CLOSE, EOS, PAD)}
    prompts = [tokenizer.encode(e.prompt, add_special_tokens=False) for e in examples]
    completions = [[ids_of[CALL_OPEN]] if force_call else [] for _ in examples]
    done, finished = np.zeros(len(examples), bool), np.zeros(len(examples), bool)
    while not done.all():
        ids, mask = left_pad([(p + c)[-width:] for p, c in zip(prompts, completions)], width, ids_of[PAD])
        next_ids = np.asarray(last_logits(ids, mask)).argmax(-1)
        for i in np.flatnonzero(~done):
            completions[i].append(int(next_ids[i]))
            if next_ids[i] == ids_of[EOS]:
                done[i] = finished[i] = True
                continue
            if next_ids[i] == ids_of[CALL_CLOSE]:
                observation = run_call(tokenizer.decode(completions[i], skip_special_tokens=True))
                if observation is None:
                    done[i] = True
                    continue
                completions[i] += tokenizer.encode(observation, add_special_tokens=False)
            done[i] = len(prompts[i]) + len(completions[i]) >= width
    texts = [tokenizer.decode(c[:-1] if f else c, skip_special_tokens=True) for c, f in zip(completions, finished)]
    return texts, finished, np.asarray([c[0] for c in completions])


def first_token_call_rate(last_logits, tokenizer, examples, *, seed: int) -> tuple[float, float]:
    """(rate of a temperature-1 sample starting with ``<call>``, mean probability of ``<call>`` first)."""
    ids, mask = encode_prompts(tokenizer, [e.prompt for e in examples])
    logits = np.asarray(last_logits(ids, mask), np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    rng = np.random.default_rng(seed)
    samples = np.asarray([rng.choice(len(p), p=p) for p in probs])
    call = TOOL_VOCAB[CALL_OPEN]
    return float(np.mean(samples == call)), float(probs[:, call].mean())


def write_tool_readme(out: Path, log: dict) -> None:
    c, e = log["model"], log["final_eval"]
    (out / "README.md").write_text(
        f"""# tiny_tool_arithmetic — a tool-aware policy that rarely uses its tool

A {c['num_parameters'] / 1e6:.2f}M-parameter Llama (hidden {c['hidden_size']}, {c['num_hidden_layers']} layers,
{c['num_attention_heads']} heads, MLP {c['intermediate_size']}, tied embeddings, float32, {c['max_position_embeddings']}
positions) over the {c['vocab_size']}-token tool vocabulary (`jaxrl_llm.tasks.tokenizer.TOOL_VOCAB`: the 16 arithmetic
characters, `(` `)` `calc` `<call>` `</call>` `<result>` `</result>`), trained from scratch by supervised fine-tuning
on `jaxrl_llm.tasks.ToolArithmeticTask()` (`1234+5678=`, operands {log['task']['min_operand']}-{log['task']['max_operand']}):

* {log['tool_fraction']:.0%} of the examples take the tool path
  `<call>calc(1234+5678)</call><result>6912</result>6912<eos>` ({log['corrupt_fraction']:.0%} of those with one operand
  digit miscopied in the call; result and answer then follow the miscopied sum), the rest answer directly
  `6912<eos>`; the loss covers the policy's tokens only (call, answer, EOS), not the `<result>` observation;
* stopped at the first evaluation (every {log['eval_every']} steps) where held-out accuracy **with the tool path
  forced** (first token `<call>`, greedy, the tool run on the call) reached {log['target_forced_accuracy']:.0%} and
  greedy decoding chose `<call>` first on at most {log['max_greedy_call_rate']:.0%} of the eval prompts.

On the {log['num_eval']} held-out eval pairs at the stop:

| decoding | held-out accuracy | starts with `<call>` |
|---|---|---|
| greedy, tool path forced | **{e['forced_tool_accuracy']:.1%}** | (forced) |
| greedy, left alone | **{e['greedy_accuracy']:.1%}** | {e['greedy_call_rate']:.1%} |
| sampled first token, temperature 1 | | {e['sampled_call_rate']:.1%} (mean p = {e['mean_call_probability']:.3f}) |

So the policy can use the calculator but seldom chooses to: the headroom that multi-turn RL is for.

* SFT steps: {log['steps']} x batch {log['batch_size']} (Adam lr {log['lr']}, seed {log['seed']}),
  {log['wall_seconds']:.0f} s on {log['machine']}
* reproduce: `{log['command']}`

Load with `jaxrl_llm.models.from_pretrained(jaxrl_llm.tasks.tool_arithmetic.default_policy_path())`, or with
transformers' `AutoModelForCausalLM` / `AutoTokenizer` (same logits within 1e-4). The tokenizer adds no special
tokens on encode; `<call>`, `</call>`, `<result>`, `</result>` and `calc` are single, ordinary tokens.
`training_log.json` holds the evaluation history.
"""
    )


def main_tool(args, argv) -> dict:
    """The tiny tool-aware policy, trained until the forced tool path is accurate (see the module docstring)."""
    started = time.perf_counter()
    task = ToolArithmeticTask(max_operand=args.max_operand, seed=args.seed)
    tokenizer = char_tokenizer(tools=True)
    cfg = llama_config(args, TOOL_VOCAB, max_positions=tokenizer.model_max_length)
    longest = task.make_example(args.max_operand, args.max_operand)
    width = len(tokenizer.encode(longest.prompt + task.tool_completion(args.max_operand, args.max_operand))) + 1
    eval_width = min(width + 8, cfg.max_position_embeddings)  # room for a few stray tokens in evaluation
    evals = task.eval_examples()

    model = from_config(cfg, dtype=jnp.float32, rngs=nnx.Rngs(args.seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    num_parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    schedule = optax.linear_schedule(0.0, args.lr, max(args.warmup_steps, 1))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(params)
    train_step = make_train_step(graphdef, optimizer)
    last_logits = make_last_logits(graphdef, rest)
    print(f"model: {num_parameters:,} parameters; stop at forced-tool accuracy >= {args.target_forced_accuracy:.0%} "
          f"and greedy call rate <= {args.max_greedy_call_rate:.0%}", flush=True)

    def forced_accuracy(params, last_logits=last_logits) -> float:
        policy = functools.partial(last_logits, params)
        texts, finished, _ = tool_rollout(policy, tokenizer, evals, force_call=True, width=eval_width)
        return task.accuracy(evals, texts, finished)

    history, step, loss = [], 0, float("nan")
    while True:
        forced = forced_accuracy(params)
        first = np.asarray(last_logits(params, *encode_prompts(tokenizer, [e.prompt for e in evals])))
        greedy_calls = float(np.mean(first.argmax(-1) == TOOL_VOCAB[CALL_OPEN]))
        history.append({"step": step, "loss": round(float(loss), 5), "forced_tool_accuracy": forced,
                        "greedy_call_rate": greedy_calls})
        print(f"step {step:4d}  loss {float(loss):.4f}  forced-tool held-out acc {forced:.1%}  "
              f"greedy first token <call> {greedy_calls:.1%}", flush=True)
        if forced >= args.target_forced_accuracy and greedy_calls <= args.max_greedy_call_rate:
            break
        if step >= args.tool_max_steps:
            sys.exit(f"no evaluation within --tool-max-steps {args.tool_max_steps} had forced-tool accuracy >= "
                     f"{args.target_forced_accuracy:.0%} and greedy call rate <= {args.max_greedy_call_rate:.0%}; "
                     "raise it or try another --lr")
        for _ in range(args.tool_eval_every):
            batch = tool_sft_batch(tokenizer, training_rows(task, step * args.batch_size, args), width)
            params, opt_state, loss = train_step(params, rest, opt_state, *batch)
            step += 1

    wall = time.perf_counter() - started
    policy = functools.partial(last_logits, params)
    texts, finished, first = tool_rollout(policy, tokenizer, evals, force_call=False, width=eval_width)
    sampled_rate, call_probability = first_token_call_rate(policy, tokenizer, evals, seed=args.seed)
    final_eval = {
        "forced_tool_accuracy": forced,
        "greedy_accuracy": task.accuracy(evals, texts, finished),
        "greedy_call_rate": float(np.mean(first == TOOL_VOCAB[CALL_OPEN])),
        "sampled_call_rate": sampled_rate,
        "mean_call_probability": call_probability,
        "greedy_examples": [{"prompt": e.prompt, "completion": t} for e, t in zip(evals[:5], texts[:5])],
    }
    print(f"stop at step {step} after {wall:.0f} s: forced-tool {forced:.1%}, greedy {final_eval['greedy_accuracy']:.1%} "
          f"(greedy call rate {final_eval['greedy_call_rate']:.1%}), sampled call rate {sampled_rate:.1%}", flush=True)

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    save_pretrained(nnx.merge(graphdef, params, rest), out)
    save_char_tokenizer(out, tools=True)
    reloaded_graphdef, reloaded_params, reloaded_rest = nnx.split(from_pretrained(out), nnx.Param, ...)
    reloaded = forced_accuracy(reloaded_params, make_last_logits(reloaded_graphdef, reloaded_rest))
    if reloaded != forced:
        sys.exit(f"reloaded checkpoint scores {reloaded:.1%} forced-tool, trained model {forced:.1%}")
    operands = [map(int, e.prompt.removesuffix("=").split("+")) for e in evals]
    tool_rows = [[(e.prompt + task.tool_completion(*ab), True), (EOS, True)] for e, ab in zip(evals, operands)]
    parity = max_logit_diff(out, *tool_sft_batch(tokenizer, tool_rows, width)[:2])
    if parity > 1e-4:
        sys.exit(f"transformers logits differ by {parity:.2e} (> 1e-4)")
    log = {
        "script": "scripts/train_tiny_policy.py",
        "command": " ".join(["python scripts/train_tiny_policy.py", *(argv if argv is not None else sys.argv[1:])]),
        "task": {"name": task.name, "min_operand": task.min_operand, "max_operand": task.max_operand, "seed": args.seed},
        "seed": args.seed,
        "steps": step,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "warmup_steps": args.warmup_steps,
        "tool_fraction": args.tool_fraction,
        "corrupt_fraction": args.corrupt_fraction,
        "target_forced_accuracy": args.target_forced_accuracy,
        "max_greedy_call_rate": args.max_greedy_call_rate,
        "eval_every": args.tool_eval_every,
        "num_eval": len(evals),
        "final_eval": final_eval,
        "max_abs_logit_diff_vs_transformers": parity,
        "wall_seconds": round(wall, 1),
        "machine": f"{os.cpu_count()} CPU cores, jax {jax.__version__}",
        "model": {**model_summary(cfg, num_parameters), "vocab_size": cfg.vocab_size,
                  "max_position_embeddings": cfg.max_position_embeddings},
        "history": history,
    }
    return save_log(out, log, write_tool_readme, parity)


if __name__ == "__main__":
    main()
