"""Lineage hashing (pure) and the index: canonical forms, chains, resolving a turn."""

from __future__ import annotations

import json
import sqlite3
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpServer

from aiohttp_session_store import SessionManager, StoreConfig, get_store
from aiohttp_session_store.lineage import (
    ChainLinks,
    canonical,
    chain_hashes,
    extend,
    reply_message,
    root,
    scope_digest,
)
from aiohttp_session_store.models import LineageNode

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = str(ROOT / "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

import fake_upstream  # noqa: E402
import proxy_server  # noqa: E402

# --------------------------------------------------------------------------- canonical


def test_canonical_ignores_what_clients_drop_or_rewrite() -> None:
    sent: dict[str, Any] = {
        "role": "assistant",
        "content": "  Hello there.\n",
        "reasoning_content": "thinking...",
        "refusal": None,
        "audio": None,
        "annotations": [],
        "function_call": None,
        "unknown": 1,
    }
    assert canonical(sent) == canonical({"role": "assistant", "content": "Hello there."})


_STDLIB = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, check_circular=False
).encode


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(st.characters(exclude_categories=())),
    name=st.text(min_size=1),
    args=st.text(st.characters(exclude_categories=())),
)
def test_canonical_bytes_are_the_stdlib_encoders_whichever_encoder_runs(
    text: str, name: str, args: str
) -> None:
    """Stored chain hashes must not depend on orjson being installed: same bytes as json."""
    message = {
        "role": "assistant",
        "name": name,
        "content": text,
        "tool_calls": [{"id": "c1", "function": {"name": name, "arguments": args}}],
        "tool_call_id": name,
    }
    kept: dict[str, Any] = {"role": "assistant", "name": name}
    if text.strip():
        kept["content"] = text.strip()
    kept["tool_calls"] = [["c1", name, args]]
    kept["tool_call_id"] = name
    assert canonical(message) == _STDLIB(kept).encode("utf-8", "surrogatepass")
    plain = {"role": "user", "content": text}  # the commonest shape has its own path
    kept = {"role": "user", "content": text.strip()} if text.strip() else {"role": "user"}
    assert canonical(plain) == _STDLIB(kept).encode("utf-8", "surrogatepass")


def test_canonical_text_parts_equal_a_string() -> None:
    parts = {
        "role": "user",
        "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
    }
    assert canonical(parts) == canonical({"role": "user", "content": "a\nb"})


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ({"role": "user", "content": "x"}, {"role": "system", "content": "x"}),
        ({"role": "user", "content": "x"}, {"role": "user", "content": "y"}),
        ({"role": "user", "content": "x"}, {"role": "user", "content": "x", "name": "bob"}),
        (
            {"role": "tool", "content": "x", "tool_call_id": "1"},
            {"role": "tool", "content": "x", "tool_call_id": "2"},
        ),
        (
            {
                "role": "assistant",
                "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": "{}"}}],
            },
            {
                "role": "assistant",
                "tool_calls": [{"id": "1", "function": {"name": "g", "arguments": "{}"}}],
            },
        ),
    ],
)
def test_canonical_keeps_what_defines_the_conversation(
    a: dict[str, Any], b: dict[str, Any]
) -> None:
    assert canonical(a) != canonical(b)


def test_tool_calls_canonical_ignores_type_and_nulls() -> None:
    call = {"id": "c1", "function": {"name": "f", "arguments": '{"q": 1}'}}
    assert canonical({"role": "assistant", "content": None, "tool_calls": [call]}) == canonical(
        {"role": "assistant", "content": "", "tool_calls": [{**call, "type": "function"}]}
    )


def test_not_a_message() -> None:
    assert canonical("hi") is None
    assert canonical({"content": "no role"}) is None
    assert chain_hashes([{"role": "user", "content": "a"}, 3], "") is None


# --------------------------------------------------------------------------- chains


def test_chain_is_a_prefix_chain() -> None:
    messages = [{"role": "user", "content": str(i)} for i in range(4)]
    chain = chain_hashes(messages, "")
    assert chain is not None
    assert len(chain) == 4
    assert chain_hashes(messages[:2], "") == chain[:2]
    assert extend(chain[2], messages[3]) == chain[3]
    assert extend(root(""), messages[0]) == chain[0]


