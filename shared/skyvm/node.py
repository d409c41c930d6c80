"""The node runtime: what runs inside a node's container.

``python -m skyvm.node run --payload URL --result URL --attempt ID`` fetches
the payload (a cloudpickled call, or a shell command), runs it, writes the
result or the exception with its traceback back to the store, and exits
non-zero on failure. Its stdout and stderr are the node's log.

Other subcommands: ``check`` (the cluster's setup: is the runtime usable),
``cancel --attempt ID`` (stop a running attempt), and ``idle-watch`` (a
cluster container's main process: exits after the idle autostop period, as
SkyPilot's autostop does on a VM).

May import: the standard library, cloudpickle, skyvm.calls and skyvm.payloads (the
store): the node image has nothing else of the launcher's.
"""

from __future__ import annotations

import argparse
import inspect
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import cloudpickle

from skyvm.calls import make_call_payload, make_command_payload, ship_by_value  # noqa: F401 - their public home was here
from skyvm.payloads import store_for_object

STATE_DIR = Path(os.environ.get("SKYVM_NODE_STATE", "/tmp/skyvm-node"))
ACTIVITY = STATE_DIR / "activity"

EXIT_OK = 0
EXIT_USER_FAILURE = 1
EXIT_INFRA = 3
EXIT_CANCELLED = 143

# A line on a node's output that starts with this is a record its code sends the launcher (an engine's
# events, say), not a line of its log: the launcher hands it to the node's log sink whatever
# ``stream_logs`` says, and keeps it out of the log's tail. Written below the node's log file. Plain ASCII:
# a control character would be a line break to str.splitlines() or stripped with colour codes.
RELAY_MARK = "::skyvm-relay:: "


class _Cancelled(BaseException):
    """Raised in the node's main thread on SIGTERM."""


def _touch_activity() -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    ACTIVITY.touch()


def _pidfile(attempt: str) -> Path:
    return STATE_DIR / f"{attempt}.pid"


def _run_call(payload: dict) -> Any:
    value = payload["fn"](*payload["args"], **payload["kwargs"])
    if inspect.isawaitable(value):
        import asyncio  # only async nodes pay for it

        value = asyncio.run(_await(value))
    return value


async def _await(awaitable):
    return await awaitable


