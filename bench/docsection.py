"""Doc sections that bench scripts regenerate: the text between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``.

Everything outside the markers is written by hand; everything inside belongs to the script named in the section.
"""

from __future__ import annotations

from pathlib import Path


def write_section(doc: Path, name: str, body: str) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = doc.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        raise SystemExit(f"{doc}: markers {begin} / {end} missing")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{body.strip()}\n{end}{tail}", encoding="utf-8")
    print(f"wrote the {name} section of {doc}")
