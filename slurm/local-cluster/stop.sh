#!/usr/bin/env bash
# Stop what slurm/local-cluster/start.sh started (listed in $CN2_SLURM_DIR/started), newest first.
# A pid file is trusted only in a directory owned by this user, and a process is stopped only when
# it is still the daemon named (a pid left behind may belong to another program by now).
set -uo pipefail
umask 077
RUN="${CN2_SLURM_DIR:-/var/lib/cn2-slurm}"
[ -f "$RUN/started" ] || { echo "[local-cluster] nothing started here"; exit 0; }
if [ -L "$RUN" ] || [ "$(stat -c %u "$RUN")" != "$(id -u)" ]; then
  echo "error: $RUN is a symbolic link or not owned by $(id -un); not acting on its pid files" >&2
  exit 1
fi
# name in `started` -> pid file and the process name (comm) it must have
pidfile() {
  case "$1" in
    munged) echo /run/munge/munged.pid ;;
    *) echo "$RUN/$1.pid" ;;
  esac
}
procname() {
  case "$1" in
    mysqld) echo mariadbd ;;
    *) echo "$1" ;;
  esac
}
# running PID NAME: PID is a live (not zombie) process called NAME.
running() {
  local st
  st=$(ps -o stat=,comm= -p "$1" 2>/dev/null) || return 1
  [ "${st:0:1}" != Z ] && [ "$(echo "$st" | awk '{print $2}')" = "$2" ]
}
for name in $(tac "$RUN/started"); do
  f=$(pidfile "$name")
  want=$(procname "$name")
  [ -f "$f" ] || continue
  pid=$(cat "$f" 2>/dev/null)
  case "$pid" in ''|*[!0-9]*) echo "[local-cluster] $f holds no pid; skipping $name"; continue ;; esac
  if running "$pid" "$want"; then
    echo "[local-cluster] stopping $name (pid $pid)"
    kill "$pid"
    for _ in $(seq 40); do running "$pid" "$want" || break; sleep 0.25; done
  elif ps -p "$pid" >/dev/null 2>&1; then
    echo "[local-cluster] pid $pid of $f is not $want now; leaving it alone"
  fi
done
rm -f "$RUN/started"
