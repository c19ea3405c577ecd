"""`jaxrl-llm train | eval | export | plan`.

    jaxrl-llm train --config configs/rloo_arithmetic.yaml [--resume] [section.key=value ...]
    jaxrl-llm train --config ... --coordinator HOST:PORT --num-processes N --process-id I   (one per host)
    jaxrl-llm eval --config configs/rloo_arithmetic.yaml [--checkpoint]
    jaxrl-llm export --config configs/rloo_arithmetic.yaml --output exported/ [--step N] [--merge]
    jaxrl-llm plan --config configs/rloo_arithmetic.yaml --devices 8 [--device-memory-gb 80]
    jaxrl-llm train-rm --config configs/rm_arithmetic.yaml [section.key=value ...]

Errors a user can fix (`jaxrl_llm.UserError`: a config value, a missing file or checkpoint, a
reward function's output, the devices) print as one line naming the cause and the fix, with
exit status 2. Anything else is a bug and keeps its traceback (exit status 1); `--debug` shows
the traceback of every error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIG_HELP = ("YAML config (required). configs/rloo_arithmetic.yaml is the main job's recipe; keys a file "
               "leaves out take the defaults in jaxrl_llm/training/config.py (sized for real models: lr 1e-6)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrl-llm", description="Online RL for LLMs in JAX.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, help=CONFIG_HELP)
    common.add_argument("--debug", action="store_true", help="show the traceback of every error")
    common.add_argument("--host-malloc", choices=["tuned", "default"], default="tuned",
                        help="glibc's malloc: tuned (the default) keeps XLA:CPU's large buffers for the next "
                             "call instead of unmapping them and faulting them in again (faster CPU steps; the "
                             "process keeps its peak memory); default leaves glibc as it is. A MALLOC_* "
                             "variable in the environment wins (jaxrl_llm/training/host_memory.py)")
    common.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. algo.kl_coef=0.02")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("train", "train a policy with REINFORCE, RLOO, PPO, GRPO, RAFT or vanilla PG"),
        ("eval", "held-out metrics and sample completions of the configured policy (or of the run's latest checkpoint)"),
        ("export", "write a run's policy as a Hugging Face directory"),
        ("plan", "per-device memory of the run's compiled programs on N devices, nothing allocated"),
        ("train-rm", "train a Bradley-Terry reward model on preference pairs (a train-rm config: model, data, train)"),
    ]:
        p = sub.add_parser(name, help=help_text, parents=[common])
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
            p.add_argument("--coordinator", default=None,
                           help="multi-process run: HOST:PORT of process 0 (with --num-processes, --process-id)")
            p.add_argument("--num-processes", type=int, default=None, help="multi-process run: how many processes")
            p.add_argument("--process-id", type=int, default=None, help="multi-process run: this process, 0..N-1")
            p.add_argument("--distributed-auto", action="store_true",
                           help="multi-process run set up by the cluster (SLURM, Open MPI, TPU pods): JAX "
                                "detects the coordinator and this process's id")
        if name == "eval":
            p.add_argument("--checkpoint", action="store_true", help="evaluate the run's latest checkpoint")
        if name == "export":
            p.add_argument("--output", required=True, help="directory to write")
            p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
            p.add_argument("--merge", action="store_true",
                           help="LoRA runs: write the base with the adapters merged in (a Hugging Face "
                                "directory) instead of a PEFT adapter directory")
        if name == "plan":
            p.add_argument("--devices", type=int, required=True, help="devices to plan for (fake CPU devices)")
            p.add_argument("--device-memory-gb", type=float, default=None,
                           help="say whether the largest program fits this much memory per device")
            p.add_argument("--programs", default="generate,prepare,update",
                           help="comma-separated programs to compile (default: all three)")
            p.add_argument("--platform", default="cuda", choices=["cuda", "rocm", "tpu", "cpu"],
                           help="the machine planned for: its programs (kernels pick their blocking by it), "
                                "compiled here for XLA's memory analysis (default: cuda)")
            p.add_argument("--compare-remat", action="store_true",
                           help="also compile the update under each remat policy and recommend the least "
                                "recomputation that fits --device-memory-gb")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags and `key=value` overrides in any order (`train a.b=1 --resume c.d=2`): argparse alone
    would take only the first run of positionals."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides are section.key=value)")
    args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from jaxrl_llm.errors import Interrupted, UserError

    try:
        return _run(args)
    except Interrupted as e:  # SIGINT / SIGTERM: 128 + the signal's number, as a shell reports it
        print(f"jaxrl-llm {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except UserError as e:
        if args.debug:
            raise
        message = " ".join(str(e).split())  # one line, whatever the message's own line breaks
        if e.__cause__ is not None:
            message += " (--debug shows the traceback)"
        print(f"jaxrl-llm {args.command}: {message}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from jaxrl_llm.errors import UserError

    if args.host_malloc == "tuned":  # before JAX starts its threads: they keep the arenas they have
        from jaxrl_llm.training.host_memory import tune_glibc_malloc

        tune_glibc_malloc()
    if args.command == "train":  # before anything else touches JAX
        from jaxrl_llm.parallel import distributed

        distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed_auto)
    if args.command == "plan":
        if args.devices < 1:
            raise UserError(f"`--devices`: got {args.devices}, expected a positive integer.")
        from jaxrl_llm.training.plan import use_fake_cpu_devices

        use_fake_cpu_devices(args.devices)  # before anything starts JAX
    from jaxrl_llm.training import Trainer, export, load_config, train
    from jaxrl_llm.training.logging import markdown_table, to_json

    if args.command == "train-rm":
        from jaxrl_llm.training.reward_model import load_rm_config, train_reward_model

        summary = train_reward_model(load_rm_config(args.config, args.overrides))
        print(to_json(summary, indent=2))
        return 0
    config = load_config(args.config, args.overrides)
    if args.command == "train":
        summary = train(config, resume=args.resume)
        shown = ("eval/", "reward/", "train/accuracy")
        print(to_json({k: v for k, v in summary.items() if k.startswith(shown)}, indent=2))
    elif args.command == "plan":
        from jaxrl_llm.training.plan import format_plan, plan

        result = plan(config, devices=args.devices, programs=tuple(args.programs.split(",")), platform=args.platform,
                      compare_remat=args.compare_remat)
        print(format_plan(result, device_memory_gb=args.device_memory_gb))
    elif args.command == "eval":
        trainer = Trainer(config)
        if args.checkpoint:
            step = trainer.restore(asked_by="--checkpoint")
            print(f"evaluating step {step} of {trainer.checkpointer.directory}")
        else:
            print(f"evaluating the configured policy (model.path={config.model.path}, step 0; "
                  "--checkpoint evaluates the run's latest checkpoint)")
        metrics, rows = trainer.evaluate_with_samples()
        if not metrics:
            raise UserError(f"`task.name`: {config.task.name!r} has no held-out examples to evaluate.")
        if rows:
            print(markdown_table(rows))
        print(to_json(metrics, indent=2))
    else:
        output, step = export(config, args.output, step=args.step, merge=args.merge)
        what = ("" if config.model.lora is None else
                " (LoRA merged into the base)" if args.merge else " (PEFT adapter directory)")
        print(f"wrote step {step} of {Path(config.train.run_dir) / 'checkpoints'} to {output}{what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
