"""Generate a tiny offline set of grade-school arithmetic word problems, deterministically.

    python scripts/make_word_problems.py            # writes jaxrl_llm/assets/word_problems/

Why: a recipe that runs RL on a real (base) language model needs a task it can load offline, whose
answers a numeric verifier can check exactly. These are GSM8K-style problems, only smaller: one or
two steps of +, -, * or exact /, small numbers (mostly 2-50), integer answers in [0, 1000).

Each line of ``train.jsonl`` / ``eval.jsonl`` is one JSON object with, in this order:
  question  the problem in English ("Mia has 12 stickers. She gives 5 ...?");
  answer    the integer answer as a plain decimal string ("15");
  solution  one worked line in the GSM8K convention ("12 - 5 + 8 = 15. #### 15"); the part before
            " = " is a Python expression of ints, +, -, *, / and parentheses, so a test can check it.

Only ``random.Random(seed)`` is used, and eval is drawn first, from the same stream, then train
skipping every question already drawn: reruns are byte-identical, eval does not depend on the size of
train, and no question appears twice in or across the two files.

The prompt a base model sees is the recipe's (``configs/rloo_gemma3_270m_math.yaml``,
``task.options.prompt_template``): two worked examples, then "Question: <question>\\nAnswer:"; a
completion is expected to read " 12 - 5 + 8 = 15. The answer is 15." and end with a blank line. The
examples' names (Ben, Rosa) are not in ``NAMES``, so no generated question repeats one.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "jaxrl_llm" / "assets" / "word_problems"

FEMALE = ["Mia", "Emma", "Ava", "Sofia", "Priya", "Aisha", "Zoe", "Hana", "Lily", "Grace", "Nora",
          "Chloe", "Maya", "Yuki", "Fatima", "Elena", "Amara", "Julia", "Leah", "Ines"]
MALE = ["Liam", "Noah", "Lucas", "Omar", "Diego", "Ethan", "Mateo", "Kenji", "Arjun", "Leo", "Jack",
        "Owen", "Tariq", "Luca", "Felix", "Hugo", "Kofi", "Ravi", "Max", "Daniel"]
NAMES = [(n, "she", "her", "her") for n in FEMALE] + [(n, "he", "his", "him") for n in MALE]

THINGS = ["stickers", "marbles", "pencils", "cards", "shells", "stamps", "beads", "crayons",
          "balloons", "books", "toy cars", "buttons", "rocks", "erasers"]
FOODS = ["apples", "cookies", "strawberries", "crackers", "grapes", "candies", "muffins", "carrots",
         "oranges", "pretzels"]
OBJECTS = THINGS + FOODS
BUYABLE = [o for o in OBJECTS if o not in ("shells", "rocks")]  # found or collected, not bought
ITEMS = [("notebook", "notebooks"), ("pen", "pens"), ("toy car", "toy cars"), ("comic book", "comic books"),
         ("sandwich", "sandwiches"), ("ticket", "tickets"), ("ball", "balls"), ("plant", "plants"),
         ("puzzle", "puzzles"), ("kite", "kites")]
RELATIVES = ["brother", "sister", "friend", "cousin", "neighbor", "classmate"]
# (third person, base form, unit) for "does 7 laps a day for 5 days" problems.
ACTIVITIES = [("reads", "read", "pages"), ("swims", "swim", "laps"), ("folds", "fold", "paper cranes"),
              ("plants", "plant", "seeds"), ("saves", "save", "dollars"), ("bakes", "bake", "cookies")]


def _person(rng: random.Random) -> dict:
    name, he, his, him = rng.choice(NAMES)
    return {"name": name, "he": he, "He": he.capitalize(), "his": his, "him": him}


def _two_names(rng: random.Random) -> tuple[str, str]:
    first, second = rng.sample(NAMES, 2)
    return first[0], second[0]


# Each template draws its numbers so that every intermediate result is a non-negative integer, and
# returns (question, expression, answer); the answer is computed here, independently of the
# expression string, so the test that evaluates the expression checks both.

def t_add_find(rng, p):
    a, b, obj = rng.randint(5, 50), rng.randint(2, 50), rng.choice(OBJECTS)
    q = f"{p['name']} has {a} {obj}. {p['He']} finds {b} more. How many {obj} does {p['name']} have now?"
    return q, f"{a} + {b}", a + b


def t_sub_give(rng, p):
    a = rng.randint(10, 60)
    b, obj = rng.randint(2, a - 1), rng.choice(OBJECTS)
    q = (f"{p['name']} has {a} {obj}. {p['He']} gives {b} of them to {p['his']} {rng.choice(RELATIVES)}. "
         f"How many {obj} does {p['name']} have left?")
    return q, f"{a} - {b}", a - b


def t_mul_packs(rng, p):
    a, b, obj = rng.randint(2, 12), rng.randint(2, 25), rng.choice(BUYABLE)
    q = (f"{p['name']} buys {a} packs of {obj}. Each pack has {b} {obj}. "
         f"How many {obj} does {p['name']} buy in total?")
    return q, f"{a} * {b}", a * b


def t_div_share(rng, p):
    k, each, obj = rng.randint(2, 10), rng.randint(2, 15), rng.choice(OBJECTS)
    q = (f"{p['name']} has {k * each} {obj} and shares them equally among {k} friends. "
         f"How many {obj} does each friend get?")
    return q, f"{k * each} / {k}", each


def t_sub_add(rng, p):
    a = rng.randint(8, 50)
    b, c, obj = rng.randint(2, a - 1), rng.randint(2, 30), rng.choice(BUYABLE)
    q = (f"{p['name']} has {a} {obj}. {p['He']} gives {b} to {p['his']} {rng.choice(RELATIVES)} and buys "
         f"{c} more. How many {obj} does {p['name']} have now?")
    return q, f"{a} - {b} + {c}", a - b + c


def t_mul_sub_eat(rng, p):
    a, b, food = rng.randint(2, 10), rng.randint(3, 12), rng.choice(FOODS)
    c = rng.randint(1, min(20, a * b - 1))
    q = (f"{p['name']} buys {a} packs of {food} with {b} {food} in each pack. {p['He']} eats {c} of them. "
         f"How many {food} are left?")
    return q, f"{a} * {b} - {c}", a * b - c


def t_add_mul(rng, p):
    c, a, b, obj = rng.randint(2, 40), rng.randint(2, 9), rng.randint(2, 20), rng.choice(BUYABLE)
    q = (f"{p['name']} has {c} {obj}. {p['He']} buys {a} boxes with {b} {obj} in each box. "
         f"How many {obj} does {p['name']} have now?")
    return q, f"{c} + {a} * {b}", c + a * b


def t_div_sub(rng, p):
    k, each, food = rng.randint(2, 8), rng.randint(3, 15), rng.choice(FOODS)
    c = rng.randint(1, each - 1)
    q = (f"{p['name']} has {k * each} {food} and packs them equally into {k} bags. {p['He']} eats {c} "
         f"{food} from one bag. How many {food} are left in that bag?")
    return q, f"{k * each} / {k} - {c}", each - c


def t_together(rng, p):
    n1, n2 = _two_names(rng)
    a, b, obj = rng.randint(2, 50), rng.randint(2, 50), rng.choice(OBJECTS)
    q = f"{n1} has {a} {obj} and {n2} has {b} {obj}. How many {obj} do they have together?"
    return q, f"{a} + {b}", a + b


def t_more_than(rng, p):
    n1, n2 = _two_names(rng)
    a, b, obj = rng.randint(2, 40), rng.randint(2, 20), rng.choice(OBJECTS)
    q = (f"{n1} has {a} {obj}. {n2} has {b} more {obj} than {n1}. "
         f"How many {obj} do they have together?")
    return q, f"{a} + {a} + {b}", a + (a + b)


def t_times_as_many(rng, p):
    n1, n2 = _two_names(rng)
    a, k, obj = rng.randint(2, 50), rng.randint(2, 9), rng.choice(OBJECTS)
    q = f"{n1} has {a} {obj}. {n2} has {k} times as many {obj} as {n1}. How many {obj} does {n2} have?"
    return q, f"{a} * {k}", a * k


def t_change(rng, p):
    bill = rng.choice([20, 50, 100])
    a = rng.randint(2, 6)
    price, (_, items) = rng.randint(2, (bill - 1) // a), rng.choice(ITEMS)
    q = (f"{p['name']} buys {a} {items} for {price} dollars each. {p['He']} pays with a {bill}-dollar "
         f"bill. How many dollars of change does {p['he']} get?")
    return q, f"{bill} - {a} * {price}", bill - a * price


def t_daily(rng, p):
    does, do, unit = rng.choice(ACTIVITIES)
    a, days = rng.randint(2, 30), rng.randint(2, 14)
    q = f"{p['name']} {does} {a} {unit} every day. How many {unit} does {p['he']} {do} in {days} days?"
    return q, f"{a} * {days}", a * days


def t_afford(rng, p):
    price, count, (item, items) = rng.randint(2, 15), rng.randint(2, 12), rng.choice(ITEMS)
    q = (f"{p['name']} has {price * count} dollars. One {item} costs {price} dollars. "
         f"How many {items} can {p['he']} buy with all of {p['his']} money?")
    return q, f"{price * count} / {price}", count


def t_sub_sub(rng, p):
    a = rng.randint(12, 60)
    b = rng.randint(2, a // 2)
    c, obj = rng.randint(2, a - b - 1), rng.choice(OBJECTS)
    q = (f"{p['name']} has {a} {obj}. {p['He']} loses {b} of them and gives {c} to {p['his']} "
         f"{rng.choice(RELATIVES)}. How many {obj} does {p['name']} have left?")
    return q, f"{a} - {b} - {c}", a - b - c


def t_three_days(rng, p):
    a, b, c, obj = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 40), rng.choice(OBJECTS)
    q = (f"{p['name']} collects {a} {obj} on Monday, {b} on Tuesday and {c} on Wednesday. "
         f"How many {obj} does {p['he']} collect in all?")
    return q, f"{a} + {b} + {c}", a + b + c


def t_bags_left_over(rng, p):
    a, b, obj = rng.randint(2, 9), rng.randint(2, 15), rng.choice(OBJECTS)
    c = rng.randint(1, b - 1)  # fewer left over than fill a bag, as in real packing
    q = (f"{p['name']} puts {obj} into {a} bags with {b} {obj} in each bag and has {c} {obj} left over. "
         f"How many {obj} does {p['name']} have in all?")
    return q, f"{a} * {b} + {c}", a * b + c


def t_buy_then_share(rng, p):
    k, each, obj = rng.randint(2, 6), rng.randint(2, 12), rng.choice(BUYABLE)
    total = k * each
    a = rng.randint(1, total - 1)
    q = (f"{p['name']} has {a} {obj} and buys {total - a} more. {p['He']} shares all of them equally "
         f"among {k} friends. How many {obj} does each friend get?")
    return q, f"({a} + {total - a}) / {k}", each


TEMPLATES = [t_add_find, t_sub_give, t_mul_packs, t_div_share, t_sub_add, t_mul_sub_eat, t_add_mul,
             t_div_sub, t_together, t_more_than, t_times_as_many, t_change, t_daily, t_afford, t_sub_sub,
             t_three_days, t_bags_left_over, t_buy_then_share]


def make_record(question: str, expression: str, answer: int) -> dict:
    assert 0 <= answer < 1000, (question, answer)
    return {"question": question,
            "answer": str(answer),
            "solution": f"{expression} = {answer}. #### {answer}"}


def _draw(rng: random.Random, n: int, seen: set[str]) -> list[dict]:
    records = []
    for _ in range(100 * n + 1000):  # a bound, so an impossible request fails instead of hanging
        if len(records) == n:
            return records
        question, expression, answer = rng.choice(TEMPLATES)(rng, _person(rng))
        if question not in seen:
            seen.add(question)
            records.append(make_record(question, expression, answer))
    raise RuntimeError(f"could not draw {n} distinct questions")


def generate(n_train: int = 3000, n_eval: int = 200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, eval) records; eval is drawn first so that it does not move with ``n_train``."""
    rng = random.Random(seed)
    seen: set[str] = set()
    eval_records = _draw(rng, n_eval, seen)
    return _draw(rng, n_train, seen), eval_records


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--eval", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    train, evals = generate(args.train, args.eval, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train.jsonl", train), ("eval.jsonl", evals)):
        # Bytes, not text mode: no platform newline translation, so reruns match byte for byte.
        (args.out / name).write_bytes(to_jsonl(records).encode("utf-8"))
        print(f"wrote {len(records)} problems to {args.out / name}")


if __name__ == "__main__":
    main()
