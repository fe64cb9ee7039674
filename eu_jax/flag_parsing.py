"""absl flag parsing for the config-file commands (eu-train, the demo, compare): a bad --config.key ends
in one sentence naming it, instead of a traceback."""

from __future__ import annotations

import sys
from typing import Callable

from absl import flags


def one_line_errors(program: str) -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for `absl.app.run` that reports flag errors as `program: error: ...`, exit 2."""

    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except AttributeError as err:  # ml_collections: the key does not exist; its message is a repr
            detail = str(err).replace("\\n", ". ").replace("\\", "").replace("'", "").strip()
            print(f"{program}: error: unknown config key {detail}", file=sys.stderr)
        except flags.Error as err:
            print(f"{program}: error: {err}", file=sys.stderr)
        sys.exit(2)

    return parse
