"""Model file formats beyond safetensors: GGUF in and out (crdt_merge.formats.gguf)."""
