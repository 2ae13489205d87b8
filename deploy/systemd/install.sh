#!/usr/bin/env bash
# Bare-metal installer for the Agent Mesh node agent (systemd).
#
#   install.sh check     [--root DIR]
#   install.sh install   [--root DIR] [--binary PATH] [--no-start]
#   install.sh uninstall [--root DIR] [--keep-config]
#
# check      verifies that this machine can run the agent: kernel >= 5.8, BTF at
#            /sys/kernel/btf/vmlinux, a cgroup2 mount (from /proc/self/mountinfo) and bpffs;
#            every shortfall is explained with its fix. It looks at the running kernel
#            whatever --root says.
# install    copies the binary to ROOT/usr/local/bin/mesh-agent, the configuration to
#            ROOT/etc/agent-mesh/ (agent.yaml and policies/; an existing file is never
#            overwritten) and the units to ROOT/etc/systemd/system/ (mesh-agent.service, and
#            mesh-agent-ca.service for the CA signer, installed but not enabled). Every
#            path it creates is listed in ROOT/var/lib/agent-mesh/installed. It enables and
#            starts mesh-agent.service only when ROOT is /, systemd is running, the checks
#            pass and --no-start is not given. Running it again upgrades the binary and units.
# uninstall  stops and disables the service (ROOT=/ with systemd), detaches capture with
#            `mesh-agent detach` when the binary and pins exist (in another ROOT: only pins
#            under that ROOT), then removes exactly the paths the manifest lists (directories
#            only when empty) and the manifest itself. --keep-config keeps ROOT/etc/agent-mesh.
#
# Options:   --root DIR     install below DIR instead of / (packaging, tests); default /
#            --binary PATH  mesh-agent binary to install; default: target/release/mesh-agent of
#                           the repository this script is in, else mesh-agent on PATH
#            --no-start     install without enabling or starting the service
#
# Exit codes: 0 success; 1 failure (a step failed, e.g. copying, or detach failed, which
#             stops uninstall before anything is removed); 2 usage error; 3 check found a
#             problem (check only); 4 needs root (installing to / or uninstalling from /).
set -euo pipefail

readonly EXIT_FAILURE=1 EXIT_USAGE=2 EXIT_CHECK=3 EXIT_ROOT=4
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR
readonly REPO_DIR="$SCRIPT_DIR/../.."
readonly CONFIG_SOURCE="$SCRIPT_DIR/../config"
readonly UNITS=(mesh-agent.service mesh-agent-ca.service)
readonly MANIFEST_REL="var/lib/agent-mesh/installed"
readonly DEFAULT_PIN_DIR="/sys/fs/bpf/agent-mesh"
readonly MIN_KERNEL_MAJOR=5 MIN_KERNEL_MINOR=8

say() { printf 'install.sh: %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() {
    local code=$1
    shift
    printf 'install.sh: error: %s\n' "$*" >&2
    exit "$code"
}
usage() {
    sed -n '3,5p' "${BASH_SOURCE[0]}" | sed 's/^# */usage: /' >&2
    exit "$EXIT_USAGE"
}

# ---------------------------------------------------------------------------------- arguments
[[ $# -ge 1 ]] || usage
COMMAND=$1
shift
ROOT=/
BINARY=""
NO_START=false
KEEP_CONFIG=false
while [[ $# -gt 0 ]]; do
    case $1 in
        --root)
            [[ $# -ge 2 ]] || die "$EXIT_USAGE" "--root needs a directory"
            ROOT=$2
            shift 2
            ;;
        --binary)
            [[ $# -ge 2 ]] || die "$EXIT_USAGE" "--binary needs a path"
            BINARY=$2
            shift 2
            ;;
        --no-start)
            NO_START=true
            shift
            ;;
        --keep-config)
            KEEP_CONFIG=true
            shift
            ;;
        -h | --help) usage ;;
        *) die "$EXIT_USAGE" "unknown argument '$1' (see --help)" ;;
    esac
done
case $COMMAND in
    check | install | uninstall) ;;
    -h | --help | help) usage ;;
    *) die "$EXIT_USAGE" "unknown command '$COMMAND': use install, uninstall or check" ;;
esac
[[ -d $ROOT ]] || die "$EXIT_USAGE" "--root $ROOT is not a directory"
ROOT="$(cd "$ROOT" && pwd -P)"
# $ROOT/relative/path without a double slash when ROOT is /.
under_root() { if [[ $ROOT == / ]]; then printf '/%s' "$1"; else printf '%s/%s' "$ROOT" "$1"; fi; }
MANIFEST="$(under_root "$MANIFEST_REL")"
readonly MANIFEST

