"""Exact speed-ups for occlusion (placeholder)."""

from __future__ import annotations

from typing import Any


def build_fast_evaluator(*args: Any) -> None:
    return None
