#!/usr/bin/env bash
# dev-db.sh — a local, throwaway PostgreSQL + TimescaleDB cluster for
# development, tests and CI.
#
#   scripts/dev-db.sh up       install TimescaleDB if needed, init + start the
#                              cluster, ensure the app's role and database
#   scripts/dev-db.sh down     stop the cluster (exit 0 if it was not running)
#   scripts/dev-db.sh status   exit 0 if running, 3 if not
#   scripts/dev-db.sh env      print `export POSTGRES_...=...` lines, for
#                              eval "$(scripts/dev-db.sh env)"
#   scripts/dev-db.sh psql [args...]   psql to POSTGRES_DB as POSTGRES_USER
#   scripts/dev-db.sh pgbouncer up|down|env
#                              two PgBouncers in front of the cluster, for tests
#                              of the loader behind a pooler: 127.0.0.1 at
#                              POSTGRES_PORT+1 (pool_mode=session) and
#                              POSTGRES_PORT+2 (pool_mode=transaction); `env`
#                              prints `export PGBOUNCER_..._PORT=...` lines.
#                              `down` of the cluster stops them too, and its
#                              next `up` starts them again (`pgbouncer down`
#                              keeps them down).
#
# Settings (POSTGRES_PORT, POSTGRES_DB, POSTGRES_USER, POSTGRES_PASSWORD) come
# from the environment, else from .env, else from .env.example.
#
# Debian 12 (bookworm): PostgreSQL 15, with TimescaleDB built from Debian 13's
# source package (bookworm has no TimescaleDB package). Debian 13 (trixie):
# PostgreSQL 17 with Debian's postgresql-17-timescaledb package.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
DEV="$REPO/.dev"
SUPERUSER=postgres   # bootstrap superuser made by initdb -U (never the app's role)

log() { printf 'dev-db: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  cat >&2 <<'EOF'
usage: scripts/dev-db.sh up|down|status|env|psql [psql args...]
       scripts/dev-db.sh pgbouncer up|down|env
EOF
  exit 2
}

# --- configuration -----------------------------------------------------------

# Print the last value of KEY in a KEY=VALUE file. The file is parsed, never
# sourced: it is data, and may contain things a shell would execute.
dotenv_get() {
  local file=$1 key=$2 line value found=1
  local re_line='^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*=[[:space:]]*(.*)$'
  local re_dq='^"(.*)"[[:space:]]*(#.*)?$' re_sq="^'(.*)'[[:space:]]*(#.*)?\$"
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line%$'\r'}
    [[ $line =~ $re_line && ${BASH_REMATCH[2]} == "$key" ]] || continue
    value=${BASH_REMATCH[3]}
    if [[ $value =~ $re_dq || $value =~ $re_sq ]]; then
      value=${BASH_REMATCH[1]}
    else
      value=${value%%[[:space:]]#*}                     # drop " # comment"
      value=${value%"${value##*[![:space:]]}"}          # drop trailing blanks
    fi
    found=0
  done <"$file"
  ((found == 0)) && printf '%s' "$value"
  return "$found"
}

load_config() {
  local file="" key value
  if [[ -f $REPO/.env ]]; then file=$REPO/.env
  elif [[ -f $REPO/.env.example ]]; then file=$REPO/.env.example
  fi
  # Defaults match .env.example; they only matter if neither file has the key.
  local -A defaults=(
    [POSTGRES_PORT]=55432 [POSTGRES_DB]=fitbit
    [POSTGRES_USER]=ingest [POSTGRES_PASSWORD]=change-me-dev-only
  )
  for key in POSTGRES_PORT POSTGRES_DB POSTGRES_USER POSTGRES_PASSWORD; do
    value=${!key:-}
    if [[ -z $value && -n $file ]]; then value=$(dotenv_get "$file" "$key" || true); fi
    [[ -n $value ]] || value=${defaults[$key]}
    printf -v "$key" '%s' "$value"
  done
  if ! [[ $POSTGRES_PORT =~ ^[1-9][0-9]{0,4}$ ]] || ((POSTGRES_PORT > 65535)); then
    die "POSTGRES_PORT must be a TCP port number, got '$POSTGRES_PORT'"
  fi
  [[ $POSTGRES_USER != "$SUPERUSER" ]] ||
    die "POSTGRES_USER must not be '$SUPERUSER' (that is the cluster's superuser)"
}

