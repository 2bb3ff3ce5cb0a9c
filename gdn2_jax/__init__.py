"""gdn2-jax: Gated DeltaNet-2 in JAX/Flax."""

__version__ = "0.1.0"
