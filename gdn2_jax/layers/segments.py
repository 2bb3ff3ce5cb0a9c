"""What a document is, for every mixer: a maximal run of equal segment ids.

Packed rows carry segment ids [B, T]; a document starts wherever the id differs from the previous
token's (and at t = 0). An id may come back later (1, 1, 2, 2, 1, 1 is three documents): the
GDN-2 state resets at each start, and the convolutions and attention compare `document_ids`,
the run number, never the raw ids, so that all mixers agree on the same boundaries.
"""

import jax.numpy as jnp


def segment_starts(segment_ids, previous=None):
    """[B, T] bool: the token opens a document.

    `previous` [B, 1]: the id of the token before t = 0 (a span continuing a sequence); without it
    t = 0 opens a document."""
    if previous is None:
        before = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)))
        return (segment_ids != before) | (jnp.arange(segment_ids.shape[1]) == 0)
    before = jnp.concatenate([previous.astype(segment_ids.dtype), segment_ids[:, :-1]], axis=1)
    return segment_ids != before


def document_ids(segment_ids):
    """[B, T] int32: the number of document starts up to and including each token, so that two
    tokens of one row are in the same document exactly when their document ids are equal."""
    return jnp.cumsum(segment_starts(segment_ids), axis=1, dtype=jnp.int32)
