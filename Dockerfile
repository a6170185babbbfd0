# relayd container image (SPEC 7).
#
#   docker build -t relayd .
#   docker run -d --name relayd --hostname relay.example.com \
#     -p 587:587 -p 465:465 -p 127.0.0.1:9587:9587 \
#     -v /etc/relayd/tls:/etc/relayd/tls:ro -v relayd-state:/var/lib/relayd \
#     relayd
#
# The config baked in is docker/relayd.yaml (read it: TLS files must be
# mounted at /etc/relayd/tls, readable by UID 10587); mount your own at
# /etc/relayd/relayd.yaml to change it, `docker kill --signal=HUP relayd`
# reloads it. Static checks: tests/test_packaging.py.

# ---- build: install the package into a venv; no compiler, no cache, no tests.
FROM python:3.11-slim AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
# README.md is the package's long description (pyproject.toml: readme).
COPY pyproject.toml README.md ./
COPY relayd ./relayd
RUN python -m venv /opt/relayd \
 && /opt/relayd/bin/pip install . \
 && /opt/relayd/bin/relayd --version

# ---- runtime: the venv, the config, an unprivileged user.
FROM python:3.11-slim
ENV PATH=/opt/relayd/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RELAYD_CONFIG=/etc/relayd/relayd.yaml
# A fixed UID/GID so that mounted TLS keys and volumes can be chown-ed to it.
RUN groupadd --system --gid 10587 relayd \
 && useradd --system --uid 10587 --gid relayd --home-dir /var/lib/relayd \
            --no-create-home --shell /usr/sbin/nologin relayd \
 && install -d -o relayd -g relayd -m 0700 /var/lib/relayd /run/relayd \
 && install -d -m 0755 /etc/relayd /etc/relayd/tls
COPY --from=build /opt/relayd /opt/relayd
COPY docker/relayd.yaml /etc/relayd/relayd.yaml

USER relayd:relayd
WORKDIR /var/lib/relayd
# 587 submission (STARTTLS), 465 submissions (implicit TLS), 9587 /metrics
# and /healthz. The admin API stays on the Unix socket /run/relayd/admin.sock:
# docker exec relayd relayctl --socket /run/relayd/admin.sock status
EXPOSE 587 465 9587
# relayd.db and its journal: keep them on a named volume.
VOLUME /var/lib/relayd
# SIGTERM drains (sessions in progress finish, up to drain_timeout); a second
# SIGTERM exits at once. SIGHUP reloads the config.
STOPSIGNAL SIGTERM
# slim has no curl: Python's urllib, which is there anyway. /healthz answers
# 200 while the SMTP listeners are up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9587/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["relayd"]
CMD ["-c", "/etc/relayd/relayd.yaml"]
