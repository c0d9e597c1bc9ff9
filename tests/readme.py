"""The README's code examples, for tests that run them as they are: the fenced block right after
a `<!-- example: NAME -->` line in README.md."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def example(name: str) -> str:
    """The code of README.md's example NAME (AssertionError if the README lacks it)."""
    match = re.search(rf"<!-- example: {re.escape(name)} -->\n```[a-z]*\n(.*?)```", README.read_text(), re.S)
    assert match, f"README.md has no example {name!r}"
    return match.group(1)
