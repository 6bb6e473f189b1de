"""Where a model's checkpoint comes from: a directory, a GGUF file converted once, or the Hugging Face hub
cache (`sources.resolve_model`). Nothing here imports torch, so the launcher stays light."""
