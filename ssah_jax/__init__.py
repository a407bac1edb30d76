"""ssah_jax: safety-alignment research in JAX/Flax (Li & Kim: SSAH and explicit safety signals)."""

import os

# transformers' "PyTorch was not found. Models won't be available ..." advice, printed when it is
# imported without torch: ssah_jax reads configs and tokenizers through it and never needs its
# torch models (set before any of our modules imports transformers; a user's own value wins).
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
