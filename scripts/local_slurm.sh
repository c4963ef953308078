#!/usr/bin/env bash
# Local Slurm on this one machine for tests and CI: munged -> mariadbd -> slurmdbd -> slurmctld -> one slurmd per node.
#
#   scripts/local_slurm.sh [up]          install what is missing, write configs, start what is down, smoke test
#   scripts/local_slurm.sh down [--purge] cancel jobs, stop the daemons this script started (--purge: wipe state + DB)
#   scripts/local_slurm.sh status        one line per daemon, then sinfo
#   scripts/local_slurm.sh node-down N   kill node N as if the machine died: its slurmd and every job task on it
#   scripts/local_slurm.sh node-up N     start node N's slurmd again and RESUME the node
#
# Knobs (environment):
#   LOCAL_SLURM_NODES=1     1: one node "localhost" (127.0.0.1). N>1: nodes node1..nodeN on 127.0.0.2.., each its own
#                           slurmd (port 6830+i), hostname (UTS namespace), spool, pid, log, CPUs and fake GPUs
#   LOCAL_SLURM_DBD=1       0: no slurmdbd/MariaDB; accounting_storage/none + jobcomp/filetxt (submitit can hang!)
#   LOCAL_SLURM_GPUS=4      fake GPUs per node: char devices /var/lib/slurm/fake_gpus/<node>/nvidiaN, Gres=gpu:N
#   LOCAL_SLURM_CPUS=       CPUs advertised per node (default: detected). Other than the real count adds
#                           SlurmdParameters=config_overrides; the test suite may ask for e.g. 8 to get more slots.
#   LOCAL_SLURM_SLURMD_TIMEOUT=30  seconds without an answer before slurmctld marks a node DOWN (node-down tests)
#   LOCAL_SLURM_DB_PORT=3316
#   LOCAL_SLURM_SMOKE=1     0 skips the smoke test (srun on every node, sbatch --wait, sacct)
#
# The two-node setup: docs/local-slurm.md (repo). Spec, timings and pitfalls of the base: local-slurm.md (shared docs).
# Debian 12 + root only; no systemd needed. One cluster serves the whole machine (fixed loopback ports), so `up` is
# idempotent: with everything up it only checks; another node count reconfigures. It never touches daemons it did not
# start.
set -euo pipefail

NODES=${LOCAL_SLURM_NODES:-1}
DBD=${LOCAL_SLURM_DBD:-1}
GPUS=${LOCAL_SLURM_GPUS:-4}
CPUS=${LOCAL_SLURM_CPUS:-}
DB_PORT=${LOCAL_SLURM_DB_PORT:-3316}
SMOKE=${LOCAL_SLURM_SMOKE:-1}
SLURMD_TIMEOUT=${LOCAL_SLURM_SLURMD_TIMEOUT:-30}

CONF_DIR=/etc/slurm
RUN_DIR=/var/run/slurm
LOG_DIR=/var/log/slurm
LIB_DIR=/var/lib/slurm
STATE_DIR=$LIB_DIR/slurmctld
SPOOL_DIR=$LIB_DIR/slurmd
DATADIR=$LIB_DIR/mysql # private MariaDB; the system /var/lib/mysql and /etc/mysql stay untouched
GPU_DIR=$LIB_DIR/fake_gpus
MARKER=$RUN_DIR/local_slurm.started # "name pid" per daemon this script started
LOCK=/run/lock/local_slurm.lock
CTLD_PORT=6817 SLURMD_PORT=6818 DBD_PORT=6819 NODE_PORT_BASE=6830
HEADER="# Written by scripts/local_slurm.sh (local test cluster). Rerun the script instead of editing."
HOSTS_BEGIN="# BEGIN local_slurm.sh nodes (rerun scripts/local_slurm.sh instead of editing)"
HOSTS_END="# END local_slurm.sh nodes"
CORE_DAEMONS=(munged mariadbd slurmdbd slurmctld) # then one slurmd@NODE per node; stop order is the reverse

