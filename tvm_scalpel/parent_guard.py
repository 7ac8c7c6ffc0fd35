"""``python -m tvm_scalpel.parent_guard PARENT_PID MODULE [ARGS...]``: run ``python -m MODULE ARGS`` in
this process, and end this process group when PARENT_PID is no longer its parent.

The profiling child (TVM's rpc_server, which serves from a PopenWorker child of its own) runs in a
session of its own so that it can be stopped as a group (``profiling.stop_rpc_process``); a parent that
is killed outright (SIGKILL, the OOM killer) never gets to stop it, and the group would run on forever
(about 400 MB). Linux's PR_SET_PDEATHSIG would reach the server only, not the worker it starts, hence
this watcher, which takes the whole group down.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time

POLL_S = 0.5


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:  # reparented (to init or a subreaper) once the parent is gone
        time.sleep(POLL_S)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        raise SystemExit(f"usage: python -m tvm_scalpel.parent_guard PARENT_PID MODULE [ARGS...]; found {argv}")
    threading.Thread(target=_watch, args=(int(argv[0]),), daemon=True, name="parent-guard").start()
    sys.argv = argv[1:]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
