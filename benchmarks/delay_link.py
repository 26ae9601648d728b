#!/usr/bin/env python
"""Network namespaces joined by a user-space link with a one-way delay,
for measuring what model parallelism costs per token over a slow network
where the kernel lacks netem (`tc qdisc ... netem` says "qdisc kind is
unknown"). Needs root (ip netns, /dev/net/tun).

    sudo python benchmarks/delay_link.py --delay_ms 5 &      # 10.215.0.1 in ns llama0, 10.215.0.2 in ns llama1
    sudo ip netns exec llama0 torchrun --nnodes 2 --node_rank 0 --master_addr 10.215.0.1 ... &
    sudo ip netns exec llama1 torchrun --nnodes 2 --node_rank 1 --master_addr 10.215.0.1 ...

    sudo python benchmarks/delay_link.py --nodes 3 --delay_ms 1 &   # llama0..llama2 at 10.215.0.1 .. 10.215.0.3

Each namespace i gets a TUN device with address 10.215.0.(i + 1)/24; this
process is a hub: it reads every IP packet a namespace sends and writes it,
`delay_ms` later, to the TUN device of the namespace that owns the
packet's destination address (a timer per packet, order kept per
destination; packets to an address no namespace owns are dropped). Every
pair of nodes is thus one hop of `delay_ms` apart, like hosts on one
switch. "ready: ..." on stdout says the link is up. Ctrl-C (or SIGTERM)
removes the namespaces; namespaces of the same names left by a killed run
are removed before new ones are made.
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
SUBNET = "10.215.0."


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True)


def address(i: int) -> str:
    """Node i's address."""
    return f"{SUBNET}{i + 1}"


def namespaces(prefix: str, nodes: int) -> list:
    return [f"{prefix}{i}" for i in range(nodes)]


def remove_namespaces(names) -> None:
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


class Delayed:
    """Packets for one TUN device, written `delay` seconds after they were
    read, in the order they were read."""

    def __init__(self, fd: int, delay: float):
        self.fd, self.delay = fd, delay
        self.queue, self.ready, self.seq = [], threading.Condition(), 0
        threading.Thread(target=self._writer, daemon=True).start()

    def put(self, packet: bytes) -> None:
        with self.ready:
            heapq.heappush(self.queue, (time.monotonic() + self.delay, self.seq, packet))
            self.seq += 1
            self.ready.notify()

    def _writer(self) -> None:
        while True:
            with self.ready:
                while not self.queue or self.queue[0][0] > time.monotonic():
                    self.ready.wait(None if not self.queue else max(0.0, self.queue[0][0] - time.monotonic()))
                _, _, packet = heapq.heappop(self.queue)
            os.write(self.fd, packet)


def hub(src: int, outs: dict) -> None:
    """Reads packets from one TUN device and queues each for the device of its IPv4 destination."""
    while True:
        packet = os.read(src, 65536)
        if len(packet) >= 20 and packet[0] >> 4 == 4:
            out = outs.get(packet[16:20])
            if out is not None:
                out.put(packet)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay_ms", type=float, default=5.0, help="one-way delay added to every packet")
    parser.add_argument("--nodes", type=int, default=2, help="namespaces to make, 2 or more (default 2)")
    parser.add_argument("--prefix", default="llama", help="namespaces <prefix>0 .. <prefix>N-1")
    args = parser.parse_args()
    if not 2 <= args.nodes <= 250:
        parser.error(f"--nodes must be 2 to 250, got {args.nodes}")
    if args.delay_ms < 0:
        parser.error(f"--delay_ms must be 0 or more, got {args.delay_ms}")
    names = namespaces(args.prefix, args.nodes)

    def cleanup(*_):
        remove_namespaces(names)
        os._exit(0)

    signal.signal(signal.SIGTERM, cleanup)
    signal.signal(signal.SIGINT, cleanup)
    remove_namespaces(names)  # left by a run that was killed outright
    fds = []
    try:
        for i, ns in enumerate(names):
            sh("ip", "netns", "add", ns)
            dev = f"{args.prefix}t{i}"
            fds.append(open_tun(dev))  # opened here, then moved: the file stays attached
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", dev, "mtu", "65000", "up")
            sh("ip", "-n", ns, "addr", "add", f"{address(i)}/24", "dev", dev)
    except BaseException:
        remove_namespaces(names)
        raise
    outs = {bytes(int(x) for x in address(i).split(".")): Delayed(fd, args.delay_ms / 1000)
            for i, fd in enumerate(fds)}
    for fd in fds:
        threading.Thread(target=hub, args=(fd, outs), daemon=True).start()
    where = ", ".join(f"{address(i)} in {ns}" for i, ns in enumerate(names))
    print(f"ready: {where}, {args.delay_ms} ms each way", flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
