"""The lineage nodes a store knows: which upstream node a resent history continues.

Nodes are content-addressed and never change once written, so any instance may cache
them: a warm cache answers without a query; a cold one costs one indexed query for all
of a request's candidate points together. The cache is bounded in bytes. New nodes go
to the record writer (committed with the call's records) and into the cache at once, so
the next turn of a conversation finds its parent before the commit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Final

from .backends.base import Backend
from .lineage import ChainLinks, reply_message, root
from .models import LineageNode, Session, new_lineage_node
from .session_cache import str_bytes
from .turn import Turn
from .writer import RecordWriter

__all__ = ("LineageIndex", "node_bytes")

#: What one cached node costs beyond its strings (the node, its dict slot, the key).
_NODE_OVERHEAD: Final = 400
#: The share of the memory budget that remembers chain links (see `ChainLinks`).
_LINKS_SHARE: Final = 4


def node_bytes(node: LineageNode) -> int:
    """An upper estimate of the memory one cached node holds."""
    values = (
        node.hash,
        node.scope,
        node.session_id,
        node.chat_id,
        node.node_id,
        node.response_id,
        node.parent_hash,
    )
    return _NODE_OVERHEAD + sum([str_bytes(v) for v in values if v is not None])


class LineageIndex:
    """Finds the longest known point of a history; remembers the points calls produce."""

    def __init__(self, backend: Backend, writer: RecordWriter, *, max_bytes: int) -> None:
        self._backend = backend
        self._writer = writer
        # One budget for both: a quarter remembers links, the rest nodes.
        self._links = ChainLinks(max_bytes // _LINKS_SHARE)
        self._max_bytes = max_bytes - self._links.max_bytes
        self._cache: OrderedDict[str, tuple[LineageNode, int]] = OrderedDict()
        self._bytes = 0
        self.queries = 0

    @property
    def cached_bytes(self) -> int:
        return self._bytes + self._links.bytes

    def __len__(self) -> int:
        return len(self._cache)

    def _remember(self, node: LineageNode) -> None:
        cache = self._cache
        old = cache.pop(node.hash, None)
        if old is not None:
            self._bytes -= old[1]
        size = node_bytes(node)
        if size > self._max_bytes:
            return  # one node larger than the whole budget is simply not cached
        cache[node.hash] = (node, size)
        self._bytes += size
        while self._bytes > self._max_bytes:
            _, (_, dropped) = cache.popitem(last=False)
            self._bytes -= dropped

    def cached(self, key: str) -> LineageNode | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        self._cache.move_to_end(key)
        return entry[0]

    def _find_cached(self, candidates: Sequence[str]) -> tuple[LineageNode | None, list[str]]:
        """(the best cached node, the later candidates not cached, latest first)."""
        unknown: list[str] = []
        for key in reversed(candidates):
            best = self.cached(key)
            if best is not None:
                return best, unknown
            unknown.append(key)
        return None, unknown

    async def find(self, candidates: Sequence[str]) -> LineageNode | None:
        """The known node of the latest of `candidates` (hashes, oldest point first).

        Answers from memory when the latest known candidate is cached; otherwise one
        query for every candidate after the best cached one.
        """
        best, unknown = self._find_cached(candidates)
        if not unknown:
            return best
        return await self._query(best, unknown)

    async def _query(self, best: LineageNode | None, unknown: list[str]) -> LineageNode | None:
        self.queries += 1
        found = await self._backend.get_lineage_nodes(unknown)
        if not found:
            return best
        by_hash = {node.hash: node for node in found}
        for key in unknown:  # latest first
            node = by_hash.get(key)
            if node is not None:
                self._remember(node)
                return node
        return best

    def forget_before(self, cutoff: int) -> None:
        """Drop cached nodes created before `cutoff` (retention swept them from the store)."""
        for key in [k for k, (n, _) in self._cache.items() if n.created_at < cutoff]:
            _, size = self._cache.pop(key)
            self._bytes -= size

    def record(self, node: LineageNode) -> None:
        """Remember `node` and hand it to the writer (committed with the call's records)."""
        if self.cached(node.hash) is not None:
            return  # content-addressed: the first node of a hash stays
        self._remember(node)
        self._writer.put_node(node)

    async def session_nodes(self, session_id: str) -> list[LineageNode]:
        """Every node of a session, oldest first (a conversation's tree)."""
        return await self._backend.list_lineage_nodes(session_id)

    async def resolve(self, history: list[Any], *, scope: str, session: Session | None) -> Turn:
        """The turn of a call sending `history`: the latest known point it continues.

        Only a point that ends in an assistant message and leaves at least one message
        after it can be continued (the upstream needs something new to answer).
        """
        chain = self._links.chain(history, scope)
        turn = Turn(session=session, scope=scope, history=history)
        if chain is None:
            return turn
        hashes = [digest.hex() for digest in chain]
        turn.hashes = hashes
        turn.last_digest = chain[-1] if chain else None
        candidates = [
            hashes[i]
            for i in range(len(history) - 1)
            if history[i].get("role") == "assistant"  # the chain checked they are dicts
        ]
        if candidates:
            # No await (no coroutine) when memory answers: the common case.
            best, unknown = self._find_cached(candidates)
            turn.node = best if not unknown else await self._query(best, unknown)
        return turn

    def complete(
        self, turn: Turn, reply: object, *, response_id: str | None, now: int
    ) -> LineageNode | None:
        """Record the point a completed call reached: its history, then its reply.

        `reply` is the `chat.completion` object the client received (assembled for a
        stream). Nothing is recorded unless the handler reported the node its reply became.
        """
        if not turn.advanced or turn.reply_node_id is None or turn.hashes is None:
            return None
        message = reply_message(reply)
        if message is None:
            return None
        previous = turn.last_digest
        if previous is None:
            previous = bytes.fromhex(turn.hashes[-1]) if turn.hashes else root(turn.scope)
        digest = self._links.extend(previous, message)
        if digest is None:
            return None
        session = turn.session
        chat_id = turn.reply_chat_id or turn.chat_id or (session.chat_id if session else None)
        node = new_lineage_node(
            hash=digest.hex(),
            scope=turn.scope,
            session_id=session.id if session is not None else None,
            chat_id=chat_id,
            node_id=turn.reply_node_id,
            response_id=response_id,
            depth=len(turn.history) + 1,
            parent_hash=turn.node.hash if turn.node is not None else None,
            created_at=now,
        )
        self.record(node)
        return node
