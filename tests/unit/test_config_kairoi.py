"""Kairoi's configuration file is read as Kairoi reads it (issue: a true drop-in).

Kairoi (src/configuration.rs) deserialises `[log] level` into one of trace,
debug, info, warn, error, off; validates `[database] framerate` as an integer
from 1 to 65535 (default 512); and loads its file with config-rs 0.11's
`File::with_name`, which reads the exact path or, failing that, the path with a
`.toml` extension, and `./configuration.toml` when no path is given.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kairoi_trio.config import Config, ConfigError, find_config, load_config, parse_config
from kairoi_trio.observability.logging import OFF, level_number


@pytest.mark.parametrize("level", ["trace", "debug", "info", "warn", "error", "off", "warning"])
def test_every_level_kairoi_accepts_is_accepted(level: str) -> None:
    assert parse_config({"log": {"level": level}}).log.level == level


@pytest.mark.parametrize(
    ("level", "number"),
    [
        ("trace", logging.NOTSET),
        ("debug", logging.DEBUG),
        ("info", logging.INFO),
        ("warn", logging.WARNING),
        ("warning", logging.WARNING),
        ("error", logging.ERROR),
        ("off", OFF),
    ],
)
def test_levels_map_to_their_meaning(level: str, number: int) -> None:
    assert level_number(level) == number
    assert OFF > logging.CRITICAL


def test_an_unknown_level_names_the_accepted_ones() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"log": {"level": "verbose"}})
    message = str(error.value)
    assert "log.level" in message and "'verbose'" in message
    for level in ("trace", "debug", "info", "warn", "error", "off"):
        assert level in message


@pytest.mark.parametrize("framerate", [1, 512, 65535])
def test_framerates_kairoi_accepts(framerate: int) -> None:
    assert parse_config({"database": {"framerate": framerate}}).database.framerate == framerate


@pytest.mark.parametrize("framerate", [0, -1, 65536, 2**40])
def test_framerates_kairoi_refuses(framerate: int) -> None:
    with pytest.raises(ConfigError, match=r"database\.framerate must be from 1 to 65535"):
        parse_config({"database": {"framerate": framerate}})


@pytest.mark.parametrize("framerate", [512.0, "512", True])
def test_a_framerate_must_be_an_integer(framerate: object) -> None:
    with pytest.raises(ConfigError, match=r"database\.framerate must be an integer"):
        parse_config({"database": {"framerate": framerate}})


def test_one_default_framerate() -> None:
    assert Config().database.framerate == 512


def test_without_a_path_configuration_toml_is_read_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert find_config(None) is None
    assert load_config(None) == Config()
    Path("configuration.toml").write_text("[controller]\nlisten = '127.0.0.1:7000'\n")
    assert find_config(None) == Path("configuration.toml")
    assert load_config(None).controller.listen == "127.0.0.1:7000"


def test_a_path_without_extension_finds_the_toml_file(tmp_path: Path) -> None:
    (tmp_path / "production.toml").write_text("[log]\nlevel = 'warn'\n")
    assert find_config(tmp_path / "production") == tmp_path / "production.toml"
    assert load_config(tmp_path / "production").log.level == "warn"


def test_the_exact_path_wins_over_the_toml_one(tmp_path: Path) -> None:
    (tmp_path / "kairoi.conf").write_text("[log]\nlevel = 'error'\n")
    (tmp_path / "kairoi.toml").write_text("[log]\nlevel = 'debug'\n")
    assert load_config(tmp_path / "kairoi.conf").log.level == "error"
    # config-rs replaces an extension that names no file, as Path.with_suffix does
    assert find_config(tmp_path / "kairoi.prod") == tmp_path / "kairoi.toml"


def test_a_named_file_that_is_not_there_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(tmp_path / "typo")
    assert "typo" in str(error.value) and "typo.toml" in str(error.value)
    with pytest.raises(ConfigError, match="directory"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        "[storage]\nretention_s = 1e308\n",
        "[shutdown]\ngrace_period_s = 1e12\n",
        "[controller]\nidle_timeout_s = 1e10\n",
        "[runners.http]\ntimeout_s = 1e300\n",
        "[runners.amqp]\nheartbeat_s = 70000\n",
    ],
)
def test_every_duration_is_bounded(text: str) -> None:
    """Durations beyond 100 years would push time arithmetic out of 0001..9999."""
    import tomllib

    key = text.split("\n")[1].split(" ")[0]
    with pytest.raises(ConfigError, match=key):
        parse_config(tomllib.loads(text))
