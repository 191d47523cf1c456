"""The command line of ``launch/stage1.py`` and ``launch/stage2.py``: ``--config`` and
``--section.key=value`` overrides, ``--help`` generated from the config schema, and the exit codes
that SLURM scripts and users act on:

    0  done
    2  unusable configuration (one line naming the key; nothing was started)
    3  the run stopped itself (non-finite steps, lost data, an unwritable checkpoint): the log says why
    4  stopped on a stop signal (``train.stop_signals``) after saving a checkpoint: rerun to continue
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline import dist
from pipeline.checkpoint import CheckpointError
from pipeline.config import Config, ConfigError
from pipeline.train import StoppedOnSignal, TrainingStopped, train

log = logging.getLogger("coma.train")


def parse_cli(stage: int, argv: list[str]) -> Config:
    """``--config PATH`` plus ``--a.b=value`` overrides; ``--local_rank`` (passed by the deepspeed
    launcher) is accepted and ignored (the rank comes from the environment)."""
    from pipeline.config import did_you_mean, load_config

    path, overrides, i = None, [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path, e.g. --config launch/configs/stage1_tiny.yaml")
            path, i = argv[i + 1], i + 2
            continue
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a.startswith("--local_rank") or a.startswith("--local-rank"):
            if "=" not in a:
                i += 1
        elif a.startswith("--") and "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            raise ConfigError(f"'{a} {argv[i + 1]}': overrides are written --section.key=value"
                              f"{did_you_mean(a, argv[i + 1])} (--help lists every key)")
        else:
            overrides.append(a)
        i += 1
    cfg = load_config(path, overrides)
    if cfg.train.stage != stage:
        raise ConfigError(f"train.stage={cfg.train.stage} in {path} but this is the stage-{stage} entry point; "
                          f"use launch/stage{cfg.train.stage}.py or fix train.stage")
    return cfg


def cli_help(stage: int) -> str:
    """``launch/stage{1,2}.py --help``: the entry point's usage, the presets shipped beside it, and
    every config key with its default and meaning (generated from pipeline/config.py's schema)."""
    from pipeline.config import help_text

    main_doc = getattr(sys.modules.get("__main__"), "__doc__", None) or ""
    configs = Path(__file__).resolve().parent.parent / "launch" / "configs"
    presets = sorted(p for p in configs.glob(f"stage{stage}_*.yaml")) if configs.is_dir() else []
    head = main_doc.strip() or f"launch/stage{stage}.py --config PRESET.yaml [--section.key=value ...]"
    shown = "\n".join(f"  {p}" for p in presets) or "  (none found beside this installation)"
    return (f"{head}\n\npresets (--config):\n{shown}\n\nconfig keys (--section.key=value; "
            f"YAML values: 8, 1e-4, true, null, [a, b]):\n\n{help_text()}")


def main(stage: int, argv: list[str]) -> int:
    """Entry point of launch/stage1.py and launch/stage2.py; returns the process exit code (see
    the module docstring)."""
    from pipeline.data import DataError, data_error_reason

    if "-h" in argv or "--help" in argv:
        print(cli_help(stage))
        return 0
    try:
        cfg = parse_cli(stage, argv)
        train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    except (TrainingStopped, CheckpointError) as e:
        log.error("training stopped: %s", e)
        return 3
    except DataError as e:
        log.error("training stopped: %s", data_error_reason(e))
        return 3
    except StoppedOnSignal as e:
        log.warning("stopped: %s", e)
        return 4
    finally:
        dist.destroy()
    return 0
