#!/bin/sh
# Makes the images imgq builds FROM where no registry serves python:3.11-slim or redis:7 (README, "Deploy"):
#
#   deploy/base-image.sh                 # -> imgq-base:<codename>, and the redis-server .debs for deploy/redis.Dockerfile
#   docker build --network host --build-arg BASE_IMAGE=imgq-base:bookworm ... .
#
# The base is a Debian root file system made with debootstrap (minbase) from the host's own Debian mirror, of
# the host's release, with python3 (>= 3.11 on bookworm), python3-venv and ca-certificates, brought up to date
# from the release's -updates and -security suites, then `docker import`ed. Everything comes from the Debian
# repository the host's apt already uses; the build later needs no network beyond loopback.
#
# Environment: BASE_IMAGE (tag, default imgq-base:<codename>), SUITE (default: the host's codename), MIRROR
# (default: the host's first Debian URI), DEBS_DIR (where the redis .debs go, default build/deploy/redis/debs),
# FORCE=1 rebuilds an image that already exists. Needs root, debootstrap and a running dockerd.
set -eu

. /etc/os-release
SUITE=${SUITE:-${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release: set SUITE}}
BASE_IMAGE=${BASE_IMAGE:-imgq-base:$SUITE}
ROOT_DIR=$(cd "$(dirname "$0")/.." && pwd)
DEBS_DIR=${DEBS_DIR:-$ROOT_DIR/build/deploy/redis/debs}
SOURCES=/etc/apt/sources.list.d/debian.sources
if [ -z "${MIRROR:-}" ]; then
    MIRROR=$(sed -n 's/^URIs:[[:space:]]*\(.*debian\)\/*$/\1/p' "$SOURCES" 2>/dev/null | head -n1)
    MIRROR=${MIRROR:-http://deb.debian.org/debian}
fi

[ "$(id -u)" = 0 ] || { echo "base-image.sh: needs root (debootstrap, chroot)" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "base-image.sh: apt-get install debootstrap" >&2; exit 1; }

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
        && ls "$DEBS_DIR"/redis-server_*.deb >/dev/null 2>&1; then
    echo "base-image.sh: $BASE_IMAGE and $DEBS_DIR exist (FORCE=1 makes them again)"
    exit 0
fi

ROOTFS=$(mktemp -d /var/tmp/imgq-rootfs.XXXXXX)
chmod 755 "$ROOTFS"  # apt downloads as _apt
cleanup() {
    umount "$ROOTFS/proc" 2>/dev/null || true
    rm -rf --one-file-system "$ROOTFS"
}
trap cleanup EXIT INT TERM

echo "base-image.sh: debootstrap $SUITE from $MIRROR into $ROOTFS"
debootstrap --variant=minbase --components=main \
    --include=python3,python3-venv,ca-certificates,passwd \
    "$SUITE" "$ROOTFS" "$MIRROR"

# The host's Debian sources (release, -updates, -security); else the release alone, as debootstrap left it.
if [ -f "$SOURCES" ]; then
    cp "$SOURCES" "$ROOTFS/etc/apt/sources.list.d/debian.sources"
    rm -f "$ROOTFS/etc/apt/sources.list"
fi
# As in Docker's own Debian images: package scripts must not start services inside a build.
printf '#!/bin/sh\nexit 101\n' > "$ROOTFS/usr/sbin/policy-rc.d"
chmod 755 "$ROOTFS/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$ROOTFS/etc/resolv.conf"
mount -t proc proc "$ROOTFS/proc"
chroot "$ROOTFS" sh -ec '
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get -y -qq upgrade
    apt-get clean
    # redis-server and what it needs beyond this base, for deploy/redis.Dockerfile (no apt inside builds).
    apt-get install -y -qq --download-only --no-install-recommends redis-server redis-tools
'
rm -rf "$DEBS_DIR"
mkdir -p "$DEBS_DIR"
mv "$ROOTFS"/var/cache/apt/archives/*.deb "$DEBS_DIR"/
umount "$ROOTFS/proc"

# What an image does not need: package lists (apt-get update brings them back), caches, the build's resolv.conf.
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin "$ROOTFS"/var/cache/apt/archives/partial \
       "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/* "$ROOTFS"/var/tmp/*
: > "$ROOTFS/etc/resolv.conf"

echo "base-image.sh: docker import -> $BASE_IMAGE"
tar --numeric-owner -C "$ROOTFS" -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --message "debootstrap --variant=minbase $SUITE $MIRROR + python3, python3-venv, ca-certificates" \
    - "$BASE_IMAGE"
docker image ls "$BASE_IMAGE"
ls "$DEBS_DIR"
