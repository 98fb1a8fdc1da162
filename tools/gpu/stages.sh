#!/usr/bin/env bash
# Sourced by the GPU jobs run in stages (attention.sh, skinny.sh) after `set -u` and setting STAGES and LOG: makes
# $OUT, copies all output to $OUT/$LOG, sources setup.sh, sets fail=0 and defines
#   has NAME   whether stage NAME is in $STAGES
#   step TEXT  prints "== TEXT (seconds since the start)"
OUT=${OUT:?set OUT}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/$LOG") 2>&1
source tools/gpu/setup.sh || true
has() { [[ " $STAGES " == *" $1 "* ]]; }
fail=0
start=$SECONDS
step() { echo "== $1 ($(( SECONDS - start )) s)"; }
