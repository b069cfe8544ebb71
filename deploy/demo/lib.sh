# shellcheck shell=bash
# Shared by the deploy/demo-* scripts (sourced, not run): compose, the cluster's state, the
# Python client, chatters, and the claims each demo checks at its end.
#
# Conventions: `step` announces what the demo does, `say` what it shows; every measured figure
# goes through `figure` (printed at once, repeated in the summary) and every claim through `pass`
# / `fail` / `check`; `finish` prints the claims and exits 1 if one failed. Everything a demo
# starts (chatters, the 4th node) is stopped by its id on exit, and the cluster is put back:
# nodes unpaused, reconnected, started, all healthy.

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo_root" || exit 1
# The cluster's secrets (.env, written once with random values); clients mint their tokens with
# the auth secret.
"$repo_root/deploy/init-env" || exit 1
CHAT_AUTH_SECRET="$(sed -n 's/^CHAT_AUTH_SECRET=//p' "$repo_root/.env" | tail -n 1)"
export CHAT_AUTH_SECRET

CHATCLIENT="$repo_root/deploy/demo/chatclient.py"
SCALE_FILE="$repo_root/deploy/docker-compose.scale.yml"
NODES=(node1 node2 node3)
declare -A PORT=([node1]=8081 [node2]=8082 [node3]=8083 [node4]=8084)
HTTP_PORTS=(8081 8082 8083)

# The compose project: the same one `docker compose up -d` uses from the repository root.
project="${COMPOSE_PROJECT_NAME:-$(sed -n 's/^COMPOSE_PROJECT_NAME=//p' "$repo_root/.env" 2>/dev/null | tail -n 1)}"
project="${project:-chat}"
network="${project}_cluster"

step() { printf '\n==> %s\n' "$*"; }
say() { printf '    %s\n' "$*"; }
# Shows the command (on stderr, so that silencing its output does not hide it), then runs it.
run() {
    printf '+ %s\n' "$*" >&2
    "$@"
}
die() {
    printf '%s: %s\n' "${DEMO:-demo}" "$*" >&2
    exit 1
}
now() { date +%s.%N; }
# Seconds from $1 (a `now` value) to now, two decimals.
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# `docker compose` (v2) when it works, else `docker-compose` (v1); both read docker-compose.yml
# and .env from the repository root.
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
else
    die "neither \`docker compose\` nor \`docker-compose\` is available"
fi
compose() { "${COMPOSE[@]}" -p "$project" -f "$repo_root/docker-compose.yml" "$@"; }
compose_scale() { "${COMPOSE[@]}" -p "$project" -f "$repo_root/docker-compose.yml" -f "$SCALE_FILE" "$@"; }

# The container of a service (running or not), by the labels both compose versions set: its
# name (chat_node1_1 with docker-compose v1, chat-node1-1 with v2).
cid() {
    docker ps -a --format '{{.Names}}' --filter "label=com.docker.compose.project=$project" \
        --filter "label=com.docker.compose.service=$1" | head -n 1
}

py() { "$PYTHON" "$CHATCLIENT" "$@"; }

# --- claims and figures -------------------------------------------------------------------------

CLAIMS=()
FIGURES=()
FAILED=0
pass() {
    CLAIMS+=("PASS  $*")
    say "ok: $*"
}
fail() {
    CLAIMS+=("FAIL  $*")
    FAILED=1
    say "FAILED: $*"
}
# check DESCRIPTION COMMAND...: runs the command, records the claim by its exit status.
check() {
    local desc="$1"
    shift
    if "$@"; then pass "$desc"; else fail "$desc"; fi
}
figure() {
    FIGURES+=("$1: $2")
    say "measured: $1: $2"
}

# --- Python client ------------------------------------------------------------------------------

PYTHON=python3
ensure_python() {
    command -v python3 >/dev/null || die "python3 is required"
    if python3 -c 'import websockets' 2>/dev/null; then
        return 0
    fi
    say "installing the Python package websockets (quietly)"
    if python3 -m pip install --quiet --disable-pip-version-check websockets >/dev/null 2>&1 ||
        python3 -m pip install --quiet --disable-pip-version-check --user websockets >/dev/null 2>&1; then
        python3 -c 'import websockets' 2>/dev/null && return 0
    fi
    # A system Python that refuses pip (PEP 668): a virtual environment beside this file.
    local venv="$repo_root/deploy/demo/.venv"
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv" >/dev/null ||
        die "cannot install websockets (pip and venv failed)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check websockets >/dev/null ||
        die "cannot install websockets into $venv"
    PYTHON="$venv/bin/python"
}

# --- chatters (background clients, stopped by pid) -----------------------------------------------

# One user per node; each client lists its home node first, then the others to fail over to.
declare -A USER_OF=([node1]=alice [node2]=bob [node3]=carol)
CLIENT_ARGS=()
for _n in "${NODES[@]}"; do
    _urls="${PORT[$_n]}"
    for _m in "${NODES[@]}"; do [[ "$_m" == "$_n" ]] || _urls+=",${PORT[$_m]}"; done
    CLIENT_ARGS+=(--client "${USER_OF[$_n]}=$_urls")
