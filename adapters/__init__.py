"""Versioned LoRA adapter registry, merge, and verified GGUF export."""
