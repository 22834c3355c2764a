#!/usr/bin/env bash
# The central MLflow tracking server for lmu_asr sweeps: `mlflow server` from the project's .venv.
#
#   slurm/mlflow-server.sh [options] [-- more `mlflow server` options]
#
#   --dir DIR        state folder: mlflow.db, artifacts/, auth files
#                    ($LMU_ASR_MLFLOW_DIR, default ~/lmu_asr-mlflow)
#   --backend URI    backend store ($LMU_ASR_MLFLOW_BACKEND, default sqlite:///DIR/mlflow.db),
#                    e.g. postgresql://user@dbhost/mlflow (needs `pip install psycopg2-binary`)
#   --artifacts URI  artifact store ($LMU_ASR_MLFLOW_ARTIFACTS, default DIR/artifacts); artifacts
#                    go through the server (--serve-artifacts): compute nodes need no shared path
#   --host HOST      interface to bind ($LMU_ASR_MLFLOW_HOST, default 127.0.0.1; 0.0.0.0 = all)
#   --port PORT      ($LMU_ASR_MLFLOW_PORT, default 5000)
#   --workers N      uvicorn workers ($LMU_ASR_MLFLOW_WORKERS, default 4)
#   --allowed-hosts LIST  more Host-header names, comma-separated ($LMU_ASR_MLFLOW_ALLOWED_HOSTS):
#                    a client sends the name it used for the server; always allowed are localhost,
#                    private IPs (MLflow's defaults), this node's names and IPv4 addresses
#   --auth           basic auth (`--app-name basic-auth`, needs `pip install "mlflow[auth]"`); the
#                    first start creates user $MLFLOW_AUTH_ADMIN_USERNAME (default admin) with
#                    password $MLFLOW_AUTH_ADMIN_PASSWORD; clients set MLFLOW_TRACKING_USERNAME and
#                    MLFLOW_TRACKING_PASSWORD
#   -h, --help
#
# Prints the tracking URI for sweeps (tracking.uri=http://HOST:PORT), then runs the server in the
# foreground (exec: signals reach `mlflow server` directly).
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "mlflow-server: $*" >&2; exit 2; }

dir=${LMU_ASR_MLFLOW_DIR:-$HOME/lmu_asr-mlflow}
backend=${LMU_ASR_MLFLOW_BACKEND:-} artifacts=${LMU_ASR_MLFLOW_ARTIFACTS:-}
host=${LMU_ASR_MLFLOW_HOST:-127.0.0.1} port=${LMU_ASR_MLFLOW_PORT:-5000}
workers=${LMU_ASR_MLFLOW_WORKERS:-4} extra_hosts=${LMU_ASR_MLFLOW_ALLOWED_HOSTS:-} auth=0
while (($#)); do
  case $1 in
    --dir) dir=${2:?}; shift ;;
    --backend) backend=${2:?}; shift ;;
    --artifacts) artifacts=${2:?}; shift ;;
    --host) host=${2:?}; shift ;;
    --port) port=${2:?}; shift ;;
    --workers) workers=${2:?}; shift ;;
    --allowed-hosts) extra_hosts=${2:?}; shift ;;
    --auth) auth=1 ;;
    -h | --help) usage ;;
    --) shift; break ;;
    *) echo "mlflow-server: unknown option $1" >&2; usage 2 >&2 ;;
  esac
  shift
done
[[ $port =~ ^[0-9]+$ ]] || die "--port must be a number, got '$port'"

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
backend=${backend:-sqlite:///$dir/mlflow.db}
artifacts=${artifacts:-$dir/artifacts}

mlflow=${LMU_ASR_MLFLOW_BIN:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/mlflow}
[ -x "$mlflow" ] || mlflow=$(command -v mlflow) || die "no mlflow: run scripts/setup.sh first"
py=$(dirname "$mlflow")/python
[ -x "$py" ] || py=python3

# Host header check (MLflow 3.5+): a request whose Host is not listed gets 403. Giving the list
# replaces MLflow's defaults, so they are repeated here. The browser UI's POSTs carry an Origin
# header, which must be allowed too when the UI is opened by the node's name or address.
names=(localhost 127.0.0.1 "[::1]" "$(hostname -s)" "$(hostname -f 2>/dev/null || hostname)")
[[ $host == 0.0.0.0 || $host == :: ]] || names+=("$host")
for ip in $(hostname -I 2>/dev/null); do [[ $ip == *:* ]] || names+=("$ip"); done  # IPv4 ones
IFS=, read -ra more <<<"$extra_hosts"
mapfile -t names < <(printf '%s\n' "${names[@]}" "${more[@]}" | awk 'NF && !seen[$0]++')
hosts=() origins=()
for n in "${names[@]}"; do
  hosts+=("$n" "${n/#\[/[[]}:*") origins+=("http://$n:$port")  # [ starts a class in a pattern
done
read -ra private <<<"192.168.* 10.* $(printf '172.%d.* ' {16..31}) fc00:* fd00:*"
hosts+=("${private[@]}")  # private IPs, as MLflow's default

args=(--backend-store-uri "$backend" --artifacts-destination "$artifacts" --serve-artifacts
  --host "$host" --port "$port" --workers "$workers"
  --allowed-hosts "$(IFS=,; echo "${hosts[*]}")"
  --cors-allowed-origins "$(IFS=,; echo "${origins[*]}")")
if ((auth)); then
  "$py" -c "import flask_wtf" 2>/dev/null ||
    die "--auth needs MLflow's auth extra: .venv/bin/pip install 'mlflow[auth]==3.17.2'"
  # The users database defaults to ./basic_auth.db; keep it (and a stable secret key, which
  # every worker and restart must share) in DIR instead.
  if [ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
    pkg=$("$py" -c "import importlib.util as u; print(u.find_spec('mlflow').origin)")
    pkg=$(dirname "$pkg")  # not `import mlflow.server.auth`: that reads the config at import
    sed "s|^database_uri = .*|database_uri = sqlite:///$dir/basic_auth.db|" \
      "$pkg/server/auth/basic_auth.ini" >"$dir/basic_auth.ini"
    export MLFLOW_AUTH_CONFIG_PATH=$dir/basic_auth.ini
  fi
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    [ -s "$dir/secret_key" ] ||
      (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$dir/secret_key")
    MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$dir/secret_key")
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  args+=(--app-name basic-auth)
fi
# MLflow's job runner (GenAI scorers) is not used by lmu_asr; without it the server starts faster
# and runs fewer processes.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}

url_host=$host
[[ $host == 0.0.0.0 || $host == :: ]] && url_host=$(hostname -s)
echo "mlflow-server: store $backend, artifacts $artifacts"
echo "mlflow-server: sweeps use  tracking.uri=http://$url_host:$port  (or MLFLOW_TRACKING_URI)"
exec "$mlflow" server "${args[@]}" "$@"
