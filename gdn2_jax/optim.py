"""AdamW with warm-up then cosine decay, global-norm clipping, and a weight-decay mask."""

from __future__ import annotations

import jax
import optax

from gdn2_jax.config import OptimizerConfig

# Parameters that set decay rates, offsets or scales: shrinking them toward zero is not a
# regulariser, it changes what the layer computes (A_log -> 0 is a fixed decay of e^-1).
NO_DECAY_NAMES = frozenset({"A_log", "dt_bias", "bias", "scale"})


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.lr * cfg.final_lr_ratio,
    )


def _path_names(path) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def decays(path, leaf) -> bool:
    """Weight decay applies to matrices only: not to A_log, dt_bias, norms or biases."""
    names = _path_names(path)
    if any(n in NO_DECAY_NAMES or "norm" in n.lower() for n in names):
        return False
    return getattr(leaf, "ndim", 0) >= 2


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
    cfg: OptimizerConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    adamw = optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )  # fmt: skip
    if cfg.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw), schedule
    return adamw, schedule
