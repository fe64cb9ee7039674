"""The shared front of the config-file commands (eu-train, eu-eval, the demo, compare): absl flags with
an ml_collections `--config`, where bad settings and expected failures end in one sentence, exit 2."""

from __future__ import annotations

import sys
from typing import Any, Callable

from absl import app, flags, logging

from eu_jax.files import localize_path_settings


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


def run_config_command(
    program: str, config_flag: Any, body: Callable[[Any], int], errors: tuple[type[BaseException], ...] = (ValueError, OSError)
) -> None:
    """Run `body(config)` as the program: stray arguments and a missing --config are usage errors, `errors`
    become `program: error: <message>` with exit 2, orbax's per-file INFO logs are silenced, and compiled
    programs are kept on disk for the next run (`compile_cache`). Path settings are made local first ('~'
    expanded; a URL such as gs://... refused before anything runs: the commands read and write local paths)."""

    def run(argv: list[str]) -> int:
        logging.set_verbosity(logging.WARNING)
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go through --config.section.key=value")
        if config_flag.value is None:
            raise app.UsageError("--config=path/to/config.py is required")
        try:
            localize_path_settings(config_flag.value)
            from eu_jax.compile_cache import enable_compilation_cache  # imports jax: not for --help or bad settings

            enable_compilation_cache()
            return body(config_flag.value)
        except errors as err:
            print(f"{program}: error: {err}", file=sys.stderr)
            return 2

    app.run(run, flags_parser=one_line_errors(program))
