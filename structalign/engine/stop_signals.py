"""Ctrl-C and SIGTERM during training: stop at the next sync point, save, exit with a status that says which.

SIGTERM is what SLURM and Kubernetes send to preempt a job (torchrun forwards it to its workers). The ranks exchange
their signals at sync points (structalign.engine.runlog) and stop together after saving; if no sync point comes within
train.preempt_grace_s, the process exits without a new checkpoint. A second Ctrl-C aborts; a repeated SIGTERM (a
scheduler may signal torchrun and its workers alike) changes nothing.
"""
import os
import signal
import sys
import threading

# Exit status of a run stopped by a signal (the CLI's, and a rank's whose grace period ran out): 130 for Ctrl-C as a
# shell reports it, 75 (EX_TEMPFAIL) for SIGTERM, a preemption: requeue the same command with --resume auto.
STOP_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 75}


class StopSignals:
    """A context that catches SIGINT and SIGTERM (in the main thread; elsewhere it catches nothing) for a run.

    received: the number of the first signal caught, 0 while none was.
    """

    def __init__(self, grace_s: float, rank: int, distributed: bool):
        self.grace_s, self.rank, self.distributed = grace_s, rank, distributed
        self.received = 0
        self.grace = threading.Timer(grace_s, self._out_of_grace)
        self.grace.daemon = True
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._caught) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.grace.cancel()

    def _caught(self, signum, frame):
        if self.received:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = signum
        self.grace.start()
        print(f"\ninterrupt ({signal.Signals(signum).name}, rank {self.rank}): saving a checkpoint at the next "
              f"{'sync point' if self.distributed else 'step'} (Ctrl-C again to abort)", flush=True)

    def _out_of_grace(self):
        name = signal.Signals(self.received).name
        print(f"rank {self.rank}: no sync point within train.preempt_grace_s={self.grace_s:g} s of {name}: exiting "
              f"without a new checkpoint", file=sys.stderr, flush=True)
        os._exit(STOP_EXIT_CODES[name])
