#!/usr/bin/env bash
# Benchmark: nightly backups of many small files (an Immich-like thumbnail library) plus
# an SQLite database, agex against the restic binary, for each N in $SCALE_N:
#
#   first     fresh repositories, `restic backup` vs `agex backup --repo scale-restic`
#   second    nothing changed (the nightly run)
#   changed   1 % of the files rewritten
#   dual      restic then borg (the binaries one after the other) vs `agex backup` to both,
#             fresh repositories, first + second backup
#   drill     `agex drill` of agex's Restic snapshot vs `restic restore` of restic's
#
# The tree: N files of 0.5-3.5 KB (half random, half text-like) in 300 directories, and
# an SQLite database of 200,000 rows (dumped fresh by each peer run, streamed by agex).
# Wall times and peak RSS come from /usr/bin/time; every ratio is peer time / agex time
# (>= 1 means agex is as fast or faster). Release build; honours CARGO_TARGET_DIR.
# Needs about 2.5 GB of disk per 500,000 files under /var/tmp.
set -euo pipefail
cd "$(dirname "$0")/.."
for t in restic borg sqlite3 age /usr/bin/time bc python3; do
  command -v "$t" > /dev/null || { echo "missing $t: run scripts/install-deps.sh" >&2; exit 2; }
done
SCALE_N="${SCALE_N:-150000 500000}"

cargo build --release -q -p agex-cli
AGEX="${CARGO_TARGET_DIR:-$PWD/target}/release/agex"
base="$(mktemp -d /var/tmp/agex-bench-scale.XXXXXX)"
chmod 755 "$base"
trap 'rm -rf "$base"' EXIT
age-keygen -o "$base/admin.txt" 2> /dev/null
admin_pub="$(age-keygen -y "$base/admin.txt")"

measure() { # $1 = label, rest = command (run by bash -c); sets WALL[label], RSS[label] (MiB)
  local label="$1"
  shift
  # The same warm page cache for every command: these machines reclaim idle page cache
  # within a minute (DAMON), so a warm-up at the start would favour whoever runs first.
  find "$src" -type f -exec cat {} + > /dev/null
  sync
  if ! /usr/bin/time -o "$work/time.out" -f '%e %M %U %S' bash -c "$*" > /dev/null 2> "$work/cmd.err"; then
    echo "$label failed:" >&2
    tail -20 "$work/cmd.err" >&2
    exit 1
  fi
  read -r wall rss user sys < <(tail -1 "$work/time.out")
  WALL[$label]="$wall"
  RSS[$label]="$((rss / 1024))"
  # CPU (user + system) too: on a shared machine it says more than wall time alone.
  printf '  %-28s %8.2fs %6d MiB %8.2fs CPU  (load %s)\n' "$label" "$wall" "$((rss / 1024))" \
    "$(echo "$user + $sys" | bc -l)" "$(cut -d' ' -f1 /proc/loadavg)"
}
ratio() { echo "$1 / $2" | bc -l; }

for N in $SCALE_N; do
  declare -A WALL=() RSS=()
  work="$base/n$N"
  root="$work/root"
  src="$root/srv/scale"
  mkdir -p "$src/files" "$src/db" "$work/cfg/secrets" "$work/cfg/policies" "$work/repos"
  echo "N=$N: generating $N files in 300 directories and an SQLite database ..."
  python3 - "$src/files" "$N" <<'PY'
import os, random, sys
base, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(42)
words = [os.urandom(5).hex() for _ in range(2048)]
for d in range(300):
    os.makedirs(os.path.join(base, f"d{d:03}"), exist_ok=True)
