"""`python -m aiohttp_session_store`: the command line (see cli.py)."""

from __future__ import annotations

from .cli import main

__all__ = ()

raise SystemExit(main())
