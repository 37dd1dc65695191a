"""examples/configuration.toml is a working file that names every option at its default."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from kairoi_trio.config import Config, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "configuration.toml"


def option_names(cls: type, prefix: str = "") -> set[str]:
    names = set()
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else f.default
        if dataclasses.is_dataclass(default):
            names |= option_names(type(default), f"{name}.")
        else:
            names.add(name)
    return names


def flatten(table: dict, prefix: str = "") -> set[str]:
    names = set()
    for key, value in table.items():
        if isinstance(value, dict):
            names |= flatten(value, f"{prefix}{key}.")
        else:
            names.add(f"{prefix}{key}")
    return names


def test_the_example_loads_and_equals_the_defaults() -> None:
    assert load_config(EXAMPLE) == Config()


# Old names of tables, still accepted; the example shows the new name only (setting
# a key under both names is an error): [metrics] is [http]'s old name.
OLD_NAMES = ("metrics.",)


def test_the_example_names_every_option() -> None:
    with open(EXAMPLE, "rb") as f:
        written = flatten(tomllib.load(f))
    wanted = {name for name in option_names(Config) if not name.startswith(OLD_NAMES)}
    assert wanted - written == set(), "options missing from the example"
