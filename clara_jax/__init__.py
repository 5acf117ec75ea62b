"""clara-jax: CLaRa (continuous latent reasoning for RAG) in JAX/Flax.

Public API: `Clara` (load, save, compress, retrieve, generate), `straight_through_topk`.
"""

__version__ = "0.1.0"

from clara_jax.clara.model import Clara, GenerationOutput  # noqa: E402
from clara_jax.clara.topk import straight_through_topk  # noqa: E402

__all__ = ["Clara", "GenerationOutput", "straight_through_topk", "__version__"]
