"""Stage 2: contrastive matching (InfoNCE with negatives gathered across GPUs).

    # from a stage-1 export (LoRA merged) or any Hugging Face VLM
    deepspeed launch/stage2.py --config launch/configs/stage2_qwen2_5_vl_3b.yaml \\
        --model.init=runs/stage1_qwen2_5_vl_3b/export
    torchrun --nproc_per_node 8 launch/stage2.py --config launch/configs/stage2_qwen2_5_vl_3b.yaml \\
        --model.init=runs/stage1_qwen2_5_vl_3b/export
    # CPU, 2 processes over gloo, tiny model and bundled data
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launch/stage2.py --config launch/configs/stage2_tiny.yaml \\
        --model.init=runs/stage1_tiny/export
    # SLURM: launch/slurm/stage2.sbatch (or coma.sbatch for stage 1 + export + stage 2)

Per-GPU batches larger than train.micro_batch_size go through the embedding cache in chunks
(train.embedding_cache_chunk); the exported embedding model lands in runs/NAME/export and loads
with pipeline.Embedder.from_pretrained.
"""
import sys
from importlib.util import find_spec

if find_spec("pipeline") is None:  # imported as an installed package, never by a path relative to this file
    sys.exit(f"{sys.argv[0]}: coma-pipeline is not installed in {sys.executable}: run `pip install -e .` in the repository")

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(stage=2, argv=sys.argv[1:]))
