"""A `scratchlm` training command (pretrain, finetune sft, ...) that SIGKILLs itself right
after it logs step KILL_AT: a kill at a known point of the run, for the resume tests. Polling
for a checkpoint and then killing raced the training loop: a fast machine could finish the run
first, a slow one be killed at any step.

    python tests/killed_at_step.py KILL_AT pretrain --data ... --out ...
"""

import os
import signal
import sys

from scratchlm.cli import main
from scratchlm.train.metrics import MetricsLog


def die_after_logging(step: int) -> None:
    """Make the metrics log kill the process as soon as its file holds the row of `step`."""
    write = MetricsLog.write

    def write_then_die(self: MetricsLog, row: dict) -> None:
        write(self, row)
        if row.get("step") == step:
            os.kill(os.getpid(), signal.SIGKILL)

    MetricsLog.write = write_then_die


if __name__ == "__main__":
    die_after_logging(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
