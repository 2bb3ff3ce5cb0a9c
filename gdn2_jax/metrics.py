"""Training telemetry: JSONL and TensorBoard writers, the progress bar, and analytic FLOPs/MFU."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax

# Dense bf16 peak FLOP/s per device (vendor datasheets, no sparsity), matched against
# jax.Device.device_kind. Devices not listed (CPUs) get no MFU.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("B200", 2250e12),
    ("L40S", 362e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v4", 275e12),
    ("TPU v6", 918e12),
)


def peak_flops(device_kind: str) -> float | None:
    for name, flops in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


class MetricsWriter:
    """Appends one JSON object per record to `metrics.jsonl` and mirrors scalars to TensorBoard.

    Only process 0 writes; the others get a writer that does nothing, so call sites need no
    `if process_index == 0`.
    """

    def __init__(self, workdir: str | Path, *, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, split: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"split": split, "step": step, "time": time.time(), **metrics}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def drop_records_after(workdir: str | Path, step: int) -> None:
    """Removes the records of steps after `step` from `metrics.jsonl`: a run resumed from
    `step` logs those steps again, and one record per step and split stays true. A last line
    without its newline is a record the previous process was killed writing, and goes too. The
    file is replaced whole (a new file renamed over it)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    complete = lines if not lines or lines[-1].endswith("\n") else lines[:-1]
    kept = []
    for number, line in enumerate(complete, 1):
        try:
            record_step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{number} is not a metrics record ({e!r}): {line!r}") from e
        if record_step <= step:
            kept.append(line)
    if len(kept) == len(lines):
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    tmp.replace(path)


class Throughput:
    """Tokens/s and MFU over the interval since the previous call."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_total: float | None):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_total = peak_total
        self._time, self._step = time.perf_counter(), None

    def reset(self, step: int) -> None:
        self._time, self._step = time.perf_counter(), step

    def measure(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps = step - (self._step if self._step is not None else step)
        elapsed, self._time, self._step = now - self._time, now, step
        if steps <= 0 or elapsed <= 0:
            return {}
        tokens_per_s = steps * self.tokens_per_step / elapsed
        out = {"tokens_per_s": tokens_per_s, "step_time_s": elapsed / steps}
        if self.peak_total:
            out["mfu"] = tokens_per_s * self.flops_per_token / self.peak_total
        return out


def total_peak_flops(override_per_device: float = 0.0) -> float | None:
    per_device = override_per_device or peak_flops(jax.devices()[0].device_kind)
    return per_device * jax.device_count() if per_device else None


def progress_bar(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(initial=start, total=total, disable=not enabled, dynamic_ncols=True, unit="step")


def format_postfix(metrics: dict[str, float]) -> dict[str, str]:
    out = {"loss": f"{metrics['loss']:.4f}"}
    if "tokens_per_s" in metrics:
        out["tok/s"] = f"{metrics['tokens_per_s']:,.0f}"
    if "mfu" in metrics:
        out["mfu"] = f"{metrics['mfu']:.1%}"
    return out


def is_finite(x: float) -> bool:
    return math.isfinite(x)


def _matmul_params(params: dict, tied: bool) -> int:
    """Parameters used once per token in a multiply-add: every matrix (projections, depthwise
    convolutions) except the embedding table, which is a lookup unless it doubles as the head."""
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if len(x.shape) < 2:
            continue
        if not tied and str(getattr(path[-1], "key", "")) == "wte":
            continue
        total += math.prod(x.shape)
    return total


def gdn2_flops_per_token(num_heads: int, K: int, V: int, C: int) -> float:
    """Forward FLOPs per token of one GDN-2 op, chunkwise WY form (paper Eqs. 18-25):
    q·kᵀ and (b⊙k)·kᵀ within the chunk (2·2CK), the triangular solve applied to the K- and
    V-wide right-hand sides (C(K+V)), the intra-chunk A·u (2CV), and the three state products
    q·S, k·S and kᵀ·u (3·2KV)."""
    return num_heads * (5 * C * K + 3 * C * V + 6 * K * V)


def attention_flops_per_token(hidden: int, seq_len: int, window: int | None) -> float:
    """Forward FLOPs per token of causal attention scores and weighted sum (2·2·d·context),
    with the context averaged over positions."""
    span = seq_len if window is None else min(window, seq_len)
    context = sum(min(t + 1, span) for t in range(seq_len)) / seq_len
    return 4 * hidden * context


def train_flops_per_token(model_cfg, seq_len: int, params: dict) -> float:
    """Analytic training FLOPs per token: 6 per matmul parameter (forward 2, backward 4) plus
    three times the forward FLOPs of the token mixers. Rematerialisation is not counted, as in
    the usual MFU definition."""
    mixers = 0.0
    for kind in model_cfg.block_pattern:
        if kind == "gdn2":
            heads = model_cfg.gdn2_num_v_heads or model_cfg.gdn2_num_heads
            K = model_cfg.gdn2_head_dim
            V = round(K * model_cfg.gdn2_expand_v)
            mixers += gdn2_flops_per_token(heads, K, V, min(model_cfg.chunk_size, seq_len))
        else:
            window = model_cfg.window_size if kind == "swa" else None
            mixers += attention_flops_per_token(model_cfg.hidden_size, seq_len, window)
    return 6 * _matmul_params(params, model_cfg.tie_embeddings) + 3 * mixers
