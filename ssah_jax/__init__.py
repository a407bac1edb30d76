"""ssah_jax: safety-alignment research in JAX/Flax (Li & Kim: SSAH and explicit safety signals)."""

__version__ = "0.1.0"
