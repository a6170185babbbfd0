"""Several relayd processes on one host, one per core (SPEC 8; the systemd
template unit ``systemd/relayd@.service``): one config file for all of them,
and what each needs of its own derived from its instance number.

With ``RELAYD_INSTANCE=N`` (1-999; the template sets it to ``%i``) relayd
runs as instance N of the host's set:

* its admin socket is the configured one with ``-N`` before the suffix
  (``/run/relayd/admin.sock`` -> ``/run/relayd/admin-2.sock``);
* its metrics listener, and the optional TCP admin listener, are on the
  configured port + N (9587 -> 9589 for instance 2; port 0 stays 0);
* the SMTP listeners are shared: each must say ``reuse_port: true``, so
  that the kernel spreads connections over the instances;
* the store must be PostgreSQL: processes sharing one SQLite file would
  each keep quotas of their own.

A config that cannot run as an instance is refused with the YAML path of
each reason, as ``--check`` reports any other problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .config import Config, Source, parse_hostport
from .errors import ConfigError

ENV_VAR = "RELAYD_INSTANCE"
MAX_INSTANCE = 999


@dataclass(frozen=True)
class InstanceSource(Source):
    """A config source whose every load (start and SIGHUP) is made instance
    ``instance``'s."""

    instance: int = 0

    def load(self) -> Config:
        return for_instance(super().load(), self.instance, str(self))

    def __str__(self) -> str:
        return f"{super().__str__()} (instance {self.instance})"


def from_environment(source: Source) -> Source:
    """``source`` as $RELAYD_INSTANCE's instance, or as is without it."""
    value = os.environ.get(ENV_VAR, "")
    if not value:
        return source
    if not value.isdigit() or not 1 <= int(value) <= MAX_INSTANCE:
        raise ConfigError(str(source), [
            f"${ENV_VAR}: expected an instance number 1-{MAX_INSTANCE} (got {value!r})"])
    return InstanceSource(source.path, int(value))


def for_instance(cfg: Config, n: int, where: str) -> Config:
    """``cfg`` as instance ``n`` runs it (module docstring); ConfigError
    listing what stops it from running as one of several."""
    problems = [f"listen[{i}].reuse_port: must be true when {ENV_VAR} is set: the "
                "instances of a host share each listener's address"
                for i, lst in enumerate(cfg.listen) if not lst.reuse_port]
    for key, address in (("admin.listen", cfg.admin.listen), ("metrics.listen", cfg.metrics.listen)):
        if address is not None and parse_hostport(address)[1] + n > 65535:
            problems.append(f"{key}: port {parse_hostport(address)[1]} + instance {n} is past 65535")
    if not cfg.database_dsn:
        problems.append(f"database: {ENV_VAR} runs one of several relayd processes, which "
                        "must share a PostgreSQL database (postgresql://...), not an SQLite file")
    if problems:
        raise ConfigError(where, problems)
    admin = cfg.admin.model_copy(update={
        "socket": str(numbered(Path(cfg.admin.socket), n)),
        "listen": shifted(cfg.admin.listen, n)})
    metrics = cfg.metrics.model_copy(update={"listen": shifted(cfg.metrics.listen, n)})
    return cfg.model_copy(update={"admin": admin, "metrics": metrics})


def numbered(path: Path, n: int) -> Path:
    return path.with_name(f"{path.stem}-{n}{path.suffix}")


def shifted(address: str | None, n: int) -> str | None:
    """``host:port`` with the port moved up by ``n`` (0 stays 0)."""
    if address is None:
        return None
    host, port = parse_hostport(address)
    host = f"[{host}]" if ":" in host else host
    return f"{host}:{port + n if port else 0}"
