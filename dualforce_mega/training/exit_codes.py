"""Exit codes of the trainer and its launcher (docs/TRAINING.md, "Exit codes").

A scheduler can act on them: 75 (preempted, checkpoint saved) means "run the same command again".
"""
OK = 0
FAILED = 1           # unexpected error: the traceback is in the log
USER_ERROR = 2       # bad config / input / run directory, named in one line; no rank started
NONFINITE = 3        # train.nonfinite_limit consecutive steps with a non-finite loss or gradient norm
HANG = 4             # a rank made no progress for run.hang_timeout_s (step watchdog) or a collective timed out
CHECKPOINT_IO = 5    # a checkpoint could not be written (disk full, ...); the previous one is intact
PREEMPTED = 75       # a preemption signal (run.preempt_signals): the step finished, a checkpoint was saved
# internal: preflight tells the launch script that the run is already finished (the script exits 0)
PREFLIGHT_FINISHED = 10

NAMES = {OK: "ok", FAILED: "failed", USER_ERROR: "user error", NONFINITE: "non-finite steps", HANG: "hang",
         CHECKPOINT_IO: "checkpoint i/o", PREEMPTED: "preempted"}


class TrainingStop(Exception):
    """Ends training with ``exit_code`` and a one-line message (no traceback). ``collective``: every rank
    raises it at the same point, so the process group can still be shut down cleanly."""

    exit_code = FAILED
    collective = False
    error = True          # logged as an error (a preemption is only a warning)


class Preempted(TrainingStop):
    exit_code = PREEMPTED
    collective = True
    error = False


class NonFiniteLimit(TrainingStop):
    exit_code = NONFINITE
    collective = True


class CheckpointWriteError(TrainingStop):
    exit_code = CHECKPOINT_IO


class HangDetected(TrainingStop):
    exit_code = HANG
