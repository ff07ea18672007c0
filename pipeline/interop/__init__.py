"""Interoperability with other model libraries (Hugging Face transformers: `pipeline.interop.hf`)."""
