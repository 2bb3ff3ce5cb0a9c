"""GDN-2 causal language models: recurrent (GDN-2 mixers only) and hybrid (GDN-2 + SWA).

A model is embeddings, pre-norm blocks `x + mixer(norm_1 x)`, `x + SwiGLU(norm_2 x)`, a final
RMSNorm and a tied or untied head. `ModelConfig.block_pattern` names each block's mixer:
"gdn2", "swa" (sliding-window attention) or "attn" (full attention). Layout and initialization
follow NVIDIA's lit_gpt `GPT`, so `gdn2_jax.convert` maps checkpoints one-to-one.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gdn2_jax.layers import Attention, GatedDeltaRule2, RMSNorm, SwiGLU
from gdn2_jax.layers.init import partitioned, torch_linear_init
from gdn2_jax.loss import head_logits
from gdn2_jax.model_config import ModelConfig
from gdn2_jax.ops.core import OP_RESIDUALS_NAME

EMBED_INIT_STD = 0.02  # lit_gpt's `mamba_init` embedding

_policies = jax.checkpoint_policies
# ModelConfig.remat_policy -> what a rematerialized block saves. Saving the GDN-2 op's
# backward residuals lets the backward skip rerunning the op's forward kernels.
REMAT_POLICIES = {
    "full": _policies.nothing_saveable,
    "dots": _policies.dots_with_no_batch_dims_saveable,
    "gdn2_op": _policies.save_only_these_names(OP_RESIDUALS_NAME),
    "dots_and_gdn2_op": _policies.save_from_both_policies(
        _policies.dots_with_no_batch_dims_saveable,
        _policies.save_only_these_names(OP_RESIDUALS_NAME),
    ),
}


class StepKernels(NamedTuple):
    """A block's concatenated projection kernels for decoding: the mixer's projections of its
    input (GDN-2's seven, attention's q, k, v) and the MLP's w1 and w2."""

    mixer: jax.Array | None
    mlp: jax.Array | None


