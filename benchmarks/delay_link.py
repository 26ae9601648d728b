#!/usr/bin/env python
"""Two network namespaces joined by a user-space link with a one-way delay,
for measuring what model parallelism costs per token over a slow network
where the kernel lacks netem (`tc qdisc ... netem` says "qdisc kind is
unknown"). Needs root (ip netns, /dev/net/tun).

    sudo python benchmarks/delay_link.py --delay_ms 5 &      # 10.215.0.1 in ns llama0, 10.215.0.2 in ns llama1
    sudo ip netns exec llama0 torchrun --nnodes 2 --node_rank 0 --master_addr 10.215.0.1 ... &
    sudo ip netns exec llama1 torchrun --nnodes 2 --node_rank 1 --master_addr 10.215.0.1 ...

Each namespace gets a TUN device; this process copies every IP packet from
one to the other after `delay_ms` (a timer per packet, order kept). Ctrl-C
(or SIGTERM) removes the namespaces.
"""

import argparse
import fcntl
import heapq
import os
import signal
import struct
import subprocess
import threading
import time

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def forward(src: int, dst: int, delay: float) -> None:
    queue, ready = [], threading.Condition()
    seq = 0

    def writer():
        while True:
            with ready:
                while not queue or queue[0][0] > time.monotonic():
                    ready.wait(None if not queue else max(0.0, queue[0][0] - time.monotonic()))
                _, _, packet = heapq.heappop(queue)
            os.write(dst, packet)

    threading.Thread(target=writer, daemon=True).start()
    while True:
        packet = os.read(src, 65536)
        with ready:
            heapq.heappush(queue, (time.monotonic() + delay, seq, packet))
            seq += 1
            ready.notify()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay_ms", type=float, default=5.0, help="one-way delay added to every packet")
    parser.add_argument("--prefix", default="llama", help="namespaces <prefix>0 and <prefix>1")
    args = parser.parse_args()
    names = [f"{args.prefix}{i}" for i in (0, 1)]
    fds = []
    for i, ns in enumerate(names):
        sh("ip", "netns", "add", ns)
        dev = f"{args.prefix}t{i}"
        fds.append(open_tun(dev))  # opened here, then moved: the file stays attached
        sh("ip", "link", "set", dev, "netns", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "set", dev, "mtu", "65000", "up")
        sh("ip", "-n", ns, "addr", "add", f"10.215.0.{i + 1}", "peer", f"10.215.0.{2 - i}", "dev", dev)

    def cleanup(*_):
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns])
        os._exit(0)

    signal.signal(signal.SIGTERM, cleanup)
    signal.signal(signal.SIGINT, cleanup)
    for a, b in ((0, 1), (1, 0)):
        threading.Thread(target=forward, args=(fds[a], fds[b], args.delay_ms / 1000), daemon=True).start()
    print(f"ready: 10.215.0.1 in {names[0]}, 10.215.0.2 in {names[1]}, {args.delay_ms} ms each way", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
