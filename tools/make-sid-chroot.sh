#!/usr/bin/env bash
# Make (once) a Debian sid chroot with the Pythons that Debian sid carries and
# the host may not: python3.14 and python3.15, each with -dev and -venv (and
# the -dbg build when sid has one), gcc and libc6-dev, so that the extension
# builds and the test suite runs there, and git for tools/check-native.sh.
# tools/in-sid-chroot.sh runs a command inside it.
#
#   tools/make-sid-chroot.sh
#
# Idempotent: when the chroot is complete (its stamp names this recipe) it
# returns at once.  A chroot whose debootstrap finished but whose packages do
# not match the recipe gets the packages installed; one whose debootstrap did
# not finish is removed and made again.  To follow sid's newer packages,
# remove the directory and run this again.
#
# MEMLIMITS_SID_CHROOT: the directory (default .ci-chroot/sid in this
# checkout, which git ignores).  MEMLIMITS_SID_MIRROR: the Debian mirror
# (default http://deb.debian.org/debian).  Needs root; installs debootstrap
# with apt-get if it is missing (Debian and Ubuntu hosts).
#
# The first time takes about 3 minutes on 2 cores (debootstrap, then ~75
# packages; 1.2 GB on disk); after that it returns in a hundredth of a
# second.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
root=${MEMLIMITS_SID_CHROOT:-$repo/.ci-chroot/sid}
mirror=${MEMLIMITS_SID_MIRROR:-http://deb.debian.org/debian}
export MEMLIMITS_SID_CHROOT=$root

# Required packages; the optional ones are installed when sid has them.
# git: tools/check-native.sh copies the working tree by asking git for it.
required=(python3.14 python3.14-dev python3.14-venv
    python3.15 python3.15-dev python3.15-venv gcc libc6-dev git)
# tmux: tests/test_cli.py drives `memlimits-async top PID` in it (3.14's
# sys.remote_exec attach).
optional=(python3.14-dbg python3.15-dbg python3.14-nogil python3.15-nogil tmux)
# Changing either list changes the recipe, and the next run installs the
# difference into the existing chroot.
recipe="recipe 2: ${required[*]} | optional: ${optional[*]}"
stamp=$root/.memlimits-sid-chroot.stamp
bootstrapped=$root/.memlimits-debootstrap.done

complete() {
    [ -f "$stamp" ] && [ "$(head -n 1 "$stamp")" = "$recipe" ]
}
if complete; then
    echo "sid chroot: $root (complete; reused)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "make-sid-chroot: needs root (debootstrap, chroot)" >&2
    exit 1
fi
# One maker at a time (two checkouts or CI runs may share a chroot): the
# others wait, then find it complete.
mkdir -p "$(dirname "$root")"
exec 9>"$root.lock"
flock 9
if complete; then
    echo "sid chroot: $root (complete; made meanwhile)"
    exit 0
fi

start=$SECONDS
if [ ! -f "$bootstrapped" ]; then
    if ! command -v debootstrap >/dev/null; then
        echo "sid chroot: installing debootstrap"
        apt-get update -q
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
    fi
    if [ -e "$root" ]; then
        echo "sid chroot: removing the unfinished $root"
        # Mounts into the chroot live only in the private namespaces of
        # in-sid-chroot.sh; --one-file-system guards against any other.
        rm -rf --one-file-system "${root:?}"
    fi
    mkdir -p "$root"
    echo "sid chroot: debootstrap --variant=minbase sid $root $mirror"
    debootstrap --variant=minbase sid "$root" "$mirror" >"$root.debootstrap.log" 2>&1 || {
        tail -n 30 "$root.debootstrap.log" >&2
        [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
        echo "make-sid-chroot: debootstrap failed (log: $root.debootstrap.log)" >&2
        exit 1
    }
    rm -f "$root.debootstrap.log"
    touch "$bootstrapped"
fi

in_chroot() {
    "$repo/tools/in-sid-chroot.sh" --setup "$@"
}

# Package scripts inside must not start daemons (the host's init is not
# the chroot's): the policy-rc.d convention tells invoke-rc.d so.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
# The mirror may serve a snapshot of sid whose Release file's Valid-Until
# has passed (as this project's machines see it); apt would then refuse it.
# apt still checks the signatures (the host does the same).
cat >"$root/etc/apt/apt.conf.d/99memlimits-snapshot" <<'APT'
Acquire::Check-Valid-Until "false";
Acquire::Check-Date "false";
APT
echo "sid chroot: apt-get update"
in_chroot apt-get update -q
packages=("${required[@]}")
for package in "${optional[@]}"; do
    # apt-cache show succeeds for virtual packages too; a candidate version
    # means something installable.
    if in_chroot apt-cache policy "$package" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        packages+=("$package")
    else
        echo "sid chroot: sid has no $package"
    fi
done
echo "sid chroot: apt-get install ${packages[*]}"
in_chroot env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -q --no-install-recommends "${packages[@]}"
in_chroot apt-get clean

{
    echo "$recipe"
    echo "made $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - start)) s"
    in_chroot dpkg-query -W "${packages[@]}"
} >"$stamp.tmp"
mv "$stamp.tmp" "$stamp"
echo "sid chroot: $root (made in $((SECONDS - start)) s)"
sed -n '3,$p' "$stamp"
