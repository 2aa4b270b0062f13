#!/usr/bin/env bash
# Make sure the servers the service tests talk to are up: PostgreSQL (127.0.0.1:5432, database
# `test`) and Redis (127.0.0.1:6379). Starts one that is installed but stopped; fails loudly when
# one is missing. The S3 endpoint is moto's standalone server, started in-process by the tests.
set -u
fail=0

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 30); do port_open "$1" && return 0; sleep 0.5; done
  return 1
}

if ! port_open 5432; then
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    wait_port 5432 || { echo "ERROR: PostgreSQL did not come up on 127.0.0.1:5432" >&2; fail=1; }
  else
    echo "ERROR: PostgreSQL is not installed/running on 127.0.0.1:5432 (needed by the service tests)" >&2
    fail=1
  fi
fi

if ! port_open 6379; then
  if command -v redis-server >/dev/null 2>&1; then
    echo "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    wait_port 6379 || { echo "ERROR: Redis did not come up on 127.0.0.1:6379" >&2; fail=1; }
  else
    echo "ERROR: Redis is not installed/running on 127.0.0.1:6379 (needed by the service tests)" >&2
    fail=1
  fi
fi

exit $fail
