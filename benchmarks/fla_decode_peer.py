"""The PyTorch side of `bench_generate.py`'s per-layer table: one decoding token of fla 0.6.0's
`GatedDeltaNet2` layer (with its cache, so it takes the `fused_recurrent_gdn2` path) and of the
`fused_recurrent_gdn2` op alone, eager, timed between CUDA events. Needs CUDA.
"""

import torch
from fla.layers.gdn2 import GatedDeltaNet2
from fla.ops.gdn2 import fused_recurrent_gdn2

from gdn2_jax.model_config import ModelConfig

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def _per_step_us(step, steps: int) -> float:
    for _ in range(3):
        step()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / steps * 1e3


def _time_op(cfg: ModelConfig, batch: int, steps: int, dtype) -> float:
    H, K = cfg.gdn2_num_heads, cfg.gdn2_head_dim
    V = round(K * cfg.gdn2_expand_v)
    dev = "cuda"
    q, k, b = (torch.randn(batch, 1, H, K, device=dev, dtype=dtype) for _ in range(3))
    v, w = (torch.randn(batch, 1, H, V, device=dev, dtype=dtype) for _ in range(2))
    g = -torch.rand(batch, 1, H, K, device=dev, dtype=torch.float32)
    b, w = b.sigmoid(), w.sigmoid()
    state = [torch.zeros(batch, H, K, V, device=dev, dtype=torch.float32)]

    def step():
        _, state[0] = fused_recurrent_gdn2(
            q, k, v, g, b, w, initial_state=state[0], output_final_state=True,
            use_qk_l2norm_in_kernel=True,
        )  # fmt: skip

    return _per_step_us(step, steps)


def _time_layer(cfg: ModelConfig, batch: int, steps: int, dtype) -> float:
    from fla.models.cache_utils import Cache  # needs transformers

    layer = GatedDeltaNet2(
        hidden_size=cfg.hidden_size, num_heads=cfg.gdn2_num_heads, head_dim=cfg.gdn2_head_dim,
        expand_v=cfg.gdn2_expand_v, conv_size=cfg.conv_size, layer_idx=0, mode="chunk",
        norm_eps=cfg.norm_eps,
    ).to(device="cuda", dtype=dtype).eval()  # fmt: skip
    x = torch.randn(batch, 1, cfg.hidden_size, device="cuda", dtype=dtype)
    cache = Cache()
    layer(x, past_key_values=cache, use_cache=True)  # the first token creates the cache

    def step():
        layer(x, past_key_values=cache, use_cache=True)

    return _per_step_us(step, steps)


def time_fla_layer(cfg: ModelConfig, batch: int, steps: int):
    """LayerRows for fla's layer step and op step at `batch` (imported here: torch is optional)."""
    from bench_generate import LayerRow

    dtype = DTYPES[cfg.dtype]
    rows = []
    with torch.no_grad():
        try:
            rows.append(LayerRow(batch, "fla layer step", _time_layer(cfg, batch, steps, dtype)))
        except ImportError as err:  # fla's Cache subclasses transformers' Cache
            rows.append(LayerRow(batch, "fla layer step", None, f"not run: {err}"))
        rows.append(LayerRow(batch, "fla op step", _time_op(cfg, batch, steps, dtype)))
    return rows
