"""Shared helpers of the Python checks: find the binary, generate stubs from proto/, start a
`tokenvault serve --dev` child on loopback and stop it whatever happens, redact output.

Nothing here prints a card number: output that could carry one goes through `redact`.
"""

import atexit
import ctypes
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PROTO_DIR = os.path.join(REPO, "proto")
PROTO_FILE = os.path.join(PROTO_DIR, "tokenvault", "v1", "tokenvault.proto")
SERVICE_NAME = "tokenvault.v1.TokenVaultService"

# Runs of 12 to 19 digits, possibly grouped by single spaces or dashes: anything shaped like
# a card number (PAN-shaped tokens included) is replaced before it reaches the output.
_PANLIKE = re.compile(r"\d(?:[ -]?\d){11,18}")


def redact(text):
    return _PANLIKE.sub("[redacted]", text)


def binary():
    """The tokenvault binary: $TOKENVAULT_BIN, else target/debug/tokenvault."""
    path = os.environ.get("TOKENVAULT_BIN") or os.path.join(REPO, "target", "debug", "tokenvault")
    path = os.path.abspath(path)
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"no tokenvault binary at {path}; run `cargo build` first")
    return path


def clean_env():
    """The environment without tokenvault settings that would change what the server does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENVAULT_")}
    env.pop("RUST_LOG", None)
    return env


def generate_stubs(out_dir):
    """Python message and service stubs for proto/ into out_dir (grpcio-tools, no system
    protoc); returns (pb2, pb2_grpc) of tokenvault.v1."""
    import importlib

    import grpc_tools
    from grpc_tools import protoc

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        PROTO_FILE,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("grpc_tools.protoc failed on " + PROTO_FILE)
    if out_dir not in sys.path:
        sys.path.insert(0, out_dir)
    pb2 = importlib.import_module("tokenvault.v1.tokenvault_pb2")
    pb2_grpc = importlib.import_module("tokenvault.v1.tokenvault_pb2_grpc")
    return pb2, pb2_grpc


def _die_with_parent():
    """In the child before exec: SIGTERM it if this Python process dies, even by SIGKILL
    (Linux PR_SET_PDEATHSIG), so no server outlives its test."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: atexit and the signal handlers remain
        pass


class DevServer:
    """`tokenvault serve --dev` on 127.0.0.1:0 in a temporary data directory.

    `start` waits (bounded) for the banner and reads the bound address and the demo API keys
    from it; the banner itself is never echoed (it holds keys and a test card number).
    `stop` sends SIGTERM, waits, then SIGKILLs; it is also registered with atexit, so the child
    does not outlive this process on any normal exit path.
    """

    def __init__(self, extra_args=(), start_timeout=60.0):
        self.tmp = tempfile.TemporaryDirectory(prefix="tokenvault-py-")
        self.data_dir = os.path.join(self.tmp.name, "data")
        self.log_path = os.path.join(self.tmp.name, "server.log")
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.proc = None
        self.addr = None
        self.keys = {}
        self.tls = False

    def start(self):
        log = open(self.log_path, "wb")
        cmd = [
            binary(), "serve", "--dev",
            "--data-dir", self.data_dir,
            "--listen", "127.0.0.1:0",
            "--log-level", "info",
        ] + self.extra_args
        self.proc = subprocess.Popen(
            cmd, cwd=self.tmp.name, env=clean_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=log, preexec_fn=_die_with_parent,
        )
        log.close()
        atexit.register(self.stop)
        lines = queue.Queue()

        def pump(stream):
            for raw in iter(stream.readline, b""):
                lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
            lines.put(None)

        threading.Thread(target=pump, args=(self.proc.stdout,), daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        rules = 0
        while rules < 3:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.fail_start(f"no banner within {self.start_timeout:.0f} s")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                self.fail_start(f"server exited early with code {self.proc.wait(timeout=5)}")
            if line.startswith("====="):
                rules += 1
            stripped = line.strip()
            if stripped.startswith("listening:"):
                parts = stripped.split()
                self.addr = parts[1]
                self.tls = "(TLS)" in stripped
            m = re.match(r"^(\w+)\s+API key:\s+(tvk_\S+)$", stripped)
            if m:
                self.keys[m.group(1)] = m.group(2)
        if not self.addr or "checkout" not in self.keys or "payments" not in self.keys:
            self.fail_start("banner lacks the address or the demo API keys")
        return self

    @property
    def port(self):
        return int(self.addr.rsplit(":", 1)[1])

    def fail_start(self, why):
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"tokenvault serve --dev did not start: {why}\n{tail}")

    def log_tail(self, n=30):
        try:
            with open(self.log_path, "r", encoding="utf-8", errors="replace") as f:
                return redact("".join(f.readlines()[-n:]))
        except OSError:
            return ""

    def admin(self, *args, timeout=60):
        """Runs an admin command on this server's data directory; returns stdout."""
        out = subprocess.run(
            [binary(), *args, "--data-dir", self.data_dir], cwd=self.tmp.name,
            env=clean_env(), stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"tokenvault {args[0]} exited {out.returncode}: "
                + redact(out.stderr.decode("utf-8", "replace"))
            )
        return out.stdout.decode("utf-8", "replace")

    def stop(self, timeout=20.0):
        """Stops the server (SIGTERM, then SIGKILL after `timeout`); returns its exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        code = proc.poll()
        if code is None:
            try:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
        return code

    def cleanup(self):
        self.stop()
        self.tmp.cleanup()


def install_watchdog(seconds, what):
    """Ends the process after `seconds`, or on SIGTERM/SIGHUP, by SystemExit, so `finally`
    blocks and atexit handlers run and the server child is stopped."""

    def expire(_signum, _frame):
        sys.stderr.write(f"{what}: timed out after {seconds} s\n")
        raise SystemExit(3)

    def terminated(signum, _frame):
        sys.stderr.write(f"{what}: stopped by signal {signum}\n")
        raise SystemExit(3)

    signal.signal(signal.SIGALRM, expire)
    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGHUP, terminated)
    signal.alarm(seconds)