for i in range(n):
    size = rng.randint(512, 3584)
    data = os.urandom(size) if i % 2 else (" ".join(rng.choice(words) for _ in range(size // 11))).encode()[:size]
    with open(os.path.join(base, f"d{i % 300:03}", f"t{i}.webp"), "wb") as f:
        f.write(data)
PY
  sqlite3 "$src/db/app.db" "PRAGMA journal_mode=WAL;
    CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, body BLOB);
    WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 200000)
    INSERT INTO items SELECT n, 'item ' || n, randomblob(200) FROM g;" > /dev/null

  cd "$work/cfg"
  cat > agex.toml <<TOML
[keys]
admin = "$admin_pub"
[groups]
admins = ["admin"]
recovery = ["admin"]
[hosts.bench]
key = "$admin_pub"
[repositories.scale-restic]
kind = "restic"
url = "$work/repos/agex-restic"
password_secret = "restic-password"
[repositories.scale-borg]
kind = "borg"
url = "$work/repos/agex-borg"
password_secret = "borg-passphrase"
TOML
  cat > secrets/secrets.toml <<'TOML'
[secrets.restic-password]
recipients = ["admins", "recovery", "bench"]
backup_password = true
generator = { kind = "password", length = 40 }
[secrets.borg-passphrase]
recipients = ["admins", "recovery", "bench"]
backup_password = true
generator = { kind = "password", length = 40 }
TOML
  cat > policies/scale.toml <<'TOML'
paths = ["/srv/scale/files"]
[[databases]]
kind = "sqlite"
path = "/srv/scale/db/app.db"
TOML
  agex() { "$AGEX" -C "$work/cfg" --root "$root" --host bench -i "$base/admin.txt" "$@"; }
  agex generate > /dev/null
  (umask 077 && age -d -i "$base/admin.txt" secrets/restic-password.age > "$work/restic.pass" &&
    age -d -i "$base/admin.txt" secrets/borg-passphrase.age > "$work/borg.pass")
  export RESTIC_PASSWORD_FILE="$work/restic.pass" RESTIC_CACHE_DIR="$work/restic-cache"
  export BORG_PASSCOMMAND="cat $work/borg.pass" BORG_BASE_DIR="$work/borg-base"
  export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=no BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
  agex_cmd="'$AGEX' -C '$work/cfg' --root '$root' --host bench -i '$base/admin.txt'"
  dumps="$work/dumps"
  restic_run="rm -rf '$dumps' && mkdir -p '$dumps' && sqlite3 '$src/db/app.db' \".backup '$dumps/app.sqlite3'\" && restic -r"
  restic_run_tail="backup -q '$src/files' '$dumps'"
  borg_run="borg create --compression zstd,3"

  restic -r "$work/repos/restic" init -q > /dev/null
  agex repo init scale-restic > /dev/null
  echo "N=$N:"
  measure "restic first" "$restic_run '$work/repos/restic' $restic_run_tail"
  measure "agex first" "$agex_cmd backup --service scale --repo scale-restic"
  measure "restic second" "$restic_run '$work/repos/restic' $restic_run_tail"
  measure "agex second" "$agex_cmd backup --service scale --repo scale-restic"
  python3 - "$src/files" "$N" <<'PY'
import os, random, sys
base, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
for i in rng.sample(range(n), n // 100):
    with open(os.path.join(base, f"d{i % 300:03}", f"t{i}.webp"), "wb") as f:
        f.write(os.urandom(rng.randint(512, 3584)))
PY
  measure "restic changed" "$restic_run '$work/repos/restic' $restic_run_tail"
  measure "agex changed" "$agex_cmd backup --service scale --repo scale-restic"

  # Both repositories: fresh ones for each side.
  restic -r "$work/repos/seq-restic" init -q > /dev/null
  borg init --encryption=repokey-blake2 "$work/repos/seq-borg" 2> /dev/null
  sed -i "s#$work/repos/agex-restic#$work/repos/dual-restic#; s#$work/repos/agex-borg#$work/repos/dual-borg#" agex.toml
  agex repo init scale-restic > /dev/null
  agex repo init scale-borg > /dev/null
  seq_cmd="$restic_run '$work/repos/seq-restic' $restic_run_tail && $borg_run '$work/repos/seq-borg::scale-{now:%Y-%m-%dT%H:%M:%S.%f}' '$src/files' '$dumps'"
  measure "restic+borg first" "$seq_cmd"
  measure "agex both first" "$agex_cmd backup --service scale"
  measure "restic+borg second" "$seq_cmd"
  measure "agex both second" "$agex_cmd backup --service scale"

  # Drill of the last Restic snapshot vs restic restoring restic's own.
  sed -i "s#$work/repos/dual-restic#$work/repos/agex-restic#; s#$work/repos/dual-borg#$work/repos/agex-borg#" agex.toml
  rm -rf "$work/restored"
  measure "restic restore" "restic -r '$work/repos/restic' restore latest --target '$work/restored'"
  rm -rf "$work/restored"
  measure "agex drill" "$agex_cmd drill --service scale --repo scale-restic"
  manifest_bytes="$(restic -r "$work/repos/restic" --no-cache ls latest > /dev/null 2>&1; \
    "$AGEX" -C "$work/cfg" --root "$root" --host bench -i "$base/admin.txt" restore --service scale \
      --repo scale-restic --to "$work/restored" > /dev/null 2>&1; \
    stat -c %s "$work/restored/var/lib/agex/dumps/scale/manifest.json")"
  rm -rf "$work/restored"
  cd - > /dev/null

  printf 'N=%d manifest: %d bytes (%d per 100,000 files)\n' "$N" "$manifest_bytes" "$((manifest_bytes * 100000 / N))"
  for k in first second changed; do
    printf 'N=%d peak RSS %s: agex %d MiB, restic %d MiB\n' "$N" "$k" "${RSS[agex $k]}" "${RSS[restic $k]}"
  done
  printf 'N=%d peak RSS dual: agex %d MiB, restic+borg %d MiB\n' "$N" \
    "$(( ${RSS[agex both first]} > ${RSS[agex both second]} ? ${RSS[agex both first]} : ${RSS[agex both second]} ))" \
    "$(( ${RSS[restic+borg first]} > ${RSS[restic+borg second]} ? ${RSS[restic+borg first]} : ${RSS[restic+borg second]} ))"
  printf 'N=%d peak RSS drill: agex %d MiB, restic restore %d MiB\n' "$N" "${RSS[agex drill]}" "${RSS[restic restore]}"
  printf 'N=%d ratio scale first: %.2f\n' "$N" "$(ratio "${WALL[restic first]}" "${WALL[agex first]}")"
  printf 'N=%d ratio scale second: %.2f\n' "$N" "$(ratio "${WALL[restic second]}" "${WALL[agex second]}")"
  printf 'N=%d ratio scale changed: %.2f\n' "$N" "$(ratio "${WALL[restic changed]}" "${WALL[agex changed]}")"
  printf 'N=%d ratio scale dual: %.2f\n' "$N" \
    "$(ratio "$(echo "${WALL[restic+borg first]} + ${WALL[restic+borg second]}" | bc -l)" \
      "$(echo "${WALL[agex both first]} + ${WALL[agex both second]}" | bc -l)")"
  printf 'N=%d ratio scale drill: %.2f (agex drill time / restic restore time; the target is <= 1.5)\n' "$N" \
    "$(ratio "${WALL[agex drill]}" "${WALL[restic restore]}")"
  rm -rf "$work"
done