@settings(max_examples=100, deadline=None)
@given(
    messages=st.lists(
        st.one_of(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "assistant", ""]), "content": st.text()}
            ),
            st.fixed_dictionaries(
                {"role": st.just("tool"), "content": st.text(), "tool_call_id": st.text()}
            ),
            st.just({"role": "user", "content": None}),
        ),
        max_size=6,
    ),
    scope=st.sampled_from(["", "s"]),
)
def test_remembered_links_are_the_chain(messages: list[dict[str, Any]], scope: str) -> None:
    links = ChainLinks(max_bytes=2_000)
    for _ in range(2):  # computed, then (some) remembered
        assert links.chain(messages, scope) == chain_hashes(messages, scope)
        assert links.bytes <= 2_000
    if messages:
        previous = root(scope)
        assert links.extend(previous, messages[0]) == extend(previous, messages[0])


def test_remembered_links_are_bounded_oldest_first() -> None:
    links = ChainLinks(max_bytes=5_000)
    chains = [links.chain([{"role": "user", "content": f"{i}" * 100}], "") for i in range(40)]
    assert 0 < len(links) < 40
    assert links.bytes <= 5_000
    # Forgotten or remembered, a link gives the same digest.
    assert links.chain([{"role": "user", "content": "0" * 100}], "") == chains[0]
    assert links.chain([{"role": "user", "content": "9" * 100}], "") == chains[9]


def test_scope_separates_chains() -> None:
    messages = [{"role": "user", "content": "hi"}]
    alice = chain_hashes(messages, scope_digest("Bearer alice"))
    bob = chain_hashes(messages, scope_digest("Bearer bob"))
    anonymous = chain_hashes(messages, "")
    assert alice != bob != anonymous != alice


def test_scope_digest_is_keyed_when_asked() -> None:
    assert scope_digest("k") != scope_digest("k", b"secret")
    assert scope_digest("k", b"secret") == scope_digest("k", b"secret")
    assert "k" not in scope_digest("k")


def test_reply_message_of_a_completion() -> None:
    completion = {"choices": [{"message": {"role": "assistant", "content": "x", "refusal": None}}]}
    assert reply_message(completion) == {"role": "assistant", "content": "x"}
    assert reply_message({"choices": []}) is None
    assert reply_message([]) is None


# --------------------------------------------------------------------------- the index


def node(key: str, depth: int) -> LineageNode:
    return LineageNode(
        hash=key,
        scope="",
        session_id="s",
        chat_id="c",
        node_id=f"n-{key}",
        response_id=None,
        depth=depth,
        parent_hash=None,
        created_at=1,
    )


async def test_warm_cache_answers_without_a_query(tmp_path: Path) -> None:
    async with SessionManager(tmp_path / "s.db") as manager:
        index = manager.lineage
        index.record(node("a", 2))
        index.record(node("b", 4))
        assert await index.find(["a", "b"]) == node("b", 4)
        assert index.queries == 0


