"""Command-line option types the load-test tools share."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence


def names_of(known: Sequence[str], what: str) -> Callable[[str], list[str]]:
    """An argparse type for a comma-separated list of `known` names; any other name
    (an empty one too) is refused with one line saying which are known."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",")]
        unknown = sorted(name or "''" for name in set(names) - set(known))
        if unknown:
            raise argparse.ArgumentTypeError(f"no {what} {', '.join(unknown)}; of: {', '.join(known)}")
        return names

    return parse
