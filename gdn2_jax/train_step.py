"""The pure training and evaluation steps. They are jitted once by the trainer, with explicit
shardings and the train state donated; nothing here reads the config or the clock."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from gdn2_jax import loss, sharding

Batch = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def forward_stats(params, graphdef: nnx.GraphDef, batch: Batch) -> dict[str, jax.Array]:
    """The summed loss stats (`gdn2_jax.loss.token_stats`) of a batch, the head's logits
    computed in `model.loss_chunks` pieces."""
    model = nnx.merge(graphdef, params)
    x = model.features(batch["inputs"], segment_ids=batch.get("segment_ids"))
    return loss.head_token_stats(
        x,
        model.head(),
        batch["targets"],
        batch["loss_mask"],
        num_chunks=model.config.loss_chunks,
    )


def _micro_batches(batch: Batch, num: int) -> Batch:
    """[B, ...] -> [num, B/num, ...] taking rows i*num + j into micro-batch j: with the batch
    split in contiguous blocks over devices, every micro-batch stays evenly split, no copies."""

    def split(x):
        rows = x.shape[0]
        if rows % num:
            raise ValueError(f"batch of {rows} rows does not split into {num} micro-batches")
        return jnp.swapaxes(x.reshape(rows // num, num, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def accumulate_grads(params, graphdef, batch: Batch, accum_steps: int):
    """Gradient of the summed loss over micro-batches, plus the summed stats."""

    def grad_of(micro):
        def loss(p):
            stats = forward_stats(p, graphdef, micro)
            return stats["loss_sum"], stats

        return jax.grad(loss, has_aux=True)(params)

    if accum_steps == 1:
        return grad_of(batch)
    micro = _micro_batches(batch, accum_steps)

    def body(carry, one):
        grads, stats = grad_of(jax.lax.with_sharding_constraint(one, _batch_spec(one)))
        return jax.tree.map(jnp.add, carry, (grads, stats)), None

    zeros = jax.tree.map(
        jnp.zeros_like, jax.eval_shape(grad_of, jax.tree.map(lambda x: x[0], micro))
    )
    (grads, stats), _ = jax.lax.scan(body, zeros, micro)
    return grads, stats


def _batch_spec(batch: Batch):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return jax.tree.map(lambda _: jax.sharding.PartitionSpec(), batch)
    return jax.tree.map(lambda _: sharding.batch_spec(mesh), batch)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    accum_steps: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    grads, stats = accumulate_grads(state.params, graphdef, batch, accum_steps)
    tokens = jnp.maximum(stats["tokens"], 1.0)
    # Token-weighted mean over the whole batch, whatever the micro-batch split.
    grads = jax.tree.map(lambda g: g / tokens, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": stats["loss_sum"] / tokens,
        "accuracy": stats["correct"] / tokens,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "lr": schedule(state.step),
        "tokens": stats["tokens"],
    }
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params, batch: Batch, *, graphdef: nnx.GraphDef) -> dict[str, jax.Array]:
    return forward_stats(params, graphdef, batch)
