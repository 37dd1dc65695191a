"""TOML configuration (config.py, SPEC §6, docs/configuration.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kairoi_trio.config import Config, ConfigError, load_config, parse_address


def load_text(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "kairoi.toml"
    path.write_text(text)
    return load_config(path)


def test_no_file_and_an_empty_file_give_the_documented_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no ./configuration.toml
    for config in (load_config(None), load_text(tmp_path, "")):
        assert config == Config()
        assert config.controller.listen == "127.0.0.1:5678"
        assert config.grpc.listen == "127.0.0.1:5679"
        assert config.metrics.listen == "127.0.0.1:9678"
        assert config.storage.directory == "kairoi-data"
        assert config.data_directory == Path("kairoi-data")
        assert config.log.level == "info"
        assert config.database.fsync_on_persist is True
        assert config.database.framerate == 512  # Kairoi's default
        assert config.jobs.max_payload_bytes == 1 << 20
        assert config.auth.tokens == []
        assert config.runners.shell.allowed_commands == []


def test_kairois_keys_are_accepted(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
[log]
level = "debug"

[controller]
listen = "0.0.0.0:6000"

[database]
fsync_on_persist = false
framerate = 512
""",
    )
    assert config.log.level == "debug"
    assert config.controller.listen == "0.0.0.0:6000"
    assert config.database.fsync_on_persist is False
    assert config.database.framerate == 512
    assert config.grpc == Config().grpc  # untouched tables keep their defaults


