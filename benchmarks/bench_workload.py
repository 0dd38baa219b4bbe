"""The benchmark's traffic: deterministic chat.completions request bodies over ~1000 conversations.

Every body is a conversation as an OpenAI client resends it: a system message, the first user
message (which names the session), then a few assistant/user turns. Bodies are ordered turn by
turn, so a load generator that rotates through them revisits each conversation with a longer
history, as real clients do.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Final

__all__ = (
    "AUTHORIZATION",
    "CHAT_PATH",
    "DEFAULT_CONVERSATIONS",
    "MAX_TURNS",
    "REPLY_TEXT",
    "conversation_bodies",
    "write_bodies",
)

CHAT_PATH: Final = "/v1/chat/completions"
AUTHORIZATION: Final = "Bearer sk-bench-0123456789abcdef0123456789abcdef"
DEFAULT_CONVERSATIONS: Final = 1000
MAX_TURNS: Final = 4

#: What bench_app replies to every call (20 chunks of it over SSE). A client resends the
#: replies it received, so the assistant turns of a history are this text: the store's
#: conversation lineage then finds each turn's parent, as it does for a real client.
REPLY_TEXT: Final = "".join(f"word{i} " for i in range(20))

_SYSTEM: Final = (
    "You are a helpful assistant. Answer concisely, cite sources when you can, and say so"
    " plainly when you do not know."
)
_TOPICS: Final = (
    "the difference between TCP and UDP",
    "how to cook rice without a rice cooker",
    "why the sky is blue",
    "a good name for a grey cat",
    "how SQLite's write-ahead log works",
    "the plot of Hamlet in three sentences",
    "how to read a flame graph",
    "what a B-tree is",
)
_FOLLOW_UPS: Final = (
    "Can you give an example?",
    "Shorter, please.",
    "Why is that?",
    "And what about the opposite case?",
    "Thanks. One more question about that.",
)


def _messages(rng_seed: int, conversation: int, turns: int) -> list[dict[str, str]]:
    topic = _TOPICS[conversation % len(_TOPICS)]
    # The conversation number makes each first message, hence each session id, distinct.
    first = f"Conversation {conversation}: please explain {topic}. " + "Some context. " * (
        1 + conversation % 5
    )
    messages = [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": first}]
    for turn in range(1, turns):
        messages.append({"role": "assistant", "content": REPLY_TEXT})
        # Drawn per (conversation, turn): each turn's history extends the previous one's.
        follow_up = random.Random(rng_seed * 1_000_003 + conversation * 31 + turn).choice(
            _FOLLOW_UPS
        )
        messages.append({"role": "user", "content": follow_up})
    return messages


def conversation_bodies(
    *, stream: bool, conversations: int = DEFAULT_CONVERSATIONS, seed: int = 1
) -> list[bytes]:
    """Request bodies (JSON bytes), turn 1 of every conversation first, then turn 2, ..."""
    bodies: list[bytes] = []
    for turns in range(1, MAX_TURNS + 1):
        for conversation in range(conversations):
            body: dict[str, Any] = {
                "model": "bench-model",
                "messages": _messages(seed, conversation, turns),
                "stream": stream,
                "temperature": 0.7,
            }
            if stream:
                body["stream_options"] = {"include_usage": True}
            bodies.append(json.dumps(body, separators=(",", ":")).encode())
    return bodies


def write_bodies(path: Path, bodies: list[bytes]) -> Path:
    """One compact JSON body per line (what wrk's Lua script and the aiohttp loader read)."""
    path.write_bytes(b"".join(body + b"\n" for body in bodies))
    return path
