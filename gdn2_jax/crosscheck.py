"""Cross-framework checking: the same arrays through gdn2_jax and fla's PyTorch reference.

Used by the test suite, the numerics notebook and `python -m gdn2_jax.crosscheck`, which prints the
relative error of the forward and of every gradient per backend. torch and fla-core (the `test`
extra) are imported only when a reference is computed.
"""

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gdn2_jax.ops import gated_delta_rule2

NAMES = ("q", "k", "v", "g", "b", "w", "initial_state")


def rel_err(a, b):
    """‖a − b‖ / ‖b‖ in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@dataclasses.dataclass(frozen=True)
class Shape:
    B: int = 2
    T: int = 100
    H: int = 2
    K: int = 32
    V: int = 16


def make_inputs(seed, shape: Shape, *, extreme=False, with_h0=True, g_scale=0.3):
    """Random inputs as float32 numpy arrays: normalized keys, gates in range, g ≤ 0.

    With `extreme`, 10% of the log-decays are drawn from [−80, −20] (hard resets).
    """
    rng = np.random.default_rng(seed)
    B, T, H, K, V = dataclasses.astuple(shape)

    def normal(*dims):
        return rng.standard_normal(dims).astype(np.float32)

    def sigmoid(x):
        return (1 / (1 + np.exp(-x))).astype(np.float32)

    k = normal(B, T, H, K)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    g = (-np.exp(normal(B, T, H, K)) * g_scale).astype(np.float32)
    if extreme:
        hard = rng.random(g.shape) < 0.1
        g = np.where(hard, rng.uniform(-80, -20, g.shape), g).astype(np.float32)
    return dict(
        q=normal(B, T, H, K),
        k=k,
        v=normal(B, T, H, V),
        g=g,
        b=sigmoid(normal(B, T, H, K)),
        w=sigmoid(normal(B, T, H, V)),
        initial_state=normal(B, H, K, V) if with_h0 else None,
    )


def make_cotangents(seed, shape: Shape, n_states=None):
    rng = np.random.default_rng(seed + 1000)
    B, T, H, K, V = dataclasses.astuple(shape)
    n = B if n_states is None else n_states
    return (
        rng.standard_normal((B, T, H, V)).astype(np.float32),
        rng.standard_normal((n, H, K, V)).astype(np.float32),
    )


def torch_reference(inputs, cotangents, reference=None):
    """Forward and all gradients of fla's naive recurrence (float32, CPU; needs torch, fla-core)."""
    import torch
    from fla.ops.gdn2.naive import naive_recurrent_gdn2

    reference = reference or naive_recurrent_gdn2
    names = [n for n in NAMES if inputs[n] is not None]
    tensors = {n: torch.tensor(inputs[n], requires_grad=True) for n in names}
    args = [tensors[n] for n in NAMES[:6]]
    o, S = reference(*args, initial_state=tensors.get("initial_state"), output_final_state=True)
    do, dS = (torch.tensor(c) for c in cotangents)
    ((o * do).sum() + (S * dS).sum()).backward()
    grads = {n: tensors[n].grad.numpy() for n in names}
    return o.detach().numpy(), S.detach().numpy(), grads


def jax_forward_and_grads(inputs, cotangents, fn=gated_delta_rule2, **kwargs):
    """(o, final_state, grads by name) of a JAX implementation with the same cotangents."""
    names = [n for n in NAMES if inputs[n] is not None]

    def run(*arrays):
        named = dict(zip(names, arrays, strict=True))
        return fn(
            *(named[n] for n in NAMES[:6]),
            initial_state=named.get("initial_state"),
            output_final_state=True,
            **kwargs,
        )

    (o, S), vjp = jax.vjp(run, *(jnp.asarray(inputs[n]) for n in names))
    grads = vjp(tuple(jnp.asarray(c) for c in cotangents))
    return np.asarray(o), np.asarray(S), dict(zip(names, map(np.asarray, grads), strict=True))


def compare_with_fla(inputs, backend, seed=0, **kwargs):
    """Relative error of o, the final state and every gradient of `backend` against fla."""
    shape = Shape(*inputs["q"].shape[:3], inputs["q"].shape[3], inputs["v"].shape[3])
    cotangents = make_cotangents(seed, shape)
    o_ref, S_ref, g_ref = torch_reference(inputs, cotangents)
    o, S, grads = jax_forward_and_grads(
        inputs, cotangents, fn=gated_delta_rule2, backend=backend, **kwargs
    )
    errors = {"o": rel_err(o, o_ref), "final_state": rel_err(S, S_ref)}
    return errors | {f"d{n}": rel_err(grads[n], g_ref[n]) for n in grads}


def main():
    parser = argparse.ArgumentParser(description="GDN-2 errors against fla's naive recurrence")
    parser.add_argument("--backends", nargs="+", default=["scan", "xla"])
    parser.add_argument("--lengths", nargs="+", type=int, default=[63, 100, 130])
    parser.add_argument("--extreme", action="store_true", help="10%% of g in [-80, -20]")
    parser.add_argument(
        "--interpret", action="store_true", help="run the Pallas kernels in interpret mode (CPU)"
    )
    args = parser.parse_args()
    rows = []
    for backend in args.backends:
        for T in args.lengths:
            inputs = make_inputs(T, Shape(T=T), extreme=args.extreme)
            rows.append((backend, T, compare_with_fla(inputs, backend, interpret=args.interpret)))
    names = list(rows[0][2])
    print(f"{'backend':<8} {'T':>4} " + " ".join(f"{n:>11}" for n in names))
    for backend, T, errors in rows:
        print(f"{backend:<8} {T:>4} " + " ".join(f"{errors[n]:>11.2e}" for n in names))


if __name__ == "__main__":
    main()
