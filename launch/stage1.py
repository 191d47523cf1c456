"""Stage 1: compression pre-training (next-token CE on the dialogue through the compression tokens).

    # one node, all GPUs (DeepSpeed launcher)
    deepspeed launch/stage1.py --config launch/configs/stage1_qwen2_5_vl_3b.yaml
    # same with torchrun
    torchrun --nproc_per_node 8 launch/stage1.py --config launch/configs/stage1_qwen2_5_vl_3b.yaml
    # CPU, 2 processes over gloo, tiny model and bundled data (what the tests run)
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/stage1.py --config launch/configs/stage1_tiny.yaml
    # SLURM (srun / torchrun / deepspeed per node): launch/slurm/stage1.sbatch
    # any key can be overridden: --train.max_steps=100 --model.lora.r=8 --train.resume=none

The run writes runs/NAME/{config.yaml, metrics.jsonl, tensorboard/, checkpoints/, export/, train.log};
a rerun of the same command resumes from the newest complete checkpoint (--train.resume=auto).
"""
import sys
from importlib.util import find_spec

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(stage=1, argv=sys.argv[1:]))
