"""The cost of capturing one streamed reply: SSE parsing plus assembly, no server, no database.

    python benchmarks/bench_capture.py                  # µs per reply (best of 5 rounds)
    python benchmarks/bench_capture.py --replies 0      # the fixed cost, for callgrind

The reply is the usual shape of a chat stream: a role chunk, 20 content chunks, a finish
chunk, a usage chunk and `[DONE]`, 24 events, each sent in its own write as proxies do.
Instruction counts are deterministic, so compare them rather than times on a busy machine:

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python benchmarks/bench_capture.py --replies 2000 --rounds 1
    (the same with --replies 0) -> (Ir difference) / 2000 = instructions per reply
"""

from __future__ import annotations

import argparse
import json
import time

from aiohttp_session_store.capture import ResponseCapture

__all__ = ("main", "reply_writes")


def reply_writes(pieces: int = 20) -> list[bytes]:
    """The writes of one streamed chat reply, one event per write."""
    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def event(choice: dict[str, object], **extra: object) -> bytes:
        body = {**head, "choices": [choice] if choice else [], **extra}
        return f"data: {json.dumps(body)}\n\n".encode()

    writes = [event({"index": 0, "delta": {"role": "assistant", "content": ""}})]
    writes += [
        event({"index": 0, "delta": {"content": f"word{i} "}, "finish_reason": None})
        for i in range(pieces)
    ]
    writes.append(event({"index": 0, "delta": {}, "finish_reason": "stop"}))
    usage = {"prompt_tokens": 9, "completion_tokens": pieces, "total_tokens": 9 + pieces}
    writes.append(event({}, usage=usage))
    writes.append(b"data: [DONE]\n\n")
    return writes


def capture_reply(writes: list[bytes]) -> str | None:
    capture = ResponseCapture(limit=1 << 20, sse=True)
    for data in writes:
        capture.feed(data)
    return capture.result().text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    writes = reply_writes()
    best = float("inf")
    for _ in range(args.rounds):
        started = time.perf_counter()
        for _ in range(args.replies):
            capture_reply(writes)
        best = min(best, time.perf_counter() - started)
    if args.replies:
        print(f"{best / args.replies * 1e6:.1f} µs per reply ({len(writes)} events)")


if __name__ == "__main__":
    main()
