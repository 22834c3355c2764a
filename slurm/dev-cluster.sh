#!/usr/bin/env bash
# A private, throw-away SLURM 22.05 cluster on this machine, for development and tests.
#
#   dev-cluster.sh up DIR [--nodes N]  start N (1 or 2) nodes; last line out: export SLURM_CONF=..
#   dev-cluster.sh down DIR            cancel all jobs, stop every daemon, remove namespaces
#   dev-cluster.sh status DIR          one line per daemon + node states; exit 0 iff all run
#
#   eval "$(slurm/dev-cluster.sh up /tmp/c)"; sbatch --wrap hostname; sacct
#   slurm/dev-cluster.sh down /tmp/c
#
# Everything lives in DIR: munge key and socket, a private MariaDB (so that slurmdbd and `sacct`
# work: submitit polls sacct), slurmdbd, slurmctld, slurmd(s), config, state, logs and pid files.
# Needs root and the Debian packages slurmctld slurmd slurm-client munge slurmdbd mariadb-server
# (scripts/setup.sh installs them). No systemd. Outside DIR there are only a lock file in $TMPDIR
# and, for --nodes 2, network namespaces (/run/netns/*), a bridge and veths. Several clusters can
# run side by side: TCP ports are chosen free at `up`; ClusterName, namespace, bridge and veth
# names and the subnet derive from DIR.
#
# Daemons run in the foreground of their own session (setsid, stdio to DIR/log), so they outlive
# the calling shell and their pids are known exactly: DIR/run/<daemon>.pid. They are only ever
# stopped by those pids, never by name (another cluster's daemons have the same names).
#
# Layout of DIR:
#   slurm.conf slurmdbd.conf cluster.env (ports and names chosen at `up`) hosts (--nodes 2)
#   munge/ (key, socket, seed)  mysql/ (data, socket)  state/ (slurmctld)  spool/<node>/ (slurmd)
#   run/<daemon>.pid (ours)  run/daemon/ (the daemons' own pid files)  log/ (every log)
set -euo pipefail

PROG=dev-cluster
log() { echo "$PROG: $*" >&2; }
die() { log "error: $*"; exit 1; }
usage() {
  echo "usage:" >&2
  sed -n '4,6p' "$0" | sed 's/^#  */  /' >&2
  exit 2
}

# Names of the daemons in start order; slurmd-<node> per node is appended by load_env.
DAEMONS=(munged mariadbd slurmdbd slurmctld)

# ---------------------------------------------------------------------------------------------
# Processes

# state_of PID: the one-letter process state (R, S, Z, ...), or nothing if there is no such process.
state_of() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
  stat=${stat##*) }  # the command name in field 2 may contain spaces: cut after its ')'
  echo "${stat%% *}"
}

# pid_running PID: the process exists and is not a zombie (a daemon that died while this script,
# its parent, still runs, or one whose reaper never reaps, stays a zombie).
pid_running() {
  local s
  s=$(state_of "$1")
  [[ -n $s && $s != Z && $s != X ]]
}

# daemon_pid NAME: the recorded pid of daemon NAME (empty if none recorded).
daemon_pid() {
  local f=$DIR/run/$1.pid
  [[ -s $f ]] && cat "$f"
  return 0
}

# daemon_running NAME: its recorded process runs and is that program (not a reused pid).
daemon_running() {
  local pid comm
  pid=$(daemon_pid "$1")
  [[ $pid =~ ^[0-9]+$ ]] && pid_running "$pid" || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm == "${1%%-*}" ]]  # slurmd-n1 runs as slurmd
}

# stop_pid NAME PID: SIGTERM, wait up to 15 s, then SIGKILL and wait again.
stop_pid() {
  local name=$1 pid=$2 i
  pid_running "$pid" || return 0
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 150; i++)); do
    pid_running "$pid" || return 0
    sleep 0.1
  done
  log "$name (pid $pid) ignored SIGTERM for 15 s: SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    pid_running "$pid" || return 0
    sleep 0.1
  done
  log "warning: $name (pid $pid) is still there after SIGKILL"
}

