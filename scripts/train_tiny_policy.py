"""Train the shipped tiny arithmetic policy from scratch, and stop it early on purpose.

    python scripts/train_tiny_policy.py            # writes jaxrl_llm/assets/tiny_arithmetic/

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
"""

from __future__ import annotations

import argparse
import json
import os
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

from jaxrl_llm.assets import tiny_arithmetic_path  # noqa: E402
from jaxrl_llm.models import from_config, from_pretrained, save_pretrained  # noqa: E402
from jaxrl_llm.tasks import ArithmeticTask  # noqa: E402
from jaxrl_llm.tasks.evaluate import greedy_accuracy  # noqa: E402
from jaxrl_llm.tasks.tokenizer import BOS, EOS, PAD, VOCAB, char_tokenizer, save_char_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=tiny_arithmetic_path())
    p.add_argument("--seed", type=int, default=0, help="model init and training-stream seed")
    p.add_argument("--max-operand", type=int, default=99)
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
    args = p.parse_args(argv)
    if not 0.0 <= args.band_low < args.band_high <= 1.0:
        p.error(f"--band-low/--band-high: got {args.band_low}, {args.band_high}; expected 0 <= low < high <= 1")
    return args


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=32,
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
    import torch
    from transformers import AutoModelForCausalLM

    width = max(len(e.prompt) + len(e.answer) + 1 for e in task.eval_examples())
    tokens, attention, _ = sft_batch(task.eval_examples(), width)
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
        "model": {
            "num_parameters": num_parameters,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "intermediate_size": cfg.intermediate_size,
        },
        "history": history,
    }
    (out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    write_readme(out, log)
    print(f"saved {out} (transformers parity {parity:.1e})", flush=True)
    return log


if __name__ == "__main__":
    main()