# --- platform ------------------------------------------------------------------

# PostgreSQL major version for this Debian release (read, never assumed).
detect_pg_major() {
  local id codename version_id
  id=$(dotenv_get /etc/os-release ID || true)
  codename=$(dotenv_get /etc/os-release VERSION_CODENAME || true)
  version_id=$(dotenv_get /etc/os-release VERSION_ID || true)
  [[ $id == debian ]] || die "only Debian 12/13 are supported (this is '${id:-unknown}')"
  case "$codename/$version_id" in
    bookworm/* | */12) PG_MAJOR=15 ;;
    trixie/* | */13) PG_MAJOR=17 ;;
    *) die "unsupported Debian release '${codename:-?}' (${version_id:-?}); supported: 12 (bookworm), 13 (trixie)" ;;
  esac
  # Always the versioned binaries: PATH may hold other pg_ctl's (e.g. /usr/local/bin).
  PGBIN=/usr/lib/postgresql/$PG_MAJOR/bin
}

# The cluster's processes run as `postgres` when we are root (initdb and
# postgres refuse to run as root), otherwise as the calling user.
if ((EUID == 0)); then DB_OS_USER=postgres; else DB_OS_USER=$(id -un); fi

# Run a command as the cluster's OS user. From / so that a current directory
# that user cannot read (e.g. a 700 mktemp dir) does not upset initdb/pg_ctl.
as_db() {
  if ((EUID == 0)); then (cd / && runuser -u "$DB_OS_USER" -- "$@")
  else (cd / && "$@")
  fi
}

as_root() {
  if ((EUID == 0)); then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root to run: $*"
  fi
}

# --- installation --------------------------------------------------------------

timescaledb_installed() {
  [[ -x $PGBIN/postgres && -x $PGBIN/initdb ]] || return 1
  # Debian's standard paths if pg_config is not there to ask.
  local libdir=/usr/lib/postgresql/$PG_MAJOR/lib sharedir=/usr/share/postgresql/$PG_MAJOR
  if [[ -x $PGBIN/pg_config ]]; then
    libdir=$("$PGBIN/pg_config" --pkglibdir)
    sharedir=$("$PGBIN/pg_config" --sharedir)
  fi
  [[ -f $libdir/timescaledb.so && -f $sharedir/extension/timescaledb.control ]]
}

APT_UPDATED=0
apt_install() {
  local pkg aptlog=$DEV/build/apt.log
  local -a missing=()
  # Only what is missing: naming an installed package would upgrade it.
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  mkdir -p "$DEV/build"
  # A fresh machine's package lists may be empty: refresh them once.
  if ((APT_UPDATED == 0)); then
    log "apt-get update"
    as_root apt-get update -qq >"$aptlog" 2>&1 || { cat "$aptlog" >&2; die "apt-get update failed"; }
    APT_UPDATED=1
  fi
  log "apt-get install ${missing[*]} (log: $aptlog)"
  as_root env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$aptlog" 2>&1 ||
    { tail -n 30 "$aptlog" >&2; die "apt-get install failed; see $aptlog"; }
}

# Installing a postgresql-N server package normally creates and starts a
# "main" cluster on port 5432; we want no such extra service.
no_main_cluster() {
  [[ -e /etc/postgresql/$PG_MAJOR/main ]] && return 0
  as_root mkdir -p /etc/postgresql-common/createcluster.d
  echo 'create_main_cluster = false' |
    as_root tee /etc/postgresql-common/createcluster.d/dev-db-no-main-cluster.conf >/dev/null
}

ensure_timescaledb() {
  timescaledb_installed && return 0
  if ((PG_MAJOR == 17)); then
    # Debian 13 packages TimescaleDB (Apache-2 edition) for its PostgreSQL 17.
    [[ -x $PGBIN/postgres ]] || no_main_cluster
    apt_install "postgresql-$PG_MAJOR" "postgresql-$PG_MAJOR-timescaledb"
  else
    build_timescaledb
  fi
  timescaledb_installed || die "TimescaleDB is still missing for PostgreSQL $PG_MAJOR after installing it"
}