done
unset _n _m _urls
# users_of NODE...: their users, comma-separated.
users_of() {
    local n list=""
    for n in "$@"; do list+="${USER_OF[$n]},"; done
    echo "${list%,}"
}

declare -A CHATTER_PID=()
# chatter_start NAME ARGS...: `chatclient.py chat` writing $WORK/NAME.jsonl.
chatter_start() {
    local name="$1"
    shift
    "$PYTHON" "$CHATCLIENT" chat --ledger "$WORK/$name.jsonl" --run "$RUN" "$@" \
        2>>"$WORK/$name.log" &
    CHATTER_PID[$name]=$!
}
# chatter_start_in NODE NAME ARGS...: the same, inside NODE's network namespace (nsenter), so
# that it reaches the node on 127.0.0.1:8080 even when the node is cut off from every network.
chatter_start_in() {
    local node="$1" name="$2" pid
    shift 2
    pid="$(docker inspect -f '{{.State.Pid}}' "$(cid "$node")")"
    "${NSENTER[@]}" -t "$pid" -n "$PYTHON" "$CHATCLIENT" chat --ledger "$WORK/$name.jsonl" \
        --run "$RUN" "$@" 2>>"$WORK/$name.log" &
    CHATTER_PID[$name]=$!
}
# watcher_start NAME URL... [--room ROOM]: `chatclient.py watch`, recording every change of the
# nodes' views in $WORK/NAME.jsonl, for precise detection figures (`py wait --watched $WORK`).
watcher_start() {
    local name="$1"
    shift
    "$PYTHON" "$CHATCLIENT" watch --ledger "$WORK/$name.jsonl" "$@" 2>>"$WORK/$name.log" &
    CHATTER_PID[$name]=$!
}
# watcher_start_in NODE NAME URL...: the same inside NODE's network namespace.
watcher_start_in() {
    local node="$1" name="$2" pid
    shift 2
    pid="$(docker inspect -f '{{.State.Pid}}' "$(cid "$node")")"
    "${NSENTER[@]}" -t "$pid" -n "$PYTHON" "$CHATCLIENT" watch --ledger "$WORK/$name.jsonl" "$@" \
        2>>"$WORK/$name.log" &
    CHATTER_PID[$name]=$!
}
chatter_stop() {
    local name="$1" pid="${CHATTER_PID[$1]:-}"
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "CHATTER_PID[$name]"
}
# in_netns NODE COMMAND...: runs a host command inside the node's network namespace.
in_netns() {
    local node="$1" pid
    shift
    pid="$(docker inspect -f '{{.State.Pid}}' "$(cid "$node")")"
    "${NSENTER[@]}" -t "$pid" -n "$@"
}
NSENTER=()
# Sets NSENTER to a working nsenter (root, or sudo without a password); false when there is none.
find_nsenter() {
    command -v nsenter >/dev/null || return 1
    if [[ $EUID -eq 0 ]]; then
        NSENTER=(nsenter)
    elif sudo -n true 2>/dev/null; then
        NSENTER=(sudo -n nsenter)
    else
        return 1
    fi
}

# --- the cluster --------------------------------------------------------------------------------

node_state() { docker inspect -f '{{.State.Status}}' "$(cid "$1")" 2>/dev/null || echo missing; }
node_health() {
    docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}' \
        "$(cid "$1")" 2>/dev/null || echo missing
}
# When the node's process last exited / started, per Docker (epoch seconds): the precise moment a
# `docker kill` took effect, whatever the latency of the command itself.
died_at() { date -d "$(docker inspect -f '{{.State.FinishedAt}}' "$(cid "$1")")" +%s.%N; }
started_at() { date -d "$(docker inspect -f '{{.State.StartedAt}}' "$(cid "$1")")" +%s.%N; }
restart_count() { docker inspect -f '{{.RestartCount}}' "$(cid "$1")" 2>/dev/null || echo 0; }
on_network() {
    local nets
    nets=" $(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "$(cid "$1")") "
    [[ "$nets" == *" $network "* ]]
}

# Puts the three nodes back: unpaused, on the cluster network, started; no 4th node.
restore_nodes() {
    local n c
    for n in "${NODES[@]}"; do
        c="$(cid "$n")"
        [[ -n "$c" ]] || continue
        if [[ "$(docker inspect -f '{{.State.Paused}}' "$c")" == true ]]; then
            run docker unpause "$c" >/dev/null
        fi
        if docker network inspect "$network" >/dev/null 2>&1 && ! on_network "$n"; then
            run docker network connect --alias "$n" "$network" "$c"
        fi
    done
    c="$(cid node4)"
    if [[ -n "$c" ]]; then
        say "removing node4 (from deploy/docker-compose.scale.yml)"
        compose_scale stop node4 >/dev/null 2>&1 || true
        compose_scale rm -f -s -v node4 >/dev/null 2>&1 || docker rm -f -v "$c" >/dev/null
    fi
}

