"""llamacli: a command-line inference engine for Hugging Face Llama checkpoints."""

__version__ = "0.1.0"
