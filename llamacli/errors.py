"""Domain errors: each carries a one-line message meant for the user, and an exit code for the CLI."""


class LlamaCliError(Exception):
    """Base of every error llamacli reports to a user (exit code 1: a runtime failure)."""

    exit_code = 1


class UsageError(LlamaCliError):
    """The user asked for something invalid (a bad option value): exit code 2."""

    exit_code = 2


class InputError(LlamaCliError):
    """A path or input file is missing, unreadable or malformed."""


class ConfigError(LlamaCliError):
    """config.json / generation_config.json is missing, malformed or describes an unsupported model."""


class WeightsError(LlamaCliError):
    """Checkpoint tensors are missing, unexpected, mis-shaped, corrupt or in a refused format."""


class TokenizerError(LlamaCliError):
    """The tokenizer or chat template is missing or cannot be used."""


class ContextOverflowError(LlamaCliError):
    """A request needs more positions than the KV cache or the model's context holds."""
