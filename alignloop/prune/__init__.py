"""One-shot structured pruning of a Llama checkpoint (the Llama 3.2 1B/3B method; docs/pruning.md)."""