# Debian 12 has no TimescaleDB package: build Debian 13's source package
# (Apache-2 edition) against PostgreSQL 15. Takes about a minute.
build_timescaledb() {
  local build=$DEV/build/timescaledb apt_dir start
  start=$SECONDS
  local -a pkgs=(build-essential cmake dpkg-dev "postgresql-server-dev-$PG_MAJOR")
  [[ -x $PGBIN/postgres ]] || { no_main_cluster; pkgs+=("postgresql-$PG_MAJOR"); }
  apt_install "${pkgs[@]}"

  # Fetch the source with a private apt config (own sources, lists and cache)
  # so the system's apt sources never see trixie.
  rm -rf "$build"
  apt_dir=$build/apt
  mkdir -p "$apt_dir"/{sources.list.d,lists/partial,cache/archives/partial} "$build/src"
  cat >"$apt_dir/sources.list.d/trixie-src.sources" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  local -a apt_opts=(
    -o "Dir::Etc::SourceList=/dev/null"
    -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    -o "APT::Sandbox::User=root"   # _apt may not reach a 700 checkout
    -qq
  )
  log "fetching TimescaleDB source (Debian 13 source package)"
  if ! { as_root apt-get "${apt_opts[@]}" update &&
    (cd "$build/src" && as_root apt-get "${apt_opts[@]}" source timescaledb); } >"$build/fetch.log" 2>&1; then
    tail -n 30 "$build/fetch.log" >&2
    die "could not fetch the timescaledb source package; see $build/fetch.log"
  fi

  local src
  src=$(find "$build/src" -mindepth 1 -maxdepth 1 -type d -name 'timescaledb-*' | head -n1)
  [[ -n $src ]] || die "apt-get source timescaledb produced no source tree in $build/src"
  log "building $(basename "$src") for PostgreSQL $PG_MAJOR (log: $build/build.log)"
  # Same flags as Debian's own package, minus the test suites (they need a
  # running server and extra tools).
  if ! {
    cmake -S "$src" -B "$build/out" \
      -DCMAKE_BUILD_TYPE=Release \
      -DPG_CONFIG="$PGBIN/pg_config" \
      -DAPACHE_ONLY=1 -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF \
      -DUSE_TELEMETRY=OFF -DSEND_TELEMETRY_DEFAULT=OFF &&
      cmake --build "$build/out" --parallel "$(nproc)" &&
      as_root cmake --install "$build/out"
  } >"$build/build.log" 2>&1; then
    tail -n 30 "$build/build.log" >&2
    die "TimescaleDB build failed; full log: $build/build.log"
  fi
  log "TimescaleDB built and installed in $((SECONDS - start))s"
}

# --- cluster location ----------------------------------------------------------

# Where the cluster lives. Normally <repo>/.dev/{pgdata,postgres.log,socket}.
# If the cluster's OS user cannot reach .dev (a checkout under a 700 dir when we
# run as root), or the socket path would be too long, it lives under /var/tmp
# and .dev/pgdata is a symlink to it, so later commands find it.
resolve_location() {
  local base hash
  if ((EUID == 0)) && ! id -u "$DB_OS_USER" >/dev/null 2>&1; then
    # A fresh machine: the package that creates the cluster's OS user is not
    # installed yet, so there is nothing to probe (and no cluster). `up`
    # resolves the location again once it has installed PostgreSQL.
    base=$DEV
  elif [[ -L $DEV/pgdata ]]; then
    DATA=$(readlink -f "$DEV/pgdata")
    base=$(dirname "$DATA")
  elif [[ -d $DEV/pgdata ]] || location_usable "$DEV"; then
    base=$DEV
  else
    hash=$(printf '%s' "$REPO" | sha256sum | cut -c1-10)
    base=/var/tmp/fitbit-ingest-devdb-$hash
  fi
  DATA=$base/pgdata
  LOGFILE=$base/postgres.log
  SOCKDIR=$base/socket
}

