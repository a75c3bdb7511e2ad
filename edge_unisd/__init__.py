"""UniSD self-distillation for on-device LLMs: the method (imports no other package of this project)."""
