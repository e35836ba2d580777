# The kvgate image: xds_server, ext_proc and the engine simulator (docker-compose.yml runs each as
# `python -m ...`), and the `kvgate` CLI. Envoy runs from its official image, not from this one.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package is built from: the build context may hold a virtualenv and benchmark output.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvgate ./kvgate
COPY xds_server ./xds_server
COPY ext_proc ./ext_proc
COPY engines ./engines
RUN pip install . && rm -rf /src

# Nothing here writes to disk: the catalog and model files come read-only from a mount (/kvgate).
RUN useradd --system --uid 10001 --no-create-home kvgate
USER kvgate
WORKDIR /
