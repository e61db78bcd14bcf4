#!/usr/bin/env bash
# A throwaway PostgreSQL server for the job store's tests, on 127.0.0.1 only (Debian's postgresql package).
#   tools/ci_postgres.sh start DIR   -> prints the database URL (postgresql+psycopg://...) on stdout
#   tools/ci_postgres.sh stop DIR    -> stops that server and removes DIR
# The cluster lives in DIR (created, owned by the postgres account when run as root); it listens on a free port of
# 127.0.0.1 and on a socket inside DIR, trusts local connections, and holds one empty database, mist_test.
set -euo pipefail
action=${1:?start or stop}
dir=${2:?folder of the cluster}
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$bin" ] || { echo "no PostgreSQL server installed (Debian: apt-get install postgresql)" >&2; exit 1; }

as_owner() {  # PostgreSQL refuses to run as root
    if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}

case "$action" in
start)
    mkdir -p "$dir"
    chmod 700 "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "'$bin/initdb' -D '$dir/data' -A trust -U mist -E UTF8" >"$dir/initdb.log" 2>&1
    as_owner "'$bin/pg_ctl' -D '$dir/data' -l '$dir/server.log' -w -o \"-c listen_addresses=127.0.0.1 -p $port -k '$dir'\" start" >/dev/null
    as_owner "'$bin/createdb' -h 127.0.0.1 -p $port -U mist mist_test"
    echo "postgresql+psycopg://mist@127.0.0.1:$port/mist_test"
    ;;
stop)
    if [ -d "$dir/data" ]; then
        as_owner "'$bin/pg_ctl' -D '$dir/data' -m immediate -w stop" >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac
