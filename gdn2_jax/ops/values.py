"""Value checks of the op's inputs: values that break the math never give a finite wrong number.

What breaks the math: g > 0 or NaN in g (a log-decay is ≤ 0; g = −inf is a hard reset and is
exact), NaN or ±inf in q, k, v, b, w or the initial state, and a cu_seqlens that does not start
at 0, end at T and never decrease. Each argument is screened as it arrives:

* concrete (the op called outside jit and other transformations): ValueError at once, naming
  the argument, the first bad index and its value;
* traced, with check_values=True: the same check through `jax.experimental.checkify` (the caller
  wraps the function with `checkify.checkify` and calls `err.throw()`);
* traced, always: the affected sequences are quarantined. Their outputs and final states are NaN,
  and so is the gradient of each of their inputs; every other sequence is computed exactly as
  without them. A sequence is a batch row, or one packed sequence with cu_seqlens. A bad traced
  cu_seqlens affects every sequence, and a valid stand-in runs in its place so that no kernel
  indexes outside the arrays.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

TOKEN_LAYOUT = "[b, t, h, d]"
STEP_LAYOUT = "[b, h, d]"
STATE_LAYOUT = "[n, h, k, v]"


class Quarantine(NamedTuple):
    """Which sequences traced inputs make meaningless, as masks over the op's outputs."""

    tokens: jax.Array  # bool [B, T] ([B] for one-token inputs): outputs to poison
    states: jax.Array  # bool [N]: final states and initial-state gradients to poison
    cu_seqlens: jax.Array | None  # what the op runs with: a valid stand-in where it was bad


def _traced(x):
    return isinstance(x, jax.core.Tracer)


def _violations(name, x):
    """Elementwise mask of the values of argument `name` that break the math, and the rule."""
    if name == "g":
        rule = "must be <= 0 and not NaN (a log-decay; -inf, a hard reset, is allowed)"
        return jnp.isnan(x) | (x > 0), rule
    return ~jnp.isfinite(x), "must be finite (no NaN or inf)"


def _message(name, rule, ndim):
    """A message template with {} for each index and the value (str.format and checkify)."""
    index = ", ".join(["{}"] * ndim)
    return f"{name} {rule}: {name}[{index}] = {{}}"


def _check_array(name, x, check_values):
    """Raises for a concrete `x`; for a traced one returns its violation mask (checked through
    checkify when `check_values`)."""
    if not _traced(x):
        # Evaluated now, on x's device, even while a caller is being traced.
        with jax.ensure_compile_time_eval():
            bad, rule = _violations(name, x)
            if bool(jnp.any(bad)):
                index = np.unravel_index(int(jnp.argmax(bad.ravel())), bad.shape)
                value = np.asarray(x[index])
                raise ValueError(_message(name, rule, x.ndim).format(*index, value))
        return None
    bad, rule = _violations(name, x)
    if check_values:
        index = jnp.unravel_index(jnp.argmax(bad.ravel()), bad.shape)
        checkify.check(~jnp.any(bad), _message(name, rule, x.ndim), *index, x[index])
    return bad


def _cu_seqlens_violations(cu, length):
    """(condition, message template, format args) for each way cu_seqlens can be wrong."""
    drop = jnp.diff(cu) < 0
    i = jnp.argmax(drop)
    return (
        (cu[0] != 0, "cu_seqlens must start at 0, got cu_seqlens[0] = {}", (cu[0],)),
        (cu[-1] != length, f"cu_seqlens must end at T={length}, got {{}}", (cu[-1],)),
        (
            jnp.any(drop),
            "cu_seqlens must be non-decreasing, got cu_seqlens[{}] = {} > cu_seqlens[{}] = {}",
            (i, cu[i], i + 1, cu[i + 1]),
        ),
    )


def _check_cu_seqlens(cu, length, check_values):
    """Raises for a concrete cu_seqlens; for a traced one returns whether it is wrong."""
    if not _traced(cu):
        with jax.ensure_compile_time_eval():
            for wrong, template, args in _cu_seqlens_violations(jnp.asarray(cu), length):
                if bool(wrong):
                    raise ValueError(template.format(*(int(a) for a in args)))
        return None
    violations = _cu_seqlens_violations(cu, length)
    if check_values:
        for wrong, template, args in violations:
            checkify.check(~wrong, template, *args)
    return jnp.any(jnp.stack([wrong for wrong, _, _ in violations]))


def raise_on_concrete(tensors, *, initial_state, cu_seqlens, length):
    """The checks of every concrete argument (ValueError); traced arguments pass unchecked."""
    for name, x in tensors.items():
        if not _traced(x):
            _check_array(name, x, check_values=False)
    if initial_state is not None and not _traced(initial_state):
        _check_array("initial_state", initial_state, check_values=False)
    if cu_seqlens is not None and not _traced(cu_seqlens):
        _check_cu_seqlens(cu_seqlens, length, check_values=False)


def screen(tensors, *, initial_state, cu_seqlens, check_values, state_name="initial_state"):
    """Checks the op's inputs; returns the Quarantine of the traced ones, or None when every
    argument was concrete (and therefore already verified).

    tensors: {"q": q, ..., "w": w}, [B, T, H, *] (or [B, H, *] for one token).
    """
    step = tensors["q"].ndim == 3
    T = None if step else tensors["q"].shape[1]
    token_axes = (1, 2) if step else (2, 3)
    bad_tokens = [_check_array(n, x, check_values) for n, x in tensors.items()]
    bad_tokens = [jnp.any(m, axis=token_axes) for m in bad_tokens if m is not None]
    bad_state = None
    if initial_state is not None:
        bad_state = _check_array(state_name, initial_state, check_values)
        bad_state = None if bad_state is None else jnp.any(bad_state, axis=(1, 2, 3))
    bad_cu = None if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, T, check_values)
    if not bad_tokens and bad_state is None and bad_cu is None:
        return None
    tok = jnp.zeros(tensors["q"].shape[: 1 if step else 2], bool)
    for mask in bad_tokens:
        tok = tok | mask
    if cu_seqlens is None:
        row = tok if step else jnp.any(tok, axis=1)
        if bad_state is not None:
            row = row | bad_state
        return Quarantine(row if step else jnp.broadcast_to(row[:, None], tok.shape), row, None)
    return _packed_quarantine(tok[0], bad_state, cu_seqlens, bad_cu)


def _packed_quarantine(tok, bad_state, cu_seqlens, bad_cu):
    """Quarantine of packed sequences (B = 1) from the bad tokens tok [T]."""
    T, n = tok.shape[0], cu_seqlens.shape[0] - 1
    cu = jnp.asarray(cu_seqlens, jnp.int32)
    run_with = cu_seqlens
    if bad_cu is not None:
        stand_in = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.full(n, T, jnp.int32)])
        cu = jnp.where(bad_cu, stand_in, cu)
        run_with = cu.astype(cu_seqlens.dtype)
    seq_of = jnp.clip(jnp.searchsorted(cu[1:], jnp.arange(T), side="right"), 0, n - 1)
    seq = jax.ops.segment_max(tok.astype(jnp.int32), seq_of, num_segments=n) > 0
    if bad_state is not None:
        seq = seq | bad_state
    if bad_cu is not None:
        seq = seq | bad_cu
    return Quarantine(seq[seq_of][None], seq, run_with)


@jax.custom_vjp
def _nan_gradient(x, bad):
    """x itself; its cotangent is NaN where `bad` (broadcast to x)."""
    del bad
    return x


def _nan_gradient_fwd(x, bad):
    return x, bad


def _nan_gradient_bwd(bad, ct):
    return jnp.where(bad, jnp.nan, ct).astype(ct.dtype), None


_nan_gradient.defvjp(_nan_gradient_fwd, _nan_gradient_bwd)


def _expand(mask, ndim):
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def guard_inputs(quarantine: Quarantine, tensors, initial_state):
    """The inputs with NaN gradients on the quarantined sequences (values unchanged)."""
    tensors = tuple(_nan_gradient(x, _expand(quarantine.tokens, x.ndim)) for x in tensors)
    if initial_state is not None:
        initial_state = _nan_gradient(initial_state, _expand(quarantine.states, 4))
    return tensors, initial_state


def poison_outputs(quarantine: Quarantine, o, final_state):
    """NaN outputs and final states on the quarantined sequences."""
    o = jnp.where(_expand(quarantine.tokens, o.ndim), jnp.nan, o).astype(o.dtype)
    if final_state is not None:
        final_state = jnp.where(_expand(quarantine.states, 4), jnp.nan, final_state)
    return o, final_state
