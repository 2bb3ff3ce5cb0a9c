"""A small GDN-2 language model on prepared text: trains on a CPU in minutes.

    python scripts/stdlib_text.py --out runs/text/corpus     # or your own text and tokenizer
    python -m gdn2_jax.data.prepare --input runs/text/corpus/docs.jsonl \
        --tokenizer runs/text/corpus/tokenizer.json --out runs/text/tokens --eval-fraction 0.05
    python train.py --config configs/text_tiny.py
    python -m gdn2_jax.evaluate --checkpoint runs/text_tiny --suite ppl --data runs/text/tokens

The corpus of the first line is the docstrings of Python's standard library (2,340 documents,
1.27M characters with Python 3.12) with a 4096-token byte-level BPE trained on them; prepare
holds out 5% of the documents (140 documents, 20K tokens), which train.py evaluates on and the
last command scores whole. Any other prepared folder works with
`--set data.paths=DIR --set model.vocab_size=N` (N at least the tokenizer's vocabulary).

Measured (2 blocks, hidden 128, 2 heads of 64, 0.9M parameters; 400 steps of 16 x 128 tokens,
2.4 epochs of the 337K training tokens): held-out perplexity MEASURED_PPL (loss MEASURED_LOSS,
MEASURED_BPB bits per byte) after MEASURED_MIN minutes of training on a 2-core CPU shared with other
jobs; a unigram model of the same tokens scores UNIGRAM_PPL.

At 1.3B on a GPU, the paper's recipe on the same kind of folder (Llama-2's tokenizer.model,
vocabulary 32000, eos id 2, prepared from FineWeb-Edu parquet shards):

    python -m gdn2_jax.data.prepare --input 'fineweb-edu/sample/10BT/*.parquet' \
        --tokenizer llama-2/tokenizer.model --out /data/fwe-llama2 --workers 16
    python train.py --config configs/gdn2_1.3b.py --set data.paths=/data/fwe-llama2
"""

from gdn2_jax.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    OptimizerConfig,
    TrainConfig,
)
from gdn2_jax.model_config import ModelConfig


def get_config() -> Config:
    model = ModelConfig.preset(
        "tiny",
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=384,
        gdn2_num_heads=2,
        gdn2_head_dim=64,
        max_seq_len=128,
        # On a CPU the token-serial reference trains this size faster than the chunkwise XLA
        # path (configs/recall_tiny.py measured it); same math.
        gdn2_backend="scan",
    )
    return Config(
        model=model,
        # The prepared folder's metadata gives the dtype and end-of-document id; its held-out
        # split is the eval data.
        data=DataConfig(kind="tokens", paths=("runs/text/tokens",), seq_len=128, batch_size=16),
        optimizer=OptimizerConfig(lr=2e-3, warmup_steps=40, weight_decay=0.1),
        checkpoint=CheckpointConfig(every_steps=200, keep=2),
        logging=LoggingConfig(every_steps=20),
        eval=EvalConfig(every_steps=100, num_batches=8),
        train=TrainConfig(steps=400, workdir="runs/text_tiny"),
    )
