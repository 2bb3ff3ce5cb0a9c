"""The paper's 1.3B hybrid (GDN-2 and sliding-window attention blocks alternating, window 2048)
with the recurrent 1.3B's recipe, data and devices (`configs/gdn2_1.3b.py`: read it for the
batch, the optimizer and multi-host runs).

    python train.py --config configs/hybrid_1.3b.py --set data.paths=/data/fwe

(a folder `gdn2_jax.data.prepare` wrote, or token files as in the recurrent config).

On one GPU add `--set optimizer.grad_accum_steps=32`. Speed settings as the recurrent model's:
no rematerialization, the head's logits in 8 chunks; the SWA blocks run cuDNN's fused attention
(bfloat16, no packed documents; with segment ids they fall back to XLA's).
"""

import dataclasses
from pathlib import Path

from gdn2_jax.config import Config, load_config
from gdn2_jax.model_config import ModelConfig


def get_config() -> Config:
    cfg = load_config(Path(__file__).with_name("gdn2_1.3b.py"))
    return dataclasses.replace(
        cfg,
        model=ModelConfig.preset("hybrid-1.3b", dtype="bfloat16", loss_chunks=8),
        train=dataclasses.replace(cfg.train, workdir="runs/hybrid_1.3b"),
    )
