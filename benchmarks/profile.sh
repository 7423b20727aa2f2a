#!/bin/sh
# Profile zdproxy's data path: wrk drives 1 KiB GET keep-alive at c=50 while py-spy
# samples the proxy. Writes benchmarks/results/profile.svg (flame graph),
# profile.raw.txt (collapsed stacks) and profile-top.txt (hottest functions).
# Extra arguments go to run.py, e.g. --profile-duration 30 --zdproxy-cmd zdproxy
set -eu
exec python3 "$(dirname "$0")/run.py" --profile "$@"
