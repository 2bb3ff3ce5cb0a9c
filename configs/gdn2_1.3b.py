"""The paper's 1.3B recurrent GDN-2 on pre-tokenized files, sized for H100 / H200 nodes.

    python -m gdn2_jax.data.prepare --input 'fineweb-edu/*.parquet' \
        --tokenizer llama-2/tokenizer.model --out /data/fwe --workers 16
    python train.py --config configs/gdn2_1.3b.py --set data.paths=/data/fwe

(a prepared folder: its metadata is checked against the Llama-2 dtype, eos id and vocabulary
declared below, and its held-out split is the eval data), or flat token files with
`--set data.paths=/data/train.bin --set data.eval_paths=/data/val.bin`.

On one GPU add `--set optimizer.grad_accum_steps=32` (micro-batches of 4 x 4096 tokens, the
same per-device work as a node of 8 at the default 4).

The global batch is 128 x 4096 tokens (0.5M, the paper's recipe) on any number of GPUs: every
device holds a slice of the parameters and optimizer state (fsdp over all devices), and each
optimizer step accumulates 4 micro-batches of 32 sequences (so up to 32 devices; beyond that,
lower optimizer.grad_accum_steps). On several hosts, run the same command on each with
`--set train.distributed=true` (SLURM and similar clusters are detected; otherwise also set
train.coordinator_address, train.num_processes and train.process_id).

Speed settings: no rematerialization (16K tokens per device fit: the optimizer state is sharded
and the head's logits are computed in 8 chunks, `model.loss_chunks`, never whole); where memory
is short, `--set model.remat=true --set model.remat_policy=dots_and_gdn2_op` recomputes only the
elementwise work. `benchmarks/bench_train.py` compares these settings on one GPU.
"""

from gdn2_jax.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    MeshConfig,
    OptimizerConfig,
    TrainConfig,
)
from gdn2_jax.model_config import ModelConfig

TOKENS_PER_STEP = 128 * 4096


def get_config() -> Config:
    return Config(
        # bfloat16 compute over float32 master parameters.
        model=ModelConfig.preset("gdn2-1.3b", dtype="bfloat16", loss_chunks=8),
        # Llama-2 tokenizer (vocabulary 32000, end-of-document id 2), tokens stored as uint16;
        # a prepared folder's metadata must agree.
        data=DataConfig(
            kind="tokens",
            seq_len=4096,
            batch_size=128,
            token_dtype="uint16",
            eos_id=2,
            num_workers=4,
        ),
        # AdamW lr 4e-4, weight decay 0.1, clip 1.0, cosine after a 1B-token warm-up.
        optimizer=OptimizerConfig(
            lr=4e-4,
            warmup_steps=1_000_000_000 // TOKENS_PER_STEP,
            final_lr_ratio=0.1,
            weight_decay=0.1,
            clip_norm=1.0,
            grad_accum_steps=4,
        ),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        checkpoint=CheckpointConfig(every_steps=1000, keep=3),
        logging=LoggingConfig(every_steps=10),
        eval=EvalConfig(every_steps=1000, num_batches=16),
        # 100B tokens.
        train=TrainConfig(steps=100_000_000_000 // TOKENS_PER_STEP, workdir="runs/gdn2_1.3b"),
    )