def _run_command(command: str, child: list) -> tuple[int, str]:
    """Run a shell command, passing its output through (masked); returns (exit code, last stdout line)."""
    import threading

    proc = subprocess.Popen(["/bin/sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, text=True, bufsize=1)
    child.append(proc)

    def copy_stderr() -> None:
        for line in proc.stderr:
            sys.stderr.write(line)
            sys.stderr.flush()

    err = threading.Thread(target=copy_stderr, daemon=True)
    err.start()
    last = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        if line.strip():
            last = line.rstrip("\n")
    code = proc.wait()
    err.join(timeout=5)
    return code, last  # the value (an XCom) is the user's; only the log is masked


class _Tee:
    """Writes to a stream and to the attempt's log file (a reader that went away does not stop the node)."""

    def __init__(self, stream, log_file):
        self._stream = stream
        self._log = log_file

    def write(self, text):
        self._log.write(text)
        try:
            self._stream.write(text)
        except (BrokenPipeError, OSError, ValueError):
            pass
        return len(text)

    def flush(self):
        try:
            self._log.flush()
            self._stream.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _MaskingStream:
    """A text stream that writes through with the node's secret values replaced by ***."""

    def __init__(self, stream, secrets: list[str]):
        self._stream = stream
        self._secrets = secrets

    def write(self, text):
        if isinstance(text, str):
            for secret in self._secrets:
                text = text.replace(secret, "***")
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _secret_values() -> list[str]:
    names = [n for n in os.environ.get("SKYVM_SECRET_NAMES", "").split(",") if n]
    # Longest first, so a secret that contains another is masked whole; very short values would garble the log.
    return sorted({os.environ[n] for n in names if len(os.environ.get(n, "")) >= 6}, key=len, reverse=True)


def _mask(text: str) -> str:
    for secret in _secret_values():
        text = text.replace(secret, "***")
    return text


def _mask_output() -> None:
    """Whatever the node prints (user code, a command's output, tracebacks) is masked at the source."""
    secrets = _secret_values()
    if secrets:
        sys.stdout = _MaskingStream(sys.stdout, secrets)
        sys.stderr = _MaskingStream(sys.stderr, secrets)
        # And every log record made here: a flow run on a node (the Prefect worker's) logs to
        # Prefect's API through its handlers, not through stdout.
        from skyvm import redact

        redact.register(*secrets)


def cmd_run(args) -> int:
    _touch_activity()
    pidfile = _pidfile(args.attempt)
    pidfile.write_text(str(os.getpid()))
    if args.detached:
        # Every attempt keeps its log and exit code beside its pidfile, so it can be found again by a
        # process that did not start it; what it prints also goes to its own stdout, for a follower.
        log_file = open(STATE_DIR / f"{args.attempt}.log", "a", buffering=1)
        sys.stdout = _Tee(sys.stdout, log_file)
        sys.stderr = _Tee(sys.stderr, log_file)
        _mask_output()  # outermost: the log file and the stream both get masked text
        try:
            code = _run_attempt(args, pidfile)
            sys.stdout.flush()
            sys.stderr.flush()
            # The exit code is written before the pidfile goes: a poller never sees neither.
            (STATE_DIR / f"{args.attempt}.rc").write_text(str(code))
            return code
        finally:
            pidfile.unlink(missing_ok=True)
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            log_file.close()
    _mask_output()
    try:
        return _run_attempt(args, pidfile)
    finally:
        pidfile.unlink(missing_ok=True)


def _run_attempt(args, pidfile: Path) -> int:
    child: list = []

    def on_term(signum, frame):
        for proc in child:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        raise _Cancelled()

    signal.signal(signal.SIGTERM, on_term)
    started = time.time()
    try:
        try:
            inline = getattr(args, "payload_bytes", None)  # the agent's channel carried it: no store round trip
            if inline is None:
                store, key = store_for_object(args.payload)
                inline = store.get(key)
            payload = cloudpickle.loads(inline)
        except Exception as exc:  # noqa: BLE001 - any fetch/unpickle problem is an infrastructure failure
            print(f"skyvm.node: cannot load payload {args.payload}: {exc}", file=sys.stderr, flush=True)
            return EXIT_INFRA
        # A multi-node cluster (num_nodes) runs this on every VM, SkyPilot's rank in the environment:
        # a command runs on each; a callable on rank 0 alone unless it asked for all ranks
        # (SKYVM_ALL_RANKS). Rank 0 alone reports the node's result; every rank's exit code counts.
        rank = int(os.environ.get("SKYPILOT_NODE_RANK") or 0)
        if rank and payload["kind"] == "call" and os.environ.get("SKYVM_ALL_RANKS") != "1":
            print(f"skyvm.node: rank {rank}: a callable node runs on rank 0 (all_ranks: true runs it on every rank)", flush=True)
            return EXIT_OK
        result_store, result_key = store_for_object(args.result)
        result: dict[str, Any] = {"attempt": args.attempt}
        code = EXIT_OK
        try:
            if payload["kind"] == "call":
                result.update(ok=True, value=_run_call(payload))
            else:
                rc, last = _run_command(payload["command"], child)
                result.update(ok=rc == 0, returncode=rc, value=last)
                if rc != 0:
                    result.update(exc_type="CommandFailed", message=f"command exited with code {rc}", traceback="")
                    code = rc if 0 < rc < 256 else EXIT_USER_FAILURE
        except _Cancelled:
            print("skyvm.node: cancelled", file=sys.stderr, flush=True)
            return EXIT_CANCELLED
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, SystemExit included
            tb = traceback.format_exc()
            sys.stderr.write(tb)
            sys.stderr.flush()
            try:
                pickled = cloudpickle.dumps(exc)
            except Exception:  # noqa: BLE001 - an exception that cannot travel still reports its text
                pickled = None
            result.update(ok=False, exc=pickled, exc_type=type(exc).__qualname__, message=_mask(str(exc)), traceback=_mask(tb))
            code = EXIT_USER_FAILURE
        result["duration_s"] = round(time.time() - started, 3)
        try:
            blob = cloudpickle.dumps(result)
        except Exception as exc:  # noqa: BLE001
            blob = cloudpickle.dumps(
                {"attempt": args.attempt, "ok": False, "exc": None, "exc_type": "UnpicklableResult", "message": f"the node's return value cannot be sent back ({type(exc).__name__}: {exc}): return plain data (numbers, strings, lists, dicts, arrays) or write large objects to a bucket and return their URL", "traceback": ""}
            )
            code = EXIT_USER_FAILURE
        if not rank:
            result_store.put(result_key, blob)
        return code
    finally:
        _touch_activity()


def cmd_cancel(args) -> int:
    pidfile = _pidfile(args.attempt)
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return 0  # not running (never started or already done)
    # A node the agent forked leads its own process group: the whole group is stopped, whatever it started.
    signal_group(pid, signal.SIGTERM)
    deadline = time.time() + args.grace
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return 0
        time.sleep(0.1)
    signal_group(pid, signal.SIGKILL)
    return 0


def signal_group(pid: int, sig: int) -> None:
    """Signal the process group ``pid`` leads, or the process alone when it leads none: a node run by
    ``docker exec`` is in the exec's group, and an agent's child just forked leads its own only once it
    has called setsid(), which a cancel may come before."""
    try:
        os.killpg(pid, sig)
        return
    except PermissionError:
        return
    except ProcessLookupError:
        pass
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def cmd_status(args) -> int:
    """JSON: is the attempt running, and its exit code once done."""
    import json

    rc_file = STATE_DIR / f"{args.attempt}.rc"
    rc = int(rc_file.read_text()) if rc_file.is_file() else None
    running = False
    try:
        os.kill(int(_pidfile(args.attempt).read_text()), 0)
        running = True
    except (OSError, ValueError):
        pass
    print(json.dumps({"running": running and rc is None, "rc": rc, "known": running or rc is not None}))
    return 0


def cmd_log(args) -> int:
    """The attempt's log from byte ``--offset`` on."""
    try:
        with open(STATE_DIR / f"{args.attempt}.log", "rb") as fh:
            fh.seek(args.offset)
            sys.stdout.buffer.write(fh.read())
    except FileNotFoundError:
        pass
    return 0


def cmd_busy(args) -> int:
    """Exit 0 when some attempt runs here (a detached one holds no host-side lock)."""
    return 0 if _busy() else 1


def _busy() -> bool:
    for pidfile in STATE_DIR.glob("*.pid"):
        try:
            os.kill(int(pidfile.read_text()), 0)
            return True
        except (OSError, ValueError):
            continue
    return False


def cmd_idle_watch(args) -> int:
    """A cluster's main process. Ends (and with it the container) once idle long enough."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _touch_activity()
    poll = float(os.environ.get("SKYVM_IDLE_POLL_S", "5"))
    while True:
        time.sleep(poll)
        if args.minutes is None or args.minutes < 0:
            continue
        if _busy():
            _touch_activity()
            continue
        idle = time.time() - ACTIVITY.stat().st_mtime
        if idle >= args.minutes * 60:
            print(f"skyvm.node: idle for {idle:.0f}s, autostop after {args.minutes} min", flush=True)
            return 0


def cmd_check(args) -> int:
    import skyvm

    print(f"skyvm {skyvm.__version__} node runtime ready (python {sys.version.split()[0]})", flush=True)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skyvm.node", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run one node attempt")
    run.add_argument("--payload", required=True)
    run.add_argument("--result", required=True)
    run.add_argument("--attempt", required=True)
    run.add_argument("--detached", action="store_true", help="write the log and exit code to files; nobody waits on the process")
    st = sub.add_parser("status", help="JSON state of a detached attempt")
    st.add_argument("--attempt", required=True)
    lg = sub.add_parser("log", help="a detached attempt's log from an offset")
    lg.add_argument("--attempt", required=True)
    lg.add_argument("--offset", type=int, default=0)
    sub.add_parser("busy", help="exit 0 when an attempt runs here")
    cancel = sub.add_parser("cancel", help="stop a running attempt")
    cancel.add_argument("--attempt", required=True)
    cancel.add_argument("--grace", type=float, default=5.0)
    idle = sub.add_parser("idle-watch", help="a cluster's main process; exits when idle for --minutes")
    idle.add_argument("--minutes", type=float, default=None)
    sub.add_parser("check", help="print the runtime's version (a cluster's setup)")
    args = parser.parse_args(argv)
    commands = {"run": cmd_run, "cancel": cmd_cancel, "idle-watch": cmd_idle_watch, "check": cmd_check, "status": cmd_status, "log": cmd_log, "busy": cmd_busy}
    return commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
