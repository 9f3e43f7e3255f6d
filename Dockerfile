# syntax=docker/dockerfile:1
#
# Prism gateway image.
#
#   docker build -t prism .
#   docker run --rm prism                       # dev mode: reachable from inside the container only
#
# Binding. The default CMD is plain `prism serve`: dev mode (no authentication configured),
# which binds loopback and refuses any other address at start-up. The gateway runs and the
# HEALTHCHECK below passes inside the container, but a published port (`-p 8080:8080`)
# reaches nothing. To serve the host and beyond, mount a server config with `auth` (README,
# "Serving other hosts") and bind all interfaces, both ports:
#
#   docker run --rm -p 8080:8080 -p 8980:8980 \
#     -v ./prism.yaml:/etc/prism/prism.yaml:ro -e PRISM_CONFIG=/etc/prism/prism.yaml \
#     -e PRISM_HTTP__HOST=0.0.0.0 -e PRISM_GRPC__HOST=0.0.0.0 prism
#
# tests/test_docker_serve.py reads this command, the ENV, CMD and HEALTHCHECK below, and runs
# the gateway that way outside Docker; the README shows the same command.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The uv that wrote uv.lock; `uv sync --frozen` installs exactly what the lock says.
ARG UV_VERSION=0.13.9

# ---- builder: resolve nothing, install the locked dependencies into /app/.venv ----------
# Same base image as the runtime stage, so the venv's interpreter symlinks
# (/usr/local/bin/python3.11) resolve after the copy.
FROM ${PYTHON_IMAGE} AS builder
ARG UV_VERSION
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /app

# Dependencies first, in their own layer: it is rebuilt only when the lock changes.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project

# Then the project itself, installed editable: its .pth points the venv at /app and
# /app/proto (for the generated `prism.v1` package), where the runtime stage puts the
# sources. README.md is read by the build backend (pyproject `readme`).
COPY README.md ./
COPY app/ app/
COPY adapters/ adapters/
COPY proto/ proto/
RUN uv sync --frozen --no-dev

# ---- runtime ------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PRISM_DATA_DIR=/app/data

RUN groupadd --system --gid 10001 prism \
    && useradd --system --uid 10001 --gid prism --home-dir /app --no-create-home prism

WORKDIR /app
COPY --from=builder /app/.venv /app/.venv
COPY app/ app/
COPY adapters/ adapters/
COPY proto/ proto/
# Compile the sources now: the prism user cannot write beside them. The embedded SQLite
# file lives in /app/data, the only path the gateway writes.
RUN python -m compileall -q app adapters proto \
    && mkdir -p /app/data && chown prism:prism /app/data
VOLUME ["/app/data"]

USER prism:prism
EXPOSE 8080 8980

# Calls 127.0.0.1 from inside the container, so it works with the default loopback bind and
# with 0.0.0.0. Follows PRISM_HTTP__PORT if the port is overridden; /readyz answers 503 until
# the backends and the gRPC server are up, which urlopen raises as an error (exit 1).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('PRISM_HTTP__PORT', '8080'), timeout=2)"]

CMD ["prism", "serve"]
