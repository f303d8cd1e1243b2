#!/usr/bin/env bash
# Builds ftvm and shows every part working on this one machine (root and /dev/kvm needed):
#   1. the bundled self-test guest under KVM;
#   2. the kv guest (a Redis-compatible service) in a VM on a TAP in its own network
#      namespace, driven by stock redis-cli and redis-benchmark from a client namespace,
#      killed with SIGKILL and restarted without losing an acknowledged write;
#   3. a recording of the VM replayed identically;
#   4. the witness granting one node of a pair the right to run alone and refusing the other;
#   5. ftvm-resync bringing a diverged disk image back in line.
# Everything it creates (namespaces ftvmdemo-*, a temp dir) is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup
cargo build --release --workspace
bin=$PWD/target/release
work=$(mktemp -d /tmp/ftvm-demo.XXXXXX)
nsn=ftvmdemo-node nsc=ftvmdemo-client
pids=()
cleanup() {
  for p in "${pids[@]}"; do { kill -9 "$p"; wait "$p"; } 2>/dev/null || true; done
  ip netns del $nsn 2>/dev/null || true
  ip netns del $nsc 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "1. ftvm-node run --solo --guest selftest"
$bin/ftvm-node run --solo --guest selftest

step "2. the kv guest on a TAP in namespace $nsn, clients in $nsc"
ip netns del $nsn 2>/dev/null || true; ip netns del $nsc 2>/dev/null || true
ip netns add $nsn; ip netns add $nsc
for ns in $nsn $nsc; do
  ip netns exec $ns sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1
  ip -n $ns link set lo up
done
ip -n $nsn link add br0 type bridge
ip -n $nsn tuntap add dev tap0 mode tap
ip -n $nsn link add veth0 type veth peer name veth1 netns $nsc
ip -n $nsn link set tap0 master br0; ip -n $nsn link set veth0 master br0
ip -n $nsn addr add 10.213.0.1/24 dev br0
ip -n $nsc addr add 10.213.0.2/24 dev veth1
for l in br0 tap0 veth0; do ip -n $nsn link set $l up; done
ip -n $nsc link set veth1 up
vmargs=(run --solo --guest kv --disk "$work/kv.img" --disk-size 64M --tap tap0
        --mac 52:54:00:d3:00:01 --ip 10.213.0.100/24)
start_kv() {
  ip netns exec $nsn $bin/ftvm-node "${vmargs[@]}" "$@" > "$work/console" 2> "$work/node.log" &
  pids+=($!); kvpid=$!
  for _ in $(seq 100); do grep -q "kv: listening" "$work/console" && break; sleep 0.1; done
  sed 's/^/   console| /' "$work/console"
}
cli() { ip netns exec $nsc redis-cli -h 10.213.0.100 "$@"; }
start_kv
echo "   redis-cli SET demo 'hello from a VM' -> $(cli SET demo 'hello from a VM')"
echo "   redis-cli GET demo -> $(cli GET demo)"
ip netns exec $nsc redis-benchmark -h 10.213.0.100 -q -n 20000 -P 16 -t set,get,lpush,lrange_100 \
  | tr '\r' '\n' | grep "per second" | sed 's/^/   /'
echo "   kill -9 the node, start it again on the same disk:"
kill -9 $kvpid; wait $kvpid 2>/dev/null || true
start_kv
echo "   redis-cli GET demo -> $(cli GET demo); DBSIZE -> $(cli DBSIZE)"

step "3. record the VM, replay the recording"
kill -9 $kvpid; wait $kvpid 2>/dev/null || true
cp "$work/kv.img" "$work/kv-copy.img"
start_kv --record "$work/kv.ftlog"
for i in 1 2 3; do cli INCR counter > /dev/null; done
ip netns exec $nsc redis-benchmark -h 10.213.0.100 -q -n 2000 -t set > /dev/null
kill -TERM $kvpid; wait $kvpid 2>/dev/null || true
grep "^record:" "$work/node.log" | sed 's/^/   /'
$bin/ftvm-node replay --guest kv --log "$work/kv.ftlog" --disk "$work/kv-copy.img" > /dev/null 2> "$work/replay.log" || true
grep "^replay" "$work/replay.log" | sed 's/^/   /'
cmp -s "$work/kv.img" "$work/kv-copy.img" && echo "   the replayed disk is byte-identical to the recorded one"

step "4. the witness settles who may run alone"
$bin/ftvm-witness certs init --dir "$work/tls" --pair demo --nodes node-a,node-b > /dev/null
$bin/ftvm-witness serve --config "$work/tls/witness.toml" --data-dir "$work/witness" --listen 127.0.0.1:0 --init \
  > "$work/witness.out" 2> "$work/witness.log" &
pids+=($!)
for _ in $(seq 100); do grep -q "ready" "$work/witness.out" && break; sleep 0.1; done
waddr=$(sed -n 's/.*listen=\([^ ]*\).*/\1/p' "$work/witness.out")
set +e
$bin/ftvm-witness claim --witness "$waddr" --tls "$work/tls" --node node-a --pair demo --seen 0 | sed 's/^/   node-a granted generation /'
$bin/ftvm-witness claim --witness "$waddr" --tls "$work/tls" --node node-b --pair demo --seen 0 | sed 's/^/   node-b: /'
echo "   (node-b's claim exited ${PIPESTATUS[0]}: 3 means denied)"
set -e

step "5. ftvm-resync brings a diverged disk back in line"
head -c 64M /dev/urandom > "$work/a.img"; cp "$work/a.img" "$work/b.img"
printf 'diverged' | dd of="$work/b.img" bs=1 seek=12345678 conv=notrunc status=none
$bin/ftvm-resync local "$work/a.img" "$work/b.img" 2>&1 | tail -2 | sed 's/^/   /'
cmp -s "$work/a.img" "$work/b.img" && echo "   the images are identical again"

step "done: every part ran; everything created is being removed"