# Nodes of this configuration. One node keeps the historic name and address; several get their own name and
# loopback address, so that node lists, rendezvous hosts and per-node ranks look as on a real cluster.
node_names() {
  local i
  if ((NODES == 1)); then echo localhost; else for ((i = 1; i <= NODES; i++)); do echo "node$i"; done; fi
}
node_addr() { if [[ $1 == localhost ]]; then echo 127.0.0.1; else echo "127.0.0.$((${1#node} + 1))"; fi; }
node_port() { if [[ $1 == localhost ]]; then echo $SLURMD_PORT; else echo $((NODE_PORT_BASE + ${1#node})); fi; }
# Nodes named in the written slurm.conf (status, node-down and node-up follow the running config, not the knobs).
conf_nodes() { sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$CONF_DIR/slurm.conf" 2>/dev/null; }

say() { printf 'local_slurm: %s\n' "$*"; }
die() {
  printf 'local_slurm: error: %s\n' "$*" >&2
  exit 1
}

# ---------------------------------------------------------------- daemon bookkeeping

# Daemon names: munged mariadbd slurmdbd slurmctld, slurmd@NODE (one per node; paths from slurm.conf's %n), and
# "slurmd", the single slurmd of scripts before LOCAL_SLURM_NODES (stopped when found).
pidfile() {
  case $1 in
  munged) echo /var/run/munge/munged.pid ;;
  mariadbd) echo "$DATADIR/mysqld.pid" ;;
  slurmd@*) echo "$RUN_DIR/slurmd-${1#slurmd@}.pid" ;;
  *) echo "$RUN_DIR/$1.pid" ;;
  esac
}

port_of() {
  case $1 in
  mariadbd) echo "$DB_PORT" ;;
  slurmdbd) echo $DBD_PORT ;;
  slurmctld) echo $CTLD_PORT ;;
  slurmd@*) node_port "${1#slurmd@}" ;;
  slurmd) echo $SLURMD_PORT ;;
  esac
}

logfile() {
  case $1 in
  munged) echo /var/log/munge/munged.log ;;
  mariadbd) echo "$DATADIR/mysqld.log" ;;
  slurmd@*) echo "$LOG_DIR/slurmd-${1#slurmd@}.log" ;;
  *) echo "$LOG_DIR/$1.log" ;;
  esac
}

outfile() { if [[ $1 == slurmd@* ]]; then echo "$LOG_DIR/slurmd-${1#slurmd@}.out"; else echo "$LOG_DIR/$1.out"; fi; }

alive() { # pid is a live process (zombies count as gone: PID 1 here may never reap them)
  local state
  state=$(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null) || return 1
  [[ -n $state && $state != Z ]]
}

running_pid() { # print the pid if NAME's pid file names a live NAME process
  local f pid comm
  f=$(pidfile "$1")
  [[ -r $f ]] || return 1
  read -r pid <"$f" || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  read -r comm 2>/dev/null <"/proc/$pid/comm" || return 1 # 2> first: it must cover the < of a dead pid
  [[ $comm == "${1%@*}" ]] && alive "$pid" && echo "$pid"
}

port_listening() { # a TCP socket in LISTEN state on PORT (any address)
  local hex files=()
  printf -v hex ':%04X' "$1"
  for f in /proc/net/tcp /proc/net/tcp6; do [[ -r $f ]] && files+=("$f"); done
  awk -v p="$hex" '$4 == "0A" && substr($2, length($2) - 4) == p {found = 1} END {exit !found}' "${files[@]}"
}

started_by_us() { # NAME runs with the pid this script recorded when it started it
  local pid
  pid=$(running_pid "$1") || return 1
  grep -qx "$1 $pid" "$MARKER" 2>/dev/null
}

marker_set() { # marker_set NAME [PID]: record (or with no PID forget) a daemon this script started
  local tmp="$MARKER.tmp.$$"
  { grep -v "^$1 " "$MARKER" 2>/dev/null || true; } >"$tmp"
  [[ -n ${2:-} ]] && echo "$1 $2" >>"$tmp"
  mv -f "$tmp" "$MARKER"
}

wait_until() { # wait_until SECONDS CMD...: poll CMD every 0.1 s
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.1
  done
}

munge_ok() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

ready() { # NAME is running and serving
  running_pid "$1" >/dev/null || return 1
  case $1 in
  munged) munge_ok ;;
  *) port_listening "$(port_of "$1")" ;;
  esac
}

show_log_tail() { # to stderr, for a daemon that did not come up
  local f files=("$(logfile "$1")")
  if [[ $1 == mariadbd ]]; then files+=("$DATADIR/mysqld.out"); else files+=("$(outfile "$1")"); fi
  for f in "${files[@]}"; do
    [[ -s $f ]] && { echo "--- last lines of $f" && tail -n 15 "$f"; } >&2
  done
  return 0
}

