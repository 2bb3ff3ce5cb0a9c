"""The default: a 2-block GDN-2 model learns multi-query associative recall on a CPU.

python train.py --config configs/recall_tiny.py
"""

from gdn2_jax.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    OptimizerConfig,
    RecallConfig,
    TrainConfig,
)
from gdn2_jax.model import ModelConfig


def get_config() -> Config:
    recall = RecallConfig(variant="mqar", vocab_size=128, num_pairs=16, num_queries=16)
    return Config(
        model=ModelConfig.preset("tiny", vocab_size=recall.vocab_size, max_seq_len=128),
        data=DataConfig(kind="recall", seq_len=128, batch_size=32, recall=recall),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=100, weight_decay=0.1),
        checkpoint=CheckpointConfig(every_steps=500, keep=2),
        logging=LoggingConfig(every_steps=20),
        eval=EvalConfig(every_steps=250, num_batches=8),
        train=TrainConfig(steps=1500, workdir="runs/recall_tiny"),
    )
