"""Small helpers shared by the ``upweight reproduce`` experiments: printing, Markdown tables and
building an experiment's config from its options."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from ... import errors

C = TypeVar("C")


def say(*parts: Any) -> None:
    """Print a line now (progress output of a long experiment)."""
    print(*parts, flush=True)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; cells are converted with ``str``."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def option(name: str, options: Mapping[str, str] | None = None) -> str:
    """The option of the config field ``name``: ``options[name]``, else ``--name-with-dashes``."""
    return (options or {}).get(name, "--" + name.replace("_", "-"))


def config_from_args(
    cls: type[C], args: argparse.Namespace, options: Mapping[str, str] | None = None, **given: Any
) -> C:
    """``cls`` (a config dataclass of ``upweight.paper.config``) from the options whose ``dest`` is
    one of its fields, ``given`` taking precedence. A setting the config refuses is reported with
    its option (``options``: field → option where it is not ``--field-with-dashes``)."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    try:
        return cls(**{**values, **given})
    except errors.InputError as exc:
        setting = getattr(exc, "setting", None)
        if setting is None:
            raise
        problem = exc.problem  # type: ignore[attr-defined]
        raise errors.InputError(f"{option(setting, options)} {problem}") from exc
