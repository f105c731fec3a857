"""A helper process for the SIGKILL test: imports torch and loads the model once, then forks one
real ingest process per request, so that each killed ingest costs milliseconds, not an import.

Protocol on stdin/stdout, one JSON object per line:
  -> {"store": PATH, "restart": false}      fork a child that runs ingest(PATH, **KWARGS)
  <- {"pid": PID}                           as soon as the child exists (the test kills it)
  <- {"pid": PID, "status": S, "wall_s": T} when it ends: 0 ok, 1 error, -9 killed
Runs with OMP_NUM_THREADS=1 so that forking after torch's first use is safe.
"""

from __future__ import annotations

import json
import os
import sys
import time

KWARGS = {"model": "toy-random", "task": "ioi", "n": 16, "batch_size": 2,
          "hooks": "z", "progress": False}  # fmt: skip


def main() -> None:
    import torch

    torch.set_num_threads(1)
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
            code = 0
            try:
                runner.ingest(request["store"], restart=request.get("restart", False), **KWARGS)
            except BaseException as exc:  # report, exit non-zero: the test reads the status
                print(f"child error: {exc!r}", file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, raw = os.waitpid(pid, 0)
        status = -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)
        wall = time.monotonic() - started
        print(json.dumps({"pid": pid, "status": status, "wall_s": wall}), flush=True)


if __name__ == "__main__":
    main()
