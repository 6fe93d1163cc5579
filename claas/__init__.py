"""claas: continual learning as a service.

A user chats through an OpenAI-compatible API; feedback on an answer becomes one SDPO
self-distillation step on that user's LoRA adapter. docs/architecture.md describes the data
flow and the layers.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("claas")  # the one definition is pyproject.toml's
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
