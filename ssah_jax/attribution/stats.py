"""Streaming per-unit moments: count, mean and centred sum of squares, merged batch by batch.

Each batch's moments are computed in two passes over that batch (mean, then squared
deviations) in float32, and batches are merged with Chan et al.'s parallel update. That is
Welford's algorithm applied one batch at a time: no large-mean cancellation, and the result
does not depend on how the calibration set is cut into batches (up to rounding).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Moments(NamedTuple):
    """Moments of ``[..., units]`` activations over the tokens seen so far."""

    count: jax.Array  # int32 scalar: tokens counted
    mean: jax.Array  # float32 [..., units]
    m2: jax.Array  # float32 [..., units]: sum of squared deviations from the mean

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> Moments:
        return cls(jnp.zeros((), jnp.int32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32))

    @property
    def variance(self) -> jax.Array:
        """Population variance (divides by the token count)."""
        return self.m2 / jnp.maximum(self.count, 1).astype(jnp.float32)

    @property
    def sum_squares(self) -> jax.Array:
        """``sum_t x_t^2`` (Wanda's squared input norm)."""
        return self.m2 + self.count.astype(jnp.float32) * self.mean**2


def batch_moments(x: jax.Array, mask: jax.Array) -> Moments:
    """Moments of ``x`` ``[B, S, units]`` over the tokens where ``mask`` ``[B, S]`` is True."""
    x = x.astype(jnp.float32)
    m = mask.astype(jnp.float32)[..., None]
    count = jnp.sum(mask.astype(jnp.int32))
    mean = jnp.sum(x * m, axis=(0, 1)) / jnp.maximum(count, 1).astype(jnp.float32)
    m2 = jnp.sum(jnp.square((x - mean) * m), axis=(0, 1))
    return Moments(count, mean, m2)


def merge(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two disjoint token sets."""
    count = a.count + b.count
    na, nb = a.count.astype(jnp.float32), b.count.astype(jnp.float32)
    n = jnp.maximum(count, 1).astype(jnp.float32)
    delta = b.mean - a.mean
    mean = a.mean + delta * (nb / n)
    m2 = a.m2 + b.m2 + jnp.square(delta) * (na * nb / n)
    return Moments(count, mean, m2)
