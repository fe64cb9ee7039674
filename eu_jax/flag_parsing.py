"""The shared front of the config-file commands (eu-train, eu-eval, the demo, compare): absl flags with
an ml_collections `--config`, where bad settings and expected failures end in one sentence, exit 2."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_flags

from eu_jax.files import localize_path_settings

# How ml_collections starts the message of get_config's TypeError/ValueError, which it re-raises with the
# traceback as text: the exception raised in the file is the one it wraps.
_TRACEBACK_AS_TEXT = "Error whilst parsing config file"


class ConfigFileError(flags.Error):
    """A config file that gives no config: missing, a syntax error, no get_config, or get_config failing."""


class _OneLineConfigFileParser(flags.ArgumentParser):
    """The config flag's own parser, with every failure of the file as one `ConfigFileError('<file>: <reason>')`:
    ml_collections lets a syntax error escape, wraps get_config's errors with their traceback, and defers a
    missing file's error to the config's first use."""

    def __init__(self, parser: flags.ArgumentParser):
        self._parser = parser

    def parse(self, argument: str) -> Any:
        path = argument.split(":", 1)[0]  # the text after ':' goes to get_config
        if not Path(path).is_file():
            raise ConfigFileError(f"{path}: no such file")
        try:
            return self._parser.parse(argument)
        except Exception as err:  # whatever the file's own code raises
            raise ConfigFileError(f"{path}: {_one_line_reason(err, path)}") from None

    def flag_type(self) -> str:
        return self._parser.flag_type()


def _one_line_reason(err: BaseException, path: str) -> str:
    """The message of the exception the config file raised, on one line (a syntax error's with its line)."""
    if isinstance(err, SyntaxError):
        elsewhere = Path(err.filename or path).resolve() != Path(path).resolve()  # in a file the config imports
        return f"{err.filename + ', ' if elsewhere else ''}line {err.lineno}: {err.msg}"
    if isinstance(err, AttributeError) and err.name == "get_config":
        return "defines no get_config() function"
    if str(err).startswith(_TRACEBACK_AS_TEXT) and err.__context__ is not None:
        return _one_line_reason(err.__context__, path)
    return " ".join(str(err).split()) or type(err).__name__


def one_line_errors(program: str) -> Callable[[list[str]], list[str]]:
    """A `flags_parser` for `absl.app.run` that reports flag errors (the config file's too, through
    `_OneLineConfigFileParser`) as `program: error: ...`, exit 2."""

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


# The repository's config files: the default of the workflow commands, found wherever they are started.
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run_config_command(
    program: str,
    about: str,
    body: Callable[[Any], int],
    errors: tuple[type[BaseException], ...] = (ValueError, OSError),
    default: Path | None = None,
) -> None:
    """Define `--config` (`about` its help; `default` a config file, else the flag is required; defined here,
    when the command runs, not at import, so that several commands import into one process), then run
    `body(config)` as the program: stray arguments and a missing --config are usage errors, `errors`
    become `program: error: <message>` with exit 2, orbax's per-file INFO logs are silenced, and compiled
    programs are kept on disk for the next run (`compile_cache`). Path settings are made local first ('~'
    expanded; a URL such as gs://... refused before anything runs: the commands read and write local paths)."""

    config_flag = config_flags.DEFINE_config_file("config", default and str(default), about, lock_config=True)
    flag = flags.FLAGS[config_flag.name]
    flag.parser = _OneLineConfigFileParser(flag.parser)

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
