"""How OpenAI shows a token in log-probs: as text, with its UTF-8 bytes.

A byte-level BPE piece such as 'Ġhello' or 'Ã©' is not text: its characters stand for bytes
(GPT-2's table, `bytes_to_unicode`). The bytes are recovered exactly; the text is their UTF-8
decoding, or `bytes:\\xe2\\x80` when a token holds only part of a character, as OpenAI writes it.
"""

from __future__ import annotations

import re

from transformers import PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


class TokenText:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def show(self, token_id: int) -> tuple[str, list[int]]:
        """The token's text and its UTF-8 bytes."""
        if token_id not in self._cache:
            raw = self._bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._cache[token_id] = (text, list(raw))
        return self._cache[token_id]

    def _bytes(self, token_id: int) -> bytes:
        piece = str(self.tokenizer.convert_ids_to_tokens(token_id))
        if token_id in self.tokenizer.all_special_ids:
            return piece.encode()
        if self._byte_level and all(char in self._byte_of for char in piece):
            return bytes(self._byte_of[char] for char in piece)
        if match := _BYTE_PIECE.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        return str(self.tokenizer.decode([token_id])).encode()
