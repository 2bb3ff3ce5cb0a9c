"""The PyTorch peer of `bench_train.py`: our recurrent or hybrid LM built from fla 0.6.0's layers.

Blocks are `x + mixer(RMSNorm x)`, `x + GatedMLP(RMSNorm x)` as in `gdn2_jax.model`: the mixer
is fla's `GatedDeltaNet2` with the SiLU output gate (the paper's and our default) or, for "swa"
blocks, sliding-window attention with fla's rotary embedding through torch's compiled
`flex_attention` and a causal window block mask; the MLP is fla's `GatedMLP` with its fused
SwiGLU; the loss is fla's `FusedLinearCrossEntropyLoss` over the untied head. A training step
runs eager under bf16 autocast over float32 weights, with fused AdamW and grad-norm clipping.
Needs CUDA (fla's Triton kernels); on a CPU the model builds, for counting its parameters.
"""

import statistics
import time

import torch
from fla.layers.gdn2 import GatedDeltaNet2
from fla.modules import FusedLinearCrossEntropyLoss, GatedMLP, RMSNorm, RotaryEmbedding
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from gdn2_jax.model_config import ModelConfig

_compiled_flex_attention = None


def _flex_attention(q, k, v, block_mask):
    global _compiled_flex_attention  # compiled once, on first use: only the hybrid needs it
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention(q, k, v, block_mask=block_mask)


class WindowAttention(nn.Module):
    """Causal attention over the last `window` tokens with RoPE: x [B, T, hidden] -> same."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden, self.heads = cfg.hidden_size, cfg.attn_num_heads
        self.kv_heads = cfg.attn_num_kv_heads or cfg.attn_num_heads
        self.head_dim, self.window = cfg.attn_head_dim, cfg.window_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        self.rotary = RotaryEmbedding(self.head_dim, base=cfg.rope_theta)
        self._masks = {}

    def _block_mask(self, T: int, device):
        if T not in self._masks:

            def causal_window(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx < self.window)

            self._masks[T] = create_block_mask(causal_window, None, None, T, T, device=device)
        return self._masks[T]

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        q, k = self.rotary(q, k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # flex_attention takes [B, H, T, D]
        o = _flex_attention(q, k, v, self._block_mask(T, x.device))
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, kind: str):
        super().__init__()
        self.norm_1 = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        if kind == "gdn2":
            self.mixer = GatedDeltaNet2(
                hidden_size=cfg.hidden_size,
                head_dim=cfg.gdn2_head_dim,
                num_heads=cfg.gdn2_num_heads,
                conv_size=cfg.conv_size,
                norm_eps=cfg.norm_eps,
            )
            self.mixer.o_norm.activation = "swish"  # NVIDIA's FusedRMSNormSwishGate
        else:
            self.mixer = WindowAttention(cfg)
        self.kind = kind
        self.norm_2 = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = GatedMLP(
            cfg.hidden_size, intermediate_size=cfg.intermediate_size, fuse_swiglu=True
        )

    def forward(self, x):
        h = self.mixer(self.norm_1(x))
        x = x + (h[0] if self.kind == "gdn2" else h)  # fla's layer returns (o, attn, cache)
        return x + self.mlp(self.norm_2(x))


class PeerLM(nn.Module):
    """tokens [B, T], targets [B, T] -> mean next-token loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.tie_embeddings or "attn" in cfg.block_pattern:
            raise ValueError("the peer builds untied gdn2 / swa models only")
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.block_pattern)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.loss = FusedLinearCrossEntropyLoss()

    def forward(self, tokens, targets):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        # Autocast does not reach into fla's fused loss: cast as it would for the head's matmul.
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        return self.loss(self.norm(x).to(half), targets, self.lm_head.weight.to(half))


def _train_step(model, optimizer, inputs, targets):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def _timed_steps(cfg: ModelConfig, batch: int, seq_len: int, warmup: int, steps: int) -> dict:
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = PeerLM(cfg).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=4e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True
    )
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len + 1), device=device)
    args = (model, optimizer, tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
    torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(warmup):
        _train_step(*args)
    torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = _train_step(*args)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {
        "step_s": statistics.median(times),
        "peak_bytes": torch.cuda.max_memory_allocated(device),
        "warmup_s": warmup_s,
        "loss": float(loss),
    }


def time_peer(cfg: ModelConfig, batch: int, seq_len: int, *, warmup: int, steps: int) -> dict:
    """Median step time, peak allocated memory and warm-up time (fla's autotuning) of the
    peer's training step; its memory is handed back to the device afterwards."""
    result = _timed_steps(cfg, batch, seq_len, warmup, steps)
    torch.cuda.empty_cache()
    return result


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