def test_new_tables_and_nested_runner_tables(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
[storage]
directory = "/var/lib/kairoi"
retention_s = 60

[runners.shell]
concurrency = 4
allowed_commands = ["/opt/a.sh", "/opt/b.sh"]

[runners.amqp]
max_connections = 2

[auth]
tokens = ["s3cret"]

[grpc]
listen = "[::1]:7000"
""",
    )
    assert config.storage.directory == "/var/lib/kairoi"
    assert config.storage.retention_s == 60.0  # an integer where a number is expected
    assert isinstance(config.storage.retention_s, float)
    assert config.runners.shell.concurrency == 4
    assert config.runners.shell.allowed_commands == ["/opt/a.sh", "/opt/b.sh"]
    assert config.runners.shell.queue_size == 1024  # default kept next to a set key
    assert config.runners.amqp.max_connections == 2
    assert config.auth.tokens == ["s3cret"]
    assert config.grpc.listen == "[::1]:7000"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[nosuchtable]\nx = 1\n", "nosuchtable"),
        ("[controller]\nlisten_address = '127.0.0.1:1'\n", "listen_address"),
        ("[database]\nfsync = true\n", "fsync"),
        ("[runners.shell]\ncommands = []\n", "commands"),
        ("[runners.ftp]\nconcurrency = 1\n", "ftp"),
        ("toplevel = 1\n", "toplevel"),
    ],
)
def test_unknown_tables_and_keys_are_rejected_by_name(
    tmp_path: Path, text: str, named: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_text(tmp_path, text)
    message = str(error.value)
    assert named in message
    assert "unknown" in message
    assert "\n" not in message


def test_an_unknown_key_names_its_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"runners\.shell"):
        load_text(tmp_path, "[runners.shell]\nconcurency = 4\n")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[controller]\nmax_connections = '10'\n", "controller.max_connections"),
        ("[controller]\nmax_connections = 1.5\n", "controller.max_connections"),
        ("[controller]\nmax_connections = true\n", "controller.max_connections"),
        ("[database]\nfsync_on_persist = 1\n", "database.fsync_on_persist"),
        ("[database]\nfsync_on_persist = 'yes'\n", "database.fsync_on_persist"),
        ("[database]\nframerate = '60'\n", "database.framerate"),
        ("[controller]\nlisten = 5678\n", "controller.listen"),
        ("[storage]\nretention_s = '1d'\n", "storage.retention_s"),
        ("[storage]\nretention_s = false\n", "storage.retention_s"),
        ("[auth]\ntokens = 'abc'\n", "auth.tokens"),
        ("[auth]\ntokens = [1, 2]\n", "auth.tokens"),
        ("controller = 5\n", "controller"),
        ("[runners]\nshell = 'x'\n", "shell"),
    ],
)
def test_values_of_the_wrong_type_are_rejected(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_text(tmp_path, text)
    assert named in str(error.value)


@pytest.mark.parametrize(
    "address",
    ["localhost", ":5678", "127.0.0.1:", "127.0.0.1:99999", "127.0.0.1:http", "host:-1", ""],
)
@pytest.mark.parametrize("key", ["controller", "grpc", "metrics", "http"])
def test_bad_listen_addresses_are_rejected(tmp_path: Path, key: str, address: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_text(tmp_path, f'[{key}]\nlisten = "{address}"\n')
    assert f"{key}.listen" in str(error.value)


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("127.0.0.1:5678", ("127.0.0.1", 5678)),
        ("[::1]:5679", ("::1", 5679)),
        ("localhost:0", ("localhost", 0)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_address(address: str, parsed: tuple[str, int]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "[storage]\nretention_s = -1\n",
        "[controller]\nidle_timeout_s = -0.5\n",
        "[shutdown]\ngrace_period_s = -10\n",
        "[controller]\nmax_connections = -5\n",
        "[controller]\nmax_message_bytes = 0\n",
        "[jobs]\nmax_payload_bytes = -1\n",
        "[runners.shell]\nconcurrency = 0\n",
        "[runners.shell]\nqueue_size = -1\n",
        "[runners.amqp]\nconcurrency = -1\n",
        "[runners.amqp]\nmax_connections = 0\n",
        "[runners.http]\nqueue_size = 0\n",
        "[runners.amqp]\nconnect_timeout_s = -1\n",
        "[runners.amqp]\nconfirm_timeout_s = -1\n",
        "[runners.amqp]\nheartbeat_s = -1\n",
        "[runners.http]\ntimeout_s = -1\n",
        "[grpc]\nmax_message_bytes = -1\n",
        "[shutdown]\ngrace_period_s = nan\n",
        "[storage]\ncompact_ratio = 0\n",
        "[storage]\ncompact_ratio = -0.5\n",
        "[storage]\ncompact_ratio = inf\n",
    ],
    ids=lambda text: " ".join(text.split()),
)
def test_negative_or_zero_sizes_and_durations_are_rejected(tmp_path: Path, text: str) -> None:
    key = text.split("\n")[1].split(" ")[0]
    with pytest.raises(ConfigError) as error:
        load_text(tmp_path, text)
    assert key in str(error.value)


@pytest.mark.parametrize(("text", "ratio"), [("0.25", 0.25), ("2", 2.0), ("1e-3", 0.001)])
def test_compact_ratio_takes_any_positive_number(tmp_path: Path, text: str, ratio: float) -> None:
    assert (
        load_text(tmp_path, f"[storage]\ncompact_ratio = {text}\n").storage.compact_ratio == ratio
    )
    assert load_text(tmp_path, "").storage.compact_ratio == 0.25


def test_zero_is_fine_where_it_means_never(tmp_path: Path) -> None:
    config = load_text(tmp_path, "[controller]\nidle_timeout_s = 0\n[storage]\nretention_s = 0\n")
    assert config.controller.idle_timeout_s == 0
    assert config.storage.retention_s == 0


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[log]\nlevel = 'verbose'\n", "log.level"),
        ("[log]\nformat = 'xml'\n", "log.format"),
        ("[storage]\ndirectory = ''\n", "storage.directory"),
        ("[grpc]\ntls_cert = 'cert.pem'\n", "tls_key"),
    ],
)
def test_other_bad_values_are_rejected(tmp_path: Path, text: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_text(tmp_path, text)


@pytest.mark.parametrize(
    "text",
    ["[controller\nlisten = 1\n", "listen = \n", "[log]\nlevel = 'a'\nlevel = 'b'\n", "= 3\n"],
)
def test_invalid_toml_is_a_config_error_naming_the_file(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_text(tmp_path, text)
    message = str(error.value)
    assert "invalid TOML" in message
    assert "kairoi.toml" in message


def test_a_missing_file_is_a_config_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as error:
        load_config(missing)
    assert str(missing) in str(error.value)
    with pytest.raises(ConfigError):
        load_config(tmp_path)  # a directory


def test_a_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes("# caf\u00e9 configuration\n[log]\nlevel = 'info'\n".encode("latin-1"))
    with pytest.raises(ConfigError):
        load_config(path)


# -- [policy]: the bounds of core/validation.py ---------------------------------------------


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[policy]\nmax_attempts = 0\n", "policy.max_attempts must be from 1 to 1000, not 0"),
        # the issue: 1026 attempts overflowed the backoff at attempt 1025
        ("[policy]\nmax_attempts = 1026\n", "policy.max_attempts must be from 1 to 1000, not 1026"),
        ("[policy]\nbackoff_initial_s = 1e308\n", "policy.backoff_initial_s must be from 0 to"),
        ("[policy]\nbackoff_max_s = 1e308\n", "policy.backoff_max_s must be from 0 to"),
        ("[policy]\nbackoff_max_s = -1\n", "policy.backoff_max_s must be from 0 to"),
        ("[policy]\ntimeout_s = 3153600001\n", "policy.timeout_s must be more than 0 to"),
        ("[policy]\ntimeout_s = -1\n", "policy.timeout_s"),
        ("[policy]\nstale_after_s = 1e10\n", "policy.stale_after_s must be from 0 to"),
        ("[policy]\nstale_after_s = -1\n", "policy.stale_after_s"),
        ("[policy]\nbackoff_initial_s = inf\n", "policy.backoff_initial_s must be a finite number"),
        ("[policy]\nbackoff_max_s = nan\n", "policy.backoff_max_s must be a finite number"),
    ],
    ids=lambda v: " ".join(v.split())[:40],
)
def test_policy_values_beyond_the_bounds_are_rejected(
    tmp_path: Path, text: str, named: str
) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as error:
        load_text(tmp_path, text)
    if "must be" in named and "finite" not in named:
        assert "3,153,600,000 s (100 years)" in str(error.value) or "1000" in str(error.value)


def test_policy_values_at_the_bounds_are_accepted(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "[policy]\nmax_attempts = 1000\ntimeout_s = 3153600000\nbackoff_initial_s = 0\n"
        "backoff_max_s = 3153600000\nstale_after_s = 3153600000\n",
    )
    policy = config.policy.to_policy()
    assert (policy.max_attempts, policy.timeout_s, policy.backoff_max_s) == (
        1000,
        3_153_600_000,
        3_153_600_000,
    )
    # 0 means "none" for the timeout and staleness
    none = load_text(tmp_path, "[policy]\ntimeout_s = 0\nstale_after_s = 0\n").policy.to_policy()
    assert (none.timeout_s, none.stale_after_s) == (None, None)


def test_http_is_the_new_name_of_metrics(tmp_path: Path) -> None:
    assert Config().http.listen == "127.0.0.1:9678" and Config().http.enabled
    new = load_text(tmp_path, '[http]\nlisten = "0.0.0.0:8080"\nmax_connections = 10')
    assert new.http.listen == "0.0.0.0:8080"
    assert new.http.max_connections == 10
    old = load_text(tmp_path, '[metrics]\nlisten = "0.0.0.0:9999"\nenabled = false')
    assert old.http.listen == "0.0.0.0:9999"
    assert old.http.enabled is False  # the port stays closed, as before
    mixed = load_text(tmp_path, '[metrics]\nenabled = false\n[http]\nlisten = "127.0.0.1:1"')
    assert (mixed.http.enabled, mixed.http.listen) == (False, "127.0.0.1:1")


def test_the_same_http_key_under_both_names_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_text(tmp_path, '[metrics]\nlisten = "127.0.0.1:1"\n[http]\nlisten = "127.0.0.1:2"')
    assert "metrics.listen and http.listen are both set" in str(error.value)
