"""Conversation sessions and request/response records for OpenAI-compatible proxies on aiohttp."""

from __future__ import annotations

__version__ = "0.1.0"
