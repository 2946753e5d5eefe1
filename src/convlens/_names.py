"""The names of the files a run writes, and :func:`printable`: shared by the writer
(:mod:`convlens.outputs`) and the reader (:mod:`convlens.runfolder`) of run folders."""

from __future__ import annotations

import unicodedata
from typing import Any

__all__ = ["INTENT", "JOURNAL", "LOCK", "MANIFEST", "STAGING_PREFIX", "printable"]

MANIFEST = ".convlens-manifest.json"
JOURNAL = ".convlens-manifest.journal"  # one JSON line per image finished since the manifest's last rewrite
LOCK = ".convlens-lock"
INTENT = ".convlens-intent.json"  # written before the first rename of a swap: what the next command completes
STAGING_PREFIX = ".convlens-staging-"


def printable(text: Any) -> str:
    """``text`` safe to print, log, or put in JSON and HTML: undecodable bytes (surrogate escapes
    from ``os.fsdecode``) become ``\\xNN``, control and format characters (terminal escapes, bidi
    overrides, newlines) become ``\\xNN``/``\\uNNNN``; everything else is kept.

    Example::

        printable("a\\x1b[31mb.jpg")  # 'a\\\\x1b[31mb.jpg'
    """
    out = []
    for ch in str(text):
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8
            out.append(f"\\x{o - 0xDC00:02x}")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)
