"""Hosts of their own: network namespaces joined to this one by veth pairs.

Host ``i`` is a namespace whose only way out is a veth link: its side has ``10.77.i.2``, this
side ``10.77.i.1``. A process started in it reaches the database and the stage service at
``10.77.i.1``; ``cut(i)`` takes this side's end of the link down (nothing is closed: packets
just stop, as when a cable is pulled), ``heal(i)`` brings it back.

Needs root with the capability to make namespaces and veth links (``CAP_SYS_ADMIN`` and
``CAP_NET_ADMIN``) and ``ip``. A root that lacks them (an unprivileged container) is found by
a probe, and the test skipped, or failed under ``KAIJU_TASKS_REQUIRE_CHAOS=1``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from collections.abc import Iterator

from tests.chaos import cluster as cluster_

SUBNET = "10.77"


def skip_reason() -> str | None:
    """Why namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (Debian's iproute2)"
    return _probe()


@functools.cache
def _probe() -> str | None:
    """Make and remove a namespace and a veth pair: why that fails, or None."""
    tag = os.getpid() % 100000
    name, link = f"ktprobe{tag}", f"kp{tag}a"
    try:
        _ip("netns", "add", name)
        _ip("link", "add", link, "type", "veth", "peer", "name", f"kp{tag}b")
    except AssertionError as exc:
        return f"cannot make network namespaces and veth links here: {exc}"
    finally:
        with contextlib.suppress(AssertionError):
            _ip("link", "del", link)
        with contextlib.suppress(AssertionError):
            _ip("netns", "del", name)
    return None


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Hosts:
    """``count`` namespaces; ``address(i)`` is how host ``i`` reaches this one."""

    def __init__(self, count: int) -> None:
        self.count = count
        tag = os.getpid() % 100000
        self.names = [f"kt{tag}-{i}" for i in range(1, count + 1)]
        # Interface names are at most 15 characters.
        self.links = [f"k{tag}h{i}" for i in range(1, count + 1)]

    def address(self, i: int) -> str:
        """This side's address as host ``i`` (1-based) sees it."""
        return f"{SUBNET}.{i}.1"

    def own_address(self, i: int) -> str:
        """Host ``i``'s own address (what the database sees as the client)."""
        return f"{SUBNET}.{i}.2"

    def command(self, i: int, argv: list[str]) -> list[str]:
        """``argv`` run inside host ``i``."""
        return ["ip", "netns", "exec", self.names[i - 1], *argv]

    def create(self) -> None:
        for i, (name, link) in enumerate(zip(self.names, self.links, strict=True), start=1):
            peer = f"{link[:-2]}n{i}"
            _ip("netns", "add", name)
            _ip("link", "add", link, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "netns", name)
            _ip("addr", "add", f"{self.address(i)}/24", "dev", link)
            _ip("link", "set", link, "up")
            _ip("-n", name, "addr", "add", f"{self.own_address(i)}/24", "dev", peer)
            _ip("-n", name, "link", "set", peer, "up")
            _ip("-n", name, "link", "set", "lo", "up")

    def cut(self, i: int) -> None:
        """Host ``i`` loses the network: its packets go nowhere, nothing is closed."""
        _ip("link", "set", self.links[i - 1], "down")

    def heal(self, i: int) -> None:
        """Host ``i`` is reachable again."""
        _ip("link", "set", self.links[i - 1], "up")

    def remove(self) -> None:
        for name, link in zip(self.names, self.links, strict=True):
            with contextlib.suppress(AssertionError):
                _ip("link", "del", link)  # takes its peer with it
            with contextlib.suppress(AssertionError):
                _ip("netns", "del", name)


@contextlib.contextmanager
def hosts(count: int) -> Iterator[Hosts]:
    """``count`` namespaces, removed on exit; skips the test when none can be made."""
    reason = skip_reason()
    if reason is not None:
        cluster_.unavailable(reason)
    made = Hosts(count)
    try:
        made.create()
        yield made
    finally:
        made.remove()
