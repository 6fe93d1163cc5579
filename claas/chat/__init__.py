"""Serving: sample an answer from an adapter's current version and record its rollout.

The first half of the data flow (docs/architecture.md), in three parts:
- `claas.chat.service`: `ChatService`, which resolves a request's model to weights, samples the
  answer and stores its rollout, so feedback can later name it by completion id;
- `claas.chat.stream`: an answer's visible text, streamed as its tokens arrive;
- `claas.chat.slots`: how many generations each owner may run at once.

    chat = ChatService(service, store, base_model, tokenizer, max_context, rollout_ttl)
    completion = await chat.complete(chat.resolve("alice/assistant"), messages, params)
"""

from claas.chat.service import (
    ChatService,
    Choice,
    Completion,
    ModelTarget,
    TextCallback,
    new_completion_id,
)
from claas.chat.slots import GenerationSlot, GenerationSlots
from claas.chat.stream import StreamDecoder, cut_at_stop, stop_strings, visible_text

__all__ = [
    "ChatService",
    "Choice",
    "Completion",
    "GenerationSlot",
    "GenerationSlots",
    "ModelTarget",
    "StreamDecoder",
    "TextCallback",
    "cut_at_stop",
    "new_completion_id",
    "stop_strings",
    "visible_text",
]
