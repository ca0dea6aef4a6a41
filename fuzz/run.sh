#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 20) from its committed seed corpus
# (fuzz/corpus/<target>, never written to: new inputs go to fuzz/target/corpus/<target>).
# Fails on any crash, hang (an input taking > 1 s) or out-of-memory (> 2048 MB); prints
# the number of executions of each target. TARGETS="a b" runs only those.
# Needs the nightly toolchain and cargo-fuzz (scripts/install-deps.sh installs it).
set -euo pipefail
seconds="${1:-20}"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
# Its own target dir whatever the caller uses: the nightly, instrumented build must not
# mix with the product's.
export CARGO_TARGET_DIR="$here/target"
targets="${TARGETS:-$(cargo +nightly fuzz list)}"
cargo +nightly fuzz build --release >/dev/null
failed=0
summary=""
for t in $targets; do
  work="$CARGO_TARGET_DIR/corpus/$t"
  mkdir -p "$work" "$here/artifacts/$t"
  log="$CARGO_TARGET_DIR/fuzz-$t.log"
  set +e
  cargo +nightly fuzz run --release "$t" "$work" "$here/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=1 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$here/artifacts/$t/" >"$log" 2>&1
  rc=$?
  set -e
  execs="$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -1)"
  if [ -z "$execs" ]; then
    execs="$(sed -n 's/^#\([0-9]*\)[[:space:]]*DONE.*/\1/p' "$log" | tail -1)"
  fi
  if [ "$rc" -eq 0 ]; then
    verdict=ok
  else
    verdict="FAILED (exit $rc; log $log, inputs in fuzz/artifacts/$t/)"
    failed=1
    grep -E '^(==[0-9]+==|thread|SUMMARY|ERROR)|panicked|deadly signal|timeout|out-of-memory' "$log" | head -20 >&2 || true
  fi
  line="$(printf 'fuzz %-16s %8ss  executions: %-10s %s' "$t" "$seconds" "${execs:-?}" "$verdict")"
  echo "$line"
  summary="$summary$line"$'\n'
done
printf '%s' "$summary" >"$CARGO_TARGET_DIR/summary.txt"
exit "$failed"
