# syntax=docker/dockerfile:1
#
# The hub-worker image. The build stage turns the project into wheels (its own and
# those of its dependencies); the runtime stage installs them offline and carries
# no compiler, no build tools and no source tree. The SQL ships inside the wheel
# (worker/sql), so the installed worker finds its migrations and queries.
#
#   docker build -t hub-worker .
#   docker run --rm -e HUB_NATS_URL=... -e HUB_DATABASE_URL=... hub-worker run

# One pinned base for both stages, so the wheels match the interpreter that runs them.
ARG PYTHON_IMAGE=python:3.11.17-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the wheel is made of (pyproject.toml's wheel target: worker/, plus sql/
# force-included as worker/sql; README.md is the package's readme).
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY sql ./sql
# Wheels of the project and of everything it depends on (no extras: the embedded
# servers stay out), so that the runtime stage installs exactly what was resolved here
# and needs no index.
RUN pip wheel --wheel-dir /dist .

FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1
# A fixed numeric uid/gid (not root), so that volume ownership and Kubernetes'
# runAsNonRoot checks do not depend on the image's /etc/passwd.
RUN groupadd --system --gid 10001 hub \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin hub
# The wheels are bind-mounted from the build stage rather than copied, so they
# leave no layer behind.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install --no-index --find-links=/dist hub-worker \
    && hub-worker --version
WORKDIR /app
# The image installs no extras, so it carries no embedded servers: set HUB_NATS_URL and
# HUB_DATABASE_URL. HUB_DATA_DIR (where `run` keeps its lock and hub.json) must be
# writable by the worker's user.
RUN mkdir -p /app/data && chown -R 10001:10001 /app
ENV HUB_DATA_DIR=/app/data \
    HUB_HTTP_ADDR=0.0.0.0:9464
USER 10001:10001
# /metrics, /healthz and /readyz (HUB_HTTP_ADDR).
EXPOSE 9464
# The port is read from HUB_HTTP_ADDR, so that moving it does not break the check.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('HUB_HTTP_ADDR', '').rpartition(':')[2] or '9464'; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
ENTRYPOINT ["hub-worker"]
CMD ["run"]