# Brings the cluster up if need be and waits until the three nodes are healthy and see each
# other (3 up, quorum) everywhere. Returns non-zero on timeout.
ensure_cluster() {
    local timeout="${1:-60}" t0 n all
    docker image inspect chat-node:latest >/dev/null 2>&1 ||
        die "image chat-node:latest not found: run deploy/build-image first"
    restore_nodes
    t0="$(now)"
    compose up -d 2>&1 | sed 's/^/    /'
    while true; do
        all=1
        for n in "${NODES[@]}"; do
            [[ "$(node_health "$n")" == healthy ]] || all=0
        done
        ((all)) && break
        if awk -v s="$(since "$t0")" -v t="$timeout" 'BEGIN { exit !(s > t) }'; then
            say "nodes not healthy after ${timeout} s:"
            for n in "${NODES[@]}"; do say "  $n: $(node_state "$n") $(node_health "$n")"; done
            return 1
        fi
        sleep 0.5
    done
    py wait "${HTTP_PORTS[@]}" --up 3 --quorum yes --timeout "$timeout" \
        --label "3 up and quorum on every node" >/dev/null
}

# check_no_crash ARRAY_NAME: claims that no node's RestartCount moved since it was recorded in
# the associative array (node -> count): Docker restarts a node (unless-stopped) only when it
# exits by itself, which in these demos means it crashed.
check_no_crash() {
    local -n before="$1"
    local n crashed=()
    for n in "${!before[@]}"; do
        [[ "$(restart_count "$n")" == "${before[$n]}" ]] || crashed+=("$n")
    done
    if ((${#crashed[@]})); then
        fail "no node crashed (Docker restarted: ${crashed[*]})"
    else
        pass "no node crashed (Docker restarted none)"
    fi
}

# verify_claims ROOM...: reads each room's history through every node and checks it against
# every ledger of the demo; records two claims (the stored history, what clients received).
verify_claims() {
    local rc=0 room args=()
    for room in "$@"; do args+=(--room "$room"); done
    py verify --ledger "$WORK" "${args[@]}" --url 8081 --url 8082 --url 8083 ${VERIFY_QUIET:+--quiet} || rc=$?
    ((rc & 4)) && fail "the history can be read through every node"
    if ((rc & 1)); then fail "$HISTORY_CLAIM"; else pass "$HISTORY_CLAIM"; fi
    if ((rc & 2)); then fail "$DELIVERY_CLAIM"; else pass "$DELIVERY_CLAIM"; fi
    VERIFY_NOTE="history intact"
    ((rc & 1)) && VERIFY_NOTE="HISTORY WRONG"
    ((rc & 4)) && VERIFY_NOTE="$VERIFY_NOTE, HISTORY UNREADABLE"
    if ((rc & 2)); then VERIFY_NOTE+=", a client MISSED messages"; else VERIFY_NOTE+=", every client got every message"; fi
    return 0
}
VERIFY_NOTE="not verified"
HISTORY_CLAIM="no acknowledged message lost or stored twice: each is in the history once, at its acked seq; seqs contiguous from 1; the same history through every node"
DELIVERY_CLAIM="every client received every message once, without a gap, across its reconnects (join with since)"

# --- a demo's life ------------------------------------------------------------------------------

WORK=""
RUN=""
# demo_init NAME: checks the tools, sets up the work directory and the exit trap.
demo_init() {
    DEMO="$1"
    command -v docker >/dev/null || die "docker is required"
    command -v curl >/dev/null || die "curl is required"
    ensure_python
    # Names this run's rooms and message ids: rooms outlive a run in the volumes, so a later run
    # must never reuse one.
    RUN="$(date +%y%m%d%H%M%S)$((RANDOM % 10))$((RANDOM % 10))"
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/chat-demo-$DEMO.XXXXXX")"
    trap demo_exit EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

demo_exit() {
    local status=$?
    local name
    for name in "${!CHATTER_PID[@]}"; do chatter_stop "$name"; done
    if ((status != 0)) && [[ -z "${DEMO_FINISHED:-}" ]]; then
        step "interrupted (status $status): putting the cluster back"
        ensure_cluster 90 || true
    fi
    return "$status"
}

# Prints the figures and claims; writes the one-line summary for demo-all; exits 1 on a failed
# claim. $1: the one-line summary of the figures.
finish() {
    local line="$1" c
    DEMO_FINISHED=1
    step "$DEMO: measured"
    for c in "${FIGURES[@]}"; do say "$c"; done
    step "$DEMO: claims"
    for c in "${CLAIMS[@]}"; do say "$c"; done
    local verdict=PASS
    ((FAILED)) && verdict=FAIL
    if ((FAILED)); then
        say "ledgers and client logs kept in $WORK"
        say "node logs: ${COMPOSE[*]} logs node1 node2 node3"
    elif [[ -n "${KEEP_WORK:-}" ]]; then
        say "ledgers and client logs kept in $WORK (KEEP_WORK is set)"
    else
        rm -rf "$WORK"
    fi
    if [[ -n "${DEMO_SUMMARY_FILE:-}" ]]; then
        printf '%s: %s - %s\n' "$DEMO" "$verdict" "$line" >>"$DEMO_SUMMARY_FILE"
    fi
    printf '\n%s: %s - %s\n' "$DEMO" "$verdict" "$line"
    exit "$FAILED"
}
