"""Your own prompts: a task read from a file with the `datasets` library, offline.

`task.name: dataset` with `task.options`:

    path: prompts.jsonl      # .jsonl, .json, .parquet, .csv, or a `save_to_disk` directory
    prompt_field: prompt     # a string, or a list of chat messages ({role, content})
    prompt_template: null    # or a format string of the row's fields: "Question: {question}\nAnswer:"
    answer_field: answer     # optional: the reference answer the verifiers compare with
    eval_path: null          # a held-out file, or:
    eval_fraction: 0.0       # the share of `path` held out (a fixed split, whatever the seed)
    shuffle_seed: 0          # the order of each epoch
    chat_template: false     # render prompts with the tokenizer's chat template
    verifier: null           # exact_match | numeric (default exact_match when there is an answer)

Relative paths in a config file are relative to that file (`load_config` resolves them).

The training stream is epoch after epoch of the rows, each epoch in a new order drawn from
`(shuffle_seed, epoch)`: `train_example(index)` is a pure function of `index`, so a trainer's
data position stays one integer and `--resume` replays exactly. Every row is checked when the
task is built (the fields exist, every prompt is a string or a message list), so a bad row is an
error before training, not a crash at step 900.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import numpy as np

from jaxrl_llm.errors import UserError
from jaxrl_llm.tasks.base import Example, check_batch_lengths
from jaxrl_llm.tasks.verifiers import ANSWER_VERIFIERS

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_EVAL_SPLIT_SALT = 0x0E7A1  # the held-out rows of `eval_fraction` do not move with shuffle_seed


@contextlib.contextmanager
def _quiet_datasets():
    """`datasets` prints a progress bar per file it reads; a trainer has its own."""
    from datasets import utils
    from datasets.utils import logging as ds_logging

    was_disabled, verbosity = utils.are_progress_bars_disabled(), ds_logging.get_verbosity()
    utils.disable_progress_bars()
    ds_logging.set_verbosity_error()
    try:
        yield
    finally:
        if not was_disabled:
            utils.enable_progress_bars()
        ds_logging.set_verbosity(verbosity)


def load_rows(path: str, *, option: str = "path", split: str = "train"):
    """The rows of `path` as a `datasets.Dataset` held in memory (no cache files written)."""
    import datasets

    where = f"`task.options.{option}`"
    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"{where}: got {path!r}, expected the path of a data file or directory.")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{where}: no file or directory at {path!r}.")
    with _quiet_datasets():
        if os.path.isdir(path):
            try:
                loaded = datasets.load_from_disk(path, keep_in_memory=True)
            except FileNotFoundError as e:
                raise UserError(f"{where}: {path!r} is a directory but not one written by "
                                f"datasets' save_to_disk ({e}).") from None
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UserError(f"`task.options.split`: got {split!r}, but {path!r} holds the splits "
                                    f"{sorted(loaded)}.")
                loaded = loaded[split]
            return loaded
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in FILE_FORMATS:
            raise UserError(f"{where}: {path!r} has the extension {suffix or '(none)'!r}, expected one of "
                            f"{sorted(FILE_FORMATS)} or a save_to_disk directory.")
        reader = {"json": datasets.Dataset.from_json, "parquet": datasets.Dataset.from_parquet,
                  "csv": datasets.Dataset.from_csv}[FILE_FORMATS[suffix]]
        try:
            return reader(path, keep_in_memory=True)
        except Exception as e:  # pyarrow's parse errors: name the file
            raise UserError(f"{where}: could not read {path!r} as {FILE_FORMATS[suffix]}: "
                            f"{type(e).__name__}: {e}") from e


def _is_messages(value) -> bool:
    return (isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value))


class DatasetTask:
    """Prompts (and optional reference answers) from a data file; see the module docstring.

    `tokenizer` is the policy's: the trainer passes it, and it is needed only for
    `chat_template: true`.
    """

    name = "dataset"

    def __init__(self, path: str, prompt_field: str | None = None, answer_field: str | None = None,
                 eval_path: str | None = None, eval_fraction: float = 0.0, shuffle_seed: int = 0,
                 chat_template: bool = False, verifier: str | None = None, split: str = "train",
                 prompt_template: str | None = None, tokenizer=None):
        for option, value in (("prompt_field", prompt_field), ("answer_field", answer_field),
                              ("prompt_template", prompt_template)):
            if value is not None and not isinstance(value, str):
                raise UserError(f"`task.options.{option}`: got {value!r}, expected a string.")
        if prompt_template is not None and prompt_field is not None:
            raise UserError("`task.options.prompt_template`: give it or prompt_field, not both (the template "
                            "names the fields it uses, e.g. 'Question: {question}\\nAnswer:').")
        if prompt_template is None and prompt_field is None:
            prompt_field = "prompt"
        if isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, int) or shuffle_seed < 0:
            raise UserError(f"`task.options.shuffle_seed`: got {shuffle_seed!r}, expected an int >= 0.")
        if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, (int, float)) or not 0 <= eval_fraction < 1:
            raise UserError(f"`task.options.eval_fraction`: got {eval_fraction!r}, expected a float in [0, 1).")
        if eval_path is not None and eval_fraction:
            raise UserError(f"`task.options.eval_fraction`: got {eval_fraction}, but eval_path is set too; "
                            "give one of them (eval_path: a held-out file, eval_fraction: a share of path).")
        if not isinstance(chat_template, bool):
            raise UserError(f"`task.options.chat_template`: got {chat_template!r}, expected true or false.")
        if verifier is None and answer_field is not None:
            verifier = "exact_match"
        if verifier is not None and verifier not in ANSWER_VERIFIERS:
            raise UserError(f"`task.options.verifier`: got {verifier!r}, expected one of {sorted(ANSWER_VERIFIERS)} "
                            "or null.")
        if verifier is not None and answer_field is None:
            raise UserError(f"`task.options.verifier`: got {verifier!r}, but there is no answer to verify "
                            "against; set task.options.answer_field.")
        self.path, self.prompt_field, self.answer_field = os.fspath(path), prompt_field, answer_field
        self.prompt_template = prompt_template
        self.shuffle_seed = shuffle_seed
        self.verifier = verifier
        self.verifies = verifier is not None
        self._render = self._renderer(tokenizer) if chat_template else None

        rows = load_rows(path, split=split)
        self._check(rows, self.path)
        if eval_path is not None:
            eval_rows = load_rows(eval_path, option="eval_path", split=split)
            self._check(eval_rows, os.fspath(eval_path))
            self._train, self._eval_rows = rows, [eval_rows[i] for i in range(len(eval_rows))]
        elif eval_fraction:
            order = np.random.default_rng(_EVAL_SPLIT_SALT).permutation(len(rows))
            n_eval = max(1, int(round(eval_fraction * len(rows))))
            if n_eval >= len(rows):
                raise UserError(f"`task.options.eval_fraction`: got {eval_fraction}, which holds out all "
                                f"{len(rows)} rows of {self.path!r}; lower it.")
            self._eval_rows = [rows[int(i)] for i in order[:n_eval]]
            self._train = rows.select(np.sort(order[n_eval:]))
        else:
            self._train, self._eval_rows = rows, []
        self.num_rows = len(self._train)
        self._epoch, self._order = -1, None
        self._eval = [self._example(row) for row in self._eval_rows]

    # -- checks and rendering ---------------------------------------------------------------------
    def _check(self, rows, path: str) -> None:
        """Fields present, at least one row, every prompt a string or a list of chat messages."""
        if len(rows) == 0:
            raise UserError(f"`task.options.path`: {path!r} holds no rows.")
        for option, field in (("prompt_field", self.prompt_field), ("answer_field", self.answer_field)):
            if field is not None and field not in rows.column_names:
                raise UserError(f"`task.options.{option}`: got {field!r}, but {path!r} has the columns "
                                f"{rows.column_names}.")
        if self.prompt_template is not None:
            for i in range(len(rows)):
                self._fill(rows[i], f"row {i} of {path!r}")
            return
        for i, prompt in enumerate(rows[self.prompt_field]):
            if isinstance(prompt, str):
                if not prompt.strip():
                    raise UserError(f"`task.options.prompt_field`: row {i} of {path!r} has an empty prompt "
                                    f"({prompt!r}); remove the row or fill it in.")
                continue
            if not _is_messages(prompt):
                raise UserError(f"`task.options.prompt_field`: row {i} of {path!r} has the prompt {prompt!r} "
                                f"({type(prompt).__name__}), expected a string or a list of chat messages "
                                "({role: ..., content: ...}).")
            if self._render is None:
                raise UserError(f"`task.options.chat_template`: row {i} of {path!r} holds chat messages; set "
                                "task.options.chat_template: true to render them with the tokenizer's template.")
        if self.answer_field is not None:
            missing = [i for i, a in enumerate(rows[self.answer_field]) if a is None]
            if missing:
                raise UserError(f"`task.options.answer_field`: {len(missing)} row(s) of {path!r} have no "
                                f"{self.answer_field!r} (the first is row {missing[0]}).")

    @staticmethod
    def _renderer(tokenizer):
        """`render(messages or text) -> str` with the tokenizer's chat template and the assistant
        turn opened (`add_generation_prompt`)."""
        if tokenizer is None:
            raise UserError("`task.options.chat_template`: true needs the policy's tokenizer (the trainer "
                            "passes it; pass tokenizer= when building the task yourself).")
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"`task.options.chat_template`: the tokenizer ({type(tokenizer).__name__}, "
                            f"{getattr(tokenizer, 'name_or_path', '')!r}) has no chat template (base models "
                            "usually have none); set chat_template: false and write prompts as plain text.")
        # The template writes the BOS token as text; when encoding adds a BOS too, the text's
        # own is dropped so the policy sees one, as in training.
        bos = tokenizer.bos_token
        probe = tokenizer("x")["input_ids"]
        adds_bos = bos is not None and len(probe) > 0 and probe[0] == tokenizer.bos_token_id

        def render(prompt) -> str:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return text[len(bos):] if adds_bos and text.startswith(bos) else text

        return render

    def _fill(self, row: dict, where: str) -> str:
        """`prompt_template` filled with the row's fields."""
        try:
            return self.prompt_template.format(**row)
        except KeyError as e:
            raise UserError(f"`task.options.prompt_template`: names the field {e.args[0]!r}, but {where} has the "
                            f"fields {sorted(row)} (a literal brace is written {{{{ or }}}}).") from None
        except (ValueError, IndexError) as e:
            raise UserError(f"`task.options.prompt_template`: {self.prompt_template!r} is not a format string of "
                            f"field names ({e}; a literal brace is written {{{{ or }}}}).") from None

    def _example(self, row: dict) -> Example:
        if self.prompt_template is not None:
            raw, columns = self._fill(row, "the row"), dict(row)
        else:
            raw, columns = row[self.prompt_field], {k: v for k, v in row.items() if k != self.prompt_field}
        answer = None if self.answer_field is None else str(row[self.answer_field])
        return Example(self._render(raw) if self._render else raw, answer, raw, columns)

    # -- the Task protocol -------------------------------------------------------------------------
    def train_example(self, index: int) -> Example:
        """Row `order(epoch)[index % num_rows]` of epoch `index // num_rows`."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise UserError(f"index: got {index!r}, expected an int >= 0")
        epoch, position = divmod(int(index), self.num_rows)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.shuffle_seed, epoch]).permutation(self.num_rows)
        return self._example(self._train[int(self._order[position])])

    def train_batch(self, start_index: int, n: int) -> list[Example]:
        return [self.train_example(start_index + i) for i in range(n)]

    def eval_examples(self) -> list[Example]:
        return list(self._eval)

    def score_batch(self, examples: Sequence[Example], texts: Sequence[str], finished) -> np.ndarray:
        """The configured verifier (`exact_match` or `numeric`) against each example's answer."""
        if self.verifier is None:
            raise UserError("`reward.terms`: kind 'task' needs a verifier, and this dataset task has none; "
                            "set task.options.answer_field (and verifier), or use a python reward.")
        check_batch_lengths(examples, texts, finished)
        verify = ANSWER_VERIFIERS[self.verifier]
        return np.asarray([verify(t, e.answer, finished=bool(f)) for e, t, f in zip(examples, texts, finished)],
                          np.float32)
