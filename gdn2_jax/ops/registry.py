"""One registry of named implementations per form of the op, and how a backend name is resolved.

The chunk form (`gated_delta_rule2`) has "pallas", "xla" and "scan"; the token-serial form
(`gated_delta_rule2_recurrent`, `gated_delta_rule2_step`) has "pallas" and "scan". Each
implementation says through `supports(request)` whether it can run the inputs, and why not.
"auto" takes the first implementation of its form's order that supports them; a name asked for
explicitly either runs or raises NotImplementedError with the reason. Nothing switches silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gdn2_jax.ops import core


@dataclasses.dataclass(frozen=True)
class Request:
    """The facts about a call that decide which implementations can run it."""

    K: int
    V: int
    dtypes: tuple  # of q, k, v, b, w (g is computed in float32 by every implementation)
    chunk_size: int | None  # None for the token-serial form
    platform: str  # jax.default_backend() at trace time
    interpret: bool  # run Pallas kernels in interpret mode (any platform)

    @classmethod
    def of(cls, q, k, v, b, w, *, chunk_size, interpret):
        dtypes = tuple(jnp.dtype(x.dtype) for x in (q, k, v, b, w))
        return cls(q.shape[-1], v.shape[-1], dtypes, chunk_size, jax.default_backend(), interpret)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """A named implementation: `supports` returns None when it can run a request, else why not."""

    name: str
    supports: Callable[[Request], str | None]
    run: Callable


def _always(request: Request) -> None:
    del request


def _pallas_supports(kernel_check: str) -> Callable[[Request], str | None]:
    def supports(request: Request) -> str | None:
        if request.platform != "gpu" and not request.interpret:
            return (
                f"the Pallas kernels need a GPU (this is {request.platform!r}); pass "
                "interpret=True to run them in Pallas interpret mode"
            )
        try:
            unsupported = core.pallas_kernel("pallas_kernels", kernel_check)
        except NotImplementedError as err:  # the package is not importable
            return str(err)
        return unsupported(request.K, request.V, request.dtypes, request.chunk_size)

    return supports


class Registry:
    """The implementations of one form of the op, and the order "auto" tries them in."""

    def __init__(self, form: str, implementations: tuple[Implementation, ...], auto: tuple):
        self.form = form
        self.implementations = {impl.name: impl for impl in implementations}
        self.auto = auto
        self.names = ("auto", *self.implementations)

    def check_name(self, backend: str) -> None:
        if backend not in self.names:
            raise ValueError(f"{self.form} backend must be one of {self.names}, got {backend!r}")

    def select(self, backend: str, request: Request) -> Implementation:
        """The implementation that runs `request` for `backend` (a name, or "auto")."""
        self.check_name(backend)
        if backend != "auto":
            impl = self.implementations[backend]
            reason = impl.supports(request)
            if reason is not None:
                raise NotImplementedError(f'{self.form} backend="{backend}" cannot run: {reason}')
            return impl
        reasons = []
        for name in self.auto:
            impl = self.implementations[name]
            reason = impl.supports(request)
            if reason is None:
                return impl
            reasons.append(f"{name}: {reason}")
        raise NotImplementedError(f"no {self.form} backend supports these inputs: {reasons}")


CHUNK = Registry(
    "chunk",
    (
        Implementation("pallas", _pallas_supports("chunk_unsupported"), core.pallas_chunk),
        Implementation("xla", _always, core.xla_chunk),
        Implementation("scan", _always, core.scan_chunk),
    ),
    auto=("pallas", "xla"),
)

RECURRENT = Registry(
    "token-serial",
    (
        Implementation("pallas", _pallas_supports("recurrent_unsupported"), core.pallas_recurrent),
        Implementation("scan", _always, core.scan_recurrent),
    ),
    auto=("pallas", "scan"),
)
