"""Unit tests of relayd.config: host:port parsing, loopback, the config
file's lookup order, the embedded default against SPEC, the database key,
every problem collected at once, masking, the TLS file checks. The corpora,
the CLI and the example config are in test_config.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from relayd import config


@pytest.mark.parametrize("value,expected", [
    ("127.0.0.1:587", ("127.0.0.1", 587)),
    ("0.0.0.0:0", ("0.0.0.0", 0)),
    ("localhost:65535", ("localhost", 65535)),
    ("mail.example.com:25", ("mail.example.com", 25)),
    ("[::1]:587", ("::1", 587)),
    ("[::]:465", ("::", 465)),
    ("[2001:db8::25]:2525", ("2001:db8::25", 2525)),
    ("[::ffff:127.0.0.1]:25", ("::ffff:127.0.0.1", 25)),
])
def test_parse_hostport(value: str, expected: tuple[str, int]) -> None:
    assert config.parse_hostport(value) == expected


@pytest.mark.parametrize("value,message", [
    ("localhost", "expected \"host:port\", got 'localhost'"),
    ("[::1]", "expected \"host:port\", got '[::1]'"),
    ("::1:587", "expected \"host:port\""),
    ("::1", "expected \"host:port\""),
    ("[::1]587", "expected \"host:port\""),
    ("host:", "expected \"host:port\""),
    (":587", "expected \"host:port\""),
    ("host:smtp", "expected \"host:port\""),
    ("host:-1", "expected \"host:port\""),
    ("host :25", "expected \"host:port\""),
    ("", "expected \"host:port\""),
    ("host:123456", "expected \"host:port\""),
    ("host:70000", "port 70000 is out of range 0-65535"),
    ("[::1]:65536", "port 65536 is out of range 0-65535"),
])
def test_parse_hostport_rejects(value: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        config.parse_hostport(value)
    assert message in str(info.value)


@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.0.2.1", False), ("relay.example.com", False),
    ("::ffff:127.0.0.1", False),
])
def test_is_loopback(host: str, loopback: bool) -> None:
    assert config.is_loopback(host) is loopback


def test_listener_properties() -> None:
    lst = config.Listener(address="[::1]:2587", tls="none", auth_require_tls=False)
    assert (lst.host, lst.port) == ("::1", 2587)


def test_locate_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC 1: -c > $RELAYD_CONFIG > /etc/relayd/relayd.yaml > embedded."""
    etc = tmp_path / "etc-relayd.yaml"
    monkeypatch.setattr(config, "DEFAULT_PATH", str(etc))
    monkeypatch.delenv(config.ENV_VAR, raising=False)
    assert config.locate(None) == config.Source(None)          # nothing: embedded
    assert str(config.locate(None)) == "<embedded default>"
    etc.write_text("log_level: warning\n")
    assert config.locate(None) == config.Source(str(etc))      # the /etc file
    assert config.locate(None).load().log_level == "warning"
    monkeypatch.setenv(config.ENV_VAR, "/from/env.yaml")
    assert config.locate(None) == config.Source("/from/env.yaml")  # env beats /etc
    assert config.locate("/from/cli.yaml") == config.Source("/from/cli.yaml")  # -c beats env
    monkeypatch.setenv(config.ENV_VAR, "")                     # empty env: ignored
    assert config.locate(None) == config.Source(str(etc))
    assert config.locate("") == config.Source(str(etc))


def test_default_path_is_etc() -> None:
    assert config.DEFAULT_PATH == "/etc/relayd/relayd.yaml"
    assert config.ENV_VAR == "RELAYD_CONFIG"


def test_embedded_default_matches_spec() -> None:
    cfg = config.Source(None).load()
    assert [(l.address, l.tls, l.auth_require_tls) for l in cfg.listen] == [
        ("127.0.0.1:2587", "none", False)]
    assert cfg.tls is None
    assert cfg.state_dir == "./relayd-data"
    assert cfg.database_path == Path("./relayd-data/relayd.db")
    assert cfg.admin.socket == "./relayd-data/admin.sock" and cfg.admin.mode_bits == 0o660
    assert cfg.metrics.listen == "127.0.0.1:9587"


def test_database_path() -> None:
    assert config.parse({"state_dir": "/var/lib/relayd"}).database_path == Path(
        "/var/lib/relayd/relayd.db")
    assert config.parse({"database": "/srv/r.db"}).database_path == Path("/srv/r.db")


def test_database_dsn_or_path() -> None:
    dsn = "postgresql://relayd@db.example.com:5432/relayd"
    cfg = config.parse({"database": dsn})
    assert cfg.database_dsn == dsn
    assert config.parse({"database": "postgres:///relayd"}).database_dsn == "postgres:///relayd"
    for path in ("/srv/r.db", "relative/r.db", "C:/r.db", "./odd:name.db"):
        assert config.parse({"database": path}).database_dsn is None


def test_parse_collects_every_problem() -> None:
    with pytest.raises(config.ConfigError) as info:
        config.parse({"limits": {"max_recipients": 0, "bogus": 1}, "log_level": "loud"}, "x.yaml")
    assert info.value.source == "x.yaml"
    assert info.value.problems == [
        "limits.max_recipients: Input should be greater than 0 (got 0)",
        "limits.bogus: unknown key",
        "log_level: Input should be 'debug', 'info', 'warning' or 'error' (got 'loud')"]


def test_effective_masks_only_set_passwords() -> None:
    cfg = config.parse({"system_smtps": [
        {"host": "a.example", "port": 25, "username": "u", "password": "hunter2", "auth": True},
        {"host": "b.example", "port": 25}]})
    eff = config.effective(cfg)
    assert [s["password"] for s in eff["system_smtps"]] == ["********", None]
    assert "hunter2" not in repr(eff)
    assert cfg.system_smtps[0].password == "hunter2"    # the running config keeps it


def test_check_files_loads_real_tls(tls_files: tuple[str, str]) -> None:
    cert, key = tls_files
    cfg = config.parse({"listen": [{"address": "127.0.0.1:0", "tls": "implicit"}],
                        "tls": {"cert": cert, "key": key}})
    config.check_files(cfg, "x")
    swapped = cfg.model_copy(update={"tls": config.TLSFiles(cert=key, key=cert)})
    with pytest.raises(config.ConfigError) as info:
        config.check_files(swapped, "x")
    assert info.value.problems[0] == f"tls.cert: {key!r} holds no PEM certificate"


def test_check_files_names_a_key_that_does_not_match(tls_files: tuple[str, str],
                                                      tmp_path: Path) -> None:
    cert, _ = tls_files
    other = trustme.CA().issue_cert("localhost")
    other_key = tmp_path / "other-key.pem"
    other.private_key_pem.write_to_path(str(other_key))
    cfg = config.parse({"listen": [{"address": "127.0.0.1:0", "tls": "implicit"}],
                        "tls": {"cert": cert, "key": str(other_key)}})
    with pytest.raises(config.ConfigError) as info:
        config.check_files(cfg, "x")
    assert info.value.problems == [
        "tls: the private key does not match the certificate, or a PEM block is damaged"]
