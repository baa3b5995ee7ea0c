#!/bin/bash
# The throughput workload on collective.js 0.3.1, for docs/performance.rst's comparison:
#   NODE_PATH=<dir holding collective/> benchmarks/collectivejs/run.sh N K BASE_PORT
# starts N members on BASE_PORT.. (loopback), each writing K keys w<i>.<j> from one start time,
# and prints each member's seconds until it held all N*K and the cluster-wide sets/s. npm's
# registry no longer serves `collective`: use a checkout of github.com/arch1t3ct/collective.js
# at its 0.3.1 commit placed as <dir>/collective (see docs/benchmarks.rst).
set -eu
n=$1; k=$2; base=$3
here=$(dirname "$0")
out=$(mktemp -d)
start=$(( $(date +%s%3N) + 3000 ))
for i in $(seq 0 $((n-1))); do node "$here/member.js" "$i" "$n" "$k" "$start" "$base" > "$out/$i" & done
wait
python3 - "$out" "$n" "$k" <<'PY'
import json, sys
out, n, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seconds = [json.loads(open(f"{out}/{i}").readline())["seconds"] for i in range(n)]
if None in seconds:
    print("members", seconds, "INCOMPLETE")
else:
    print("members", seconds, f"all hold all; {n * k / max(seconds):,.0f} sets/s")
PY
rm -rf "$out"
