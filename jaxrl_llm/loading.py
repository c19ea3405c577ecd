"""Python objects named in a config: `package.module:name` or `path/to/file.py:name` (reward
functions, environments, tools)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from jaxrl_llm.errors import UserError


def load_object(target: str, where: str, what: str = "function"):
    """The callable `target` names: `package.module:name`, or `path/to/file.py:name`. Errors name
    the config key (`where`) and say what was expected (`what`: "function", "class", ...)."""
    if not isinstance(target, str) or ":" not in target:
        raise UserError(f"{where}: got {target!r}, expected 'package.module:{what}' or 'path/to/file.py:{what}'.")
    module_name, name = target.rsplit(":", 1)
    if module_name.endswith(".py"):
        if not os.path.isfile(module_name):
            raise UserError(f"{where}: no file at {module_name!r} (a relative path in a config file is "
                            "relative to that file; on the command line, to the working directory).")
        # Files beside the loaded file are importable from it, as when it is run as a script.
        directory = os.path.dirname(os.path.abspath(module_name))
        if directory not in sys.path:
            sys.path.append(directory)
        spec = importlib.util.spec_from_file_location(f"jaxrl_llm_user_{abs(hash(module_name))}", module_name)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise UserError(f"{where}: importing {module_name!r} raised {type(e).__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise UserError(f"{where}: cannot import {target!r} ({e}).") from e
    found = getattr(module, name, None)
    if not callable(found):
        raise UserError(f"{where}: {module_name!r} has no {what} {name!r}.")
    return found


__all__ = ["load_object"]
