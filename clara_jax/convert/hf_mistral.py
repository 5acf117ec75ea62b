"""Hugging Face Mistral and our base checkpoint: moved to `clara_jax.clara.formats.hf_mistral`
(every checkpoint format sits in `clara.formats`); these names stay importable from here."""

from clara_jax.clara.formats.hf_mistral import (CONFIG, TOKENIZER, config_from_hf,
                                                config_to_hf, convert_hf_to_checkpoint,
                                                hf_tensors, layout, load_checkpoint,
                                                load_hf_mistral, save_checkpoint,
                                                save_hf_mistral)

__all__ = ["CONFIG", "TOKENIZER", "config_from_hf", "config_to_hf", "convert_hf_to_checkpoint",
           "hf_tensors", "layout", "load_checkpoint", "load_hf_mistral", "save_checkpoint",
           "save_hf_mistral"]
