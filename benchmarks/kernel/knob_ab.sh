#!/usr/bin/env bash
# Run-time knobs of the CUDA backend against each other on one binary and one GPU:
# `bench_lasp2 T H D B dtype mode fb` for every configuration, alternating, ROUNDS times per
# shape, one line per run with the eager forward, the forward replayed from a CUDA graph
# and fwd + bwd replayed from a graph (ms, x memory floor).
#   benchmarks/kernel/knob_ab.sh "" "LASP2_CUDA_PDL=1" "LASP2_CUDA_STATE_STAGES=4" ...
# A configuration is a space-separated list of NAME=value ("" = the defaults).
# SHAPES="T,H,D,B,dtype,mode ..." (default: 64K gates, 4K x B = 8 gates, 64K fixed),
# ROUNDS (default 2), BIN (default .carry/bin/bench_lasp2, from build_carry.sh).
set -u
cd "$(dirname "$0")/../.."
BIN=${BIN:-.carry/bin/bench_lasp2}
SHAPES=${SHAPES:-"65536,16,128,1,bf16,gate 4096,16,128,8,bf16,gate 65536,16,128,1,bf16,fixed"}
[ $# -gt 0 ] || set -- ""
for s in $SHAPES; do
  for r in $(seq "${ROUNDS:-2}"); do
    for c in "$@"; do
      line=$(env $c timeout 60 "$BIN" ${s//,/ } fb 2>&1 |
             grep -E '^lasp2_forward|^fwd\+bwd \(graph\)' |
             awk '{for (i = 1; i <= NF && $i !~ /^[0-9.]+$/; ++i) name = (i == 1 ? $i : name " " $i);
                   printf "%s %s ms (%sx) | ", name, $i, $(i + 2)}')
      echo "${s//,/ } r$r [${c:-default}]: $line"
    done
  done
done