systemd_running() { [[ -d /run/systemd/system ]] && command -v systemctl > /dev/null; }

# ---------------------------------------------------------------------------------- check
check_failed=0
check_ok() { say "ok:   $*"; }
check_bad() {
    check_failed=1
    say "FAIL: $1"
    shift
    local line
    for line in "$@"; do say "      fix: $line"; done
}

# Mount point of the first mount of a filesystem type, from /proc/self/mountinfo (the type is
# the first field after the " - " separator; the mount point is field 5).
mount_of_type() {
    awk -v fstype="$1" '{
        for (i = 7; i <= NF; i++) if ($i == "-") { if ($(i + 1) == fstype) { print $5; exit } break }
    }' /proc/self/mountinfo
}

run_checks() {
    check_failed=0
    local release major minor
    release="$(uname -r)"
    major="${release%%.*}"
    minor="${release#*.}"
    minor="${minor%%[!0-9]*}"
    if [[ $major =~ ^[0-9]+$ && $minor =~ ^[0-9]+$ ]] \
        && { ((major > MIN_KERNEL_MAJOR)) || ((major == MIN_KERNEL_MAJOR && minor >= MIN_KERNEL_MINOR)); }; then
        check_ok "kernel $release (>= $MIN_KERNEL_MAJOR.$MIN_KERNEL_MINOR)"
    else
        check_bad "kernel $release is older than $MIN_KERNEL_MAJOR.$MIN_KERNEL_MINOR (CAP_BPF, cgroup socket programs and BPF links need it)" \
            "upgrade the kernel: Debian 11+, Ubuntu 20.10+ and RHEL 9 ship a new enough one"
    fi

    if [[ -r /sys/kernel/btf/vmlinux ]]; then
        check_ok "kernel BTF at /sys/kernel/btf/vmlinux"
    else
        check_bad "no kernel BTF at /sys/kernel/btf/vmlinux (the kernel was built without CONFIG_DEBUG_INFO_BTF)" \
            "use a distribution kernel with BTF, or rebuild with CONFIG_DEBUG_INFO_BTF=y"
    fi

    local cgroup2
    cgroup2="$(mount_of_type cgroup2)"
    if [[ -n $cgroup2 ]]; then
        check_ok "cgroup2 mounted at $cgroup2"
    else
        check_bad "no cgroup2 (unified hierarchy) mount in /proc/self/mountinfo" \
            "boot with systemd.unified_cgroup_hierarchy=1 (cgroup v2), or mount it: mount -t cgroup2 none /sys/fs/cgroup"
    fi

    local bpffs
    bpffs="$(mount_of_type bpf)"
    if [[ -n $bpffs ]]; then
        check_ok "bpffs mounted at $bpffs"
    elif grep -qw bpf /proc/filesystems 2> /dev/null; then
        check_ok "bpffs supported but not mounted (mesh-agent.service mounts it at /sys/fs/bpf; by hand: mount -t bpf bpf /sys/fs/bpf)"
    else
        check_bad "the kernel has no bpf filesystem (CONFIG_BPF_SYSCALL is off)" \
            "use a kernel built with CONFIG_BPF_SYSCALL=y and CONFIG_CGROUP_BPF=y"
    fi

    local config="/boot/config-$release"
    if [[ -r $config ]]; then
        if grep -q '^CONFIG_CGROUP_BPF=y' "$config"; then
            check_ok "CONFIG_CGROUP_BPF=y ($config)"
        else
            check_bad "CONFIG_CGROUP_BPF is not set in $config (cgroup socket programs)" \
                "use a kernel built with CONFIG_CGROUP_BPF=y"
        fi
    fi

    if systemd_running; then
        check_ok "systemd is running"
    else
        say "note: systemd is not running here: install copies files but cannot start the service"
    fi
    return "$check_failed"
}

# ---------------------------------------------------------------------------------- manifest
# Paths are recorded relative to ROOT, one a line, in creation order, each once.
declare -A RECORDED=()
load_manifest() {
    if [[ -f $MANIFEST ]]; then
        local path
        while IFS= read -r path; do
            [[ -n $path ]] && RECORDED[$path]=1
        done < "$MANIFEST"
    fi
}
record() {
    local rel=$1
    if [[ -z ${RECORDED[$rel]:-} ]]; then
        RECORDED[$rel]=1
        printf '%s\n' "$rel" >> "$MANIFEST"
    fi
}
# mkdir -p that records every directory it creates.
make_dir() {
    local rel=$1 path="" part
    local -a parts
    IFS=/ read -ra parts <<< "$rel"
    for part in "${parts[@]}"; do
        [[ -z $part ]] && continue
        path="${path:+$path/}$part"
        if [[ ! -d "$(under_root "$path")" ]]; then
            mkdir -m 0755 "$(under_root "$path")" || die "$EXIT_FAILURE" "cannot create $(under_root "$path")"
            CREATED_DIRS+=("$path")
        fi
    done
}
# Records directories created before the manifest's own directory existed.
flush_created_dirs() {
    local dir
    for dir in "${CREATED_DIRS[@]}"; do record "$dir"; done
    CREATED_DIRS=()
}
CREATED_DIRS=()

