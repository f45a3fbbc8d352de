"""The scripts' command lines: `--configs NAME ... --KEY VALUE` flags into a config, and one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from dreamerv2_tf.config import CONFIGS_FILE, Config, ConfigError, build, read_named_configs, to_bool


def split_flags(argv: Sequence[str]) -> dict[str, list[str]]:
    """`--key v1 v2 --flag` -> {'key': ['v1', 'v2'], 'flag': []}; `--key=v` also works."""
    flags: dict[str, list[str]] = {}
    current = None
    for token in argv:
        if token == "-h":
            token = "--help"
        if token.startswith("--") and len(token) > 2:
            name, eq, value = token[2:].partition("=")
            current = name
            flags[current] = [value] if eq else []
        elif current is None:
            raise ConfigError(f"unexpected argument '{token}'; flags look like --key value")
        else:
            flags[current].append(token)
    return flags


def parse(argv: Sequence[str], path: str | Path = CONFIGS_FILE) -> tuple[Config, dict[str, Any]]:
    """Parse CLI flags into a config and the loader's own options (print_config, help)."""
    flags = split_flags(argv)
    names = flags.pop("configs", ["defaults"]) or ["defaults"]
    options = {"help": "help" in flags, "print_config": False}
    flags.pop("help", None)
    if "print_config" in flags:
        options["print_config"] = to_bool("print_config", (flags.pop("print_config") or ["true"])[0])
    overrides = {}
    for key, values in flags.items():
        if not values:
            raise ConfigError(f"--{key} needs a value")
        overrides[key] = values[0] if len(values) == 1 else values
    return build(names, overrides, path), options


def usage(path: str | Path = CONFIGS_FILE, prog: str = "train.py") -> str:
    named = read_named_configs(path)
    return "\n".join([
        f"usage: python scripts/{prog} [--configs NAME ...] [--KEY VALUE ...] [--print_config]",
        "",
        f"named configs (applied in order over defaults): {', '.join(named)}",
        "override any key: --task atari_breakout --rssm.deter 200 --model_opt.lr 1e-4",
        "lists: --log_keys_video image  or  --encoder.cnn_kernels 4,4,4,4",
        "regex keys apply to every match: --'.*\\.norm' layer",
        "--print_config prints the resolved config as YAML and exits.",
    ])


def from_cli(argv: Sequence[str] | None = None, prog: str = "train.py",
             path: str | Path = CONFIGS_FILE) -> Config:
    """Config for a script: handles --help/--print_config and exits 2 on user errors."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        # Help must work even when other flags are wrong.
        if any(token in ("-h", "--help") or token.startswith("--help=") for token in argv):
            print(usage(path, prog))
            sys.exit(0)
        config, options = parse(argv, path)
    except ConfigError as exc:
        fail(str(exc))
    if options["print_config"]:
        print(config.to_yaml(), end="")
        sys.exit(0)
    return config


def fail(message: str, status: int = 2) -> None:
    """Report a user mistake as one line on stderr and exit with `status` (2; 1 for a failed run)."""
    line = " ".join(str(message).split())  # e.g. YAML parser errors span several lines
    print(f"error: {line}", file=sys.stderr)
    sys.exit(status)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts: one-line errors and exit status 2, like config errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        fail(f"{message} (see --help)")


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Print each warning raised inside as one line `warning: ...` on stderr (Python's own format takes two)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for item in caught:
                print(f"warning: {item.message}", file=sys.stderr)