stop_daemon() { # SIGTERM, wait for the pid to vanish (slurmctld needs ~3 s to save state), SIGKILL after 30 s
  local name=$1 pid
  pid=$(running_pid "$name") || return 0
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_until 30 eval "! alive $pid"; then
    say "$name (pid $pid) ignored SIGTERM for 30 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_until 10 eval "! alive $pid" || die "$name (pid $pid) does not stop"
  fi
  marker_set "$name"
  say "stopped $name (pid $pid)"
}

start_daemon() {
  local name=$1 port out pid
  out=$(outfile "$name")
  port=$(port_of "$name")
  if [[ -n $port ]] && port_listening "$port"; then
    die "port busy: $port ($name) is held by another process, not by a $name with pid file $(pidfile "$name")"
  fi
  # Daemons must not inherit fd 9 (the flock): they would hold the lock for as long as they run.
  case $name in
  munged) runuser -u munge -- /usr/sbin/munged </dev/null >>"$out" 2>&1 9>&- || { show_log_tail munged; die "munged did not start"; } ;;
  mariadbd)
    # MariaDB (user mysql) cannot write into slurm-owned dirs, so socket, pid and log live in its datadir;
    # --no-defaults keeps /etc/mysql and the system instance out of it. slurmdbd logs "Database settings not
    # recommended values" below half its recommendation (buffer pool 1 GiB, lock wait 900 s): 128M is not enough.
    setsid /usr/sbin/mariadbd --no-defaults --datadir="$DATADIR" --user=mysql --socket="$DATADIR/mysqld.sock" \
      --pid-file="$DATADIR/mysqld.pid" --log-error="$DATADIR/mysqld.log" --port="$DB_PORT" \
      --bind-address=127.0.0.1 --innodb-buffer-pool-size=512M --innodb-lock-wait-timeout=900 \
      --init-file="$DATADIR/local_slurm_init.sql" </dev/null >>"$DATADIR/mysqld.out" 2>&1 9>&- &
    ;;
  slurmdbd | slurmctld) "/usr/sbin/$name" </dev/null >>"$out" 2>&1 9>&- || { show_log_tail "$name"; die "$name did not start"; } ;;
  slurmd@*) start_slurmd "${name#slurmd@}" </dev/null >>"$out" 2>&1 9>&- || { show_log_tail "$name"; die "$name did not start"; } ;;
  esac
  if ! wait_until 60 ready "$name"; then
    show_log_tail "$name"
    die "$name did not come up within 60 s (log: $(logfile "$name"))"
  fi
  pid=$(running_pid "$name")
  marker_set "$name" "$pid"
  # node-down finds the node's processes (slurmstepd, tasks) by this namespace, even after slurmd is gone.
  [[ $name == slurmd@* && $name != slurmd@localhost ]] && readlink "/proc/$pid/ns/uts" >"$RUN_DIR/slurmd-${name#slurmd@}.uts"
  say "started $name (pid $pid)"
}

start_slurmd() { # one node's slurmd; several nodes: in its own UTS namespace, so `hostname` there is the node name
  local node=$1
  if [[ $node == localhost ]]; then
    /usr/sbin/slurmd -N localhost
  else
    # The namespace also tells node-down which processes ran "on" this node (slurmstepd and tasks inherit it).
    unshare --uts sh -c 'hostname "$1" && exec /usr/sbin/slurmd -N "$1"' sh "$node"
  fi
}

# ---------------------------------------------------------------- install and configure

