#!/usr/bin/env bash
# Run the transfer benchmark over a rate-limited link: a private network namespace whose
# loopback is shaped with tc (token bucket), so the project's path and plain gRPC both cross
# a link of RATE instead of unshaped loopback. Needs root, iproute2 and tc. Touches nothing
# outside the namespace it creates, and deletes it on exit.
#   usage: sudo benchmarks/shaped_link.sh RATE [transfer_bench args...]
#   e.g.   sudo benchmarks/shaped_link.sh 100mbit --repeats 5 --cache-dir .cache/models
set -euo pipefail
rate=${1:?usage: $0 RATE (e.g. 100mbit, 1gbit) [transfer_bench args...]}
shift
ns="fedbench-$$"
cd "$(dirname "$0")/.."
ip netns add "$ns"
trap 'ip netns del "$ns"' EXIT
ip netns exec "$ns" ip link set lo up
ip netns exec "$ns" tc qdisc add dev lo root tbf rate "$rate" burst 512kb latency 50ms
ip netns exec "$ns" tc qdisc show dev lo
ip netns exec "$ns" .venv/bin/python -m benchmarks.transfer_bench "$@"
