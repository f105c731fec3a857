"""A helper process for the SIGKILL tests: imports torch and loads the model once, then forks one
real ingest process per request, so that each killed ingest costs milliseconds, not an import.

Protocol on stdin/stdout, one JSON object per line:
  -> {"store": PATH, "restart": false}      fork a child that runs ingest(PATH, **KWARGS)
     optional keys: "n" (prompts instead of KWARGS' n); "cli": true with "stdout": FILE runs
     `actstore ingest` through the CLI, its stdout in FILE; "kill": [WHEN, K] makes the child
     SIGKILL itself at a catalog transaction boundary: WHEN "before-commit",
     "before-checkpoint" (committed to the write-ahead log only) or "after-commit" of its K-th
     write transaction (counted from 1), or ["print", 0] just before the CLI prints the run id;
     "record_each": true records every batch in its own transaction (as a model whose batches
     take longer than ingest.background.RECORD_EVERY_S is recorded)
  <- {"pid": PID}                           as soon as the child exists (the test kills it)
  <- {"pid": PID, "status": S, "wall_s": T} when it ends: 0 ok, 1 error, -9 killed
Runs with OMP_NUM_THREADS=1 so that forking after torch's first use is safe.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

KWARGS = {"model": "toy-random", "task": "ioi", "n": 16, "batch_size": 2,
          "hooks": "z", "progress": False}  # fmt: skip


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
    from actstore.catalog import Catalog

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


def run(request: dict, runner) -> int:
    kwargs = {**KWARGS, "n": request.get("n", KWARGS["n"])}
    if request.get("kill"):
        arm(*request["kill"])
    if request.get("record_each"):
        import ingest.background

        ingest.background.RECORD_EVERY_S = 0.0
    if not request.get("cli"):
        runner.ingest(request["store"], restart=request.get("restart", False), **kwargs)
        return 0
    from actstore.cli import main

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
    import actstore.cli  # noqa: F401  (imported once here, not in every child)
    import ingest.runner as runner
    from actstore.models import load_model

    model = load_model(KWARGS["model"])
    _ = model.fingerprint

    def cached(spec: str, device: str | None = None):
        assert spec == KWARGS["model"], spec
        return model

    runner.load_model = cached  # the model is loaded once; everything else runs per child
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        started = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                code = run(request, runner)
            except BaseException as exc:  # report, exit non-zero: the test reads the status
                print(f"child error: {exc!r}", file=sys.stderr, flush=True)
                code = 1
            sys.stdout.flush()
            os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, raw = os.waitpid(pid, 0)
        status = -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)
        wall = time.monotonic() - started
        print(json.dumps({"pid": pid, "status": status, "wall_s": wall}), flush=True)


if __name__ == "__main__":
    main()
