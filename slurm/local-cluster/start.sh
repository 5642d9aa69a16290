#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine (idempotent): installs slurm-wlm, munge, slurmdbd
# and MariaDB when missing, creates the munge key, starts munged, a private MariaDB, slurmdbd,
# slurmctld and slurmd directly (no systemd), and waits until `sinfo` shows the node idle.
# State, logs, pid files and the database live in $CN2_SLURM_DIR (default /var/lib/cn2-slurm), a
# private directory: created 0700, and refused when it is a symbolic link, is not owned by the user
# running this script or is writable by others. stop.sh stops exactly what this script started.
# MariaDB's root logs in by socket only (as the OS root); slurmdbd's database user has a password
# generated on first start (kept in $CN2_SLURM_DIR/db-password, 0600). Needs root.
set -euo pipefail
umask 077   # every file and directory this script creates is private unless made otherwise below
here="$(cd "$(dirname "$0")" && pwd)"
RUN="${CN2_SLURM_DIR:-/var/lib/cn2-slurm}"
DBPORT="${CN2_SLURM_DB_PORT:-3307}"
MARKER="# cn2-local-cluster"
log() { echo "[local-cluster] $*"; }
die() { echo "error: $*" >&2; exit 1; }
# alive PIDFILE NAME: the pid file names a running process called NAME. After a session is killed
# its pid files (and sockets) stay behind, the pid may belong to another program by then, and a
# container whose init does not reap keeps zombies that `kill -0` still reports as alive.
alive() {
  local pid st
  [ -f "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  st=$(ps -o stat=,comm= -p "$pid" 2>/dev/null) || return 1
  [ "${st:0:1}" != Z ] && [ "$(echo "$st" | awk '{print $2}')" = "$2" ]
}
# private_dir DIR: DIR exists, is a real directory owned by us, and only we can write to it.
private_dir() {
  [ -L "$1" ] && die "$1 is a symbolic link; set CN2_SLURM_DIR to a private directory"
  [ -e "$1" ] || mkdir -m 700 -p "$1"
  [ -d "$1" ] || die "$1 is not a directory"
  [ "$(stat -c %u "$1")" = "$(id -u)" ] || die "$1 belongs to uid $(stat -c %u "$1"), not to $(id -un); refusing to use it"
  [ $(( 0$(stat -c %a "$1") & 022 )) -eq 0 ] || die "$1 is writable by others (mode $(stat -c %a "$1")); refusing to use it"
  chmod 700 "$1"
}
private_dir "$RUN"

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v slurmdbd >/dev/null \
   || ! command -v mariadbd >/dev/null; then
  log "installing slurm-wlm, munge, slurmdbd, mariadb-server (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge slurmdbd mariadb-server >/dev/null
fi

mkdir -p "$RUN"/{state,spool,log,mysql}
mkdir -p -m 755 /etc/slurm
for conf in slurm.conf slurmdbd.conf; do
  if [ -f /etc/slurm/$conf ] && ! grep -q "^$MARKER" /etc/slurm/$conf; then
    echo "error: /etc/slurm/$conf exists and is not the local test cluster's; not touching it" >&2
    exit 1
  fi
done
cpus=$(nproc)
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
old_conf=$(cat /etc/slurm/slurm.conf 2>/dev/null || true)
# slurm.conf holds no secret and every Slurm command reads it: readable by all.
sed -e "s#@RUN@#$RUN#g" -e "s#@CPUS@#$cpus#g" -e "s#@MEM_MB@#$mem_mb#g" "$here/slurm.conf.in" > /etc/slurm/slurm.conf
chmod 644 /etc/slurm/slurm.conf
conf_changed=$([ "$old_conf" != "$(cat /etc/slurm/slurm.conf)" ] && echo yes || echo no)
# The database password: generated once, private; slurmdbd.conf made 0600 before it is written.
if [ ! -s "$RUN/db-password" ]; then
  head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 32 > "$RUN/db-password"
fi
chmod 600 "$RUN/db-password"
dbpass=$(cat "$RUN/db-password")
touch /etc/slurm/slurmdbd.conf
chmod 600 /etc/slurm/slurmdbd.conf
sed -e "s#@RUN@#$RUN#g" -e "s#@DBPORT@#$DBPORT#g" -e "s#@DBPASS@#$dbpass#g" "$here/slurmdbd.conf.in" \
  > /etc/slurm/slurmdbd.conf
touch "$RUN/started"

# munge: one key, one daemon.
if [ ! -s /etc/munge/munge.key ]; then
  log "creating the munge key"
  mkdir -p -m 755 /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
fi
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
chmod 755 /run/munge   # clients of every user reach munged's socket here
if ! alive /run/munge/munged.pid munged; then
  log "starting munged"
  # --force: a killed munged leaves its socket and lock behind, which would stop a new one.
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged --force
  grep -qx munged "$RUN/started" || echo munged >> "$RUN/started"
fi

# MariaDB for slurmdbd, private to this cluster (own datadir, socket and port).
if ! alive "$RUN/mysqld.pid" mariadbd; then
  if [ ! -d "$RUN/mysql/mysql" ]; then
    log "initialising MariaDB in $RUN/mysql"
    # root@localhost authenticates by unix socket: only the OS root, through $RUN (0700), gets in.
    mariadb-install-db --no-defaults --datadir="$RUN/mysql" --user=root --skip-test-db \
      --auth-root-authentication-method=socket >/dev/null
  fi
  log "starting MariaDB on 127.0.0.1:$DBPORT"
  rm -f "$RUN/mysqld.sock" "$RUN/mysqld.pid"   # left behind by a killed server
  nohup mariadbd --no-defaults --datadir="$RUN/mysql" --socket="$RUN/mysqld.sock" --port="$DBPORT" \
    --bind-address=127.0.0.1 --pid-file="$RUN/mysqld.pid" --user=root >"$RUN/log/mysqld.log" 2>&1 &
  up=no
  for _ in $(seq 120); do
    if mariadb-admin --no-defaults -S "$RUN/mysqld.sock" -u root ping >/dev/null 2>&1; then up=yes; break; fi
    alive "$RUN/mysqld.pid" mariadbd || [ ! -f "$RUN/mysqld.pid" ] || break
    sleep 0.5
  done
  if [ "$up" != yes ]; then
    echo "error: MariaDB did not start; the end of $RUN/log/mysqld.log:" >&2
    tail -20 "$RUN/log/mysqld.log" >&2
    exit 1
  fi
  # slurmdbd's user, with the generated password (set again on each start: the file is the truth).
  mariadb --no-defaults -S "$RUN/mysqld.sock" -u root -e "
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$dbpass';
    ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$dbpass';
    DROP USER IF EXISTS 'slurm'@'localhost';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
  grep -qx mysqld "$RUN/started" || echo mysqld >> "$RUN/started"
fi

if ! alive "$RUN/slurmdbd.pid" slurmdbd; then
  log "starting slurmdbd"
  slurmdbd
  for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
  grep -qx slurmdbd "$RUN/started" || echo slurmdbd >> "$RUN/started"
fi
sacctmgr -n list cluster format=cluster | grep -qw cn2local || sacctmgr -i add cluster cn2local >/dev/null

if alive "$RUN/slurmctld.pid" slurmctld && [ "$conf_changed" = yes ]; then
  log "slurm.conf changed: reconfiguring the running daemons"
  scontrol reconfigure
fi
if ! alive "$RUN/slurmctld.pid" slurmctld; then
  log "starting slurmctld"
  slurmctld
  grep -qx slurmctld "$RUN/started" || echo slurmctld >> "$RUN/started"
fi
if ! alive "$RUN/slurmd.pid" slurmd; then
  log "starting slurmd"
  slurmd -N localhost
  grep -qx slurmd "$RUN/started" || echo slurmd >> "$RUN/started"
fi

for i in $(seq 120); do
  state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
  case "$state" in
    idle|mixed|allocated) log "node localhost is $state ($cpus CPUs, $mem_mb MB); sinfo:"; sinfo; exit 0 ;;
    down*|drain*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
  esac
  sleep 0.5
done
echo "error: the node did not become idle; see $RUN/log/" >&2
exit 1
