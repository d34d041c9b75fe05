"""The load check: ``workers.smoke`` on a model, in a process of its own, before it goes live.

The check loads the model, checks it against its spec, scores a smoke row and writes the shared
form of its weights (workers/smoke.py). It runs in a process of its own because onnxruntime is never
imported in the master nor the supervisor (see app/config.py). One such process can be kept waiting
with onnxruntime imported (``--wait-for-job``), so a new model does not wait for the imports.

A model that cannot go live raises ``ModelNotReady`` with its reason: ``load_timeout`` (longer than
``SMOKE_TIMEOUT_S``), ``load_crashed`` (killed, exited without a result, answered garbage), or the
smoke's own reason (``invalid_model``, ``spec_mismatch``, ``smoke_failed``...).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys

from workers.processes import describe_exit

log = logging.getLogger("sira.supervisor")

SMOKE_TIMEOUT_S = 300.0


class ModelNotReady(Exception):
    """A model that cannot go live now; `reason` is its label in the error counter."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class LoadChecker:
    """Runs load checks, one process each; keeps one waiting once `start_waiting_check` was called."""

    def __init__(self):
        # One load-check process waits with onnxruntime imported, so a new model does not wait for
        # the imports (in the sidecar only: the master's first sync leaves no process behind).
        self.keep_a_check_waiting = False
        self.waiting_check: asyncio.subprocess.Process | None = None

    async def start_waiting_check(self) -> None:
        """From now on, keep one load-check process waiting (the sidecar); the first starts now."""
        self.keep_a_check_waiting = True
        self.waiting_check = await start_load_check()

    async def check(self, model_path: str, spec_path: str) -> dict:
        """Run workers.smoke on the model in its own process; its result, or ModelNotReady.

        The process is the one kept waiting with its imports done, when there is one.
        """
        process = self.take_waiting_check() or await start_load_check()
        job = json.dumps({"model": model_path, "spec": spec_path}).encode("utf-8") + b"\n"
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(job), SMOKE_TIMEOUT_S)
        except TimeoutError:
            raise ModelNotReady("load_timeout", f"the load check of {model_path} took more than "
                                                f"{SMOKE_TIMEOUT_S:.0f}s") from None
        finally:
            if process.returncode is None:  # timed out, or this sync was cancelled
                process.kill()
                await process.wait()
        if self.keep_a_check_waiting:
            self.waiting_check = await start_load_check()
        for line in stderr.decode(errors="replace").splitlines()[-5:]:
            log.info("load check: %s", line)
        lines = stdout.decode(errors="replace").strip().splitlines()
        if process.returncode != 0 or not lines:
            raise ModelNotReady("load_crashed", f"the load check of {model_path} "
                                                f"{describe_returncode(process.returncode)}")
        try:
            result = json.loads(lines[-1])
        except ValueError:
            raise ModelNotReady("load_crashed", f"the load check of {model_path} answered "
                                                f"{lines[-1][:200]!r}") from None
        if not result.get("ok"):
            raise ModelNotReady(result.get("reason", "invalid_model"), result.get("error", "?"))
        return result

    def take_waiting_check(self) -> asyncio.subprocess.Process | None:
        """The load-check process kept waiting, if it is still alive (it is used once)."""
        process, self.waiting_check = self.waiting_check, None
        return process if process is not None and process.returncode is None else None

    async def stop_waiting_check(self) -> None:
        self.keep_a_check_waiting = False
        process = self.take_waiting_check()
        if process is not None:
            process.kill()
            await process.wait()


async def start_load_check() -> asyncio.subprocess.Process:
    """A workers.smoke process that imports onnxruntime, then waits for its one job on stdin."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "workers.smoke", "--wait-for-job", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


def describe_returncode(code: int | None) -> str:
    if code is not None and code < 0:
        return describe_exit(code)
    return f"exited with code {code} without a result"
