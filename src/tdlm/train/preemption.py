"""Preemption as clusters do it: SIGTERM (SLURM, Kubernetes, spot instances) or SIGINT (Ctrl-C,
torchrun forwarding it) asks the job to stop; the trainer finishes the optimizer step it is in
on every rank, writes a checkpoint of that step, and exits with :data:`EXIT_PREEMPTED` (75,
``EX_TEMPFAIL``: "try again"), so no work is lost and ``tdlm train --out DIR --resume``
continues exactly (same batches, noise and losses as an uninterrupted run).

A second signal while the first is being honoured stops at once (KeyboardInterrupt), as users
expect from a second Ctrl-C. Under torchrun the ranks agree after every step (one all-reduce of
a flag) so that all stop at the same step even when only one received the signal.
"""
from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Optional

from ..errors import TdlmError
from .parallel import Runtime

EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(TdlmError):
    """Raised by the trainer after the preemption checkpoint is written."""

    def __init__(self, signame: str, step: int, checkpoint: Optional[Path], run_dir: Path):
        self.step, self.checkpoint, self.run_dir = step, checkpoint, run_dir
        super().__init__(f"preempted by {signame} after step {step}; checkpoint {checkpoint} "
                         f"written; continue with: tdlm train --out {run_dir} --resume")


class Preemption:
    """Installs the handlers (main thread only) and answers, once per step,
    :meth:`requested` (a collective under torchrun)."""

    def __init__(self, runtime: Runtime):
        self.runtime = runtime
        self.signame: str = ""
        self._old: dict = {}
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signame:                     # second signal: stop now
            raise KeyboardInterrupt
        self.signame = signal.Signals(signum).name

    def requested(self) -> bool:
        """True on every rank when any rank received a signal."""
        if not self.runtime.distributed:
            return bool(self.signame)
        stop = not self.runtime.agree(not self.signame)
        if stop and not self.signame:
            self.signame = "a signal on another rank"
        return stop

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
