#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 20) from its committed seed corpus
# (fuzz/corpus/<target>, never written to: new inputs go to fuzz/target/corpus/<target>).
# Fails on any crash, hang (an input taking > 1 s) or out-of-memory (> 2048 MB); prints
# the number of executions of each target. TARGETS="a b" runs only those.
# libFuzzer's timeout is wall-clock time: on a loaded machine (or under `nice`) a fast
# input can be starved past it. FUZZ_TIMEOUT=N raises the limit libFuzzer applies, and
# every timeout it reports is replayed: only an input that takes > 1 s of CPU time is a
# hang; one that replays fast is reported as starved and the target is fuzzed on for
# the rest of its time.
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
  : >"$log"
  total=0
  starved=""
  start=$SECONDS
  while :; do
    left=$((seconds - (SECONDS - start)))
    [ "$left" -gt 0 ] || { rc=0; break; }
    before="$(ls "$here/artifacts/$t/" 2>/dev/null | sort)"
    set +e
    cargo +nightly fuzz run --release "$t" "$work" "$here/corpus/$t" -- \
      -max_total_time="$left" -timeout="${FUZZ_TIMEOUT:-1}" -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$here/artifacts/$t/" >>"$log" 2>&1
    rc=$?
    set -e
    n="$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -1)"
    if [ -z "$n" ]; then
      n="$(sed -n 's/^#\([0-9]*\)[[:space:]]*DONE.*/\1/p' "$log" | tail -1)"
    fi
    total=$((total + ${n:-0}))
    printf 'stat::number_of_executed_units: 0\n' >>"$log"   # this round is counted
    [ "$rc" -ne 0 ] || break
    # A timeout: replay each new timeout input alone, without the fuzzer's load.
    new="$(comm -13 <(echo "$before") <(ls "$here/artifacts/$t/" | sort) | grep '^timeout-' || true)"
    [ -n "$new" ] && grep -q 'libFuzzer: timeout' "$log" || break
    real=0
    for a in $new; do
      # Judged by CPU time (user + system), which load and nice do not stretch: the
      # replay itself may be starved too. libFuzzer's own limit is wall-clock, so it is
      # set far above the second a real hang would burn.
      replayed=0
      /usr/bin/time -o "$CARGO_TARGET_DIR/replay-$t.time" -f '%U %S' \
        "$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/$t" -runs=1 -timeout=120 \
        "$here/artifacts/$t/$a" >/dev/null 2>&1 || replayed=$?
      took="$(tail -1 "$CARGO_TARGET_DIR/replay-$t.time" | awk '{ print $1 + $2 }')"
      # A finding unless it ran cleanly within a second of CPU.
      if [ "$replayed" -ne 0 ] || ! awk -v s="$took" 'BEGIN { exit !(s ~ /^[0-9.]+$/ && s + 0 <= 1) }'; then
        real=1
      else
        # Kept aside (not a finding), so it can be replayed again by hand.
        mkdir -p "$here/artifacts/$t/starved"
        mv "$here/artifacts/$t/$a" "$here/artifacts/$t/starved/"
        starved="$starved $a (${took} CPU-s alone)"
      fi
    done
    [ "$real" -eq 0 ] || break
  done
  execs="$total"
  if [ "$rc" -eq 0 ]; then
    verdict=ok
    [ -z "$starved" ] || verdict="ok (timeouts not reproduced alone, starved by load:$starved)"
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