require_root() { [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons); try: sudo $0 $*"; }

require_debian() {
  if [[ ! -r /etc/debian_version ]] || ! command -v apt-get >/dev/null || ! command -v dpkg-query >/dev/null; then
    die "needs Debian (12) with apt-get; on other systems install Slurm + munge yourself"
  fi
}

ensure_packages() {
  local want=(slurmctld slurmd slurm-client munge) missing=() installed
  ((DBD)) && want+=(slurmdbd mariadb-server)
  installed=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${want[@]}" 2>/dev/null || true)
  for p in "${want[@]}"; do
    grep -qx "$p installed" <<<"$installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  say "installing ${missing[*]} (apt-get)"
  # Without systemd the postinst scripts would start munge/mariadb/slurm through invoke-rc.d unless a policy-rc.d
  # forbids it; add a temporary one where the host has none, so that only this script starts daemons.
  local policy=/usr/sbin/policy-rc.d added_policy=0 aptlog=/var/log/local_slurm.apt.log
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && added_policy=1
  fi
  local rc=0
  {
    apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  } >"$aptlog" 2>&1 || rc=$?
  ((added_policy)) && rm -f "$policy"
  if ((rc)); then
    tail -n 20 "$aptlog" >&2
    die "apt-get install ${missing[*]} failed (rc=$rc, full log: $aptlog)"
  fi
}

mkdir_owned() { # mkdir_owned OWNER MODE DIR...: create if missing; always fix the owner
  local owner=$1 mode=$2
  shift 2
  for d in "$@"; do
    [[ -d $d ]] || install -d -m "$mode" "$d"
    chown "$owner" "$d"
  done
}

prepare_dirs() {
  mkdir_owned munge: 0755 /var/run/munge
  mkdir_owned munge: 0700 /var/log/munge /var/lib/munge
  mkdir_owned slurm: 0755 "$RUN_DIR" "$LOG_DIR" "$LIB_DIR" "$STATE_DIR"
  mkdir_owned root: 0755 "$SPOOL_DIR" "$GPU_DIR" "$CONF_DIR"
  touch "$MARKER"
  if [[ ! -s /etc/munge/munge.key ]]; then
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key || die "cannot create /etc/munge/munge.key"
  fi
  # Fake GPUs must be character devices: for regular files slurmd counts the GRES but sets no CUDA_VISIBLE_DEVICES.
  # Nothing ever opens them (task/none applies no device cgroup). Major 195 is the real nvidia major.
  local i node dir
  for node in $(node_names); do
    dir=$(gpu_dir "$node")
    mkdir_owned root: 0755 "$dir" "$SPOOL_DIR/$node"
    for ((i = 0; i < GPUS; i++)); do
      [[ -c $dir/nvidia$i ]] && continue
      rm -f "$dir/nvidia$i"
      mknod "$dir/nvidia$i" c 195 "$i" || die "mknod $dir/nvidia$i failed (fake GPUs need char devices)"
    done
  done
}

gpu_dir() { if [[ $1 == localhost ]]; then echo "$GPU_DIR"; else echo "$GPU_DIR/$1"; fi; }

render_hosts() { # /etc/hosts with our block (node names -> their loopback addresses) replaced, or removed for 1 node
  local node
  awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0 == b {skip = 1} !skip {print} $0 == e {skip = 0}' /etc/hosts
  ((NODES > 1)) || return 0
  echo "$HOSTS_BEGIN"
  for node in $(node_names); do echo "$(node_addr "$node") $node"; done
  echo "$HOSTS_END"
}

write_hosts() { # in place (cat >), not mv: /etc/hosts may be a bind mount
  local want
  want=$(render_hosts)
  [[ $(</etc/hosts) == "$want" ]] && return 0
  printf '%s\n' "$want" >/etc/hosts
  say "wrote the node names into /etc/hosts"
}

node_lines() { # from `slurmd -C`, one line per node; RealMemory -2 % (more than slurmd detects drains as INVAL)
  local hw key val boards=1 sockets=1 cores=1 threads=1 cpus=1 mem=1024 extra=""
  hw=$(slurmd -C 2>/dev/null | head -n 1) || true
  for kv in $hw; do
    key=${kv%%=*} val=${kv#*=}
    case $key in
    CPUs) cpus=$val ;; Boards) boards=$val ;; SocketsPerBoard) sockets=$val ;;
    CoresPerSocket) cores=$val ;; ThreadsPerCore) threads=$val ;; RealMemory) mem=$val ;;
    esac
  done
  mem=$((mem * 98 / 100))
  if [[ -n $CPUS && $CPUS != "$cpus" ]]; then
    # Advertise CPUS as one socket of CPUS cores; slurmd keeps them only with SlurmdParameters=config_overrides.
    boards=1 sockets=1 cores=$CPUS threads=1
    extra=" CPUs=$CPUS"
  fi
  ((GPUS > 0)) && extra+=" Gres=gpu:$GPUS"
  # Every node is this machine: all see the same cores and memory (nothing enforces either, pitfall 19).
  local node port
  for node in $(node_names); do
    port=""
    [[ $node == localhost ]] || port=" Port=$(node_port "$node")"
    echo "NodeName=$node NodeAddr=$(node_addr "$node")$port Boards=$boards SocketsPerBoard=$sockets" \
      "CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem$extra State=UNKNOWN"
  done
  [[ -z $CPUS || $CPUS == "$cpus" ]] || echo "SlurmdParameters=config_overrides"
}