# Can the cluster's OS user use $1 (checked before anything exists there)?
location_usable() {
  local sock="$1/socket/.s.PGSQL.$POSTGRES_PORT"
  ((${#sock} <= 100)) || return 1   # unix socket paths max out at ~107 bytes
  ((EUID != 0)) && return 0
  mkdir -p "$1" && as_db test -x "$1"
}

# Create the cluster's directories, owned by its OS user.
prepare_location() {
  local base
  base=$(dirname "$DATA")
  mkdir -p "$DEV"
  if [[ $base != "$DEV" ]]; then
    if [[ ! -d $base ]]; then
      mkdir -m 700 "$base"
      ((EUID != 0)) || chown "$DB_OS_USER:" "$base"
    fi
    # /var/tmp is shared: only use a directory that is really ours.
    [[ $(stat -c %U "$base") == "$DB_OS_USER" ]] ||
      die "$base is owned by $(stat -c %U "$base"), not $DB_OS_USER; remove it"
    ln -sfn "$base/pgdata" "$DEV/pgdata"
    ln -sfn "$base/postgres.log" "$DEV/postgres.log"
    log "note: $DB_OS_USER cannot reach $DEV; cluster data is in $base"
  fi
  mkdir -p "$DATA" "$SOCKDIR"
  touch "$LOGFILE"
  chmod 700 "$DATA" "$SOCKDIR"
  ((EUID != 0)) || chown "$DB_OS_USER:" "$DATA" "$SOCKDIR" "$LOGFILE"
}

# --- cluster state -------------------------------------------------------------

is_running() {
  [[ -f $DATA/PG_VERSION && -x $PGBIN/pg_ctl ]] &&
    as_db "$PGBIN/pg_ctl" status -D "$DATA" >/dev/null 2>&1
}

# Port of the running server (line 4 of postmaster.pid).
running_port() { sed -n 4p "$DATA/postmaster.pid" 2>/dev/null; }

port_in_use() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# psql as the superuser over the unix socket (trusted; the socket dir is 700).
su_psql() {
  local db=$1; shift
  as_db env PGOPTIONS='-c client_min_messages=warning' \
    "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCKDIR" -p "$(running_port)" \
    -U "$SUPERUSER" -d "$db" "$@"
}

# psql as the app's role over TCP with its password, as a client would.
role_psql() {
  local db=$1; shift
  PGPASSWORD=$POSTGRES_PASSWORD PGOPTIONS='-c client_min_messages=warning' \
    "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$POSTGRES_PORT" \
    -U "$POSTGRES_USER" -d "$db" "$@"
}

write_config() {
  # Regenerated on every start so a changed port applies; postgresql.conf
  # just includes it.
  as_db tee "$DATA/dev-db.conf" >/dev/null <<EOF
# Written by scripts/dev-db.sh on every start; edits here are overwritten.
listen_addresses = '127.0.0.1'
port = $POSTGRES_PORT
unix_socket_directories = '$SOCKDIR'
unix_socket_permissions = 0700
shared_preload_libraries = 'timescaledb'
timescaledb.telemetry_level = off
# No TimescaleDB job scheduler: its per-database worker would hold every database open, so tests
# could neither copy a template database nor drop one as the (non-superuser) role. The loader
# uses no TimescaleDB jobs (compression, retention); a real deployment keeps its own setting.
timescaledb.max_background_workers = 0
max_worker_processes = 16           # >= 1 + TimescaleDB workers + parallel workers
max_connections = 100              # PostgreSQL's default: tests see what a stock server does
# max_locks_per_transaction keeps its default (64) for the same reason: never set it here.
# Dev/bench sizing; fsync and synchronous_commit keep their durable defaults.
shared_buffers = 512MB
work_mem = 32MB
maintenance_work_mem = 256MB
max_wal_size = 4GB
checkpoint_timeout = 15min
EOF
  grep -q "^include_if_exists 'dev-db.conf'" "$DATA/postgresql.conf" ||
    echo "include_if_exists 'dev-db.conf'" | as_db tee -a "$DATA/postgresql.conf" >/dev/null
}

init_cluster() {
  log "initdb $DATA (PostgreSQL $PG_MAJOR)"
  as_db "$PGBIN/initdb" -D "$DATA" -U "$SUPERUSER" \
    --auth-local=trust --auth-host=scram-sha-256 \
    --encoding=UTF8 --locale=C.UTF-8 >"$DATA.initdb.log" 2>&1 ||
    { cat "$DATA.initdb.log" >&2; die "initdb failed"; }
  rm -f "$DATA.initdb.log"
}

start_cluster() {
  log "starting PostgreSQL $PG_MAJOR on 127.0.0.1:$POSTGRES_PORT (log: $LOGFILE)"
  # 9>&-: the server must not inherit (and so hold forever) our lock file.
  if ! as_db "$PGBIN/pg_ctl" start -D "$DATA" -l "$LOGFILE" -w -t 120 >/dev/null 9>&-; then
    tail -n 20 "$LOGFILE" >&2
    die "PostgreSQL did not start; see $LOGFILE"
  fi
  local i
  for ((i = 0; i < 60; i++)); do
    "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$POSTGRES_PORT" && return 0
    sleep 1
  done
  die "PostgreSQL started but is not accepting connections on 127.0.0.1:$POSTGRES_PORT"
}

# Create/update the app's login role and database (idempotent), and make sure
# the role can have TimescaleDB in databases it creates itself.
ensure_role_and_db() {
  DEVDB_ROLE=$POSTGRES_USER DEVDB_DB=$POSTGRES_DB DEVDB_PW=$POSTGRES_PASSWORD \
    su_psql postgres <<'SQL'
\getenv role DEVDB_ROLE
\getenv db DEVDB_DB
\getenv pw DEVDB_PW
SELECT format('CREATE ROLE %I', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
-- Every time, so a changed password in .env takes effect. Never a superuser. CREATEROLE lets
-- tests make throwaway roles (tests/test_privileges.py applies sql/roles.sql to one).
SELECT format('ALTER ROLE %I LOGIN CREATEDB CREATEROLE NOSUPERUSER PASSWORD %L', :'role', :'pw') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SQL

  local trusted
  trusted=$(su_psql postgres -At -c "SELECT trusted FROM pg_available_extension_versions
    WHERE name = 'timescaledb' AND version = (SELECT default_version FROM pg_available_extensions
    WHERE name = 'timescaledb')")
  if [[ $trusted == t ]]; then
    # Trusted: the role can CREATE EXTENSION in its own databases.
    role_psql "$POSTGRES_DB" -c 'CREATE EXTENSION IF NOT EXISTS timescaledb'
  else
    # Not trusted for non-superusers: pre-install it where the role needs it;
    # databases created later are copied from template1 and so have it too.
    log "timescaledb is not a trusted extension; installing it in template1 and $POSTGRES_DB"
    su_psql template1 -c 'CREATE EXTENSION IF NOT EXISTS timescaledb'
    su_psql "$POSTGRES_DB" -c 'CREATE EXTENSION IF NOT EXISTS timescaledb'
  fi
}

# Prove that what tests do works: the role, over TCP with its password, makes a
# fresh database with TimescaleDB and a hypertable in it.
self_test() {
  local t=dev_db_selftest
  role_psql "$POSTGRES_DB" -c "DROP DATABASE IF EXISTS $t" -c "CREATE DATABASE $t"
  role_psql "$t" -c 'CREATE EXTENSION IF NOT EXISTS timescaledb' \
    -c 'CREATE TABLE x (ts timestamptz NOT NULL, v float8)' \
    -c "SELECT create_hypertable('x', 'ts')" >/dev/null
  role_psql "$POSTGRES_DB" -c "DROP DATABASE $t"
  log "self-test ok: $POSTGRES_USER can create a database with a TimescaleDB hypertable"
}

# --- PgBouncer -----------------------------------------------------------------

# Two poolers in front of the cluster, so tests can run the loader the way many
# deployments reach PostgreSQL. Debian's pgbouncer package (1.18 on Debian 12,
# 1.24 on Debian 13), run as the cluster's OS user; each instance keeps its
# pgbouncer.ini, userlist.txt, pid file and log in <.dev>/pgbouncer-<mode>/.
PGBOUNCER=/usr/sbin/pgbouncer
PGB_MODES=(session transaction)

pgb_port() {
  case $1 in
    session) echo $((POSTGRES_PORT + 1)) ;;
    transaction) echo $((POSTGRES_PORT + 2)) ;;
  esac
}

# Next to the cluster: .dev, or the /var/tmp base (with a .dev symlink) when the
# cluster's OS user cannot reach .dev (see resolve_location).
pgb_dir() {
  local base
  base=$(dirname "$DATA")
  printf '%s/pgbouncer-%s' "$base" "$1"
}

pgb_pid() {
  local pidfile pid
  pidfile="$(pgb_dir "$1")/pgbouncer.pid"
  [[ -f $pidfile ]] || return 1
  pid=$(<"$pidfile")
  [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == pgbouncer ]] || return 1
  printf '%s' "$pid"
}

ensure_pgbouncer() {
  [[ -x $PGBOUNCER ]] && return 0
  apt_install pgbouncer
  [[ -x $PGBOUNCER ]] || die "$PGBOUNCER is still missing after installing pgbouncer"
  # The package starts a system-wide pgbouncer (localhost:6432) where services may
  # start; this script wants no such extra service (as with PostgreSQL's "main").
  if [[ -d /run/systemd/system ]]; then
    as_root systemctl disable --now --quiet pgbouncer.service >/dev/null 2>&1 || true
  elif [[ -x /etc/init.d/pgbouncer ]]; then
    as_root /etc/init.d/pgbouncer stop >/dev/null 2>&1 || true
    as_root update-rc.d pgbouncer disable >/dev/null 2>&1 || true
  fi
}

# Write one instance's files. Clients authenticate with SCRAM-SHA-256 as they do
# against the server itself (pg_hba: scram-sha-256). The auth file holds the
# role's password in plain text: both PgBouncer versions then do SCRAM with the
# client and, separately, with the server, whatever the server's
# password_encryption. A SCRAM secret copied from pg_authid would only work by
# pass-through, and `up` re-salts the secret on every run (ALTER ROLE ...
# PASSWORD), which would leave such a copy stale. The file is mode 600, owned by
# the cluster's OS user, under .dev (git-ignored); the password is .env's anyway.
# ignore_startup_parameters keeps its default on purpose: the loader must work
# with a stock PgBouncer.
pgb_write_config() {
  local mode=$1 dir port pw
  dir=$(pgb_dir "$mode")
  port=$(pgb_port "$mode")
  mkdir -p "$dir"
  chmod 700 "$dir"
  ((EUID != 0)) || chown "$DB_OS_USER:" "$dir"
  if [[ $dir != "$DEV/pgbouncer-$mode" ]]; then ln -sfn "$dir" "$DEV/pgbouncer-$mode"; fi
  pw=${POSTGRES_PASSWORD//\"/\"\"}
  (umask 077 && printf '"%s" "%s"\n' "${POSTGRES_USER//\"/\"\"}" "$pw" | as_db tee "$dir/userlist.txt.new" >/dev/null)
  as_db tee "$dir/pgbouncer.ini.new" >/dev/null <<INI
; Written by scripts/dev-db.sh pgbouncer up; edits here are overwritten.
[databases]
* = host=127.0.0.1 port=$POSTGRES_PORT

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
pool_mode = $mode
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
; Small, so that in transaction mode clients really share server connections.
default_pool_size = 2
max_client_conn = 200
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
INI
  # Replace only what changed, and say whether anything did (PGB_CHANGED=1).
  local f
  PGB_CHANGED=0
  for f in userlist.txt pgbouncer.ini; do
    if cmp -s "$dir/$f.new" "$dir/$f"; then
      rm -f "$dir/$f.new"
    else
      as_db mv -f "$dir/$f.new" "$dir/$f"
      PGB_CHANGED=1
    fi
  done
}

# Stop one instance; immediate shutdown (SIGTERM before 1.23, SIGQUIT since:
# 1.23 made SIGTERM wait for every client to disconnect).
pgb_stop() {
  local mode=$1 pid sig=TERM version i
  pid=$(pgb_pid "$mode") || return 0
  version=$("$PGBOUNCER" --version 2>/dev/null | sed -n '1s/^[^0-9]*\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
  if [[ -n $version ]] && { ((${version% *} > 1)) || ((${version#* } >= 23)); }; then sig=QUIT; fi
  kill "-$sig" "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    [[ -d /proc/$pid ]] || break
    sleep 0.1
  done
  if [[ -d /proc/$pid ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$(pgb_dir "$mode")/pgbouncer.pid"
  log "pgbouncer ($mode) stopped"
}

pgb_start() {
  local mode=$1 dir port pid old_port i
  dir=$(pgb_dir "$mode")
  port=$(pgb_port "$mode")
  old_port=$(sed -n 's/^listen_port = //p' "$dir/pgbouncer.ini" 2>/dev/null || true)
  if pid=$(pgb_pid "$mode") && [[ $old_port != "$port" ]]; then
    pgb_stop "$mode"   # a changed port needs a restart, not a reload
  fi
  pgb_write_config "$mode"
  if pid=$(pgb_pid "$mode"); then
    if ((PGB_CHANGED)); then
      kill -HUP "$pid"   # reload: a changed password or server port applies
      log "pgbouncer ($mode) already running on 127.0.0.1:$port; configuration reloaded"
    fi
    return 0
  fi
  port_in_use "$port" &&
    die "port $port on 127.0.0.1 (pgbouncer, $mode) is already in use by something else (hint: set POSTGRES_PORT; the poolers use POSTGRES_PORT+1 and +2)"
  rm -f "$dir/pgbouncer.pid"
  # 9>&-: the daemon must not inherit (and so hold forever) our lock file.
  if ! as_db "$PGBOUNCER" -d -q "$dir/pgbouncer.ini" >/dev/null 2>"$dir/start.err" 9>&-; then
    cat "$dir/start.err" >&2
    tail -n 20 "$dir/pgbouncer.log" >&2 2>/dev/null || true
    die "pgbouncer ($mode) did not start; see $dir/pgbouncer.log"
  fi
  rm -f "$dir/start.err"
  for ((i = 0; i < 100; i++)); do
    port_in_use "$port" && break
    sleep 0.1
  done
  port_in_use "$port" || { tail -n 20 "$dir/pgbouncer.log" >&2 2>/dev/null; die "pgbouncer ($mode) is not listening on 127.0.0.1:$port; see $dir/pgbouncer.log"; }
  log "pgbouncer ($mode) started on 127.0.0.1:$port (log: $dir/pgbouncer.log)"
}

# Prove a client gets through: the app's role, its password, a plain libpq client.
pgb_self_test() {
  local mode=$1 port out
  port=$(pgb_port "$mode")
  if ! out=$(PGPASSWORD=$POSTGRES_PASSWORD PGCONNECT_TIMEOUT=10 "$PGBIN/psql" -X -q -At -v ON_ERROR_STOP=1 \
    -h 127.0.0.1 -p "$port" -U "$POSTGRES_USER" -d "$POSTGRES_DB" -c 'SELECT 1' 2>&1) || [[ $out != 1 ]]; then
    die "pgbouncer ($mode) on 127.0.0.1:$port: a test connection failed: $out (log: $(pgb_dir "$mode")/pgbouncer.log)"
  fi
}

pgb_up() {
  local mode
  ((POSTGRES_PORT + 2 <= 65535)) || die "POSTGRES_PORT+2 must be a TCP port number (the poolers use POSTGRES_PORT+1 and +2)"
  is_running || die "the database is not running; run 'scripts/dev-db.sh up' first"
  [[ $(running_port) == "$POSTGRES_PORT" ]] ||
    die "the database runs on port $(running_port) but POSTGRES_PORT is $POSTGRES_PORT"
  ensure_pgbouncer
  for mode in "${PGB_MODES[@]}"; do pgb_start "$mode"; done
  for mode in "${PGB_MODES[@]}"; do pgb_self_test "$mode"; done
  log "pgbouncer ready: session 127.0.0.1:$(pgb_port session), transaction 127.0.0.1:$(pgb_port transaction) (eval \"\$(scripts/dev-db.sh pgbouncer env)\")"
}

# Stop the poolers. With `forget`, also remove their configuration, so the
# cluster's next `up` does not start them again.
pgb_down() {
  local mode dir
  for mode in "${PGB_MODES[@]}"; do
    dir=$(pgb_dir "$mode")
    pgb_stop "$mode"
    if [[ ${1:-} == forget ]]; then rm -f "$dir/pgbouncer.ini" "$dir/userlist.txt"; fi
  done
}

# Poolers that were up before the cluster's `down` (their pgbouncer.ini is
# still there) come back with its `up`.
pgb_restore() {
  local mode
  for mode in "${PGB_MODES[@]}"; do
    if [[ -f $(pgb_dir "$mode")/pgbouncer.ini ]]; then
      pgb_up
      return
    fi
  done
}

cmd_pgbouncer() {
  (($# == 1)) || usage
  case $1 in
    env)
      printf 'export PGBOUNCER_SESSION_PORT=%q\n' "$(pgb_port session)"
      printf 'export PGBOUNCER_TRANSACTION_PORT=%q\n' "$(pgb_port transaction)"
      ;;
    up | down)
      mkdir -p "$DEV"
      exec 9>"$DEV/dev-db.lock"
      flock -w 900 9 || die "another dev-db.sh is busy in $REPO"
      if [[ $1 == up ]]; then pgb_up; else pgb_down forget; fi
      ;;
    *) usage ;;
  esac
}

# --- commands ------------------------------------------------------------------

cmd_up() {
  mkdir -p "$DEV"
  # One `up`/`down` at a time per checkout (parallel CI steps, impatient humans).
  exec 9>"$DEV/dev-db.lock"
  flock -w 900 9 || die "another dev-db.sh is busy in $REPO"

  if is_running; then
    local port
    port=$(running_port)
    [[ $port == "$POSTGRES_PORT" ]] ||
      die "already running on port $port but POSTGRES_PORT is $POSTGRES_PORT; run 'scripts/dev-db.sh down' first"
    log "already running on 127.0.0.1:$POSTGRES_PORT ($DATA)"
    ensure_role_and_db
    pgb_restore
    return 0
  fi
  if port_in_use "$POSTGRES_PORT"; then
    die "port $POSTGRES_PORT on 127.0.0.1 is already in use by something else (hint: set POSTGRES_PORT, e.g. POSTGRES_PORT=55433 scripts/dev-db.sh up)"
  fi

  ensure_timescaledb
  resolve_location   # again: on a fresh Debian 13 the postgres user only exists now
  prepare_location
  if [[ -f $DATA/PG_VERSION ]]; then
    [[ $(<"$DATA/PG_VERSION") == "$PG_MAJOR" ]] ||
      die "$DATA holds a PostgreSQL $(<"$DATA/PG_VERSION") cluster, this machine uses $PG_MAJOR; remove it (rm -rf $DATA)"
  else
    init_cluster
  fi
  write_config
  start_cluster
  ensure_role_and_db
  self_test
  pgb_restore
  log "ready: postgresql://$POSTGRES_USER@127.0.0.1:$POSTGRES_PORT/$POSTGRES_DB (eval \"\$(scripts/dev-db.sh env)\")"
}

cmd_down() {
  pgb_down   # keeps their configuration: the next `up` starts them again
  if ! is_running; then
    log "not running"
    return 0
  fi
  log "stopping ($DATA)"
  as_db "$PGBIN/pg_ctl" stop -D "$DATA" -m fast -w -t 120 >/dev/null
  log "stopped"
}

cmd_status() {
  if ! is_running; then
    echo "not running (data: $DATA)"
    exit 3
  fi
  local versions
  versions=$(su_psql postgres -At -F '|' -c "SELECT split_part(current_setting('server_version'), ' ', 1),
    (SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb')")
  echo "running: 127.0.0.1:$(running_port), data $DATA, PostgreSQL ${versions%%|*}, TimescaleDB ${versions#*|}"
}

cmd_env() {
  printf 'export POSTGRES_HOST=%q\n' 127.0.0.1
  printf 'export POSTGRES_PORT=%q\n' "$POSTGRES_PORT"
  printf 'export POSTGRES_DB=%q\n' "$POSTGRES_DB"
  printf 'export POSTGRES_USER=%q\n' "$POSTGRES_USER"
  printf 'export POSTGRES_PASSWORD=%q\n' "$POSTGRES_PASSWORD"
}

cmd_psql() {
  local psql=$PGBIN/psql
  [[ -x $psql ]] || psql=$(command -v psql) || die "psql not found; run 'scripts/dev-db.sh up' first"
  PGPASSWORD=$POSTGRES_PASSWORD exec "$psql" -h 127.0.0.1 -p "$POSTGRES_PORT" \
    -U "$POSTGRES_USER" -d "$POSTGRES_DB" "$@"
}

main() {
  (($# >= 1)) || usage
  local cmd=$1; shift
  load_config
  case $cmd in
    env) cmd_env; return ;;
    psql) detect_pg_major; cmd_psql "$@" ;;
    pgbouncer)
      detect_pg_major
      resolve_location
      cmd_pgbouncer "$@"
      ;;
    up | down | status)
      (($# == 0)) || usage
      detect_pg_major
      resolve_location
      "cmd_$cmd"
      ;;
    -h | --help | help) usage ;;
    *) usage ;;
  esac
}

main "$@"
