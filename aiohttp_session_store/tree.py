"""A session's conversation as the tree it is: lineage nodes in, branches and the active path out.

Pure (no I/O): `show`, the query API's ``GET /sessions/{id}/tree`` and the viewer build
their tree here from `Backend.list_lineage_nodes` and the session's exchanges.

Regenerate and edit give one node several children (sibling branches). The *active path*
is the chain from the newest node back to its root through `parent_hash`: the
conversation as the client last saw it. A node whose parent is not in the session (it
continued a chain recorded under another session) is a root here; its `parent_hash`
still says where it came from.

Trees are walked without recursion, and the JSON is flat (children as hashes), so a
conversation of thousands of turns nests nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .models import Exchange, LineageNode
from .timeparse import format_iso
from .views import last_user_text, reply_text

__all__ = ("ConversationTree", "TreeLine", "build_tree", "exchanges_by_response", "tree_json")


@dataclass(frozen=True, slots=True)
class TreeLine:
    """One node in reading order: `lead` is the drawing before it ("├─ ", "│  └─ ", ...)."""

    node: LineageNode
    lead: str
    active: bool


@dataclass(frozen=True, slots=True)
class ConversationTree:
    nodes: Mapping[str, LineageNode]
    roots: tuple[str, ...]
    children: Mapping[str, tuple[str, ...]]
    #: Root first, newest node last; empty for an empty tree.
    active_path: tuple[str, ...]

    @property
    def branch_points(self) -> int:
        """How many nodes (and the session itself, for several roots) have several children."""
        forks = sum(1 for kids in self.children.values() if len(kids) > 1)
        return forks + (1 if len(self.roots) > 1 else 0)

    def walk(self) -> Iterator[TreeLine]:
        """Every node once, depth first, oldest child first, with its drawing.

        A chain without forks stays at one indentation; only siblings are drawn as
        branches, so a long linear conversation does not drift to the right.
        """
        active = frozenset(self.active_path)
        # (hash, lead of its own line, lead of its descendants' lines)
        stack: list[tuple[str, str, str]] = list(reversed(_branches("", self.roots)))
        while stack:
            key, lead, under = stack.pop()
            yield TreeLine(self.nodes[key], lead, key in active)
            stack.extend(reversed(_branches(under, self.children.get(key, ()))))


def _branches(under: str, keys: Sequence[str]) -> list[tuple[str, str, str]]:
    if len(keys) == 1:
        return [(keys[0], under, under)]
    out = []
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        out.append((key, under + ("└─ " if last else "├─ "), under + ("   " if last else "│  ")))
    return out


def build_tree(nodes: Sequence[LineageNode]) -> ConversationTree:
    """The tree of `nodes` (as `list_lineage_nodes` gives them: oldest first)."""
    by_hash: dict[str, LineageNode] = {}
    for node in nodes:
        by_hash.setdefault(node.hash, node)
    order = {key: i for i, key in enumerate(by_hash)}
    children: dict[str, list[str]] = {}
    roots: list[str] = []
    for key, node in by_hash.items():
        parent = node.parent_hash
        if parent is not None and parent in by_hash and parent != key:
            children.setdefault(parent, []).append(key)
        else:
            roots.append(key)
    active: list[str] = []
    if by_hash:
        newest = max(by_hash.values(), key=lambda n: (n.created_at, order[n.hash]))
        seen: set[str] = set()
        cursor: str | None = newest.hash
        while cursor is not None and cursor in by_hash and cursor not in seen:
            seen.add(cursor)
            active.append(cursor)
            cursor = by_hash[cursor].parent_hash
        active.reverse()
    return ConversationTree(
        nodes=by_hash,
        roots=tuple(roots),
        children={k: tuple(v) for k, v in children.items()},
        active_path=tuple(active),
    )


def tree_json(
    tree: ConversationTree, exchanges: Mapping[str, Exchange] | None = None
) -> dict[str, Any]:
    """The tree as `show --json` and ``GET /sessions/{id}/tree`` give it: flat nodes in reading
    order, each with its children's hashes. `exchanges` (by response id) adds the call's id,
    its last user message and the reply."""
    exchanges = exchanges or {}
    out = []
    for line in tree.walk():
        node = line.node
        exchange = exchanges.get(node.response_id) if node.response_id else None
        out.append(
            {
                "hash": node.hash,
                "parent_hash": node.parent_hash,
                "children": list(tree.children.get(node.hash, ())),
                "active": line.active,
                "depth": node.depth,
                "chat_id": node.chat_id,
                "node_id": node.node_id,
                "response_id": node.response_id,
                "request_id": None if exchange is None else exchange.request.request_id,
                "created_at": format_iso(node.created_at),
                "user_message": None
                if exchange is None
                else last_user_text(exchange.request.openai_request),
                "reply": None
                if exchange is None or exchange.response is None
                else reply_text(exchange.response.openai_response),
            }
        )
    return {
        "roots": list(tree.roots),
        "active_path": list(tree.active_path),
        "branch_points": tree.branch_points,
        "nodes": out,
    }


def exchanges_by_response(exchanges: Sequence[Exchange]) -> dict[str, Exchange]:
    """`exchanges` keyed by their response id (the join of `LineageNode.response_id`)."""
    return {e.response.response_id: e for e in exchanges if e.response is not None}