# Copies a file (mode $3); with $4 = keep, an existing target is left alone.
copy_file() {
    local source=$1 rel=$2 mode=$3 policy=${4:-replace}
    local target
    target="$(under_root "$rel")"
    if [[ -e $target && $policy == keep ]]; then
        say "kept existing $target"
        return 0
    fi
    local existed=false
    [[ -e $target ]] && existed=true
    install -m "$mode" "$source" "$target" || die "$EXIT_FAILURE" "cannot copy $source to $target"
    if $existed; then say "updated $target"; else say "installed $target"; fi
    record "$rel"
}

# ---------------------------------------------------------------------------------- install
find_binary() {
    if [[ -n $BINARY ]]; then
        [[ -f $BINARY && -x $BINARY ]] || die "$EXIT_USAGE" "--binary $BINARY is not an executable file"
    elif [[ -x $REPO_DIR/target/release/mesh-agent ]]; then
        BINARY="$REPO_DIR/target/release/mesh-agent"
    elif command -v mesh-agent > /dev/null; then
        BINARY="$(command -v mesh-agent)"
    else
        die "$EXIT_USAGE" "no mesh-agent binary: build it (cargo build --release -p mesh-agent) or pass --binary PATH"
    fi
}

do_install() {
    if [[ $ROOT == / && $EUID -ne 0 ]]; then
        die "$EXIT_ROOT" "installing to / needs root (run it with sudo, or use --root DIR)"
    fi
    find_binary
    [[ -f $CONFIG_SOURCE/standalone.yaml ]] || die "$EXIT_FAILURE" "missing $CONFIG_SOURCE/standalone.yaml next to this script"
    local unit
    for unit in "${UNITS[@]}"; do
        [[ -f $SCRIPT_DIR/$unit ]] || die "$EXIT_FAILURE" "missing $SCRIPT_DIR/$unit next to this script"
    done
    # A binary that cannot even parse the shipped configuration is not installed.
    local output
    if ! output="$("$BINARY" --log warn validate --config "$CONFIG_SOURCE/standalone.yaml" 2>&1 > /dev/null)"; then
        printf '%s\n' "$output" >&2
        die "$EXIT_FAILURE" "$BINARY rejects $CONFIG_SOURCE/standalone.yaml: is it a mesh-agent build of this release?"
    fi

    make_dir "$(dirname "$MANIFEST_REL")"
    touch "$MANIFEST"
    load_manifest
    flush_created_dirs
    record "$MANIFEST_REL"

    make_dir usr/local/bin
    make_dir etc/agent-mesh/policies
    make_dir etc/systemd/system
    flush_created_dirs

    copy_file "$BINARY" usr/local/bin/mesh-agent 0755
    copy_file "$CONFIG_SOURCE/standalone.yaml" etc/agent-mesh/agent.yaml 0644 keep
    local policy
    for policy in "$CONFIG_SOURCE"/policies/*; do
        [[ -f $policy ]] || continue
        copy_file "$policy" "etc/agent-mesh/policies/$(basename "$policy")" 0644 keep
    done
    for unit in "${UNITS[@]}"; do
        copy_file "$SCRIPT_DIR/$unit" "etc/systemd/system/$unit" 0644
    done

    if [[ $ROOT != / ]]; then
        say "installed under $ROOT: not starting anything (the service is started only when installing to /)"
        return 0
    fi
    if ! systemd_running; then
        say "systemd is not running: not starting the service (start mesh-agent yourself: $(under_root usr/local/bin/mesh-agent) run --config /etc/agent-mesh/agent.yaml)"
        return 0
    fi
    systemctl daemon-reload
    if $NO_START; then
        say "--no-start: start it with systemctl enable --now mesh-agent.service"
        return 0
    fi
    if ! run_checks > /dev/null; then
        warn "this machine fails the checks ($0 check explains): not starting the service"
        return 0
    fi
    systemctl enable mesh-agent.service
    # restart, not start: a reinstall replaces the running binary.
    systemctl restart mesh-agent.service
    say "mesh-agent.service enabled and started (systemctl status mesh-agent; journalctl -u mesh-agent)"
}

# ---------------------------------------------------------------------------------- uninstall
# spec.datapath.pinDir of the installed configuration (the agent's default when not set).
installed_pin_dir() {
    local config pin=""
    config="$(under_root etc/agent-mesh/agent.yaml)"
    if [[ -f $config ]]; then
        pin="$(sed -n 's/^[[:space:]]*pinDir:[[:space:]]*\([^[:space:]#]*\).*/\1/p' "$config" | head -n 1)"
        pin="${pin%\"}"
        pin="${pin#\"}"
    fi
    printf '%s' "${pin:-$DEFAULT_PIN_DIR}"
}

