#!/usr/bin/env bash
# Benchmark: one nightly backup of a service (a ~0.6 GB tree of many small files and a
# few large ones, an SQLite database and a PostgreSQL database) to a Restic-format and a
# Borg repository, agex against the peers, all measured in the same run:
#
#   restic alone           dump both databases, `restic backup` tree + dumps
#   agex restic-only       `agex backup --repo bench-restic`
#   borg alone             dump both databases, `borg create` tree + dumps
#   agex borg-only         `agex backup --repo bench-borg`
#   restic+borg            dump once, then restic, then borg (one after the other)
#   borgmatic+restic       the peers' way: borgmatic `create` (its own sqlite/postgresql
#                          hooks), then the restic binary with its own fresh dumps
#   agex both              `agex backup` (both repositories at once, each db dumped once)
#
# Each configuration gets fresh repositories and runs twice: the first backup and a
# second, incremental one of the unchanged tree (the usual nightly case). Wall, CPU
# (user+sys) and peak RSS come from /usr/bin/time. Repositories are local directories,
# compression zstd level 3 on both sides (borg `zstd,3`, restic's default `auto`).
# The last lines are the ratios the issues ask for, from first+second wall times;
# `ratio s3` compares `restic backup` and `agex backup` against a local SeaweedFS, and
# `rss s3` their peak RSS (ONLY=s3 runs that case alone). Needs root (a private
# PostgreSQL cluster run as `postgres`); borgmatic is installed into a venv under
# ~/.cache/agex-bench on first use (pinned to 2.0.13 so runs compare).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench/backup.sh needs root (PostgreSQL cluster as postgres)" >&2; exit 2; }
for t in restic borg sqlite3 age /usr/bin/time bc python3; do
  command -v "$t" > /dev/null || { echo "missing $t: run scripts/install-deps.sh" >&2; exit 2; }
done
PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
SMALL="${SMALL:-24000}"      # small files, 1-32 KiB each
LARGE="${LARGE:-3}"          # large files, LARGE_MB each
LARGE_MB="${LARGE_MB:-80}"

venv="$HOME/.cache/agex-bench/venv"
if [ "${ONLY:-}" != s3 ] && ! "$venv/bin/borgmatic" --version 2> /dev/null | grep -qx 2.0.13; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'borgmatic==2.0.13'
fi
BORGMATIC="$venv/bin/borgmatic"

