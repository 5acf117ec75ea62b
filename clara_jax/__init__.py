"""clara-jax: CLaRa (continuous latent reasoning for RAG) in JAX/Flax."""

__version__ = "0.1.0"
