#!/usr/bin/env bash
# Stop what slurm/local-cluster/start.sh started (listed in $CN2_SLURM_DIR/started), newest first.
set -uo pipefail
RUN="${CN2_SLURM_DIR:-/tmp/cn2-slurm}"
[ -f "$RUN/started" ] || { echo "[local-cluster] nothing started here"; exit 0; }
pidfile() {
  case "$1" in
    munged) echo /run/munge/munged.pid ;;
    *) echo "$RUN/$1.pid" ;;
  esac
}
for name in $(tac "$RUN/started"); do
  f=$(pidfile "$name")
  if [ -f "$f" ] && ps -o stat= -p "$(cat "$f")" 2>/dev/null | grep -qv "^Z"; then
    echo "[local-cluster] stopping $name"
    kill "$(cat "$f")"
    for _ in $(seq 40); do ps -o stat= -p "$(cat "$f")" 2>/dev/null | grep -qv "^Z" || break; sleep 0.25; done
  fi
done
rm -f "$RUN/started"
