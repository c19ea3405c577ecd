"""`jaxrl-llm train | eval | export`.

    jaxrl-llm train --config configs/rloo_arithmetic.yaml [--resume] [section.key=value ...]
    jaxrl-llm eval --config configs/rloo_arithmetic.yaml [--checkpoint]
    jaxrl-llm export --config configs/rloo_arithmetic.yaml --output exported/
    jaxrl-llm plan --config configs/rloo_arithmetic.yaml --devices 8 [--device-memory-gb 80]
"""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxrl-llm", description="Online RL for LLMs in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("train", "train a policy with REINFORCE, RLOO, PPO, GRPO, RAFT or vanilla PG"),
        ("eval", "held-out accuracy of the configured policy (or of the run's latest checkpoint)"),
        ("export", "write a run's policy as a Hugging Face directory"),
        ("plan", "per-device memory of the run's compiled programs on N devices, nothing allocated"),
    ]:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=None, help="YAML config (defaults: the built-in RLOO arithmetic run)")
        p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. algo.kl_coef=0.02")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
        if name == "eval":
            p.add_argument("--checkpoint", action="store_true", help="evaluate the run's latest checkpoint")
        if name == "export":
            p.add_argument("--output", required=True, help="directory to write")
            p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
        if name == "plan":
            p.add_argument("--devices", type=int, required=True, help="devices to plan for (fake CPU devices)")
            p.add_argument("--device-memory-gb", type=float, default=None,
                           help="say whether the largest program fits this much memory per device")
            p.add_argument("--programs", default="generate,prepare,update",
                           help="comma-separated programs to compile (default: all three)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "plan":
        if args.devices < 1:
            print(f"jaxrl-llm: `--devices`: got {args.devices}, expected a positive integer", file=sys.stderr)
            return 2
        from jaxrl_llm.training.plan import use_fake_cpu_devices

        use_fake_cpu_devices(args.devices)  # before anything starts JAX
    from jaxrl_llm.training import Trainer, export, load_config, train

    try:
        config = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"jaxrl-llm: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "train":
        summary = train(config, resume=args.resume)
        print(json.dumps({k: v for k, v in summary.items() if "accuracy" in k or k.startswith("reward/")}, indent=2))
    elif args.command == "plan":
        from jaxrl_llm.training.plan import format_plan, plan

        try:
            result = plan(config, devices=args.devices, programs=tuple(args.programs.split(",")))
        except ValueError as e:
            print(f"jaxrl-llm: {e}", file=sys.stderr)
            return 2
        print(format_plan(result, device_memory_gb=args.device_memory_gb))
    elif args.command == "eval":
        trainer = Trainer(config, resume=args.checkpoint)
        print(json.dumps(trainer.evaluate(), indent=2))
    else:
        print(f"wrote {export(config, args.output, step=args.step)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
