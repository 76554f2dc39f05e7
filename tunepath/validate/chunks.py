"""Long documents cut into pieces for continued pretraining instead of being rejected.

The rule (also written into report.md): a document longer than `validate.text_chars.max` characters is cut
into pieces of at most that many characters, each cut at the last blank line before the limit, else the last
line break, else the last space, else exactly at the limit; whitespace at the cut is dropped. The pieces keep
the document's source line and get their own ids (the document's id and the piece number); they go to the
document's split, so no piece of an eval document trains.
"""

from __future__ import annotations

import hashlib

RULE = ("documents longer than validate.text_chars.max ({max:,} characters) are cut into pieces of at most that "
        "many characters, at the last blank line before the limit, else the last line break, else the last space, "
        "else at the limit (validate.long_text: chunk)")


def chunk_text(text: str, limit: int) -> list[str]:
    pieces = []
    while len(text) > limit:
        window = text[:limit + 1]
        cut = next((i for i in (window.rfind("\n\n"), window.rfind("\n"), window.rfind(" ")) if i > 0), limit)
        piece = text[:cut].rstrip()
        if piece:
            pieces.append(piece)
        text = text[cut:].lstrip()
    if text.strip():
        pieces.append(text)
    return pieces


def chunk_id(record_id: str, number: int) -> str:
    return hashlib.sha256(f"{record_id}#{number}".encode()).hexdigest()[:16]
