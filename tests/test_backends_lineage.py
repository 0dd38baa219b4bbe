"""Conversation lineage storage, run against every backend: nodes written by `write_batch`,
read by hash and by session, kept first on a duplicate hash, and purged in bounded batches."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace

from test_backends import T0, UNICODE, make_request, make_session

from aiohttp_session_store.backends.base import Backend
from aiohttp_session_store.migrations import MIGRATIONS, latest_version
from aiohttp_session_store.models import LineageNode, RequestQuery, WriteBatch


def node(
    hash_: str,
    *,
    session_id: str | None = "s1",
    created: int = T0,
    depth: int = 2,
    parent: str | None = None,
    node_id: str = "n1",
) -> LineageNode:
    return LineageNode(
        hash=hash_,
        scope="key:abc",
        session_id=session_id,
        chat_id="chat-1",
        node_id=node_id,
        response_id=f"resp-{hash_}",
        depth=depth,
        parent_hash=parent,
        created_at=created,
    )


async def test_nodes_round_trip_by_hash(backend: Backend) -> None:
    a = node("h-a")
    b = replace(node("h-b", parent="h-a", depth=4), session_id=None, chat_id=None)
    c = replace(node("h-c"), response_id=None, scope=UNICODE)
    await backend.write_batch(WriteBatch(nodes=[a, b, c]))
    got = await backend.get_lineage_nodes(["h-b", "missing", "h-a", "h-c", "h-a"])
    assert sorted(got, key=lambda n: n.hash) == [a, b, c]
    assert await backend.get_lineage_nodes(["missing"]) == []
    assert await backend.get_lineage_nodes([]) == []


async def test_a_duplicate_hash_keeps_the_first_node(backend: Backend) -> None:
    first = node("h", node_id="first")
    await backend.write_batch(WriteBatch(nodes=[first]))
    await backend.write_batch(WriteBatch(nodes=[replace(first, node_id="second", depth=9)]))
    # Twice within one batch, too: the first of the batch wins.
    await backend.write_batch(
        WriteBatch(nodes=[node("g", node_id="one"), node("g", node_id="two")])
    )
    assert await backend.get_lineage_nodes(["h"]) == [first]
    assert [n.node_id for n in await backend.get_lineage_nodes(["g"])] == ["one"]


async def test_two_instances_inserting_one_hash_at_once_store_one_row(
    backend: Backend, backend_factory: Callable[..., Backend]
) -> None:
    other = backend_factory()
    await other.open()
    try:
        for i in range(10):
            await asyncio.gather(
                backend.write_batch(WriteBatch(nodes=[node(f"h{i}", node_id="a")])),
                other.write_batch(WriteBatch(nodes=[node(f"h{i}", node_id="b")])),
            )
        hashes = [f"h{i}" for i in range(10)]
        seen = await other.get_lineage_nodes(hashes)
        assert sorted(n.hash for n in seen) == sorted(hashes)
        assert {n.node_id for n in seen} <= {"a", "b"}
        assert await backend.get_lineage_nodes(hashes) == seen
    finally:
        await other.close()


async def test_list_lineage_nodes_is_the_sessions_oldest_first(backend: Backend) -> None:
    nodes = [
        node("z-late", created=T0 + 30, depth=6),
        node("a-early", created=T0 + 10, depth=2),
        node("m-mid", created=T0 + 20, depth=4),
        node("other", session_id="s2", created=T0 + 5),
        node("orphan", session_id=None, created=T0 + 1),
    ]
    await backend.write_batch(WriteBatch(nodes=nodes))
    listed = await backend.list_lineage_nodes("s1")
    assert [n.hash for n in listed] == ["a-early", "m-mid", "z-late"]
    assert [n.hash for n in await backend.list_lineage_nodes("s2")] == ["other"]
    assert await backend.list_lineage_nodes("nobody") == []


async def test_delete_lineage_before_goes_oldest_first_in_bounded_batches(
    backend: Backend,
) -> None:
    await backend.write_batch(WriteBatch(nodes=[node(f"h{i}", created=T0 + i) for i in range(7)]))
    cutoff = T0 + 5  # h0..h4 are older; h5 (== cutoff) and h6 are kept
    assert await backend.delete_lineage_before(cutoff, 0) == 0
    assert await backend.delete_lineage_before(cutoff, 2) == 2
    remaining = [n.hash for n in await backend.list_lineage_nodes("s1")]
    assert remaining == ["h2", "h3", "h4", "h5", "h6"]
    assert await backend.delete_lineage_before(cutoff, 2) == 2
    assert await backend.delete_lineage_before(cutoff, 2) == 1
    assert await backend.delete_lineage_before(cutoff, 2) == 0
    assert [n.hash for n in await backend.list_lineage_nodes("s1")] == ["h5", "h6"]


async def test_lineage_outlives_its_session_and_records(backend: Backend) -> None:
    await backend.insert_session(make_session("s1"))
    await backend.write_batch(WriteBatch(requests=[make_request("r1")], nodes=[node("h")]))
    await backend.delete_session("s1")
    await backend.delete_expired_sessions(T0 + 10**9, 10)
    assert await backend.get_lineage_nodes(["h"]) == [node("h")]


async def test_migrating_from_the_previous_version_keeps_data(
    backend_factory: Callable[..., Backend],
) -> None:
    previous = tuple(m for m in MIGRATIONS if m.version < latest_version())
    old = backend_factory(migrations=previous)
    await old.open()
    try:
        assert await old.schema_version() == latest_version() - 1
        await old.insert_session(make_session("kept", first=UNICODE))
        await old.write_batch(WriteBatch(requests=[make_request("r1", session_id="kept")]))
    finally:
        await old.close()
    new = backend_factory()
    await new.open()
    try:
        assert await new.schema_version() == latest_version()
        assert await new.get_session("kept") == make_session("kept", first=UNICODE)
        assert await new.count_requests(RequestQuery()) == 1
        await new.write_batch(WriteBatch(nodes=[node("h")]))
        assert await new.list_lineage_nodes("s1") == [node("h")]
    finally:
        await new.close()
