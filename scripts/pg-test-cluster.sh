#!/usr/bin/env bash
# Throwaway PostgreSQL cluster for tests.
#
#   pg-test-cluster.sh start DIR PORT   # data in DIR/data, socket in DIR, listens on 127.0.0.1:PORT
#   pg-test-cluster.sh stop DIR         # idempotent: fine if never started / already stopped / DIR gone
#
# Superuser `test`, trust auth, no durability (fsync etc. off): never use it for real data.
# Finds initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin; as root installs Debian's `postgresql`
# when missing. initdb/pg_ctl refuse to run as root, so as root they run as uid/gid 65534 (nobody)
# via setpriv, and DIR is chowned to 65534.
set -euo pipefail

PROG=pg-test-cluster
NOBODY=65534

die() { echo "$PROG: error: $*" >&2; exit 1; }
usage() { echo "usage: $0 start DIR PORT | stop DIR" >&2; exit 2; }

is_root() { [ "$(id -u)" = 0 ]; }

# Run a command as the cluster's owner (nobody when we are root, else ourselves).
as_owner() {
    if is_root; then
        setpriv --reuid="$NOBODY" --regid="$NOBODY" --clear-groups -- "$@"
    else
        "$@"
    fi
}

PG_BIN=
find_pg_bin() {
    local d
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        PG_BIN=$(dirname "$(command -v pg_ctl)")
        [ -x "$PG_BIN/initdb" ] || PG_BIN=$(dirname "$(command -v initdb)")
        return 0
    fi
    # Prefer 15, then the newest other version.
    for d in /usr/lib/postgresql/15/bin $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            PG_BIN=$d
            return 0
        fi
    done
    return 1
}

ensure_pg_bin() {
    find_pg_bin && return 0
    if ! is_root; then
        die "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin.
Install them (Debian: sudo apt-get install -y postgresql), or set MENDLOOP_TEST_POSTGRES_URL to an existing server."
    fi
    command -v apt-get >/dev/null 2>&1 || die "initdb/pg_ctl not found and apt-get is unavailable"
    echo "$PROG: installing Debian's postgresql package (apt-get)..." >&2
    local aptlog
    aptlog=$(mktemp "${TMPDIR:-/tmp}/pg-apt.XXXXXX")
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } >"$aptlog" 2>&1; then
        cat "$aptlog" >&2
        rm -f "$aptlog"
        die "apt-get install postgresql failed"
    fi
    rm -f "$aptlog"
    find_pg_bin || die "postgresql installed but initdb/pg_ctl still not found"
}

# pg_ctl status: 0 running, 3 not running, 4 no (accessible) data directory.
pg_running() { as_owner "$PG_BIN/pg_ctl" -D "$1" status >/dev/null 2>&1; }

cmd_start() {
    local dir=$1 port=$2 data
    [[ $port =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd -P)
    data=$dir/data
    ensure_pg_bin

    if is_root; then
        chown "$NOBODY:$NOBODY" "$dir"
        chmod 700 "$dir"
        as_owner test -w "$dir" -a -x "$dir" ||
            die "$dir is not reachable by uid $NOBODY (a parent directory is not world-searchable); use a DIR under /tmp"
    fi
    # The server must not inherit the caller's possibly unreadable cwd (e.g. /root).
    cd "$dir"

    if [ ! -f "$data/PG_VERSION" ]; then
        if ! as_owner "$PG_BIN/initdb" -D "$data" -U test --auth=trust --no-locale -E UTF8 --no-sync \
            >"$dir/initdb.log" 2>&1; then
            cat "$dir/initdb.log" >&2
            die "initdb failed"
        fi
        echo "include_if_exists = 'mendloop-test.conf'" >>"$data/postgresql.conf"
    fi

    if pg_running "$data"; then
        echo "$PROG: already running in $dir" >&2
        return 0
    fi

    # Rewritten on every start so PORT/DIR may change between starts.
    cat >"$data/mendloop-test.conf" <<CONF
port = $port
listen_addresses = '127.0.0.1'
unix_socket_directories = '${dir//\'/\'\'}'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = minimal
max_wal_senders = 0
jit = off
CONF
    is_root && chown "$NOBODY:$NOBODY" "$data/mendloop-test.conf"

    # Belt and braces: the same settings on the command line (as in RECIPES.md).
    if ! as_owner "$PG_BIN/pg_ctl" -D "$data" -l "$dir/postgres.log" -w -t 60 \
        -o "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        start >/dev/null 2>&1; then
        tail -n 30 "$dir/postgres.log" >&2 2>/dev/null || true
        die "could not start PostgreSQL on 127.0.0.1:$port (see $dir/postgres.log)"
    fi
    echo "$PROG: PostgreSQL $("$PG_BIN/pg_ctl" --version | awk '{print $3}') on 127.0.0.1:$port, data in $dir" >&2
}

cmd_stop() {
    local dir=$1 data pid
    [ -d "$dir" ] || return 0
    dir=$(cd "$dir" && pwd -P)
    data=$dir/data
    [ -f "$data/PG_VERSION" ] || return 0
    cd "$dir"
    if ! find_pg_bin; then
        # No binaries (removed?): signal the postmaster directly (SIGINT = fast shutdown).
        if [ -f "$data/postmaster.pid" ]; then
            pid=$(head -n1 "$data/postmaster.pid")
            kill -INT "$pid" 2>/dev/null || true
        fi
        return 0
    fi
    pg_running "$data" || return 0
    if ! as_owner "$PG_BIN/pg_ctl" -D "$data" -m fast -w -t 30 stop >/dev/null 2>&1; then
        as_owner "$PG_BIN/pg_ctl" -D "$data" -m immediate -w -t 30 stop >/dev/null 2>&1 ||
            die "could not stop PostgreSQL in $dir"
    fi
}

case "${1:-}" in
    start) [ $# -eq 3 ] || usage; cmd_start "$2" "$3" ;;
    stop) [ $# -eq 2 ] || usage; cmd_stop "$2" ;;
    *) usage ;;
esac