# job_pids: processes of this cluster's jobs: slurmstepd (slurmd passes it its environment, which
# holds SLURM_CONF=DIR/slurm.conf) and every process with SLURM_JOB_ID and our SLURM_CONF in its
# environment (job scripts, tasks, srun inside jobs). Pure bash: no fork per process.
job_pids() {
  local d pid comm var conf job
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    conf="" job=""
    while IFS= read -r -d '' var; do
      case $var in
        "SLURM_CONF=$DIR/slurm.conf") conf=1 ;;
        SLURM_JOB_ID=*) job=1 ;;
      esac
    done 2>/dev/null <"$d/environ" || continue
    [[ -n $conf ]] || continue
    comm=$(cat "$d/comm" 2>/dev/null) || continue
    if [[ $comm == slurmstepd || -n $job ]] && pid_running "$pid"; then
      echo "$pid"
    fi
  done
}

# ---------------------------------------------------------------------------------------------
# Configuration

# pick_port VAR: set VAR to a TCP port nobody listens on or connects from, and not picked before
# by this run, in 30000-32699: below Linux's ephemeral ports (32768-) and above lmu_asr's per-job
# rendezvous ports (10000-29999, lmu_asr/distributed.py).
PICKED=" "
pick_port() {
  local used p
  used=" $(ss -Htan | awk '{n = split($4, a, ":"); print a[n]}' | tr '\n' ' ') "
  while :; do
    p=$((30000 + RANDOM % 2700))
    [[ $used == *" $p "* || $PICKED == *" $p "* ]] || break
  done
  PICKED+="$p "
  printf -v "$1" '%s' "$p"
}

# load_env: read DIR/cluster.env (written by `up` before it starts anything).
load_env() {
  [[ -f $DIR/cluster.env ]] || return 1
  # shellcheck source=/dev/null
  source "$DIR/cluster.env"
  local n
  DAEMONS=(munged mariadbd slurmdbd slurmctld)
  for n in $NODE_NAMES; do DAEMONS+=("slurmd-$n"); done
}

# choose_env NODES: ports, names and (--nodes 2) subnet for a fresh cluster; writes cluster.env.
dir_hash() { printf '%s' "$DIR" | sha1sum | cut -c1-6; }

