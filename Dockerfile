# Image for the batch loader: `python -m ingest` (ingest.py) against TimescaleDB.
# Build context is restricted by .dockerignore to ingest.py, requirements.txt
# and sql/ -- no .env, no data, no tests ever reach the image.
# Base image: the Python 3.12 minor tag on Debian 12 (bookworm), slim variant. How to move or
# tighten this pin, and where the tag is documented: docs/operations.md ("Docker image pins").
FROM python:3.12-slim-bookworm

# DATA_DIR: the (read-only) mount holding the Fitbit JSON files.
# REJECT_FILE: must be somewhere the non-root user can write; docker-compose.yml
# mounts a named volume there so rejects outlive the container.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DATA_DIR=/data \
    REJECT_FILE=/tmp/rejects/rejects.jsonl

WORKDIR /app

# Dependencies first: this layer is reused until requirements.txt changes.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY ingest.py ./
# Compiled once here and run as a module, so each run loads the cached bytecode instead of
# compiling 3,500 lines again (~50 ms of every run, most of an unchanged re-run's start-up).
RUN python -m compileall -q ingest.py
COPY sql/ ./sql/

# Fixed uid/gid so volume ownership is predictable across rebuilds. The code
# stays root-owned (read-only for the app); only the rejects dir is writable.
# A named volume mounted on /tmp/rejects is seeded with this ownership.
RUN groupadd --system --gid 10001 ingest \
    && useradd --system --no-log-init --uid 10001 --gid ingest --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin ingest \
    && mkdir -p /data /tmp/rejects \
    && chown ingest:ingest /tmp/rejects

USER 10001:10001

ENTRYPOINT ["python", "-m", "ingest"]