async def test_cold_cache_costs_one_query(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    async with SessionManager(db) as manager:
        manager.lineage.record(node("a", 2))
        manager.lineage.record(node("b", 4))
    async with SessionManager(db) as manager:
        index = manager.lineage
        assert await index.find(["a", "b", "c"]) == node("b", 4)
        assert index.queries == 1
        assert await index.find(["a", "b"]) == node("b", 4)  # now warm
        assert index.queries == 1


async def test_cache_is_bounded_in_bytes(tmp_path: Path) -> None:
    config = StoreConfig(lineage_cache_bytes=20_000)
    async with SessionManager(tmp_path / "s.db", config=config) as manager:
        for i in range(1_000):
            manager.lineage.record(node(f"{i:064x}", 2))
        assert manager.lineage.cached_bytes <= 20_000
        assert 0 < len(manager.lineage) < 1_000
        await manager.writer.flush()
        # Forgotten from memory, not from the store.
        assert await manager.lineage.find([f"{0:064x}"]) == node(f"{0:064x}", 2)


# --------------------------------------------------------------------------- end to end


@pytest.fixture
async def proxy(aiohttp_server: AiohttpServer, tmp_path: Path) -> tuple[TestServer, TestServer]:
    upstream = await aiohttp_server(fake_upstream.create_app())
    app = proxy_server.create_app(
        db=tmp_path / "s.db",
        upstream=str(upstream.make_url("")).rstrip("/"),
        mode="stateful",
        config=StoreConfig(flush_interval=0.01),
    )
    return upstream, await aiohttp_server(app)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("text", ["Hello world", "What is the weather? [tool]"])
async def test_openai_clients_resent_history_hashes_as_recorded(
    proxy: tuple[TestServer, TestServer], stream: bool, text: str
) -> None:
    upstream, server = proxy
    client = openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key="alice", max_retries=0
    )
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": text},
    ]
    async with client:
        if stream:
            pieces: list[str] = []
            calls: dict[int, dict[str, Any]] = {}
            async for chunk in await client.chat.completions.create(
                model="qwen-fake", messages=messages, stream=True
            ):
                for choice in chunk.choices:
                    pieces.append(choice.delta.content or "")
                    for tc in choice.delta.tool_calls or ():
                        call = calls.setdefault(
                            tc.index,
                            {
                                "id": "",
                                "type": "function",
                                "function": {"name": "", "arguments": ""},
                            },
                        )
                        call["id"] = tc.id or call["id"]
                        if tc.function is not None:
                            call["function"]["name"] += tc.function.name or ""
                            call["function"]["arguments"] += tc.function.arguments or ""
            reply: dict[str, Any] = {"role": "assistant", "content": "".join(pieces)}
            if calls:
                reply["tool_calls"] = [calls[i] for i in sorted(calls)]
        else:
            completion = await client.chat.completions.create(model="qwen-fake", messages=messages)
            # What a client appends to its history: the message as the library parsed it.
            reply = completion.choices[0].message.model_dump()
    assert bool(reply.get("tool_calls")) == ("[tool]" in text)
    store = get_store(server.app)
    await store.flush()
    with sqlite3.connect(store.manager.backend.path) as db:  # type: ignore[attr-defined]
        ((stored_hash, node_id, depth),) = db.execute(
            "SELECT hash, node_id, depth FROM lineage"
        ).fetchall()
    chain = chain_hashes([*messages, reply], scope_digest("Bearer alice"))
    assert chain is not None
    assert stored_hash == chain[-1].hex()
    assert (node_id, depth) == (upstream.app[fake_upstream.CALLS][-1].new_parent_id, 3)


async def test_lineage_retention_forgets_old_points(tmp_path: Path) -> None:
    now = [1_000_000_000]
    config = StoreConfig(lineage_retention="1d", clock=lambda: now[0])
    async with SessionManager(tmp_path / "s.db", config=config) as manager:
        manager.lineage.record(replace(node("a", 2), created_at=now[0]))
        now[0] += 2 * 86_400_000
        manager.lineage.record(replace(node("b", 2), created_at=now[0]))
        await manager.sweep()
        assert manager.lineage_purged == 1
        assert await manager.lineage.find(["a"]) is None
        assert await manager.lineage.find(["b"]) is not None


def test_a_role_outside_the_chat_format_is_hashed_but_never_remembered() -> None:
    # A client's role string can be of any size: remembering it would hold bytes that the
    # bound does not see. The digest is the same either way.
    links = ChainLinks(max_bytes=100_000)
    previous = root("")
    for i in range(20):
        message = {"role": "u" * 100_000 + str(i), "content": ""}
        assert links.extend(previous, message) == extend(previous, message)
    assert (len(links), links.bytes) == (0, 0)


def test_a_remembered_link_counts_its_role_and_its_text() -> None:
    counted = {}
    for role in ("assistant", "user"):
        links = ChainLinks(max_bytes=100_000)
        links.extend(root(""), {"role": role, "content": "x" * 1_000})
        counted[role] = links.bytes
    assert counted["assistant"] - counted["user"] == len("assistant") - len("user")
    assert counted["user"] > 1_000
