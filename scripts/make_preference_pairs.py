"""Write jaxrl_llm/assets/arithmetic_preferences/pairs.jsonl: preference pairs of the shipped tiny
policy on the arithmetic task, labelled by the hidden gold judge (jaxrl_llm/tasks/gold_judge.py).

    python scripts/make_preference_pairs.py [--prompts 4000] [--noise 0.1]

4 completions per prompt at temperature 1; each prompt whose completions the judge does not
score alike gives its best against its worst, 10% of the labels flipped. configs/rm_arithmetic.yaml
trains a reward model on them; benchmarks/paper_table.py samples the same pairs anew.
"""

import argparse
from pathlib import Path

from jaxrl_llm.tasks import gold_judge
from jaxrl_llm.training import Trainer, load_config

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4000)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--out", default=str(ROOT / "jaxrl_llm" / "assets" / "arithmetic_preferences" / "pairs.jsonl"))
    args = parser.parse_args()
    trainer = Trainer(load_config(ROOT / "configs" / "rloo_arithmetic.yaml",
                                  ["train.run_dir=/tmp/make_preference_pairs", "train.progress=false"]))
    pairs = gold_judge.sample_pairs(trainer, args.prompts, noise=args.noise)
    print(f"{len(pairs)} pairs from {args.prompts} prompts -> {gold_judge.write_pairs(pairs, args.out)}")
