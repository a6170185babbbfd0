"""The configuration: bad- and good-config corpora through the real CLI, the
example config/relayd.yaml (unit tests of relayd.config:
test_config_units.py).

The corpus follows chasquid's test/t-20-bad_configs: ``bad_configs/NAME.yaml``
beside ``NAME.expected``, the exact problem lines ``relayd -c NAME.yaml
--check`` must print on stderr (each prefixed there with ``NAME.yaml: ``).
Add a case by dropping in the two files; regenerate an .expected only after
reading the new message and judging it precise (names the YAML path, quotes
the value). Every ``good_configs/*.yaml`` must pass ``--check``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import trustme
import yaml

from relayd import config
from relayd.daemon import RESTART_KEYS

ROOT = Path(__file__).resolve().parent.parent
BAD = ROOT / "tests" / "bad_configs"
GOOD = ROOT / "tests" / "good_configs"
EXAMPLE = ROOT / "config" / "relayd.yaml"
RELAYD = [sys.executable, "-m", "relayd"]

# Corpus cases whose .expected holds the message relayd should give but does not
# yet: strict xfails, so fixing one turns its test red until it moves here.
KNOWN_GAPS: dict[str, str] = {}

BAD_CASES = sorted(p.stem for p in BAD.glob("*.yaml"))
GOOD_CASES = sorted(p.name for p in GOOD.glob("*.yaml"))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != config.ENV_VAR}
    env.update(extra)
    return env


def run_relayd(*args: str, cwd: Path | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RELAYD, *args], cwd=cwd, env=env or clean_env(),
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def corpus_results() -> dict[str, subprocess.CompletedProcess[str]]:
    """Run every corpus file once, concurrently (each run is a fresh Python)."""
    jobs = [(f"bad:{n}", BAD, f"{n}.yaml") for n in BAD_CASES]
    jobs += [(f"good:{n}", GOOD, n) for n in GOOD_CASES]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {key: pool.submit(run_relayd, "-c", name, "--check", cwd=cwd)
                   for key, cwd, name in jobs}
        return {key: f.result() for key, f in futures.items()}


# ---------------------------------------------------------------- the corpus

def test_corpus_is_complete() -> None:
    yamls = {p.stem for p in BAD.glob("*.yaml")}
    expecteds = {p.stem for p in BAD.glob("*.expected")}
    assert yamls == expecteds, "each bad config needs NAME.yaml and NAME.expected"
    assert set(KNOWN_GAPS) <= yamls
    assert {p.name for p in BAD.iterdir()} == {p.name for p in BAD.glob("*.yaml")} | {
        p.name for p in BAD.glob("*.expected")}, "only .yaml/.expected files in bad_configs/"


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=KNOWN_GAPS[n], strict=True))
    if n in KNOWN_GAPS else n
    for n in BAD_CASES])
def test_bad_config(name: str, corpus_results: dict[str, Any]) -> None:
    r = corpus_results[f"bad:{name}"]
    expected = (BAD / f"{name}.expected").read_text(encoding="utf-8").splitlines()
    assert expected and all(expected), f"{name}.expected must list the problem lines"
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 1, r.stderr
    prefix = f"{name}.yaml: "
    lines = r.stderr.splitlines()
    problems = [ln.removeprefix(prefix) for ln in lines if ln.startswith(prefix)]
    assert problems == expected, "\n" + r.stderr
    assert lines[-1] == f"relayd: configuration {name}.yaml is invalid"
    assert len(lines) == len(expected) + 1, "nothing but the problems and the verdict"
    assert r.stdout == ""


@pytest.mark.parametrize("name", GOOD_CASES)
def test_good_config(name: str, corpus_results: dict[str, Any]) -> None:
    r = corpus_results[f"good:{name}"]
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"relayd: configuration {name} is valid\n"
    assert r.stderr == ""


def test_empty_file_is_all_defaults() -> None:
    assert config.load_file(GOOD / "empty.yaml") == config.Config()
    assert config.load_file(GOOD / "comments-only.yaml") == config.Config()


# ---------------------------------------------------------------- CLI details

def test_missing_config_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    r = run_relayd("-c", str(missing), "--check")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"{missing}: cannot read: No such file or directory",
        f"relayd: configuration {missing} is invalid"]


def test_invalid_config_without_check_exits_1(tmp_path: Path) -> None:
    """Starting (not --check) on a bad file prints the same lines and exits 1,
    before binding anything."""
    r = run_relayd("-c", str(BAD / "unknown-nested-key.yaml"))
    assert r.returncode == 1
    assert f"{BAD / 'unknown-nested-key.yaml'}: limits.bogus_key: unknown key" in r.stderr


def test_env_var_and_precedence_through_cli(tmp_path: Path) -> None:
    good = GOOD / "loopback-plain-auth.yaml"
    r = run_relayd("--check", env=clean_env(RELAYD_CONFIG=str(good)))
    assert r.returncode == 0 and r.stdout == f"relayd: configuration {good} is valid\n"
    # -c wins over $RELAYD_CONFIG
    bad = BAD / "log-level-bogus.yaml"
    r = run_relayd("-c", str(good), "--check", env=clean_env(RELAYD_CONFIG=str(bad)))
    assert r.returncode == 0, r.stderr
    r = run_relayd("-c", str(bad), "--check", env=clean_env(RELAYD_CONFIG=str(good)))
    assert r.returncode == 1


def test_help_mentions_lookup_order_and_signals() -> None:
    r = run_relayd("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    order = ["-c PATH", "$RELAYD_CONFIG", "/etc/relayd/relayd.yaml", "embedded default"]
    positions = [text.find(s) for s in order]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), text
    for s in ("SIGHUP", "SIGTERM", "drain_timeout", "--check", "--print-config"):
        assert s in text


def test_print_config_masks_passwords() -> None:
    r = run_relayd("-c", str(GOOD / "every-key-without-tls.yaml"), "--print-config")
    assert r.returncode == 0, r.stderr
    assert "secret" not in r.stdout
    dumped = yaml.safe_load(r.stdout)
    assert dumped["system_smtps"][0]["password"] == "********"
    assert dumped["system_smtps"][1]["password"] is None
    assert dumped["system_smtps"][0]["username"] == "relay@example.com"
    # the effective config is itself a valid config, defaults filled in
    assert dumped["limits"]["max_errors"] == 1
    assert dumped["received_header"] == "hide_client"
    assert dumped["listen"][1] == {"address": "[::1]:0", "tls": "none", "auth_require_tls": True,
                                   "proxy_protocol": False, "reuse_port": False}
    config.parse(dumped)


def test_print_config_embedded_default(tmp_path: Path) -> None:
    env = clean_env()
    if os.path.exists(config.DEFAULT_PATH):
        pytest.skip(f"{config.DEFAULT_PATH} exists on this machine")
    r = subprocess.run([*RELAYD, "--print-config"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    dumped = yaml.safe_load(r.stdout)
    assert dumped["listen"] == [{"address": "127.0.0.1:2587", "tls": "none",
                                 "auth_require_tls": False, "proxy_protocol": False,
                                 "reuse_port": False}]
    assert dumped["trusted_proxies"] == ["127.0.0.1/32", "::1/128"]
    assert dumped["timeouts"]["proxy"] == 5
    assert dumped["state_dir"] == "./relayd-data"
    assert dumped["admin"]["socket"] == "./relayd-data/admin.sock"
    assert dumped["metrics"]["listen"] == "127.0.0.1:9587"
    assert dumped["received_header"] == "full"


def test_console_script_entry_point() -> None:
    """The `relayd` command pip installed (not just `python -m relayd`)."""
    script = Path(sysconfig.get_path("scripts")) / "relayd"
    assert script.exists(), f"{script}: is the package pip-installed?"
    r = subprocess.run([str(script), "-c", str(GOOD / "empty.yaml"), "--check"],
                       env=clean_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_print_config_and_the_start_log_mask_the_dsn_password(tmp_path: Path) -> None:
    path = tmp_path / "relayd.yaml"
    path.write_text('database: "postgresql://relayd:hunter2@db.example.com/relayd"\n')
    r = run_relayd("-c", str(path), "--print-config")
    assert r.returncode == 0, r.stderr
    assert "hunter2" not in r.stdout
    assert yaml.safe_load(r.stdout)["database"] == (
        "postgresql://relayd:********@db.example.com/relayd")
    eff = config.flatten(config.effective(config.parse(yaml.safe_load(path.read_text()))))
    assert eff["database"] == "postgresql://relayd:********@db.example.com/relayd"


# ---------------------------------------------------------------- the example

def example_text(tls_files: tuple[str, str] | None = None, *, system_smtp: bool = False) -> str:
    """config/relayd.yaml, optionally with real TLS files and with its
    commented-out system_smtps example entry enabled."""
    text = EXAMPLE.read_text(encoding="utf-8")
    if tls_files:
        cert, key = tls_files
        assert "cert: /etc/relayd/cert.pem" in text and "key: /etc/relayd/key.pem" in text
        text = text.replace("/etc/relayd/cert.pem", cert).replace("/etc/relayd/key.pem", key)
    if system_smtp:
        lines = text.splitlines()
        start = lines.index("# system_smtps:")
        end = start
        while end < len(lines) and lines[end].startswith("# "):
            end += 1
        block = [ln[2:] for ln in lines[start:end]]
        assert len(block) > 10
        lines[lines.index("system_smtps: []")] = ""
        lines[start:end] = block
        text = "\n".join(lines) + "\n"
    return text


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("example-tls")
    leaf = trustme.CA().issue_cert("relay.example.com")
    cert, key = d / "cert.pem", d / "key.pem"
    leaf.private_key_and_cert_chain_pem.write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


def test_example_config_passes_check(tmp_path: Path, tls_pair: tuple[str, str]) -> None:
    path = tmp_path / "relayd.yaml"
    path.write_text(example_text(tls_pair))
    r = run_relayd("-c", str(path), "--check")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    path.write_text(example_text(tls_pair, system_smtp=True))
    r = run_relayd("-c", str(path), "--check")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr


def test_example_config_without_tls_files_names_tls() -> None:
    r = run_relayd("-c", str(EXAMPLE), "--check")
    assert r.returncode == 1
    assert f"{EXAMPLE}: tls.cert: cannot read '/etc/relayd/cert.pem'" in r.stderr


def _schema_keys(model: type[Any], prefix: str = "") -> set[str]:
    """Dotted paths of every key the schema accepts ([] for list items)."""
    out: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        out.add(path)
        ann = field.annotation
        if type(None) in get_args(ann):                     # X | None
            ann = next(a for a in get_args(ann) if a is not type(None))
        if get_origin(ann) is list:
            ann, path = get_args(ann)[0], path + "[]"
        if isinstance(ann, type) and issubclass(ann, config.Strict):
            out |= _schema_keys(ann, path + ".")
    return out


def _yaml_keys(data: Any, prefix: str = "") -> set[str]:
    out: set[str] = set()
    if isinstance(data, dict):
        for k, v in data.items():
            out.add(prefix + k)
            out |= _yaml_keys(v, prefix + k + ".")
    elif isinstance(data, list):
        for item in data:
            out |= _yaml_keys(item, prefix.removesuffix(".") + "[].")
    return out


def test_example_documents_every_key(tls_pair: tuple[str, str]) -> None:
    data = yaml.safe_load(example_text(tls_pair, system_smtp=True))
    schema = _schema_keys(config.Config)
    assert "limits.max_sessions_per_ip" in schema and "system_smtps[].verify_tls" in schema
    missing = schema - _yaml_keys(data)
    assert not missing, f"config/relayd.yaml does not show: {sorted(missing)}"


def test_example_shows_the_defaults() -> None:
    """Where the example keeps a default, it is the schema's real default."""
    data = yaml.safe_load(EXAMPLE.read_text())
    defaults = config.Config().model_dump(mode="json")
    for section in ("limits", "auth_failures", "failover", "timeouts"):
        assert data[section] == defaults[section], section
    for key in ("drain_timeout", "log_level", "database", "system_smtps", "received_header"):
        assert data[key] == defaults[key], key
    assert data["admin"]["mode"] == defaults["admin"]["mode"]
    assert data["admin"]["listen"] == defaults["admin"]["listen"]
    assert data["metrics"] == defaults["metrics"]
    entry = yaml.safe_load(example_text(system_smtp=True))["system_smtps"][0]
    fields = config.UpstreamSpec.model_fields
    for key in ("verify_tls", "debug", "priority", "ssltls"):
        assert entry[key] == fields[key].default, key


def test_example_says_which_keys_need_a_restart() -> None:
    """The comment block above each top-level key says [restart] or [reload],
    and [restart] exactly for relayd.daemon.RESTART_KEYS."""
    lines = EXAMPLE.read_text().splitlines()
    seen = set()
    for i, line in enumerate(lines):
        m = re.match(r"([a-z_]+):", line)
        if not m:
            continue
        key = m.group(1)
        seen.add(key)
        j = i
        while j > 0 and lines[j - 1].startswith("#"):
            j -= 1
        block = "\n".join(lines[j:i])
        want = "[restart]" if key in RESTART_KEYS else "[reload"
        assert want in block, f"{key}: the comment above it should say {want}"
    assert seen == set(config.Config.model_fields)
    header = " ".join(lines[:30])
    assert all(k in header for k in RESTART_KEYS)
