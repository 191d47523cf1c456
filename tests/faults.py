"""Fault injection for the robustness tests, kept out of the production config: a NaN loss on
rank 0 at chosen steps, a rank SIGKILLed in the middle of a step.  ``install(...)`` sets
:attr:`pipeline.step.StepRunner.loss_hook` in this process; run as a script, it is a stage entry
point for launchers (torchrun, deepspeed) that installs the faults named by ``--fault.*`` and
then runs ``pipeline.cli.main``:

    torchrun --nproc_per_node 2 tests/faults.py --fault.stage=1 --fault.kill_step=5 --config … [overrides]
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Optional, Sequence

log = logging.getLogger("coma.train")


def install(nan_steps: Sequence[int] = (), kill_step: Optional[int] = None, kill_rank: int = 1) -> None:
    from pipeline import dist
    from pipeline.step import StepRunner

    def hook(loss, state):
        if kill_step is not None and state.step == kill_step and dist.get_rank() == kill_rank:
            log.warning("fault kill_step=%d: killing rank %d mid-step", state.step, dist.get_rank())
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if state.step in nan_steps and dist.get_rank() == 0:
            return loss * float("nan")
        return loss

    StepRunner.loss_hook = staticmethod(hook)


def uninstall() -> None:
    from pipeline.step import StepRunner

    StepRunner.loss_hook = None


def main(argv: list[str]) -> int:
    import yaml

    from pipeline.cli import main as stage_main

    faults = {a[len("--fault."):].split("=", 1)[0]: yaml.safe_load(a.split("=", 1)[1])
              for a in argv if a.startswith("--fault.")}
    stage = faults.pop("stage")
    install(nan_steps=faults.get("nan_steps", ()), kill_step=faults.get("kill_step"),
            kill_rank=faults.get("kill_rank", 1))
    return stage_main(stage, [a for a in argv if not a.startswith("--fault.")])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