render_slurm_conf() {
  cat <<EOF
$HEADER
ClusterName=localcluster
SlurmctldHost=localhost
SlurmUser=slurm
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire+1 s before it may start again (default 120 s); changes need a daemon restart.
AuthInfo=cred_expire=5
MpiDefault=none
# No cgroups at all: no cgroup.conf needed, but also no memory/CPU enforcement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
ReturnToService=2
MailProg=/bin/true
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
# One slurmd per node on this machine (Debian builds with MULTIPLE_SLURMD): %n is the node name.
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmdSpoolDir=$SPOOL_DIR/%n
# A node that stops answering is DOWN after this long (default 300 s); node-down tests wait on it.
SlurmdTimeout=$SLURMD_TIMEOUT
StateSaveLocation=$STATE_DIR
SchedulerType=sched/backfill
# Scheduler passes every second (default 60 s): requeue -> restart in ~6 s instead of ~3 min.
SchedulerParameters=bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
KillWait=5
GresTypes=gpu
EOF
  if ((DBD)); then
    cat <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
EOF
  else
    cat <<EOF
# No slurmdbd: sacct is disabled (sacct -c reads the jobcomp file) and submitit cannot see cancelled jobs.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG_DIR/jobcomp.log
EOF
  fi
  cat <<EOF
# Preemption: a job in "high" requeues one in "low" (USR2 first, SIGTERM to steps after GraceTime).
SlurmctldParameters=preempt_send_user_signal
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
$(node_lines)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=OFF
PartitionName=low   Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=1  PreemptMode=REQUEUE GraceTime=20
PartitionName=high  Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
}

render_gres_conf() {
  echo "$HEADER"
  echo "AutoDetect=off"
  local node
  for node in $(node_names); do
    if ((GPUS == 1)); then
      echo "NodeName=$node Name=gpu File=$(gpu_dir "$node")/nvidia0"
    elif ((GPUS > 1)); then
      echo "NodeName=$node Name=gpu File=$(gpu_dir "$node")/nvidia[0-$((GPUS - 1))]"
    fi
  done
}

render_slurmdbd_conf() {
  cat <<EOF
$HEADER
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=slurm
PidFile=$RUN_DIR/slurmdbd.pid
LogFile=$LOG_DIR/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurmdbpass
StorageLoc=slurm_acct_db
EOF
}

differs() { # differs FILE CONTENT: FILE is missing or has other content; refuses files this script did not write
  [[ -e $1 ]] || return 0
  [[ $(head -n 1 "$1") == "$HEADER" ]] || die "$1 exists but was not written by this script; refusing to overwrite it"
  [[ $(<"$1") != "$2" ]]
}

write_conf() { # write_conf FILE CONTENT OWNER MODE
  local tmp="$1.tmp.$$"
  printf '%s\n' "$2" >"$tmp"
  chown "$3" "$tmp"
  chmod "$4" "$tmp"
  mv -f "$tmp" "$1"
}

init_mariadb_datadir() { # once: mariadb-install-db; the init file (re)creates the slurm DB user at every start
  mkdir_owned mysql: 0750 "$DATADIR"
  if [[ ! -d $DATADIR/mysql ]]; then
    say "initialising MariaDB datadir $DATADIR"
    mariadb-install-db --no-defaults --datadir="$DATADIR" --user=mysql --auth-root-authentication-method=socket \
      --skip-test-db >"$LIB_DIR/mariadb-install-db.log" 2>&1 ||
      { tail -n 20 "$LIB_DIR/mariadb-install-db.log" >&2; die "mariadb-install-db failed"; }
  fi
  local sql
  sql=$(
    for host in localhost 127.0.0.1; do
      echo "CREATE USER IF NOT EXISTS 'slurm'@'$host' IDENTIFIED BY 'slurmdbpass';"
      echo "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'$host';"
    done
  )
  if [[ ! -f $DATADIR/local_slurm_init.sql || $(<"$DATADIR/local_slurm_init.sql") != "$sql" ]]; then
    write_conf "$DATADIR/local_slurm_init.sql" "$sql" mysql: 0600
  fi
}

wait_node_ready() { # NODE is idle (or busy with jobs); DOWN/DRAINED is RESUMEd (a drain survives in the state dir)
  local node=$1 deadline=$((SECONDS + 30)) state
  while :; do
    state=$(sinfo -h -n "$node" -o %T 2>/dev/null | head -n 1) || state=""
    case $state in
    idle | mixed | allocated | completing) return 0 ;;
    down | drained | draining | fail | *drain*)
      say "node $node is $state: scontrol update NodeName=$node State=RESUME"
      scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
      ;;
    esac
    if ((SECONDS >= deadline)); then
      sinfo -R >&2 || true
      show_log_tail "slurmd@$node"
      die "node $node is '${state:-unknown}', not idle, after 30 s (sinfo -R above)"
    fi
    sleep 0.2
  done
}

