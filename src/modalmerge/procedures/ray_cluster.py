"""Joining a Ray cluster, or starting a local instance, as a search and a spread merge both do.

Without an address a new local instance is started for the caller and shut down after it:
`num_cpus` as asked, no dashboard, node address 127.0.0.1 (Ray 2.60's gRPC servers still listen
on every interface, so tests run it inside a network namespace that has only loopback). An
address (`--address` or RAY_ADDRESS) is checked with a plain TCP connection first: where nothing
answers, ray.init would retry for minutes, and the user gets one line instead.
"""

from __future__ import annotations

import os
import socket

from ..errors import MergeError, one_line

LOOPBACK = "127.0.0.1"
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20   # callers move parameters, metrics and statistics, never tensors
CONNECT_TIMEOUT_S = 5.0


def connect(ray, address: str | None, cpus: int, namespace: str) -> bool:
    """Join the cluster at `address`, or start a local instance of `cpus` CPUs; whether this call
    did either (then the caller shuts Ray down), False when the caller's Ray was already running."""
    if ray.is_initialized():
        return False
    quiet = dict(configure_logging=False, log_to_driver=False)
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, namespace=namespace, **quiet)
        except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
            raise MergeError(f"no Ray cluster at {address} (--address or RAY_ADDRESS): {one_line(e, 200)}; start one "
                             "there (ray start --head), or leave --address out for a local one") from None
    else:  # address="local": always a new instance, never a cluster found on the machine
        ray.init(address="local", num_cpus=cpus, _node_ip_address=LOOPBACK, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, namespace=namespace, **quiet)
    return True


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def node_name(ray, node_id: str) -> str:
    """A node as records name it: host name, IP address and the start of Ray's node id (two nodes
    on one machine share the first two)."""
    node = next((n for n in ray.nodes() if n["NodeID"] == node_id), {})
    return f"{node.get('NodeManagerHostname', '?')} {node.get('NodeManagerAddress', '?')} (node {node_id[:8]})"


def check_reachable(address: str) -> None:
    """One line, quickly, when nothing listens at a cluster's HOST:PORT."""
    if address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise MergeError(f"--address {address}: write HOST:PORT of the cluster's head, e.g. 127.0.0.1:6379")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise MergeError(f"no Ray cluster at {address} (--address or RAY_ADDRESS): {why.lower()}; start one there "
                         "(ray start --head --port PORT), or leave --address out for a local one") from None
