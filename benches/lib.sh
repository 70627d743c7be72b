# Helpers shared by the benchmark scripts that start syncblock processes; `source` it after
# setting BIN (the syncblock binary). Not a script of its own.
#   port          a free TCP port on 127.0.0.1
#   json EXPR     evaluates EXPR on the JSON object read from stdin (as `d`) and prints it
#   status PORT   the replication status of the first volume of the node whose admin endpoint is
#                 on PORT (`syncblock status --json`, `volumes[0].replication`), or {}
#   wait_admin P  waits (up to 10 s) until that admin endpoint answers
#   PIDS, kill_pids: processes to SIGKILL on exit (`trap kill_pids EXIT`)
PY=/usr/bin/python3
[ -x "$BIN" ] || cargo build --release -p syncblock-nbd
PIDS=()
kill_pids() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
port() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
json() { $PY -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
status() {
  { "$BIN" status --json --admin "127.0.0.1:$1" 2>/dev/null || echo '{}'; } |
    $PY -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps((d.get("volumes") or [{}])[0].get("replication") or {}))'
}
wait_admin() { for _ in $(seq 200); do "$BIN" status --json --admin "127.0.0.1:$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; return 1; }
