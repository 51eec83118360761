#!/usr/bin/env bash
# Stop the daemons started by up.sh (by the PIDs in their pid files). Idempotent.
#   down.sh --purge   also delete the state dir (job state, logs)
set -uo pipefail
STATE=${LORABENCH_SLURM_DIR:-/tmp/lorabench-slurm}

stop() {  # stop NAME PIDFILE
  local pidf=$2 pid
  [ -s "$pidf" ] || return 0
  pid=$(cat "$pidf")
  kill -0 "$pid" 2>/dev/null || { rm -f "$pidf"; return 0; }
  echo "[slurm-down] stopping $1 ($pid)" >&2
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "[slurm-down] $1 ($pid) ignored SIGTERM, killing" >&2
    kill -KILL "$pid" 2>/dev/null
  fi
  rm -f "$pidf"
}

# running jobs first, so slurmd has nothing left to clean up
if [ -s "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
  timeout 5 scancel --user=root >/dev/null 2>&1 || true
fi
stop slurmd    "$STATE/slurmd.pid"
stop slurmctld "$STATE/slurmctld.pid"
stop slurmdbd  "$STATE/slurmdbd.pid"
stop mariadb   /run/mysqld/mysqld.pid
stop munged    /run/munge/munged.pid
if [ "${1:-}" = --purge ]; then rm -rf "$STATE"; echo "[slurm-down] removed $STATE" >&2; fi
exit 0
