# Orthanc Intake: the public upload listener, the admin listener and the forwarder in one
# process. Build from the repository root:   docker build -t orthanc-intake .
# A package index other than PyPI: a pip.conf as the build secret `pip.conf` (see below).
# Deployment guide (compose, secrets, volumes, nginx): docs/DEPLOYMENT.md.
#
# Both stages use the same base image (pinned by tag; pin by digest too for reproducible
# builds), because the virtual environment built in the first is copied into the second.

# ---------------------------------------------------------------------------- builder
FROM python:3.11-slim-bookworm AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/orthanc-intake

# Runtime dependencies only (no test extras). Every dependency ships binary wheels for
# linux/amd64 and linux/arm64, so no compiler is installed, here or below; a platform
# without wheels would need build-essential in THIS stage only.
#
# First the dependencies and the build backend, read from pyproject.toml alone: this layer
# is rebuilt only when pyproject.toml changes, not on every change to the code.
# The package index is PyPI, unless the build is given a pip configuration as the secret
# `pip.conf` (`--secret id=pip.conf,src=FILE`): it is mounted as /etc/pip.conf for this
# one command and is in no layer of either stage (docs/DEPLOYMENT.md, "Building the image").
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(p["build-system"]["requires"] + p["project"]["dependencies"]))' \
       > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The service runs from its source tree at /opt/orthanc-intake (an editable install):
# app/db/migrations.py finds alembic.ini and alembic/ next to the `app` package, and the
# upload page's files live in app/static/; a plain wheel carries neither.
COPY README.md alembic.ini ./
COPY alembic ./alembic
COPY app ./app

# The project itself, with what is installed above and nothing else (no index needed);
# `pip check` fails the build if that does not satisfy pyproject.toml.
RUN pip install --editable . --no-deps --no-build-isolation \
    && pip check \
    && python -m compileall -q /opt/orthanc-intake/app /opt/orthanc-intake/alembic \
    && orthanc-intake --help > /dev/null

# ---------------------------------------------------------------------------- runtime
FROM python:3.11-slim-bookworm

# A fixed, non-root UID/GID, so volume ownership and secret-file permissions are
# predictable on every host (see docs/DEPLOYMENT.md, "Secrets").
RUN groupadd --system --gid 10001 intake \
    && useradd --system --uid 10001 --gid intake --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin intake \
    && mkdir -p /data/spool \
    && chown -R intake:intake /data \
    && chmod 0750 /data

# Code and virtual environment belong to root: the service can read them, not change them.
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/orthanc-intake /opt/orthanc-intake

# INTAKE_ADMIN_HOST=0.0.0.0: inside the container the admin listener must bind every
# interface of the container's own network namespace, or Docker's port mapping cannot
# reach it. That does NOT make it public: what decides is how the port is published, and
# deploy/compose.yml publishes it as 127.0.0.1:8001:8001 only (never publish 8001 on all
# addresses, and never `--network host` with this setting). Containers on the same Docker
# network can still reach it; its /api routes require an admin regardless.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    INTAKE_DATABASE_URL=sqlite:////data/intake.db \
    INTAKE_SPOOL_DIR=/data/spool \
    INTAKE_PUBLIC_HOST=0.0.0.0 \
    INTAKE_PUBLIC_PORT=8000 \
    INTAKE_ADMIN_HOST=0.0.0.0 \
    INTAKE_ADMIN_PORT=8001 \
    INTAKE_LOG_FORMAT=json

# The database (when SQLite) and the spool: acknowledged files that Orthanc has not
# taken yet live only here. Keep it on a persistent volume and back it up.
VOLUME ["/data"]
WORKDIR /data
USER 10001:10001

# 8000: public uploads. 8001: admin API, /healthz, /readyz, /metrics (publish on loopback only).
EXPOSE 8000 8001

# `serve` stops its listeners and the forwarder on SIGTERM; acknowledged files are safe
# on disk whatever happens, an upload cut short was never acknowledged.
STOPSIGNAL SIGTERM

# Liveness from the admin listener (no curl in the slim image: Python's urllib).
# urlopen raises on a refused connection or a non-2xx answer, so the check fails then.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('INTAKE_ADMIN_PORT', '8001'), timeout=4)"]

ENTRYPOINT ["orthanc-intake"]
CMD ["serve"]