sacct_says() { [[ $(sacct -j "$1" -X -n -P -o State 2>/dev/null) == "$2" ]]; }
queue_empty() { [[ -z $(squeue -h -o %A 2>/dev/null) ]]; }

smoke_srun() { # one task on every node; with several nodes each must report its own hostname
  local got want
  if ((NODES == 1)); then
    srun -N1 -n1 -t 1 --chdir=/tmp -J local_slurm_smoke true || die "smoke test: srun true failed"
    return 0
  fi
  got=$(srun -N"$NODES" --ntasks-per-node=1 -t 1 --chdir=/tmp -J local_slurm_smoke hostname | sort) ||
    die "smoke test: srun -N$NODES hostname failed"
  want=$(node_names | sort)
  [[ $got == "$want" ]] || die "smoke test: srun -N$NODES hostname printed '${got//$'\n'/ }', not '${want//$'\n'/ }'"
}

smoke_test() {
  local t0=$SECONDS id
  smoke_srun
  id=$(sbatch --parsable --wait -t 1 --chdir=/tmp -o /dev/null -J local_slurm_smoke --wrap true) ||
    die "smoke test: sbatch --wait --wrap true failed"
  id=${id%%;*}
  if ((DBD)); then
    # The job record reaches slurmdbd asynchronously; give it a few seconds.
    wait_until 10 sacct_says "$id" COMPLETED ||
      die "smoke test: sacct -j $id says '$(sacct -j "$id" -X -n -P -o State 2>&1)', not COMPLETED"
  else # sacct is disabled without slurmdbd; jobcomp/filetxt records finished jobs
    wait_until 10 grep -q "^JobId=$id .*JobState=COMPLETED" "$LOG_DIR/jobcomp.log" ||
      die "smoke test: job $id is not COMPLETED in $LOG_DIR/jobcomp.log"
  fi
  local what="srun on $NODES node(s), sbatch --wait"
  ((DBD)) && what+=", sacct" || what+=", jobcomp"
  say "smoke test passed ($what: job $id) in $((SECONDS - t0)) s"
}

# ---------------------------------------------------------------- commands

slurmds_running() { # every slurmd daemon name with a live pid: this config's, the written config's, recorded, legacy
  local name
  {
    node_names | sed 's/^/slurmd@/'
    conf_nodes | sed 's/^/slurmd@/'
    awk '$1 == "slurmd" || $1 ~ /^slurmd@/ {print $1}' "$MARKER" 2>/dev/null
    echo slurmd
  } | sort -u | while read -r name; do running_pid "$name" >/dev/null && echo "$name"; done
  return 0
}

check_knobs() {
  local v
  for v in NODES DBD GPUS DB_PORT SMOKE SLURMD_TIMEOUT ${CPUS:+CPUS}; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "LOCAL_SLURM_$v must be a non-negative integer, got '${!v}'"
  done
  ((NODES >= 1 && NODES <= 8)) || die "LOCAL_SLURM_NODES must be 1..8, got '$NODES'"
}