choose_env() {
  local nodes=$1 hash x used
  hash=$(dir_hash)
  NODES=$nodes
  CLUSTER=dev$hash  # ClusterName: lower case, unique per DIR
  CTLD_PORT="" SLURMD_PORT="" DBD_PORT="" MYSQL_PORT=""
  pick_port CTLD_PORT
  pick_port SLURMD_PORT
  pick_port DBD_PORT
  pick_port MYSQL_PORT
  CTLD_HOST=$(hostname -s)
  if ((nodes == 1)); then
    # One slurmd on this host. The node is named like the host so that jobs can resolve
    # SLURM_JOB_NODELIST (e.g. a torch rendezvous at the first node); NodeAddr=127.0.0.1 so that
    # nothing depends on how the host name resolves outside jobs.
    NODE_NAMES=$CTLD_HOST NODE_ADDRS=127.0.0.1 CTLD_ADDR=127.0.0.1
    NET="" BRIDGE=""
  else
    # One network namespace per node, on a bridge in the root namespace (where slurmctld, slurmdbd
    # and clients stay). Subnet 10.99.X.0/24 with X from DIR's hash, moved on while another
    # interface on this machine already has an address in it. No route leads out of it.
    x=$((16#${hash:0:4} % 254 + 1))
    used=$(ip -o -4 addr show | awk '{print $4}')
    while grep -q "^10\.99\.$x\." <<<"$used"; do x=$((x % 254 + 1)); done
    NET=10.99.$x
    BRIDGE=dcb$hash  # interface names: at most 15 characters
    NODE_NAMES="" NODE_ADDRS=""
    local i
    for ((i = 1; i <= nodes; i++)); do
      NODE_NAMES+="${NODE_NAMES:+ }n$i"
      NODE_ADDRS+="${NODE_ADDRS:+ }$NET.$((i + 1))"
    done
    CTLD_ADDR=$NET.1
  fi
  NETNS_PREFIX=dc$hash  # namespace and host-side veth of node nI: dc<hash>-nI
  cat >"$DIR/cluster.env" <<EOF
NODES=$NODES
CLUSTER=$CLUSTER
CTLD_HOST=$CTLD_HOST
CTLD_ADDR=$CTLD_ADDR
CTLD_PORT=$CTLD_PORT
SLURMD_PORT=$SLURMD_PORT
DBD_PORT=$DBD_PORT
MYSQL_PORT=$MYSQL_PORT
NODE_NAMES="$NODE_NAMES"
NODE_ADDRS="$NODE_ADDRS"
NET=$NET
BRIDGE=$BRIDGE
NETNS_PREFIX=$NETNS_PREFIX
EOF
  load_env
}

write_configs() {
  local names addrs i
  read -ra names <<<"$NODE_NAMES"
  read -ra addrs <<<"$NODE_ADDRS"
  {
    cat <<EOF
# Written by slurm/dev-cluster.sh: regenerated at each fresh \`up\`.
ClusterName=$CLUSTER
SlurmctldHost=$CTLD_HOST($CTLD_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
# Private munge daemon; cred_expire=5 (minimum) is also how soon a requeued job may start again.
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=5
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/daemon/slurmctld.pid
SlurmdPidFile=$DIR/run/daemon/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups here: processes are tracked by parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
MailProg=/bin/true
# Fast scheduling and kills: sbatch to RUNNING within about a second, SIGKILL 5 s after SIGTERM;
# finished jobs stay in \`scontrol show job\` for an hour.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
KillWait=5
MinJobAge=3600
ReturnToService=2
JobRequeue=1
# Node lines below declare 8 CPUs whatever the hardware has (else the node goes INVAL).
SlurmdParameters=config_overrides
# Partition preemption: a job in \`high\` requeues jobs in \`low\` whose CPUs it needs; with
# preempt_send_user_signal their tasks get the --signal signal at once, SIGTERM after GraceTime.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
# Accounting through slurmdbd (sacct); the Pass line names the munge socket slurmctld uses for it.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$CTLD_ADDR
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$DIR/munge/munge.socket
EOF
    for i in "${!names[@]}"; do
      echo "NodeName=${names[i]} NodeHostname=${names[i]} NodeAddr=${addrs[i]}" \
        "CPUs=8 RealMemory=16000 State=UNKNOWN"
    done
    cat <<EOF
# debug is never preempted; low is requeued by high (10 s grace after the user signal).
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE PreemptMode=OFF
PartitionName=low Nodes=ALL MaxTime=INFINITE PriorityTier=1 PreemptMode=REQUEUE GraceTime=10
PartitionName=high Nodes=ALL MaxTime=INFINITE PriorityTier=10 PreemptMode=OFF
EOF
  } >"$DIR/slurm.conf"

  # slurmdbd has no -f: it reads slurmdbd.conf beside $SLURM_CONF, and insists on mode 600.
  # MariaDB's root has no password (only reachable from this machine), hence no StoragePass.
  (
    umask 077
    cat >"$DIR/slurmdbd.conf" <<EOF
# Written by slurm/dev-cluster.sh.
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/daemon/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=root
StorageLoc=slurm_acct_db
EOF
  )
  chmod 600 "$DIR/slurmdbd.conf"

  if ((NODES > 1)); then
    # Bind-mounted over /etc/hosts inside each node: node names and the controller resolve.
    {
      echo "127.0.0.1 localhost"
      echo "$CTLD_ADDR $CTLD_HOST"
      for i in "${!names[@]}"; do echo "${addrs[i]} ${names[i]}"; done
    } >"$DIR/hosts"
  fi
}

# ---------------------------------------------------------------------------------------------
# Starting

# spawn NAME CMD...: run CMD detached (own session, stdio to DIR/log/NAME.out, without the lock's
# fds) and record its pid. A background child of a script is no process group leader, so setsid
# execs without forking and $! is the daemon's pid (nsenter and unshare exec too).
spawn() {
  local name=$1
  shift
  setsid "$@" </dev/null >>"$DIR/log/$name.out" 2>&1 8>&- 9>&- &
  echo "$!" >"$DIR/run/$name.pid"
}

# on_up_exit: `up` failed (fail_up, or a command under set -e) or was interrupted: stop what it
# started.
on_up_exit() {
  local rc=$?
  ((rc != 0)) || return 0
  log "stopping what was started"
  do_down >/dev/null 2>&1 || true
}

# fail_up NAME LOGFILE: a daemon did not come up: say which log to read and exit 1 (on_up_exit).
fail_up() {
  local f out=$DIR/log/$1.out also=""
  [[ -s $out ]] && also=" (and $out)"
  log "error: $1 did not come up; read $2$also"
  for f in "$2" "$out"; do
    if [[ -s $f ]]; then
      log "last lines of $f:"
      tail -n 15 "$f" | sed 's/^/    /' >&2
    fi
  done
  exit 1
}

# wait_for NAME LOGFILE SECONDS CHECK...: poll CHECK every 0.1 s until it succeeds; fail_up when
# the daemon's process is gone or time runs out.
wait_for() {
  local name=$1 logfile=$2 secs=$3 pid i
  shift 3
  pid=$(daemon_pid "$name")
  for ((i = 0; i < secs * 10; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    if ! pid_running "$pid"; then
      log "$name (pid $pid) exited"
      fail_up "$name" "$logfile"
    fi
    sleep 0.1
  done
  log "$name: not ready after $secs s"
  fail_up "$name" "$logfile"
}

listening() { ss -Htln "sport = :$1" | grep -q .; }
munge_works() { munge -S "$DIR/munge/munge.socket" -n | unmunge -S "$DIR/munge/munge.socket"; }
ctld_up() { timeout 5 scontrol ping | grep -q UP; }

# nodes_idle: every node of the cluster reports idle.
nodes_idle() {
  local out
  out=$(timeout 5 sinfo -h -N -o '%N %t' | sort -u) || return 1
  [[ $(grep -c ' idle$' <<<"$out") -eq $NODES ]]
}

setup_network() {
  local i ns veth names addrs
  read -ra names <<<"$NODE_NAMES"
  read -ra addrs <<<"$NODE_ADDRS"
  log "network: bridge $BRIDGE $CTLD_ADDR/24, namespaces $NETNS_PREFIX-{${NODE_NAMES// /,}}"
  ip link add "$BRIDGE" type bridge
  ip addr add "$CTLD_ADDR/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for i in "${!names[@]}"; do
    ns=$NETNS_PREFIX-${names[i]} veth=$NETNS_PREFIX-${names[i]}
    ip netns add "$ns"
    ip link add "$veth" type veth peer name "${veth}p"
    ip link set "${veth}p" netns "$ns"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" link set "${veth}p" name eth0
    ip -n "$ns" addr add "${addrs[i]}/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
  done
}

teardown_network() {
  local n
  for n in $NODE_NAMES; do
    # Deleting the host end of a veth pair deletes both; the namespace goes with its last user.
    ip link del "$NETNS_PREFIX-$n" 2>/dev/null || true
    if [[ -e /run/netns/$NETNS_PREFIX-$n ]]; then ip netns del "$NETNS_PREFIX-$n" || true; fi
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

# start_slurmd NODE: 1 node: on this host. Several: in the node's network namespace, with a
# private mount and UTS namespace in which DIR/hosts covers /etc/hosts and the hostname is the
# node's name. (`ip netns exec` remounts /sys, and slurmd then dies looking for cgroups.)
start_slurmd() {
  local n=$1
  mkdir -p "$DIR/spool/$n"  # slurmd fails without it
  if ((NODES == 1)); then
    spawn "slurmd-$n" slurmd -D -f "$DIR/slurm.conf" -N "$n"
  else
    # shellcheck disable=SC2016 # $1 and $2 are sh's arguments
    spawn "slurmd-$n" nsenter --net="/run/netns/$NETNS_PREFIX-$n" unshare --mount --uts \
      sh -c 'mount --bind "$1/hosts" /etc/hosts && hostname "$2" &&
             exec slurmd -D -f "$1/slurm.conf" -N "$2"' sh "$DIR" "$n"
  fi
}

# The files and directories `up` creates in DIR (and removes again before a fresh start).
OWN_FILES=(cluster.env slurm.conf slurmdbd.conf hosts munge mysql state spool run log)

# do_up NODES: NODES is empty when --nodes was not given (1 for a fresh cluster).
do_up() {
  local nodes=$1 t0=$SECONDS n f longest
  export SLURM_CONF=$DIR/slurm.conf
  if load_env; then
    if all_running; then
      [[ -z $nodes || $nodes == "$NODES" ]] ||
        die "$DIR runs a $NODES-node cluster; run \`$0 down $DIR\` first"
      log "cluster in $DIR already runs"
      echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    log "cleaning up the stopped or half-started cluster in $DIR (its jobs and accounting go)"
    do_down
  else
    # Never delete files of someone else's: DIR must be new, empty or a dev cluster's.
    for f in "${OWN_FILES[@]}"; do
      [[ ! -e $DIR/$f ]] || die "$DIR has a '$f' but no cluster.env: use a new or empty directory"
    done
  fi
  nodes=${nodes:-1}
  for n in slurmctld slurmd slurmdbd munged mariadbd mariadb-install-db; do
    command -v $n >/dev/null || die "$n not found: apt-get install slurmctld slurmd" \
      "slurm-client munge slurmdbd mariadb-server (scripts/setup.sh does)"
  done
  [[ $(id -u) == 0 ]] || die "must run as root (daemons and jobs run as root)"
  # slurmstepd's sockets, DIR/spool/<node>/<node>_<job>.<step>, must fit a unix socket's 107 bytes.
  longest="$DIR/spool/n1/n1_4294967294.4294967294"
  ((nodes > 1)) || longest="$DIR/spool/$(hostname -s)/$(hostname -s)_4294967294.4294967294"
  ((${#longest} <= 107)) || die "path too long for unix sockets: $longest; use a shorter DIR"

  f=dcb$(dir_hash)  # the bridge choose_env will name (DIR's own one went with do_down above)
  if ((nodes > 1)) && ip link show "$f" >/dev/null 2>&1; then
    die "bridge $f exists: another dev cluster's, or a leftover (ip link del $f)"
  fi

  # Ports are free when picked, not yet taken: one `up` at a time on this machine picks and binds.
  exec 8>"${TMPDIR:-/tmp}/lmu_asr-dev-cluster.lock"
  flock 8
  trap on_up_exit EXIT
  trap 'log "interrupted"; exit 130' INT TERM HUP

  # A fresh start: slurmctld -i does not forget old jobs, so old state must go.
  for f in "${OWN_FILES[@]}"; do rm -rf "${DIR:?}/$f"; done
  mkdir -p "$DIR"/{munge,mysql,state,spool,run/daemon,log}
  chmod 755 "$DIR/munge"  # munged refuses a socket directory with mode 700
  choose_env "$nodes"
  write_configs
  log "starting $CLUSTER ($NODES node(s): $NODE_NAMES) in $DIR; ports slurmctld $CTLD_PORT," \
    "slurmd $SLURMD_PORT, slurmdbd $DBD_PORT, mariadb $MYSQL_PORT"

  # munge: a fresh key, readable only by root. --force: munged wants every directory above its
  # socket searchable by all, which DIR under a private temporary directory (pytest's, mode 700)
  # is not; only root uses this cluster, so that check does not matter here.
  head -c 1024 /dev/urandom >"$DIR/munge/munge.key"
  chmod 400 "$DIR/munge/munge.key"
  spawn munged munged -F --force --socket="$DIR/munge/munge.socket" \
    --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/daemon/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed"
  wait_for munged "$DIR/log/munged.log" 10 munge_works

  # MariaDB on 127.0.0.1 only, root without password; slurmdbd creates its database itself (and
  # logs "error: Database settings not recommended values": harmless for a cluster this small).
  log "initialising MariaDB (a few seconds)"
  if ! mariadb-install-db --no-defaults --user=root --datadir="$DIR/mysql/data" \
    --auth-root-authentication-method=normal --skip-test-db \
    >"$DIR/log/mariadb-install-db.log" 2>&1 8>&- 9>&-; then
    fail_up mariadb-install-db "$DIR/log/mariadb-install-db.log"
  fi
  spawn mariadbd mariadbd --no-defaults --user=root --datadir="$DIR/mysql/data" \
    --socket="$DIR/mysql/mysqld.sock" --port="$MYSQL_PORT" --bind-address=127.0.0.1 \
    --pid-file="$DIR/run/daemon/mariadbd.pid" --log-error="$DIR/log/mariadbd.log"
  wait_for mariadbd "$DIR/log/mariadbd.log" 60 listening "$MYSQL_PORT"

  # slurmdbd before slurmctld (which fetches its TRES from it at start).
  spawn slurmdbd slurmdbd -D
  wait_for slurmdbd "$DIR/log/slurmdbd.log" 60 listening "$DBD_PORT"

  ((NODES == 1)) || setup_network
  spawn slurmctld slurmctld -D -i -f "$DIR/slurm.conf"
  wait_for slurmctld "$DIR/log/slurmctld.log" 30 ctld_up

  for n in $NODE_NAMES; do start_slurmd "$n"; done
  for n in $NODE_NAMES; do
    wait_for "slurmd-$n" "$DIR/log/slurmd-$n.log" 30 nodes_idle
  done
  # The cluster registers with slurmdbd shortly after slurmctld starts; sacct must answer.
  wait_for slurmdbd "$DIR/log/slurmdbd.log" 30 timeout 10 sacct -n -X
  trap - EXIT INT TERM HUP
  log "cluster $CLUSTER is up in $((SECONDS - t0)) s; logs in $DIR/log"
  echo "export SLURM_CONF=$SLURM_CONF"
}

# ---------------------------------------------------------------------------------------------
# Stopping

all_running() {
  local d
  for d in "${DAEMONS[@]}"; do daemon_running "$d" || return 1; done
}

# kill_job_processes: SIGTERM, then SIGKILL after 5 s, to every process job_pids finds.
kill_job_processes() {
  local pids i
  pids=$(job_pids)
  [[ -n $pids ]] || return 0
  log "killing leftover job processes: ${pids//$'\n'/ }"
  # shellcheck disable=SC2086
  kill -TERM $pids 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    pids=$(job_pids)
    [[ -n $pids ]] || return 0
    sleep 0.1
  done
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  for ((i = 0; i < 30; i++)); do
    [[ -n $(job_pids) ]] || return 0
    sleep 0.1
  done
  pids=$(job_pids)
  log "warning: job processes survive SIGKILL: ${pids//$'\n'/ }"
}

do_down() {
  local jobs i d pid
  export SLURM_CONF=$DIR/slurm.conf
  if ! load_env; then
    log "no cluster in $DIR"
    return 0
  fi
  # 1. Jobs first: slurmstepd and srun ignore SIGTERM and would outlive slurmd.
  if daemon_running slurmctld; then
    jobs=$(timeout 5 squeue -h -o %i 2>/dev/null | sort -u | tr '\n' ' ') || true
    if [[ -n ${jobs// /} ]]; then
      log "cancelling jobs: $jobs"
      # shellcheck disable=SC2086
      timeout 10 scancel $jobs 2>/dev/null || true
      # They leave squeue when slurmd has reported every step gone (SIGKILL after KillWait=5 s).
      for ((i = 0; i < 300; i++)); do
        jobs=$(timeout 5 squeue -h -o %i 2>/dev/null) || break
        [[ -z $jobs ]] && break
        sleep 0.1
      done
    fi
  fi
  # Whatever survived (or ran while slurmctld was already gone).
  kill_job_processes
  # 2. Daemons in reverse start order, each by its recorded pid.
  for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
    d=${DAEMONS[i]}
    pid=$(daemon_pid "$d")
    if daemon_running "$d"; then stop_pid "$d" "$pid"; fi
    rm -f "$DIR/run/$d.pid"
  done
  kill_job_processes  # a step that a dying slurmd left behind
  # 3. Network namespaces, veths and bridge of a multi-node cluster.
  ((NODES == 1)) || teardown_network
  log "cluster $CLUSTER in $DIR is down"
}

# ---------------------------------------------------------------------------------------------

do_status() {
  local ok=0 d pid state out
  if ! load_env; then
    echo "no cluster in $DIR"
    return 1
  fi
  export SLURM_CONF=$DIR/slurm.conf
  for d in "${DAEMONS[@]}"; do
    pid=$(daemon_pid "$d")
    if daemon_running "$d"; then state=running; else state=stopped ok=1; fi
    printf '%-12s %-8s %s\n' "$d" "${pid:--}" "$state"
  done
  if daemon_running slurmctld && out=$(timeout 5 sinfo -h -N -o '%N %t' | sort -u); then
    # Usable nodes: idle, partly or fully allocated, or completing jobs.
    while read -r d state; do
      [[ -n $d ]] || continue
      printf 'node %-7s %s\n' "$d" "$state"
      [[ $state =~ ^(idle|mix|alloc|comp)$ ]] || ok=1
    done <<<"$out"
  else
    echo "nodes: slurmctld does not answer"
    ok=1
  fi
  return $ok
}

main() {
  local cmd=${1:-} nodes=""
  [[ $# -ge 2 ]] || usage
  shift
  DIR=$1
  shift
  while [[ $# -gt 0 ]]; do
    case $1 in
      --nodes) nodes=${2:-}; shift 2 || usage ;;
      --nodes=*) nodes=${1#--nodes=}; shift ;;
      *) usage ;;
    esac
  done
  [[ -z $nodes || $nodes =~ ^[12]$ ]] || die "--nodes must be 1 or 2"
  [[ $cmd == up ]] && mkdir -p "$DIR"
  DIR=$(realpath -m -- "$DIR")
  case $cmd in
    up | down)
      [[ -d $DIR ]] || { log "no cluster in $DIR"; return 0; }
      # One `up`/`down` at a time per DIR. Daemons get the lock's fd closed (spawn).
      exec 9>"$DIR/.lock"
      flock 9
      if [[ $cmd == up ]]; then do_up "$nodes"; else do_down; fi
      ;;
    status) [[ -d $DIR ]] || { echo "no cluster in $DIR"; return 1; }; do_status ;;
    *) usage ;;
  esac
}

main "$@"
