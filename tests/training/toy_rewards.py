"""Toy verifiable rewards for trainer tests: a random tiny model can learn them in a few steps."""


def fraction_of_sevens(prompts, completions):
    """Share of the completion's characters that are '7' (0 for an empty completion)."""
    return [c.count("7") / max(len(c), 1) for c in completions]


def broken(prompts, completions):
    """Raises on completions containing '3': the trainer must name the sample."""
    out = []
    for c in completions:
        if "3" in c:
            raise RuntimeError("cannot score a 3")
        out.append(0.0)
    return out


def nan_on_five(prompts, completions):
    return [float("nan") if "5" in c else 1.0 for c in completions]


def broken_always(prompts, completions):
    raise RuntimeError("this reward cannot score anything")