restart_for_config() { # stop what a changed config needs restarted (reverse start order); refuse foreign daemons
  local db_moved=$1 dbd_changed=$2 slurm_changed=$3 restart=() name i
  ((db_moved)) && restart+=(mariadbd)
  ((dbd_changed)) && restart+=(slurmdbd)
  ((slurm_changed)) && restart+=(slurmctld $(slurmds_running))
  for name in "${restart[@]}"; do
    if running_pid "$name" >/dev/null && ! started_by_us "$name"; then
      die "the config changed, but the running $name was not started by this script; stop the cluster first"
    fi
  done
  if ((slurm_changed)) && [[ $(conf_nodes) != "$(node_names)" ]] && running_pid slurmctld >/dev/null &&
    ! queue_empty; then
    die "the node list changes ($(conf_nodes | tr '\n' ' ')-> $(node_names | tr '\n' ' ')), but jobs are queued:" \
      "$(squeue -h -o %A | tr '\n' ' ')- scancel them or run 'down' first"
  fi
  for ((i = ${#restart[@]} - 1; i >= 0; i--)); do
    running_pid "${restart[i]}" >/dev/null && say "config changed: restarting ${restart[i]}" && stop_daemon "${restart[i]}"
  done
  return 0
}

start_wanted() { # start every daemon of this config that is down, in order
  local up=() wanted=() name port
  for name in "${CORE_DAEMONS[@]}"; do
    ((DBD)) || [[ $name != mariadbd && $name != slurmdbd ]] && wanted+=("$name")
  done
  for name in $(node_names); do wanted+=("slurmd@$name"); done
  # Fail before starting anything when a port we need belongs to something else (ports are fixed, machine-wide).
  for name in "${wanted[@]}"; do
    port=$(port_of "$name")
    if [[ -n $port ]] && ! running_pid "$name" >/dev/null && port_listening "$port"; then
      die "port busy: $port ($name) is held by another process, not by a $name with pid file $(pidfile "$name")"
    fi
  done
  for name in "${wanted[@]}"; do
    if ready "$name"; then
      up+=("$name")
    elif ! running_pid "$name" >/dev/null; then
      start_daemon "$name"
    elif ! wait_until 30 ready "$name"; then
      die "$name (pid $(running_pid "$name")) runs but does not answer"
    fi
  done
  ((${#up[@]})) && say "already up: ${up[*]}"
  return 0
}

cmd_up() {
  require_root up
  require_debian
  check_knobs
  exec 9>"$LOCK"
  flock -w 600 9 || die "another local_slurm.sh holds $LOCK"
  ensure_packages
  prepare_dirs

  # Decide everything before touching a running daemon: a changed config restarts slurmctld+slurmd together
  # (restarting only one gives "appears to have a different slurm.conf"), and only if this script started them.
  local slurm_conf gres_conf dbd_conf slurm_changed=0 dbd_changed=0 db_moved=0 node
  slurm_conf=$(render_slurm_conf)
  gres_conf=$(render_gres_conf)
  differs "$CONF_DIR/slurm.conf" "$slurm_conf" && slurm_changed=1
  differs "$CONF_DIR/gres.conf" "$gres_conf" && slurm_changed=1
  if ((DBD)); then
    dbd_conf=$(render_slurmdbd_conf)
    differs "$CONF_DIR/slurmdbd.conf" "$dbd_conf" && dbd_changed=1
    running_pid mariadbd >/dev/null && ! port_listening "$DB_PORT" && db_moved=1
  fi
  restart_for_config $db_moved $dbd_changed $slurm_changed
  write_hosts # only now: a refused reconfiguration must leave the running nodes resolvable

  ((slurm_changed)) && write_conf "$CONF_DIR/slurm.conf" "$slurm_conf" root: 0644 &&
    write_conf "$CONF_DIR/gres.conf" "$gres_conf" root: 0644 && say "wrote $CONF_DIR/slurm.conf, gres.conf"
  if ((DBD)); then
    # slurmdbd refuses a slurmdbd.conf that is not 0600 and owned by SlurmUser.
    ((dbd_changed)) && write_conf "$CONF_DIR/slurmdbd.conf" "$dbd_conf" slurm: 0600 && say "wrote $CONF_DIR/slurmdbd.conf"
    init_mariadb_datadir
  fi
  start_wanted
  for node in $(node_names); do wait_node_ready "$node"; done
  ((SMOKE)) && smoke_test
  say "cluster up: $(sinfo -h -o '%P %D nodes %T %c CPUs %G' | tr '\n' ' ')"
}

cmd_down() {
  local purge=0 name stopped=0 all
  case ${1:-} in --purge) purge=1 ;; "") ;; *) die "unknown option '$1' (down [--purge])" ;; esac
  require_root down
  exec 9>"$LOCK"
  flock -w 600 9 || die "another local_slurm.sh holds $LOCK"
  if started_by_us slurmctld; then
    local ids
    ids=$(squeue -h -o %A 2>/dev/null | tr '\n' ' ') || ids=""
    if [[ -n ${ids// /} ]]; then
      say "cancelling jobs: $ids"
      # shellcheck disable=SC2086
      scancel $ids 2>/dev/null || true
      wait_until 15 queue_empty || say "jobs still completing: $(squeue -h -o %A | tr '\n' ' ')"
    fi
  fi
  all=$(slurmds_running)
  for name in $all slurmctld slurmdbd mariadbd munged; do
    if started_by_us "$name"; then
      stop_daemon "$name"
      stopped=1
    elif running_pid "$name" >/dev/null; then
      say "leaving $name running (pid $(running_pid "$name"), not started by this script)"
    fi
  done
  ((stopped)) || say "no daemon started by this script is running"
  ((purge)) || return 0
  for name in $(slurmds_running) "${CORE_DAEMONS[@]}"; do
    running_pid "$name" >/dev/null && die "not purging: $name is still running (not started by this script)"
  done
  rm -rf "${STATE_DIR:?}"/* "${SPOOL_DIR:?}"/* "${LOG_DIR:?}"/* "$DATADIR" "$LIB_DIR/mariadb-install-db.log"
  rm -f /var/log/munge/munged.log "$MARKER" "$RUN_DIR"/slurmd-*.uts
  NODES=1 write_hosts
  say "purged job/node state, spool, logs, the accounting DB and the node names in /etc/hosts"
}

status_line() { # NAME EXPECTED: one line; returns 1 when an expected daemon is down
  local name=$1 pid how
  if pid=$(running_pid "$name"); then
    how="not started by local_slurm.sh"
    started_by_us "$name" && how="started by local_slurm.sh"
    printf '%-16s up    pid %-8s %s\n' "$name" "$pid" "$how"
  elif (($2)); then
    printf '%-16s down\n' "$name"
    return 1
  else
    printf '%-16s down  (not used)\n' "$name"
  fi
}

cmd_status() {
  local name bad=0 dbd=0
  grep -qs '^AccountingStorageType=accounting_storage/slurmdbd' "$CONF_DIR/slurm.conf" && dbd=1
  status_line munged 1 || bad=1
  status_line mariadbd $dbd || bad=1
  status_line slurmdbd $dbd || bad=1
  status_line slurmctld 1 || bad=1
  for name in $(conf_nodes); do status_line "slurmd@$name" 1 || bad=1; done
  running_pid slurmd >/dev/null && status_line slurmd 0
  if running_pid slurmctld >/dev/null; then sinfo -N -o '%N %P %T %c %G' || bad=1; fi
  return $bad
}

# ---------------------------------------------------------------- node loss

multi_node() { # NODE is a node of the written config that runs in its own namespace
  [[ -n ${1:-} ]] || die "name a node: $(conf_nodes | tr '\n' ' ')"
  conf_nodes | grep -qx "$1" || die "no node '$1' in $CONF_DIR/slurm.conf (nodes: $(conf_nodes | tr '\n' ' '))"
  [[ $1 != localhost ]] || die "node localhost shares everything with this machine; use LOCAL_SLURM_NODES=2 up first"
}

node_pids() { # live pids in the UTS namespace NS
  local d
  for d in /proc/[0-9]*; do
    [[ $(readlink "$d/ns/uts" 2>/dev/null) == "$1" ]] && alive "${d#/proc/}" && echo "${d#/proc/}"
  done
  return 0
}

cmd_node_down() { # SIGKILL the node's slurmd and everything running on it; slurmctld notices after SlurmdTimeout
  local node=${1:-} ns pids n=0
  require_root node-down
  multi_node "$node"
  exec 9>"$LOCK"
  flock -w 600 9 || die "another local_slurm.sh holds $LOCK"
  ns=$(cat "$RUN_DIR/slurmd-$node.uts" 2>/dev/null) || die "node $node was not started by this script (no namespace)"
  [[ $ns != "$(readlink /proc/self/ns/uts)" ]] || die "node $node shares this shell's namespace; refusing to kill it"
  local deadline=$((SECONDS + 10))
  while pids=$(node_pids "$ns") && [[ -n $pids ]]; do # again: a task may fork while we kill
    ((SECONDS < deadline)) || die "node $node: processes survive SIGKILL for 10 s: $pids"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    n=$((n + $(wc -w <<<"$pids")))
    sleep 0.1
  done
  marker_set "slurmd@$node"
  rm -f "$RUN_DIR/slurmd-$node.uts"
  say "node $node is gone: SIGKILL to its slurmd and all its job processes ($n kill(s));" \
    "slurmctld marks it DOWN within about $(scontrol show config | awk '/^SlurmdTimeout/ {print $3}') s"
}

cmd_node_up() {
  local node=${1:-}
  require_root node-up
  multi_node "$node"
  exec 9>"$LOCK"
  flock -w 600 9 || die "another local_slurm.sh holds $LOCK"
  ready "slurmd@$node" || start_daemon "slurmd@$node"
  wait_node_ready "$node"
  say "node $node is up: $(sinfo -h -n "$node" -o %T | head -n 1)"
}

case ${1:-up} in
up) cmd_up ;;
down) cmd_down "${2:-}" ;;
status) cmd_status ;;
node-down) cmd_node_down "${2:-}" ;;
node-up) cmd_node_up "${2:-}" ;;
-h | --help | help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
*) die "unknown command '$1' (use: up | down [--purge] | status | node-down NODE | node-up NODE)" ;;
esac
