"""Vision: the Llama 3.2 Vision cross-attention model, its data, the Llama 3-V variant and the
built-in shapes demo (reference section C). Light imports only: each module imports what it needs."""
