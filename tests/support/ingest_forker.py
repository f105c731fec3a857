"""A helper process for the SIGKILL tests: imports torch and loads the model once, then forks one
real ingest process per request, so that each killed ingest costs milliseconds, not an import.

Protocol on stdin/stdout, one JSON object per line:
  -> {"store": PATH, "restart": false}      fork a child that runs ingest(Store(PATH), …)
     optional keys: "n" (prompts instead of KWARGS' n); "cli": true with "stdout": FILE runs
     `actstore ingest` through the CLI, its stdout in FILE; "kill": [WHEN, K] makes the child
     SIGKILL itself at a catalog transaction boundary: WHEN "before-commit",
     "before-checkpoint" (committed to the write-ahead log only) or "after-commit" of its K-th
     write transaction (counted from 1), or ["print", 0] just before the CLI prints the run id;
     "record_each": true records every batch in its own transaction (as a model whose batches
     take longer than ingest.background.RECORD_EVERY_S is recorded)
  -> {"argv": [...], "stdout": FILE, "stderr": FILE, "detach": true}
                                            fork a child that runs `actstore ARGV` (its output
                                            in the two files); detached, the forker reads the
                                            next request at once, so that several run together
  -> {"wait": PID}                          wait for that detached child
  <- {"pid": PID}                           as soon as the child exists (the test kills it)
  <- {"pid": PID, "status": S, "wall_s": T} when it ends: 0 ok, 1 error, -9 killed
Runs with OMP_NUM_THREADS=1 so that forking after torch's first use is safe. The `Forker` class
below is the tests' end of the protocol (tests/conftest.py's `forker` fixture).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

KWARGS = {"model": "toy-random", "task": "ioi", "n": 16, "batch_size": 2,
          "hooks": "z"}  # fmt: skip


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(when: str, k: int) -> None:
    """Make this process kill itself at the chosen boundary."""
    if when == "print":
        import click

        echo = click.echo

        def echo_then_die(message=None, file=None, nl=True, err=False, color=None):
            if not err:  # the run id on stdout: die before it is printed
                die()
            echo(message, file, nl, err, color)

        click.echo = echo_then_die
        return
    from actstore.core.catalog import Catalog

    commit = Catalog.commit
    count = [0]

    def commit_and_maybe_die(self, con):
        count[0] += 1
        if when == "before-commit" and count[0] == k:
            die()
        if when == "before-checkpoint" and count[0] == k:  # committed, only in the WAL
            con.execute("COMMIT")
            die()
        commit(self, con)
        if when == "after-commit" and count[0] == k:
            die()

    Catalog.commit = commit_and_maybe_die


def command(request: dict) -> int:
    """`actstore ARGV` as the CLI runs it, stdout and stderr into the request's files."""
    from actstore.app.cli import main

    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    try:
        main(request["argv"])
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def run(request: dict, runner) -> int:
    if "argv" in request:
        return command(request)
    kwargs = {**KWARGS, "n": request.get("n", KWARGS["n"])}
    if request.get("kill"):
        arm(*request["kill"])
    if request.get("record_each"):
        import ingest.background

        ingest.background.RECORD_EVERY_S = 0.0
    if not request.get("cli"):
        from actstore.core.store import Store

        store = Store(request["store"], create=True)
        runner.ingest(store, restart=request.get("restart", False), **kwargs)
        return 0
    from actstore.app.cli import main

    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    args = ["ingest", request["store"], "--model", kwargs["model"], "--task", kwargs["task"],
            "--n", str(kwargs["n"]), "--batch-size", str(kwargs["batch_size"]),
            "--hooks", kwargs["hooks"]]  # fmt: skip
    try:
        main(args + (["--restart"] if request.get("restart") else []))
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def main() -> None:
    import torch

    torch.set_num_threads(1)
    import zarr.codecs  # noqa: F401  (the ingest imports Zarr lazily: ~0.3 s in every child)
    import zarr.storage  # noqa: F401

    import actstore.app.cli  # noqa: F401  (imported once here, not in every child)
    import ingest.runner as runner
    from actstore.model.adapter import load_model

    model = load_model(KWARGS["model"])
    _ = model.fingerprint

    def cached(spec: str, device: str | None = None, source: str | None = None):
        assert spec == KWARGS["model"], spec
        return model

    runner.load_model = cached  # the model is loaded once; everything else runs per child
    print(json.dumps({"ready": True}), flush=True)
    started: dict[int, float] = {}

    def report(pid: int) -> None:
        _, raw = os.waitpid(pid, 0)
        status = -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)
        wall = time.monotonic() - started.pop(pid)
        print(json.dumps({"pid": pid, "status": status, "wall_s": wall}), flush=True)

    for line in sys.stdin:
        request = json.loads(line)
        if "wait" in request:
            report(request["wait"])
            continue
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                code = run(request, runner)
            except BaseException as exc:  # report, exit non-zero: the test reads the status
                print(f"child error: {exc!r}", file=sys.stderr, flush=True)
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        started[pid] = start
        print(json.dumps({"pid": pid}), flush=True)
        if not request.get("detach"):
            report(pid)


class Forker:
    """The tests' end: starts this file as a process and speaks its protocol."""

    def __init__(self) -> None:
        root = Path(__file__).resolve().parents[2]
        path = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": path}  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=root,
        )  # fmt: skip
        assert self._read().get("ready")
        self.pending: int | None = None  # a started child whose end is still to be read
        self.spawned: set[int] = set()  # spawned children not finished yet

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the forker process died"
        return json.loads(line)

    def _send(self, request: dict) -> None:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()

    def start(self, store: Path, restart: bool = False, **options) -> int:
        self._send({"store": str(store), "restart": restart, **options})
        self.pending = self._read()["pid"]
        return self.pending

    def wait(self) -> tuple[int, float]:
        done = self._read()
        assert done["pid"] == self.pending, done
        self.pending = None
        return done["status"], done["wall_s"]

    def settle(self) -> None:
        """After a test: children whose end was not read (the test failed first) are killed
        and their ends read, so that the next test's replies are its own."""
        for pid in [*self.spawned, *([self.pending] if self.pending is not None else [])]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.pending is not None:
            self.wait()
        for pid in list(self.spawned):
            self._reap(pid)

    def run(self, store: Path, restart: bool = False, **options) -> float:
        self.start(store, restart, **options)
        status, wall = self.wait()
        assert status == 0, f"ingest exited with {status}"
        return wall

    def spawn(self, argv: list[str], output: Path) -> int:
        """Start `actstore ARGV` in a child and return at once (stdout, stderr: OUTPUT.out,
        OUTPUT.err); several spawned children run at the same time, each a process of its own."""
        out, err = output.with_suffix(".out"), output.with_suffix(".err")
        self._send({"argv": argv, "stdout": str(out), "stderr": str(err), "detach": True})
        pid = self._read()["pid"]
        self.spawned.add(pid)
        return pid

    @staticmethod
    def running(pid: int) -> bool:
        """Whether a spawned child still runs (one that ended is a zombie until finished)."""
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"

    def finish(self, pid: int, output: Path) -> tuple[int, str, str]:
        """Wait for a spawned child: its exit status (-9: killed), stdout and stderr."""
        status = self._reap(pid)
        out, err = output.with_suffix(".out"), output.with_suffix(".err")
        return status, out.read_text(), err.read_text()

    def _reap(self, pid: int) -> int:
        self._send({"wait": pid})
        done = self._read()
        assert done["pid"] == pid, done
        self.spawned.discard(pid)
        return done["status"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    main()
