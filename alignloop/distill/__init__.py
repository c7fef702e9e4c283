"""Knowledge distillation of a student from one or more teachers' logits (docs/pruning.md)."""