class Block(nnx.Module):
    """Pre-norm residual block: x + mixer(norm_1 x), then + SwiGLU(norm_2 x)."""

    def __init__(self, cfg: ModelConfig, kind: str, *, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        # lit_gpt (mamba_init) shrinks residual-branch output layers by √(2 · layers).
        out_scale = 1.0 / math.sqrt(2 * cfg.num_layers)
        self.kind = kind
        self.norm_1 = RMSNorm(
            cfg.hidden_size, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs
        )
        self.mixer = _make_mixer(cfg, kind, out_scale, rngs)
        self.norm_2 = RMSNorm(
            cfg.hidden_size, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs
        )
        self.mlp = SwiGLU(
            cfg.hidden_size,
            cfg.intermediate_size,
            out_scale=out_scale,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )

    def __call__(self, x, segment_ids=None):
        x = x + self.mixer(self.norm_1(x), segment_ids=segment_ids)
        return x + self.mlp(self.norm_2(x))

    def prefill(self, x, *, max_len: int, lengths=None):
        if self.kind == "gdn2":
            h, cache = self.mixer.prefill(self.norm_1(x), lengths=lengths)
        else:
            h, cache = self.mixer.prefill(self.norm_1(x), max_len=max_len, lengths=lengths)
        x = x + h
        return x + self.mlp(self.norm_2(x)), cache

    def step_kernels(self) -> StepKernels:
        """The concatenated projection kernels of `step` (see `CausalLM.step_kernels`)."""
        return StepKernels(self.mixer.step_kernel(), self.mlp.step_kernel())

    def step(self, x_t, cache, kernels: StepKernels | None = None):
        kernels = kernels or StepKernels(None, None)
        h, cache = self.mixer.step(self.norm_1(x_t), cache, kernel=kernels.mixer)
        x_t = x_t + h
        return x_t + self.mlp(self.norm_2(x_t), kernel=kernels.mlp), cache


def _make_mixer(cfg: ModelConfig, kind: str, out_scale: float, rngs: nnx.Rngs):
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if kind == "gdn2":
        return GatedDeltaRule2(
            cfg.hidden_size,
            cfg.gdn2_num_heads,
            cfg.gdn2_head_dim,
            expand_v=cfg.gdn2_expand_v,
            num_v_heads=cfg.gdn2_num_v_heads,
            conv_size=cfg.conv_size,
            allow_neg_eigval=cfg.allow_neg_eigval,
            output_gate=cfg.output_gate,
            norm_eps=cfg.norm_eps,
            gate_mode=cfg.gate_mode,
            backend=cfg.gdn2_backend,
            recurrent_backend=cfg.gdn2_recurrent_backend,
            decode=cfg.gdn2_decode,
            decode_block_v=cfg.gdn2_decode_block_v,
            decode_warps=cfg.gdn2_decode_warps,
            chunk_size=cfg.chunk_size,
            interpret=cfg.gdn2_interpret,
            dtype=dt,
            param_dtype=pdt,
            rngs=rngs,
        )
    return Attention(
        cfg.hidden_size,
        cfg.attn_num_heads,
        num_kv_heads=cfg.attn_num_kv_heads,
        window_size=cfg.window_size if kind == "swa" else None,
        rope_theta=cfg.rope_theta,
        implementation=cfg.attn_implementation,
        out_scale=out_scale,
        dtype=dt,
        param_dtype=pdt,
        rngs=rngs,
    )


class CausalLM(nnx.Module):
    """tokens [B, T] int32 -> logits [B, T, vocab] float32."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        cfg = config
        self.config = cfg
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        embed_init = jax.nn.initializers.normal(EMBED_INIT_STD)
        self.wte = nnx.Param(
            partitioned(embed_init, ("vocab", "embed"))(
                rngs.params(), (cfg.vocab_size, cfg.hidden_size), pdt
            )
        )
        self.blocks = nnx.List([Block(cfg, kind, rngs=rngs) for kind in cfg.block_pattern])
        self.ln_f = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt, rngs=rngs)
        head_init = partitioned(torch_linear_init(), ("embed", "vocab"))
        self.lm_head = (
            nnx.data(None)
            if cfg.tie_embeddings
            else nnx.Param(head_init(rngs.params(), (cfg.hidden_size, cfg.vocab_size), pdt))
        )

    def embed(self, tokens):
        return jnp.take(self.wte[...], tokens, axis=0).astype(jnp.dtype(self.config.dtype))

    def head(self):
        """The head matrix [hidden, vocab] (the embedding's transpose when tied)."""
        return self.wte[...].T if self.lm_head is None else self.lm_head[...]

    def logits(self, x):
        """Final norm and head; float32 logits whatever the compute dtype."""
        return head_logits(self.ln_f(x), self.head())

    def features(self, tokens, *, segment_ids=None):
        """tokens [B, T] -> the head's input [B, T, hidden]: every block, then the final norm."""
        x = self.embed(tokens)
        remat = nnx.remat(
            lambda blk, h, seg: blk(h, seg), policy=REMAT_POLICIES[self.config.remat_policy]
        )
        for block in self.blocks:
            x = remat(block, x, segment_ids) if self.config.remat else block(x, segment_ids)
        return self.ln_f(x)

    def __call__(self, tokens, *, segment_ids=None):
        """tokens [B, T] -> logits [B, T, vocab]; `segment_ids` [B, T] separates packed documents.

        A document is a maximal run of equal ids (`gdn2_jax.layers.segments`): every mixer's
        state, convolution and attention restart where the id changes, so tokens of different
        documents never interact, even when a later document reuses an earlier one's id (0 marks
        padding, which forms its own documents).
        """
        return head_logits(self.features(tokens, segment_ids=segment_ids), self.head())

    def prefill(self, tokens, *, max_len: int, lengths=None):
        """Chunk path over a prompt [B, T] -> (logits [B, T, vocab], per-block caches).

        `max_len` bounds prompt plus generated tokens: it sizes full-attention KV buffers.
        `lengths` [B] int32: row i's prompt is tokens[i, :lengths[i]] (right-padded); each
        row's cache is the one after its own prompt, and logits past it mean nothing.
        """
        x, caches = self._prefill_blocks(tokens, max_len=max_len, lengths=lengths)
        return self.logits(x), caches

    def prefill_last(self, tokens, *, max_len: int, lengths=None):
        """As `prefill`, but only the logits [B, vocab] at each row's last prompt token (the
        head runs on B positions, not B·T)."""
        x, caches = self._prefill_blocks(tokens, max_len=max_len, lengths=lengths)
        last = jnp.full((x.shape[0],), x.shape[1], jnp.int32) if lengths is None else lengths
        x_last = jnp.take_along_axis(x, (last - 1)[:, None, None], axis=1)[:, 0]
        return self.logits(x_last), caches

    def _prefill_blocks(self, tokens, *, max_len, lengths):
        if lengths is not None:
            # Padding runs with zero gates, which wipe finite values only: any id goes in.
            tokens = jnp.where(jnp.arange(tokens.shape[1]) < lengths[:, None], tokens, 0)
        x = self.embed(tokens)
        caches = []
        for block in self.blocks:
            x, cache = block.prefill(x, max_len=max_len, lengths=lengths)
            caches.append(cache)
        return x, tuple(caches)

    def step_kernels(self) -> tuple[StepKernels, ...]:
        """Per block, the kernels of the projections that read one input, concatenated: made once
        before a decoding loop and passed to every `decode_step`, they let each step read those
        weights in one matmul per group. (XLA's DotMerger does the same but inside the loop,
        copying the weights in every step.)"""
        return tuple(block.step_kernels() for block in self.blocks)

    def decode_step(self, token, caches, kernels: tuple[StepKernels, ...] | None = None):
        """One token [B] int32 after the cached context -> (logits [B, vocab], caches);
        `kernels`: `step_kernels()` (the same numbers, fewer matmuls)."""
        x = self.embed(token)
        new = []
        per_block = (None,) * len(self.blocks) if kernels is None else kernels
        for block, cache, block_kernels in zip(self.blocks, caches, per_block, strict=True):
            x, cache = block.step(x, cache, block_kernels)
            new.append(cache)
        return self.logits(x), tuple(new)


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
