"""Remote devices over TVM RPC: compile here, upload the library, time it on the device.

A device runs ``python -m tvm.exec.rpc_server --port 9090`` (or TVM's C++ ``tvm_rpc``), optionally
registered with a tracker (``python -m tvm.exec.rpc_tracker``) under a key such as ``rpi5``. hwprune
reaches it with ``--rpc HOST:PORT`` or ``--tracker HOST:PORT --key KEY`` (flags win over the
target's ``runtime.rpc``). Timing uses TVM's ``time_evaluator`` on the device: the clock is the
device's, and nothing crosses the network inside a timed call.

Example:
    >>> spec = resolve_remote(load_target("rpi5"), rpc="192.168.1.20:9090")      # doctest: +SKIP
    >>> with RemoteSession(spec) as s:                                             # doctest: +SKIP
    ...     vm = s.load_vm("model.so")
"""

from __future__ import annotations

import os
import time

from pathlib import Path

import numpy as np

from ..clock import take_turns, warm_up
from ...errors import HwpruneError, RuntimeUnavailable
from ...target import RpcEndpoint, Target


# Seconds to wait for the RPC handshake: a device answers in well under a second on a LAN.
CONNECT_TIMEOUT_S = 30.0

# Where the device is: an RPC server, or a tracker and the device key to request from it. One class for
# the target's ``runtime.rpc`` block and the --rpc / --tracker flags: they describe the same thing.
RemoteSpec = RpcEndpoint


def parse_endpoint(text: str, flag: str) -> tuple[str, int]:
    """``'HOST:PORT'`` -> ``(host, port)``, or a one-line error naming the flag.

    Example:
        >>> parse_endpoint("127.0.0.1:9090", "--rpc")
        ('127.0.0.1', 9090)
    """
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise HwpruneError(f"{flag} {text!r}: expected HOST:PORT with a port in 1..65535, e.g. 192.168.1.20:9090")
    return host.strip("[]"), int(port)


def resolve_remote(target: Target, *, rpc: str | None = None, tracker: str | None = None,
                   key: str | None = None) -> RemoteSpec | None:
    """The remote device for a run: the flags if given, else the target's ``runtime.rpc``, else None."""
    if rpc and tracker:
        raise HwpruneError("give either --rpc HOST:PORT (one RPC server) or --tracker HOST:PORT --key KEY, not both")
    if tracker:
        if not key:
            raise HwpruneError("--tracker needs --key KEY: the device key the RPC servers registered with")
        host, port = parse_endpoint(tracker, "--tracker")
        return RemoteSpec(host, port, key, tracker=True)
    if key and not rpc:
        raise HwpruneError("--key is used with --tracker HOST:PORT")
    if rpc:
        host, port = parse_endpoint(rpc, "--rpc")
        return RemoteSpec(host, port, key)
    if target.rpc is not None:
        r = target.rpc
        return r
    return None


class RemoteSession:
    """An open RPC session (a context manager): upload libraries, build VMs, time them there."""

    def __init__(self, spec: RemoteSpec, *, timeout_s: float = 600.0, connect_timeout_s: float = CONNECT_TIMEOUT_S,
                 check_only: bool = False):
        self.spec = spec
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.check_only = check_only  # a tracker: check the key, request no device (it may be busy for long)
        self.sess = None

    def __enter__(self) -> "RemoteSession":
        from .build import require_tvm

        require_tvm()
        from tvm import rpc

        s = self.spec
        try:
            if s.tracker:
                client, keys = _within(self.connect_timeout_s, lambda: _tracker_and_keys(rpc, s))
                if s.key not in keys:
                    raise RuntimeUnavailable(
                        f"the tracker at {s.host}:{s.port} has no device with key '{s.key}' "
                        f"(registered keys: {', '.join(sorted(keys)) or 'none'})")
                if not self.check_only:
                    self.sess = client.request(s.key, priority=1, session_timeout=self.timeout_s, max_retry=2)
            else:
                self.sess = _within(self.connect_timeout_s, lambda: rpc.connect(
                    s.host, s.port, key=s.key or "", session_timeout=self.timeout_s))
        except TimeoutError:
            how = (f"start the server on the device with: python -m tvm.exec.rpc_server --host 0.0.0.0 --port {s.port}"
                   if not s.tracker else "check that the tracker runs at that address (python -m tvm.exec.rpc_tracker)")
            raise RuntimeUnavailable(
                f"cannot reach the {s.describe()}: no TVM RPC answer within {self.connect_timeout_s:g} s (a firewall, "
                f"a wrong address, or another service on port {s.port}); {how}") from None
        except RuntimeUnavailable:
            raise
        except Exception as e:  # TVM raises RuntimeError / TVMError with a long C++ trace
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            how = ("start one on the device with: python -m tvm.exec.rpc_server --host 0.0.0.0 --port "
                   f"{s.port}") if not s.tracker else "check that the tracker runs and the device registered"
            raise RuntimeUnavailable(f"cannot reach the {s.describe()}: {first}; {how}") from None
        return self

    def __exit__(self, *exc) -> None:
        # TVM has no explicit close: the connection ends when the session and every remote handle made
        # from it (VMs, tensors) are gone, and a server serves one session at a time. Callers keep
        # remote handles inside the with-block.
        self.sess = None
        import gc

        gc.collect()

    @property
    def device(self):
        return self.sess.cpu()

    def upload(self, path: str | os.PathLike) -> str:
        """Copy a local file into the server's temporary folder; returns its remote name."""
        name = Path(path).name
        self.sess.upload(str(path), name)
        return name

    def load_vm(self, path: str | os.PathLike):
        """Upload a library written by ``export_library`` and make a Relax VM of it on the device."""
        from tvm import relax

        name = self.upload(path)
        try:
            lib = self.sess.load_module(name)
        except Exception as e:
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise RuntimeUnavailable(
                f"the {self.spec.describe()} cannot load {name}: {first}. Is the library built for that "
                "device's architecture (the target's runtime.tvm.target)?") from None
        return relax.VirtualMachine(lib, self.device)

    def tensor(self, x: np.ndarray):
        import tvm

        return tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32), device=self.device)


