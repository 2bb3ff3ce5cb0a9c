"""A small GDN-2 language model on prepared text, sized to train on a CPU.

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

Measured 2026-12-03 with the commands above (2 blocks, hidden 128, 2 heads of 64, 1.6M
parameters; 400 steps of 16 x 128 tokens, 2.4 epochs of the 337K training tokens): held-out
perplexity 92.7 (loss 4.529, 1.813 bits per byte) over all 19,929 scored held-out tokens, after
88.3 / 94.5 / 123 / 200 in train.py's evals at steps 400 / 300 / 200 / 100 (8 batches, a
subset); a unigram model of the training tokens scores 733 on the same tokens. Training took
24 minutes on 2 CPU cores shared with other jobs (load average ~13; 4.6 minutes of user CPU).

At 1.3B on a GPU, the paper's recipe on the same kind of folder (Llama-2's tokenizer.model,
vocabulary 32000, eos id 2, prepared from FineWeb-Edu parquet shards):

    python -m gdn2_jax.data.prepare --input 'fineweb-edu/sample/10BT/*.parquet' \
        --tokenizer llama-2/tokenizer.model --out /data/fwe-llama2 --workers 16
    python train.py --config configs/gdn2_1.3b.py --set data.paths=/data/fwe-llama2

The 1.3B model on this file's stdlib folder, on one GPU (the path end to end at scale; 8 x 2048
tokens a step overfit the 337K training tokens, so the number is not the paper's):

    python train.py --config configs/gdn2_1.3b.py --set data.paths=runs/text/tokens \
        --set data.eos_id=none --set data.seq_len=2048 --set data.batch_size=8 \
        --set optimizer.grad_accum_steps=1 --set optimizer.warmup_steps=12 \
        --set model.remat=true --set train.steps=120 --set eval.every_steps=60 \
        --set eval.num_batches=1 --set checkpoint.every_steps=120 --set train.workdir=runs/text_1.3b
    python -m gdn2_jax.evaluate --checkpoint runs/text_1.3b --suite ppl --data runs/text/tokens

Measured 2026-12-07 on an H100 80GB (benchmarks/RESULTS.md) with the two commands above: the
second scored the step-120 checkpoint on all 19,929 held-out tokens: perplexity 80.85 (loss
4.3925, 1.7585 bits per byte); train.py's evals over one batch of 16,384 of them said 212.6 at
step 60 and 77.0 at step 120. Training took 236 s with start-up and the checkpoint, 0.57-0.60 s
a step (27-29K tokens/s with remat).
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