cargo build --release -q -p agex-cli
AGEX="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/release/agex"   # where cargo built it (CARGO_TARGET_DIR honoured)
work="$(mktemp -d /var/tmp/agex-bench-backup.XXXXXX)"
chmod 755 "$work"
pgdir="$work/pg"
cleanup() {
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$pgdir/data" -m immediate stop > /dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
root="$work/root"
src="$root/srv/bench"
mkdir -p "$src/files" "$src/db" "$work/cfg/secrets" "$work/cfg/policies" "$work/dumps" "$work/repos"

echo "generating data: $SMALL small files, $LARGE × $LARGE_MB MiB, SQLite, PostgreSQL ..."
python3 - "$src/files" "$SMALL" "$LARGE" "$LARGE_MB" <<'PY'
import os, random, sys
base, small, large, large_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(42)
words = [os.urandom(6).hex() for _ in range(4096)]
for i in range(small):
    d = os.path.join(base, f"d{i % 200:03}")
    os.makedirs(d, exist_ok=True)
    size = rng.randint(1024, 32 * 1024)
    # Half text-like (compressible), half random (not), as a real app directory is.
    if i % 2:
        data = os.urandom(size)
    else:
        data = (" ".join(rng.choice(words) for _ in range(size // 12))).encode()[:size]
    with open(os.path.join(d, f"f{i}.dat"), "wb") as f:
        f.write(data)
for i in range(large):
    with open(os.path.join(base, f"large{i}.bin"), "wb") as f:
        for _ in range(large_mb):
            f.write(os.urandom(1 << 20))
PY
sqlite3 "$src/db/app.db" "PRAGMA journal_mode=WAL;
  CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, body BLOB);
  WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < 200000)
  INSERT INTO items SELECT n, 'item ' || n, randomblob(200) FROM g;" > /dev/null
mkdir -p "$pgdir"
chown postgres "$pgdir"
runuser -u postgres -- "$PGBIN/initdb" -A trust -D "$pgdir/data" > /dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$pgdir/data" -l "$pgdir/log" -w \
  -o "-k $pgdir -c listen_addresses=''" start > /dev/null
runuser -u postgres -- "$PGBIN/createdb" -h "$pgdir" bench
runuser -u postgres -- psql -X -q -h "$pgdir" -d bench -c \
  "CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz, payload text);
   INSERT INTO events SELECT g, now() - g * interval '1 minute', md5(g::text) || repeat('x', 150)
   FROM generate_series(1, 300000) g;" > /dev/null
mkdir -p "$root/run"
ln -s "$pgdir" "$root/run/postgresql"
echo "tree: $(du -sh "$src/files" | cut -f1), sqlite: $(du -sh "$src/db/app.db" | cut -f1), postgres: $(runuser -u postgres -- psql -X -At -h "$pgdir" -d bench -c "SELECT pg_size_pretty(pg_database_size('bench'))")"

# agex's configuration: one host, two repositories, one policy.
cd "$work/cfg"
age-keygen -o "$work/admin.txt" 2> /dev/null
admin_pub="$(age-keygen -y "$work/admin.txt")"
repo_url() { echo "$work/repos/$1"; }
write_config() { # $1 = restic repo dir name, $2 = borg repo dir name
  cat > agex.toml <<TOML
[keys]
admin = "$admin_pub"
[groups]
admins = ["admin"]
recovery = ["admin"]
[hosts.bench]
key = "$admin_pub"
[repositories.bench-restic]
kind = "restic"
url = "$(repo_url "$1")"
password_secret = "restic-password"
[repositories.bench-borg]
kind = "borg"
url = "$(repo_url "$2")"
password_secret = "borg-passphrase"
TOML
}
write_config agex-restic agex-borg
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
cat > policies/bench.toml <<'TOML'
paths = ["/srv/bench/files"]
[[databases]]
kind = "sqlite"
path = "/srv/bench/db/app.db"
[[databases]]
kind = "postgres"
database = "bench"
socket = "/run/postgresql"
user = "postgres"
TOML
agex() { "$AGEX" -C "$work/cfg" --root "$root" --host bench -i "$work/admin.txt" "$@"; }
agex generate > /dev/null
umask 077
age -d -i "$work/admin.txt" secrets/restic-password.age > "$work/restic.pass"
age -d -i "$work/admin.txt" secrets/borg-passphrase.age > "$work/borg.pass"
umask 022
export RESTIC_PASSWORD_FILE="$work/restic.pass"
export BORG_PASSCOMMAND="cat $work/borg.pass"
export BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK=no BORG_RELOCATED_REPO_ACCESS_IS_OK=yes
export BORG_BASE_DIR="$work/borg-base"

cat > "$work/borgmatic.yaml" <<YAML
source_directories:
  - $src/files
repositories:
  - path: $(repo_url borgmatic)
    label: bench
encryption_passcommand: cat $work/borg.pass
compression: zstd,3
archive_name_format: 'bench-{now:%Y-%m-%dT%H:%M:%S.%f}'
sqlite_databases:
  - name: app
    path: $src/db/app.db
postgresql_databases:
  - name: bench
    username: postgres
    format: custom
YAML

# The peers' own dumps, taken fresh by each peer run (what their users script).
peer_dumps() {
  rm -rf "$work/dumps" && mkdir -p "$work/dumps"
  sqlite3 "$src/db/app.db" ".backup '$work/dumps/app.sqlite3'"
  runuser -u postgres -- pg_dump -Fc -h "$pgdir" bench > "$work/dumps/bench.pgdump"
}
restic_run() { peer_dumps && restic -r "$(repo_url "$1")" backup -q "$src/files" "$work/dumps"; }
borg_run() {
  peer_dumps && borg create --compression zstd,3 "$(repo_url "$1")::bench-{now:%Y-%m-%dT%H:%M:%S.%f}" \
    "$src/files" "$work/dumps"
}
export -f peer_dumps restic_run borg_run repo_url
export work src pgdir BORGMATIC

init_restic() { restic -r "$(repo_url "$1")" init -q > /dev/null; }
init_borg() { borg init --encryption=repokey-blake2 "$(repo_url "$1")" 2> /dev/null; }

declare -A WALL CPU RSS
measure() { # $1 = label, rest = command (run by bash -c)
  local label="$1"
  shift
  sync
  cat "$src/files"/d*/* "$src/files"/large* > /dev/null   # same warm cache for everyone
  if ! /usr/bin/time -o "$work/time.out" -f '%e %U %S %M' bash -c "$*" > /dev/null 2> "$work/cmd.err"; then
    echo "$label failed:" >&2
    tail -20 "$work/cmd.err" >&2
    exit 1
  fi
  read -r wall user sys rss < <(tail -1 "$work/time.out")
  WALL[$label]="$wall"
  CPU[$label]="$(echo "$user + $sys" | bc -l)"
  RSS[$label]="$rss"
}
twice() { # $1 = label, rest = command
  local label="$1"
  shift
  measure "$label/1" "$@"
  measure "$label/2" "$@"
}
agex_cmd="'$AGEX' -C '$work/cfg' --root '$root' --host bench -i '$work/admin.txt' backup --service bench"

# ONLY=s3 measures the S3 case alone (restic vs agex against SeaweedFS).
if [ "${ONLY:-}" != s3 ]; then
init_restic restic-alone
twice "restic alone" "restic_run restic-alone"
init_borg borg-alone
twice "borg alone" "borg_run borg-alone"
init_restic seq-restic && init_borg seq-borg
twice "restic+borg" "peer_dumps && restic -r '$(repo_url seq-restic)' backup -q '$src/files' '$work/dumps' && borg create --compression zstd,3 '$(repo_url seq-borg)::bench-{now:%Y-%m-%dT%H:%M:%S.%f}' '$src/files' '$work/dumps'"
init_borg borgmatic && init_restic borgmatic-restic
# borgmatic joins a socket-directory `hostname` onto its dump path and loses it; PGHOST works.
twice "borgmatic+restic" "PGHOST='$pgdir' '$BORGMATIC' -c '$work/borgmatic.yaml' create && restic_run borgmatic-restic"

agex repo init bench-restic > /dev/null
agex repo init bench-borg > /dev/null
twice "agex restic-only" "$agex_cmd --repo bench-restic"
twice "agex borg-only" "$agex_cmd --repo bench-borg"
write_config agex-both-restic agex-both-borg
agex repo init bench-restic > /dev/null
agex repo init bench-borg > /dev/null
twice "agex both" "$agex_cmd"
fi

# S3: the same tree to a local SeaweedFS (scripts/install-deps.sh installs `weed`),
# the restic binary against `agex backup --repo bench-s3`.
weed="${AGEX_WEED:-/opt/agex-test/seaweedfs/bin/weed}"
[ -x "$weed" ] || weed="$(command -v weed || true)"
s3=""
if [ -n "$weed" ]; then
  # A free port whose gRPC companion (weed listens on port + 10000 too) is a port as well.
free_port() { python3 -c '
import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p < 55000: print(p); break'; }
  p_s3=$(free_port) p_m=$(free_port) p_v=$(free_port) p_f=$(free_port) p_i=$(free_port)
  mkdir -p "$work/weed"
  cat > "$work/weed/s3.json" <<'J'
{"identities":[{"name":"bench","credentials":[{"accessKey":"AKIDBENCH","secretKey":"benchsecretkey123"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
J
  "$weed" server -dir="$work/weed" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3 -s3.port="$p_s3" \
    -s3.config="$work/weed/s3.json" -master.port="$p_m" -volume.port="$p_v" -filer.port="$p_f" \
    -iam.port="$p_i" -s3.port.iceberg=0 -s3.port.lance=0 > "$work/weed/log" 2>&1 &
  weed_pid=$!
  trap 'kill "$weed_pid" 2>/dev/null; sleep 2; kill -9 "$weed_pid" 2>/dev/null; cleanup' EXIT
  for _ in $(seq 1 120); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$p_s3/")" = 403 ] && { s3=1; break; }
    sleep 0.5
  done
fi
if [ -n "$s3" ]; then
  export AWS_ACCESS_KEY_ID=AKIDBENCH AWS_SECRET_ACCESS_KEY=benchsecretkey123
  unset AWS_CA_BUNDLE
  s3_url() { echo "s3:http://127.0.0.1:$p_s3/$1"; }
  export -f s3_url
  export p_s3
  restic -r "$(s3_url restic-s3)" init -q > /dev/null
  twice "restic s3" "peer_dumps && restic -r '$(s3_url restic-s3)' backup -q '$src/files' '$work/dumps'"
  cat >> agex.toml <<TOML
[repositories.bench-s3]
kind = "restic"
url = "$(s3_url agex-s3)"
password_secret = "restic-password"
env_secret = "s3-credentials"
TOML
  cat >> secrets/secrets.toml <<'TOML'
[secrets.s3-credentials]
recipients = ["admins", "recovery", "bench"]
backup_password = true
TOML
  printf 'AWS_ACCESS_KEY_ID=AKIDBENCH\nAWS_SECRET_ACCESS_KEY=benchsecretkey123\n' | agex encrypt secrets/s3-credentials.age
  agex repo init bench-s3 > /dev/null
  twice "agex s3" "$agex_cmd --repo bench-s3"
fi

sum() { echo "${WALL[$1/1]} + ${WALL[$1/2]}" | bc -l; }
printf '\n%-18s %9s %9s %9s %9s %9s\n' "" "1st wall" "1st CPU" "2nd wall" "2nd CPU" "RSS MiB"
labels=()
[ "${ONLY:-}" != s3 ] && labels+=("restic alone" "agex restic-only" "borg alone" "agex borg-only" "restic+borg" "borgmatic+restic" "agex both")
[ -n "$s3" ] && labels+=("restic s3" "agex s3")
for l in "${labels[@]}"; do
  rss=$(( (${RSS[$l/1]} > ${RSS[$l/2]} ? ${RSS[$l/1]} : ${RSS[$l/2]}) / 1024 ))
  printf '%-18s %8.2fs %8.2fs %8.2fs %8.2fs %9d\n' "$l" "${WALL[$l/1]}" "${CPU[$l/1]}" "${WALL[$l/2]}" "${CPU[$l/2]}" "$rss"
done
if [ "${ONLY:-}" != s3 ]; then
floor="$(echo "(${CPU[restic alone/1]} + ${CPU[borg alone/1]}) / $(nproc)" | bc -l)"
printf '\nfloor for agex both, 1st backup: (CPU restic + CPU borg) / %d cores = %.2fs\n' "$(nproc)" "$floor"
printf 'ratio restic: %.2f\n' "$(echo "$(sum "restic alone") / $(sum "agex restic-only")" | bc -l)"
printf 'ratio dual: %.2f\n' "$(echo "$(sum "restic+borg") / $(sum "agex both")" | bc -l)"
printf 'ratio peers: %.2f\n' "$(echo "$(sum "borgmatic+restic") / $(sum "agex both")" | bc -l)"
fi
peak() { echo $(( (${RSS[$1/1]} > ${RSS[$1/2]} ? ${RSS[$1/1]} : ${RSS[$1/2]}) / 1024 )); }
if [ -n "$s3" ]; then
  printf 'ratio s3: %.2f\n' "$(echo "$(sum "restic s3") / $(sum "agex s3")" | bc -l)"
  printf 'rss s3: restic %d MiB, agex %d MiB\n' "$(peak "restic s3")" "$(peak "agex s3")"
else
  echo "ratio s3: skipped (no SeaweedFS \`weed\`: run scripts/install-deps.sh)"
fi
