"""claas: continual learning as a service.

A user chats through an OpenAI-compatible API; feedback on an answer becomes one SDPO
self-distillation step on that user's LoRA adapter. See DESIGN.md for the data flow.
"""

__version__ = "0.1.0"