def _within(seconds: float, fn):
    """``fn()``, or TimeoutError after ``seconds``: TVM's connect blocks without end on a peer that accepts the
    connection and never answers (its C++ socket has no timeout). The call is left running in a daemon thread."""
    import threading

    box: dict = {}

    def call():
        try:
            box["value"] = fn()
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=call, name="hwprune-rpc-connect", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(seconds)
    if "error" in box:
        raise box["error"]
    return box["value"]


def check_reachable(spec: RemoteSpec, *, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Open and close a session with the device (a tracker: check that it has the key), so that a wrong
    address fails in seconds, before minutes of compiling. Raises :class:`RuntimeUnavailable`."""
    with RemoteSession(spec, connect_timeout_s=connect_timeout_s, check_only=True):
        pass


def check_device(target: Target, spec: RemoteSpec) -> None:
    """Everything a run or a profile on the RPC device needs from here, checked in seconds before any training
    or compiling: the target's cross compiler, and the device answering (:func:`check_reachable`)."""
    from .build import cross_compiler

    cross_compiler(target)
    check_reachable(spec)


def _tracker_and_keys(rpc, spec: RemoteSpec):
    client = rpc.connect_tracker(spec.host, spec.port)
    return client, _tracker_keys(client)


def _tracker_keys(client) -> set[str]:
    """Device keys registered with a tracker (a request for any other key would wait forever)."""
    summary = client.summary()
    keys = set(summary.get("queue_info", {}))
    for server in summary.get("server_info", []):
        k = str(server.get("key", ""))
        if k.startswith("server:"):
            keys.add(k.split(":", 1)[1])
    return keys


def time_vms(vms: dict, inputs: dict, device, *, warmup: int, repeats: int, rounds: int = 5) -> dict[str, list[float]]:
    """Per-call milliseconds of each VM's ``main``, measured with ``time_evaluator`` on ``device``.

    The models take turns in ``rounds`` rounds (order alternating), so drift on a shared machine hits
    them alike; each round times ``repeats / rounds`` calls of each, one call per sample.
    """
    per_round = max(1, -(-repeats // rounds))
    samplers = {}
    for k, vm in vms.items():
        warm_up([lambda vm=vm, k=k: vm["main"](inputs[k])], warmup)
        evaluator = vm.time_evaluator("main", device, number=1, repeat=per_round)
        # one evaluator call gives per_round samples (one call each)
        samplers[k] = lambda n, ev=evaluator, k=k: [float(t) * 1e3 for t in ev(inputs[k]).results][:n]
    return take_turns(samplers, per_round * rounds, per_round)


def wait_for_port(host: str, port: int, timeout_s: float = 30.0) -> None:
    """Block until something accepts TCP connections on ``host:port`` (a server that is starting)."""
    import socket

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeUnavailable(f"nothing listens on {host}:{port} after {timeout_s:.0f} s") from None
            time.sleep(0.1)
