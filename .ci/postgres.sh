#!/usr/bin/env bash
# Install (if needed) and start a throwaway PostgreSQL server on loopback for the test suite,
# then print the SQLAlchemy URL to use. Usage: eval "$(bash .ci/postgres.sh start DIR)"; stop: bash .ci/postgres.sh stop DIR
set -euo pipefail
cmd=${1:?start|stop}; dir=${2:?data folder}; port=${PLAIT_PG_PORT:-55432}
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } >&2
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
as_pg() { if [ "$(id -u)" = 0 ]; then su postgres -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
case "$cmd" in
  start)
    mkdir -p "$dir"; [ "$(id -u)" = 0 ] && chown postgres "$dir"
    [ -f "$dir/PG_VERSION" ] || as_pg "$bin/initdb -D '$dir' -A trust -U postgres" >&2
    as_pg "$bin/pg_ctl -D '$dir' -l '$dir/server.log' -o \"-p $port -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=200\" -w start" >&2
    echo "export PLAIT_TEST_POSTGRES_URL=postgresql+psycopg2://postgres@127.0.0.1:$port/postgres" ;;
  stop)
    as_pg "$bin/pg_ctl -D '$dir' -m fast -w stop" >&2 || true ;;
esac
