#!/usr/bin/env bash
# One-step demo: installs what is needed, builds s3backer, and mounts a 1 GiB disk backed by a
# local directory store (test mode: each block is a file), with ext4 on top.
#   bash scripts/demo.sh          # start: prints where everything is
#   bash scripts/demo.sh stop     # unmount everything (data stays in the store directory)
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO="${S3BACKER_DEMO_DIR:-/tmp/s3backer-demo}"
STORE="$DEMO/store" FUSE_MNT="$DEMO/fuse" DATA_MNT="$DEMO/ext4"

stop() {
    mountpoint -q "$DATA_MNT" && umount "$DATA_MNT"
    if mountpoint -q "$FUSE_MNT"; then
        umount "$FUSE_MNT"
        # s3backer flushes after umount returns: wait for the process to finish.
        for _ in $(seq 1 600); do pgrep -f "s3backer.*$FUSE_MNT" >/dev/null || break; sleep 0.1; done
    fi
    echo "demo: unmounted; blocks remain in $STORE"
}
if [ "${1:-}" = stop ]; then stop; exit 0; fi

bash scripts/install-deps.sh
cargo build --release --locked
BIN="$PWD/target/release/s3backer"
mkdir -p "$STORE" "$FUSE_MNT" "$DATA_MNT"
mountpoint -q "$DATA_MNT" && stop

"$BIN" --test --size=1g --blockSize=64k --listBlocks "$STORE" "$FUSE_MNT"
if ! blkid "$FUSE_MNT/file" >/dev/null 2>&1; then
    echo "demo: creating ext4 on $FUSE_MNT/file"
    mkfs.ext4 -q -F -E nodiscard "$FUSE_MNT/file"
fi
mount -o loop,discard "$FUSE_MNT/file" "$DATA_MNT"
echo "demo run at $(date)" >> "$DATA_MNT/hello.txt"
echo "demo: ext4 on s3backer is mounted at $DATA_MNT (blocks stored as files in $STORE)"
df -h "$DATA_MNT" | tail -1
echo "demo: $DATA_MNT/hello.txt keeps one line per run:"
cat "$DATA_MNT/hello.txt"
echo "demo: $(ls "$STORE" | wc -l) non-zero blocks stored; stats: cat $FUSE_MNT/stats"
echo "demo: stop with: bash scripts/demo.sh stop"