detach_capture() {
    local binary pin
    binary="$(under_root usr/local/bin/mesh-agent)"
    pin="$(installed_pin_dir)"
    if [[ $ROOT != / ]]; then
        # Never the host's pins from a staging root: only pins that live under ROOT.
        pin="$ROOT$pin"
    fi
    if [[ ! -e $pin ]]; then
        say "no pins at $pin: nothing to detach"
        return 0
    fi
    if [[ ! -x $binary ]]; then
        warn "pins exist at $pin but $binary is gone: detach them with \`mesh-agent detach --pin-dir $pin\`"
        return 0
    fi
    say "detaching capture: $binary detach --pin-dir $pin"
    "$binary" detach --pin-dir "$pin" \
        || die "$EXIT_FAILURE" "mesh-agent detach failed: nothing was removed; fix the cause and run uninstall again (capture is still attached, so enrolled workloads' connections are refused)"
}

stop_services() {
    if [[ $ROOT != / ]]; then
        return 0
    fi
    if ! systemd_running; then
        say "systemd is not running: no service to stop"
        return 0
    fi
    local unit
    for unit in "${UNITS[@]}"; do
        if systemctl is-enabled --quiet "$unit" 2> /dev/null || systemctl is-active --quiet "$unit" 2> /dev/null; then
            say "stopping and disabling $unit"
            systemctl disable --now "$unit" || die "$EXIT_FAILURE" "cannot stop $unit"
        fi
    done
}

is_config_path() { [[ $1 == etc/agent-mesh || $1 == etc/agent-mesh/* ]]; }

do_uninstall() {
    if [[ $ROOT == / && $EUID -ne 0 ]]; then
        die "$EXIT_ROOT" "uninstalling from / needs root (run it with sudo)"
    fi
    if [[ ! -f $MANIFEST ]]; then
        say "nothing to uninstall under $ROOT (no $MANIFEST)"
        return 0
    fi
    local -a paths=()
    local path
    while IFS= read -r path; do
        [[ -z $path ]] && continue
        # The manifest is ours, but check it anyway: relative, no "..", nothing odd.
        if [[ $path == /* || $path == *..* || ! $path =~ ^[A-Za-z0-9._/@+-]+$ ]]; then
            die "$EXIT_FAILURE" "refusing to act on manifest entry '$path' in $MANIFEST"
        fi
        paths+=("$path")
    done < "$MANIFEST"

    stop_services
    detach_capture

    # Files first (newest first), then directories deepest first, then the manifest.
    local i target
    for ((i = ${#paths[@]} - 1; i >= 0; i--)); do
        path=${paths[i]}
        [[ $path == "$MANIFEST_REL" ]] && continue
        $KEEP_CONFIG && is_config_path "$path" && continue
        target="$(under_root "$path")"
        if [[ -L $target || -f $target ]]; then
            rm -f "$target"
            say "removed $target"
        fi
    done
    local -a dirs=()
    for path in "${paths[@]}"; do
        target="$(under_root "$path")"
        [[ -d $target && ! -L $target ]] && dirs+=("$path")
    done
    rm -f "$MANIFEST"
    say "removed $MANIFEST"
    local dir
    while IFS= read -r dir; do
        [[ -z $dir ]] && continue
        $KEEP_CONFIG && is_config_path "$dir" && continue
        target="$(under_root "$dir")"
        if rmdir "$target" 2> /dev/null; then
            say "removed $target/"
        elif [[ -d $target ]]; then
            say "kept $target/: it holds files install did not create"
        fi
    done < <(for dir in "${dirs[@]}"; do printf '%s\n' "$dir"; done | awk -F/ '{ print NF "\t" $0 }' | sort -rn | cut -f2-)

    if [[ $ROOT == / ]] && systemd_running; then
        systemctl daemon-reload
    fi
    say "uninstalled"
}

case $COMMAND in
    check)
        if run_checks; then
            say "this machine can run mesh-agent"
        else
            say "this machine cannot run mesh-agent yet: see the fixes above"
            exit "$EXIT_CHECK"
        fi
        ;;
    install) do_install ;;
    uninstall) do_uninstall ;;
esac
