#!/usr/bin/env bash
# Run a command inside the Debian sid chroot that tools/make-sid-chroot.sh
# makes (Python 3.14 and 3.15 with their -dev and -venv packages, gcc).
#
#   tools/in-sid-chroot.sh COMMAND [ARG ...]
#   e.g. tools/in-sid-chroot.sh python3.14 -m venv .ci-venvs/3.14
#
# The chroot is made first if it is not there yet (or not complete).  Then,
# in a private mount namespace (so every mount goes away with the command and
# none is left behind to trip a later `rm -rf` of the chroot), it binds
# /proc, /dev and /sys, this checkout at the same path (so relative and
# absolute paths under it mean the same inside and out; a git worktree's
# repository too, wherever it is), and the local directories that the host's
# pip configuration points at (find-links, file:// indexes), read-only.  Before each run it copies the host's CA
# bundle, pip configuration, resolv.conf and hosts in, so that pip and apt
# inside reach what they reach outside; PIP_* variables pass through.  The
# command runs as root in the current directory if that is under the
# checkout, else in /.
#
# MEMLIMITS_SID_CHROOT: the chroot directory (default .ci-chroot/sid in this
# checkout).  Needs root, unshare and chroot (util-linux, coreutils).
#
# --setup (used by make-sid-chroot.sh): do not check that the chroot is
# complete, and do not make it.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
root=${MEMLIMITS_SID_CHROOT:-$repo/.ci-chroot/sid}

setup=0
if [ "${1:-}" = --setup ]; then
    setup=1
    shift
fi

if [ "${1:-}" = --inside-namespace ]; then
    # Second stage, in the private mount namespace: mount, then chroot.
    shift
    mount --rbind /proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount --rbind /sys "$root/sys"
    mkdir -p "$root$repo"
    mount --bind "$repo" "$root$repo"
    if [ -n "${MEMLIMITS_SID_CHROOT_GIT:-}" ]; then
        mkdir -p "$root$MEMLIMITS_SID_CHROOT_GIT"
        mount --bind "$MEMLIMITS_SID_CHROOT_GIT" "$root$MEMLIMITS_SID_CHROOT_GIT"
    fi
    unset MEMLIMITS_SID_CHROOT_GIT
    while IFS= read -r dir; do
        [ -n "$dir" ] || continue
        mkdir -p "$root$dir"
        mount --bind "$dir" "$root$dir"
        mount -o remount,bind,ro "$root$dir"
    done <<<"${MEMLIMITS_SID_CHROOT_BINDS:-}"
    unset MEMLIMITS_SID_CHROOT_BINDS
    workdir=/
    case $PWD/ in
        "$repo"/*) workdir=$PWD ;;
    esac
    # The host's PATH, virtualenv and Python variables mean nothing inside.
    # shellcheck disable=SC2016  # expanded by the inner shell
    exec chroot "$root" /usr/bin/env -u VIRTUAL_ENV -u PYTHONHOME -u PYTHONPATH \
        -u PYENV_VERSION -u LD_PRELOAD -u LD_LIBRARY_PATH \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 \
        /bin/sh -c 'cd "$1" && shift && exec "$@"' sh "$workdir" "$@"
fi

if [ $# -eq 0 ]; then
    echo "usage: tools/in-sid-chroot.sh COMMAND [ARG ...]" >&2
    exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "in-sid-chroot: needs root (chroot, mounts)" >&2
    exit 1
fi
if [ "$setup" -eq 0 ]; then
    # Fast when the chroot is complete (it only checks the stamp).
    "$repo/tools/make-sid-chroot.sh" >&2
fi

# Host configuration that pip and apt need, copied fresh on every run so that
# the chroot follows the host's (a copy, not a bind: the chroot's own
# ca-certificates package must not write through to the host).
copy_in() {
    local src=$1
    [ -e "$src" ] || return 0
    # Unchanged: leave it, so that a command running in the chroot meanwhile
    # never finds it half copied.
    if diff -r -q "$src" "$root$src" >/dev/null 2>&1; then
        return 0
    fi
    mkdir -p "$root$(dirname "$src")"
    rm -rf "${root:?}$src"
    cp -rL "$src" "$root$src" 2>/dev/null || cp -r "$src" "$root$src"
}
for path in /etc/ssl/certs /etc/pip.conf /etc/xdg/pip "$HOME/.config/pip" "$HOME/.pip" \
    /etc/resolv.conf /etc/hosts; do
    copy_in "$path"
done
for var in PIP_CERT REQUESTS_CA_BUNDLE SSL_CERT_FILE PIP_CONSTRAINT PIP_CONFIG_FILE; do
    value=${!var:-}
    if [ -n "$value" ] && [ -f "$value" ]; then
        copy_in "$value"
    fi
done

# Local directories named by the host's pip configuration or PIP_* variables
# (find-links, file:// indexes): bound read-only at the same path, so that
# pip inside finds what pip outside finds.
pip_config=""
for py in python3 "$repo/.venv/bin/python"; do
    if pip_config=$("$py" -m pip config list 2>/dev/null); then
        break
    fi
done
binds=$(
    {
        printf '%s\n' "$pip_config"
        env | grep '^PIP_' || true
    } | tr " '\"=," '[\n*]' |
        # An index's pages link to files beside its simple/ directory
        # (../../files/...): bind the directory above a file:// index.
        sed -n 's|^file://\(/.*[^/]\)/*$|\1/..|; \|^/|p' |
        while IFS= read -r path; do
            case $path in
                */..) dirname "${path%/..}" ;;
                *) echo "$path" ;;
            esac
        done | sort -u |
        while IFS= read -r path; do
            path=${path%/}
            case $path in
                /etc/* | /proc/* | /dev/* | /sys/* | "$repo" | "$repo"/*) continue ;;
            esac
            if [ -d "$path" ]; then
                echo "$path"
            fi
        done
)
export MEMLIMITS_SID_CHROOT_BINDS=$binds
# A git worktree's repository lies outside it: bind that too, so that git
# (tools/check-native.sh lists the working tree with it) works inside.
git_dir=$(git -C "$repo" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
case $git_dir in
    "" | "$repo"/*) git_dir="" ;;
esac
export MEMLIMITS_SID_CHROOT_GIT=$git_dir
export MEMLIMITS_SID_CHROOT=$root
exec unshare --mount --propagation private -- "$0" --inside-namespace "$@"
