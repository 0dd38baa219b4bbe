"""The viewer's session page as HTML: a session's calls as a chat thread, and its branches.

Pure (records in, markup out). Every value from a record passes `esc`: records hold what
clients and upstreams sent, so all of it is hostile until escaped.

Clients resend the whole history on every call, so each call shows only what is new to the
thread: the messages past the longest history already shown (found by the lineage's chain
hashes, so it costs one pass over the messages), then its reply. A call that resends a
shorter or different history is marked as a regenerate or an edit of the turn it branches
from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape
from typing import Any, Final

from .hashing import content_text
from .lineage import extend, root
from .models import Exchange, LineageNode, ResponseRecord, Session
from .terminal import tokens
from .timeparse import format_duration_ms, format_iso
from .tree import ConversationTree, build_tree
from .views import body_json, last_user_text, reply_text

__all__ = ("esc", "human_time", "session_body", "short_text")

_REASONING_KEYS: Final = ("reasoning_content", "reasoning", "thinking")
_ROLE_LABELS: Final = {
    "system": "System prompt",
    "developer": "Developer prompt",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool result",
}
_OUTCOME_LABELS: Final = {
    "completed": "completed",
    "client_disconnected": "client disconnected",
    "upstream_error": "upstream error",
    "handler_error": "handler error",
}


def esc(value: object) -> str:
    """`value` as HTML text, quotes included (safe in attributes too)."""
    return escape("" if value is None else str(value), quote=True)


def human_time(ms: int) -> str:
    iso = format_iso(ms)
    return f'<time datetime="{iso}">{iso[:10]} {iso[11:19]} UTC</time>'


def short_text(text: str | None, width: int) -> str:
    if text is None:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


# -- messages --------------------------------------------------------------------------------------


def _pre(text: str, cls: str) -> str:
    return f'<pre class="{cls}">{esc(text)}</pre>'


def _arguments(raw: object) -> str:
    if not isinstance(raw, str):
        return json.dumps(raw, ensure_ascii=False)
    try:
        return json.dumps(json.loads(raw), ensure_ascii=False, indent=2)
    except (ValueError, RecursionError):
        return raw


def _tool_calls(calls: object) -> list[str]:
    out = []
    for call in calls if isinstance(calls, list) else ():
        if not isinstance(call, Mapping):
            continue
        function = call.get("function")
        function = function if isinstance(function, Mapping) else {}
        out.append(
            '<div class="tool-call"><div class="tool-head">Tool call '
            f'<code class="tool-name">{esc(function.get("name"))}</code>'
            f' <span class="tool-id">{esc(call.get("id"))}</span></div>'
            f"{_pre(_arguments(function.get('arguments')), 'tool-args')}</div>"
        )
    return out


def message_html(message: object) -> str:
    """One chat message: role, text, reasoning (collapsed), tool calls, tool result id."""
    if not isinstance(message, Mapping):
        return f'<div class="msg role-other">{_pre(json.dumps(message), "text")}</div>'
    role = message.get("role")
    cls = role if isinstance(role, str) and role in _ROLE_LABELS else "other"
    label = _ROLE_LABELS.get(cls, f"Role {role!r}" if role is not None else "No role")
    name = message.get("name")
    head = esc(label) + (f' <span class="name">{esc(name)}</span>' if name else "")
    if cls == "tool":
        head += f' <span class="tool-id">for {esc(message.get("tool_call_id"))}</span>'
    parts = [f'<div class="msg role-{cls}"><div class="role">{head}</div>']
    for key in _REASONING_KEYS:
        value = message.get(key)
        if isinstance(value, str) and value:
            parts.append(
                f'<details class="reasoning"><summary>Reasoning</summary>{_pre(value, "text")}'
                "</details>"
            )
    text = content_text(message.get("content"))
    if text:
        parts.append(_pre(text, "text"))
    content = message.get("content")
    if isinstance(content, list):
        others = sum(
            1 for p in content if not (isinstance(p, Mapping) and p.get("type", "text") == "text")
        )
        if others:
            parts.append(f'<div class="note">{others} non-text part(s) not shown</div>')
    parts += _tool_calls(message.get("tool_calls"))
    parts.append("</div>")
    return "".join(parts)


# -- the thread ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Turn:
    """A call as the thread shows it: what it added, and where it branched from."""

    new: Sequence[object]
    #: None: the history continues the previous call; else a note (regenerate, edit, ...).
    note: str | None


def _messages(exchange: Exchange) -> list[object] | None:
    body = body_json(exchange.request.openai_request)
    if isinstance(body, Mapping) and isinstance(body.get("messages"), list):
        return list(body["messages"])
    return None


def _reply(response: ResponseRecord | None) -> Mapping[str, Any] | None:
    body = body_json(None if response is None else response.openai_response)
    if not isinstance(body, Mapping):
        return None
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], Mapping):
        message = choices[0].get("message")
        if isinstance(message, Mapping):
            return message
    return None


def _turns(exchanges: Sequence[Exchange]) -> list[_Turn | None]:
    """For each call, its new messages; None when its request body holds no messages."""
    # Chain hash of every prefix shown so far -> (first call that had it, prefix length).
    seen: dict[bytes, tuple[int, int]] = {}
    continued: set[int] = set()
    out: list[_Turn | None] = []
    for k, exchange in enumerate(exchanges):
        messages = _messages(exchange)
        if messages is None:
            out.append(None)
            continue
        digest, best = root(""), (-1, 0)
        for m in messages:
            next_digest = extend(digest, m)
            if next_digest is None:
                break
            digest = next_digest
            best = seen.get(digest, best)
        j, length = best
        note = _branch_note(k, j, length, exchanges, len(messages), continued)
        out.append(_Turn(messages[length:], note))
        reply = _reply(exchange.response)
        transcript = [*messages, {"role": "assistant", **reply}] if reply else messages
        digest = root("")
        for n, m in enumerate(transcript, 1):
            next_digest = extend(digest, m)
            if next_digest is None:
                break
            digest = next_digest
            seen.setdefault(digest, (k, n))
    return out


def _branch_note(
    k: int, j: int, length: int, exchanges: Sequence[Exchange], sent: int, continued: set[int]
) -> str:
    """How call `k` relates to the thread: "" for a plain next turn, else what it branches."""
    if k == 0:
        return ""
    if j < 0:
        return "new conversation: shares no history with the calls above"
    previous = _messages(exchanges[j]) or []
    if length == len(previous) + 1:  # all of call j's history and its reply
        if j in continued:
            return f"edit: a different next turn after turn #{j + 1}, which was continued before"
        continued.add(j)
        return "" if j == k - 1 else f"continues turn #{j + 1}"
    if sent == length == len(previous):
        return f"regenerate: the history of turn #{j + 1} again, without its reply"
    return f"edit: branches from turn #{j + 1} after message {length}"


def _outcome(response: ResponseRecord | None) -> str:
    if response is None:
        return '<span class="outcome pending">no response recorded</span>'
    cls = response.outcome.replace("_", "-")
    label = _OUTCOME_LABELS.get(response.outcome, response.outcome)
    return f'<span class="outcome {esc(cls)}">{esc(label)}</span>'


def _facts(exchange: Exchange) -> str:
    req, resp = exchange.request, exchange.response
    items = [
        human_time(req.timestamp),
        f"<code>{esc(req.model)}</code>",
        "stream" if req.stream else "json",
        _outcome(resp),
    ]
    if resp is not None:
        items += [
            f"status {esc(resp.status_code)}",
            "tokens " + esc(tokens(resp.prompt_tokens, resp.completion_tokens, resp.total_tokens)),
            f"{esc(format_duration_ms(resp.duration_ms))}"
            f" (first byte {esc(format_duration_ms(resp.first_byte_ms))})",
        ]
    return " · ".join(f'<span class="fact">{item}</span>' for item in items)


def _reply_html(response: ResponseRecord | None) -> list[str]:
    if response is None:
        return []
    parts = []
    if response.outcome == "client_disconnected":
        parts.append(
            '<div class="disconnect">⚠ The client disconnected before the reply ended;'
            " what follows is what had been produced.</div>"
        )
    reply = _reply(response)
    if reply is not None:
        parts.append(message_html({"role": "assistant", **reply}))
    else:
        text = reply_text(response.openai_response)
        if text is not None:
            parts.append(f'<div class="msg role-assistant">{_pre(text, "text")}</div>')
    if response.error is not None:
        parts.append(f'<div class="error">Error: {esc(response.error)}</div>')
    return parts


def _thread(exchanges: Sequence[Exchange], first: int) -> list[str]:
    parts = []
    for n, (exchange, turn) in enumerate(zip(exchanges, _turns(exchanges), strict=True), first):
        resp = exchange.response
        cls = "turn" + ("" if resp is None else f" {esc(resp.outcome.replace('_', '-'))}")
        parts.append(
            f'<section class="{cls}" id="call-{n}"><h3><a href="#call-{n}">#{n}</a> '
            f"{_facts(exchange)}</h3>"
        )
        if turn is None:
            parts.append('<div class="note">the request body holds no messages</div>')
        else:
            if turn.note:
                parts.append(f'<div class="branch-note">↳ {esc(turn.note)}</div>')
            parts += [message_html(m) for m in turn.new]
        parts += _reply_html(resp)
        parts.append("</section>")
    return parts


# -- branches --------------------------------------------------------------------------------------


def branches_html(tree: ConversationTree, calls: Mapping[str, tuple[int, Exchange]]) -> str:
    """The lineage tree, one line per node; the active path marked."""
    if not tree.nodes:
        return (
            '<p class="note">No lineage recorded for this session: its handler reported no'
            " upstream node for any completed call.</p>"
        )
    lines = []
    for line in tree.walk():
        node = line.node
        found = calls.get(node.response_id or "")
        mark = "●" if line.active else "○"
        if found is None:
            label = f"node {esc(node.node_id)} (its call is not recorded here)"
        else:
            n, exchange = found
            user = short_text(last_user_text(exchange.request.openai_request), 60)
            resp = exchange.response
            reply = short_text(None if resp is None else reply_text(resp.openai_response), 60)
            label = f'<a href="#call-{n}">#{n}</a> {esc(user)} → {esc(reply)}'
        cls = "node active" if line.active else "node"
        lines.append(
            f'<li class="{cls}" data-hash="{esc(node.hash)}"><span class="lead">{esc(line.lead)}'
            f'</span><span class="mark">{mark}</span> {label}</li>'
        )
    summary = (
        f"{len(tree.nodes)} nodes, {tree.branch_points} branch point(s);"
        " ● marks the active path (from the newest reply back to its root)"
    )
    return f'<p class="note">{esc(summary)}</p><ul class="tree">{"".join(lines)}</ul>'


def session_body(
    session_id: str,
    session: Session | None,
    exchanges: Sequence[Exchange],
    nodes: Sequence[LineageNode],
    *,
    first: int,
    total: int,
    now: int,
) -> str:
    """The session page's content; `exchanges` are calls `first`.. (1-based) of `total`."""
    if session is None:
        state = "its session row is gone (expired and swept, or deleted); its records remain"
    else:
        expiry = "expired" if session.is_expired(now) else "active"
        state = (
            f"{expiry} · {session.message_count} messages · chat {esc(session.chat_id)}"
            f" · created {human_time(session.created_at)}"
            f" · last used {human_time(session.last_accessed)}"
        )
    calls = {
        e.response.response_id: (n, e)
        for n, e in enumerate(exchanges, first)
        if e.response is not None
    }
    tree = build_tree(nodes)
    shown = f"calls {first}–{first + len(exchanges) - 1} of {total}" if exchanges else "no calls"
    return "".join(
        [
            f'<h1>Session <code class="session-id">{esc(session_id)}</code></h1>',
            f'<p class="state">{state if session else esc(state)}</p>',
            '<section class="branches"><h2>Branches</h2>',
            branches_html(tree, calls),
            "</section>",
            f'<section class="thread"><h2>Conversation</h2><p class="note">{esc(shown)}</p>',
            *_thread(exchanges, first),
            "</section>",
        ]
    )
