#!/usr/bin/env bash
# Benchmark: restoring one service (a tree of many small files and a few large ones plus
# an SQLite database) from a Restic-format and a Borg repository, agex against the peer
# binaries, measured in the same run:
#
#   agex restore --to (restic)   rustic_core restore + verification against the manifest
#   restic restore (binary)      the same snapshot with the restic binary, no verification
#   agex restore --to (borg)     borg extract + verification against the manifest
#   borg extract (binary)        the same archive with the borg binary, no verification
#   agex drill                   both repositories: restore, verify, clean up (the RTO)
#
# Wall, CPU (user+sys, children included) and peak RSS come from /usr/bin/time. The
# repositories are local directories written by `agex backup`. AGEX=path picks the
# binary (default: a release build, made here).
set -euo pipefail
cd "$(dirname "$0")/.."
for t in restic borg sqlite3 /usr/bin/time python3; do
  command -v "$t" > /dev/null || { echo "missing $t: run scripts/install-deps.sh" >&2; exit 2; }
done
SMALL="${SMALL:-2000}"       # small files, 50 KB each
LARGE="${LARGE:-2}"          # large files, 100 MB each
if [ -z "${AGEX:-}" ]; then
  cargo build --release -q -p agex-cli
  AGEX="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release/agex"   # where cargo built it (CARGO_TARGET_DIR honoured)
fi
work="$(mktemp -d /var/tmp/agex-bench-restore.XXXXXX)"
pass="$(mktemp -d /dev/shm/agex-bench-restore.XXXXXX)"
trap 'rm -rf "$work" "$pass"' EXIT
cfg="$work/config" root="$work/root"
mkdir -p "$cfg/policies" "$root/srv/app/files/small"
cp -r agex.toml secrets examples "$cfg/"
sed -i "s|sftp:u123@storagebox.example:/restic|$work/restic|; s|ssh://u456@borg.example/./repo|$work/borg|; /ssh_key_secret/d" "$cfg/agex.toml"
printf '\n[backup]\nlock_wait = 5\n' >> "$cfg/agex.toml"
cat > "$cfg/policies/app.toml" <<'EOF'
paths = ["/srv/app/files"]
schedule = "*-*-* 03:00:00"

[[databases]]
kind = "sqlite"
path = "/srv/app/app.db"
EOF

echo "generating data: $SMALL × 50 KB, $LARGE × 100 MB, SQLite with 200000 rows ..."
for i in $(seq 1 "$SMALL"); do head -c 50000 /dev/urandom > "$root/srv/app/files/small/f$i"; done
for i in $(seq 1 "$LARGE"); do head -c 100000000 /dev/urandom > "$root/srv/app/files/big$i"; done
sqlite3 "$root/srv/app/app.db" "CREATE TABLE items(id INTEGER PRIMARY KEY, v TEXT);
  WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 200000)
  INSERT INTO items(v) SELECT hex(randomblob(32)) FROM c;"
echo "data: $(du -sh "$root" | cut -f1)"

AG=("$AGEX" -C "$cfg" -i "$cfg/examples/keys/admin.txt" --root "$root")
agex() { "${AG[@]}" "$@"; }
agex repo init offsite-restic > /dev/null
agex repo init offsite-borg > /dev/null
agex backup > /dev/null 2>&1
agex decrypt restic-password > "$pass/restic"
agex decrypt borg-passphrase > "$pass/borg"

measure() {
  local name="$1"; shift
  /usr/bin/time -f "%e %U %S %M" -o "$work/time" "$@" > /dev/null 2>&1
  read -r wall user sys rss < "$work/time"
  printf '%-30s %7.2f s wall %7.2f s cpu %8d KB peak RSS\n' "$name" "$wall" \
    "$(python3 -c "print($user + $sys)")" "$rss"
}
measure "agex restore --to (restic)" "${AG[@]}" restore --service app --repo offsite-restic --to "$work/out1"
measure "restic restore (binary)" restic -r "$work/restic" --password-file "$pass/restic" --no-cache \
  restore latest --target "$work/out2"
measure "agex restore --to (borg)" "${AG[@]}" restore --service app --repo offsite-borg --to "$work/out3"
archive="$(BORG_PASSCOMMAND="cat $pass/borg" borg list --short "$work/borg")"
mkdir -p "$work/out4"
measure "borg extract (binary)" sh -c "cd '$work/out4' && BORG_PASSCOMMAND='cat $pass/borg' borg extract '$work/borg::$archive'"
measure "agex drill (both)" "${AG[@]}" drill
