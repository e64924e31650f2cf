"""Where each assistant turn lies in a rendering whose prefixes differ from the whole (the third method of
common/chat.py), found by rendering the conversation once more with every message's text replaced by a marker.

Searching the rendering for each message's content, in order, is ambiguous: a short answer ("Yes", "OK") may
also stand in the system prompt a template moves into the last user turn, or in a user message; a header the
template writes differently for one turn (a participant's name in it) makes the search for the next header
land on a later turn. Either way a mask would train prompt text, silently. The markers remove the guessing:

1. Every non-empty content (and reasoning, where the template reads it) becomes a marker unique to its message
   and the conversation is rendered again. The marked text is the template's own text with the contents cut
   out: the pieces between markers are the template's structure (headers, end-of-turn tokens, tool calls),
   and each marker says whose content stood there. (Where that does not line up, equal texts share a marker
   and it is rendered once more: a template that compares messages, Mistral's `message == user_messages[-1]`,
   then compares them as it does the real ones.)
2. The pieces are lined up with the real rendering: it must start with the first piece, end with the last and
   hold the others in order; the text between two pieces is that message's text as the template rendered it
   (trimmed, split at </think>, JSON-quoted...). Each piece is placed as early and as late as it can be;
   where the two agree the place is certain, where they do not it is taken only where the message's text as
   written (or trimmed) fills the gap exactly, else there is no alignment.
3. A turn starts after the generation prompt (its header) where that header stands in the structure before
   its content, else at its content (with the spaces before it, part of its first token); without content
   (a tool-call turn of a template with no header, Mistral's `[/INST][TOOL_CALLS]`), where the generation
   prompt ends after the marker the prompt for this turn ends with (one render of the marked prefix). It ends
   at the first end-of-turn token after its content and tool calls, before the next message's content.

A template whose structure depends on the contents themselves (it compares two messages' texts, or branches
on a content's words) gives pieces that do not line up: `locate` returns None and the caller falls back to
`search`, each content looked for in the rendering in order (the method before the markers; it can take a
short answer's twin in a prompt for it, which the markers cannot). No template in tests/common/chat_families.py
or chat_published.py needs it.
"""

from __future__ import annotations

import bisect
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError

# Marker text: plain ASCII letters and digits (kept by trim, tojson, string filters), random per process.
_NONCE = secrets.token_hex(6)
_MARK = re.compile(f"ftjobs{_NONCE}m(\\d+)([cr])z")
Span = tuple[int, int, int]
Found = list[tuple[int, int, int, str]]  # (start, end, message index, "c" content | "r" reasoning) per marker


class TurnNotFound(ConfigError):
    """An assistant turn whose text cannot be found in the rendering: its loss mask cannot be built."""


@dataclass(frozen=True)
class Template:
    """What locating turns needs of a chat template, from common/chat.py (which calls this module; this module
    does not import it)."""

    render: Callable[[list[dict[str, Any]], bool], str]  # (messages, add_generation_prompt) -> text; ConfigError
    header: str  # the generation prompt, "" when it is only whitespace
    eot: str | None  # the end-of-turn token
    reasoning: str | None  # the message key the template reads reasoning from
    specials: tuple[str, ...]


def _marker(j: int, kind: str) -> str:
    return f"ftjobs{_NONCE}m{j}{kind}z"


def locate(t: Template, msgs: list[dict[str, Any]], full: str, turns: list[int]) -> list[Span] | None:
    """Each assistant turn's (start, end, message index) in `full`, or None where the marked rendering does not
    line up with it. Raises TurnNotFound for a turn that is not in the rendering."""
    for shared in (False, True):  # a marker per message; else per text (a template that compares messages)
        marked, owners = _marked(msgs, t.reasoning, shared)
        try:
            text = t.render(marked, False)
        except ConfigError:
            return None
        found = _owned([(m.start(), m.end(), int(m.group(1)), m.group(2)) for m in _MARK.finditer(text)], owners)
        regions = None if found is None else _align(full, text, found, msgs, t.reasoning)
        if found is not None and regions is not None:
            break
    else:
        return None
    to_full = _Mapping(found, regions)
    out: list[Span] = []
    floor = 0  # where the turn before ended, in the marked text
    index: dict[int, list[int]] = {}  # message -> its markers' positions in `found`
    for n, f in enumerate(found):
        index.setdefault(f[2], []).append(n)
    for k, i in enumerate(turns):
        start, end = _turn(t, marked, owners, text, found, index, i, k, floor)
        span = (to_full(start), to_full(end), i)
        if out and span[0] < out[-1][1]:
            return None
        out.append(span)
        floor = end
    return out


def _marked(msgs: list[dict[str, Any]], reasoning: str | None,
            shared: bool) -> tuple[list[dict[str, Any]], dict[int, list[int]]]:
    """The messages with their texts as markers, and which messages each marker stands for. `shared`: equal
    texts of one role get the same marker, so a template that compares messages (Mistral's
    `message == user_messages[-1]`) compares them as it does the real ones. An empty content stays empty
    (templates test it)."""
    ids: dict[tuple[str, str, str], int] = {}
    owners: dict[int, list[int]] = {}
    out = []
    for j, m in enumerate(msgs):
        m = dict(m)
        for key, kind in (("content", "c"), (reasoning, "r")):
            value = m.get(key) if key else None
            if isinstance(value, str) and value:
                n = ids.setdefault((kind, str(m.get("role")), value if shared else str(j)), len(ids))
                owners.setdefault(n, []).append(j)
                m[key] = _marker(n, kind)  # type: ignore[index]
        out.append(m)
    return out, owners


def _owned(found: Found, owners: dict[int, list[int]]) -> Found | None:
    """Markers by message: a marker several messages share must stand once for each of them, in their order;
    one message's text rendered twice makes which copy a turn trains a guess (None)."""
    seen: dict[int, int] = {}
    out = []
    for a, b, n, kind in found:
        k = seen[n] = seen.get(n, -1) + 1
        if k >= len(owners[n]):
            return None
        out.append((a, b, owners[n][k], kind))
    if any(len(owners[n]) > 1 and k + 1 != len(owners[n]) for n, k in seen.items()):
        return None
    return out


def _variants(value: str) -> list[str]:
    """How a template may render a text as it is: whole, trimmed, or trimmed on one side."""
    out = [value, value.strip(), value.rstrip(), value.lstrip()]
    return [v for n, v in enumerate(out) if v not in out[:n]]


def _align(full: str, text: str, found: Found, msgs: list[dict[str, Any]],
           reasoning: str | None) -> list[tuple[int, int]] | None:
    """Where each marker's text stands in `full` ((start, end) per marker), or None.

    The real text is pieces[0] + t0 + pieces[1] + t1 + ... + pieces[-1] for some texts t. Each piece is placed
    as early as it can be (left to right) and as late as it can be (right to left): where the two agree, that
    place is the only one. Where they do not, a place is taken only where the message's text as written (or
    trimmed) fills the gap exactly; else there is no alignment."""
    if not found:
        return [] if full == text else None
    pieces = [text[:found[0][0]], *(text[a[1]:b[0]] for a, b in zip(found, found[1:], strict=False)),
              text[found[-1][1]:]]
    n = len(pieces) - 1
    last = len(full) - len(pieces[-1])
    if not full.startswith(pieces[0]) or not full.endswith(pieces[-1]) or len(pieces[0]) > last:
        return None
    early, p = [0], len(pieces[0])
    for k in range(1, n):
        q = full.find(pieces[k], p, last)
        if q < 0:
            return None
        early.append(q)
        p = q + len(pieces[k])
    early.append(last)
    late = [last]
    for k in range(n - 1, 0, -1):
        late.append(full.rfind(pieces[k], 0, late[-1]))
    late = [0, *reversed(late)]
    places = early
    if early != late:  # more than one way to split: the texts as written decide, or nothing does
        places = [0]
        for k in range(n):
            j, kind = found[k][2], found[k][3]
            value = str(msgs[j]["content"] if kind == "c" else msgs[j][reasoning or ""])
            begin = places[-1] + len(pieces[k])
            fits = {begin + len(v) for v in _variants(value)
                    if full.startswith(v, begin) and full.startswith(pieces[k + 1], begin + len(v))}
            if early[k + 1] == late[k + 1]:
                places.append(early[k + 1])
            elif len(fits) == 1 and early[k + 1] <= (q := fits.pop()) <= late[k + 1]:
                places.append(q)
            else:
                return None
            if places[-1] < begin:
                return None
    return [(places[k] + len(pieces[k]), places[k + 1]) for k in range(n)]


class _Mapping:
    """Offsets in the marked text (outside markers) to offsets in the real one: the pieces between markers are
    the same text, shifted by how much longer each content before them is than its marker."""

    def __init__(self, found: Found, regions: list[tuple[int, int]]):
        self.ends = [b for _, b, _, _ in found]
        self.shifts = [rb - b for (_, b, _, _), (_, rb) in zip(found, regions, strict=True)]

    def __call__(self, x: int) -> int:
        n = bisect.bisect_right(self.ends, x)
        return x + (self.shifts[n - 1] if n else 0)


def _turn(t: Template, marked: list[dict[str, Any]], owners: dict[int, list[int]], text: str, found: Found,
          index: dict[int, list[int]], i: int, k: int, floor: int) -> tuple[int, int]:
    """Turn k (message i): its start and end in the marked text (the turn before it ended at `floor`)."""
    own = [found[n] for n in index.get(i, ())]
    first = own[0][0] if own else None
    # The nearest markers of the messages around it bound the turn (a system prompt moved elsewhere does not).
    if own:
        lo, hi = index[i][0], index[i][-1] + 1
    else:  # no marker of its own: it stands before the first marker of a later message
        lo = hi = next((n for n, f in enumerate(found) if f[2] > i), len(found))
    after = next((found[n][0] for n in range(hi, len(found)) if found[n][2] > i), len(text))
    before = next((found[n][1] for n in range(lo - 1, -1, -1) if found[n][2] < i), 0)
    before = max(before, floor)
    calls = marked[i].get("tool_calls") or []
    header, eot = t.header, t.eot

    def missing(what: str) -> TurnNotFound:
        return TurnNotFound(
            f"assistant turn {k + 1} (message {i}): {what}, so the turn cannot be located in the rendered text "
            "for the loss mask. Use another chat template (chat_template: chatml) or fix the row.")

    content = next((f for f in own if f[3] == "c"), None)
    if content is None and not calls:
        raise missing("its content is not in the rendering" if marked[i]["content"] else "it is empty")
    if content is None and (gone := next((c["function"]["name"] for c in calls
                                          if text.find(c["function"]["name"], before, after) < 0), None)):
        raise missing(f"its call of {gone!r} is not in the rendering")
    # The header nearest its content; without content, the first after what came before.
    h = (text.rfind(header, before, first) if first is not None else text.find(header, before, after)) if header else -1
    if h >= 0:
        start = h + len(header)
    elif first is not None:
        start = first
        while start > before and text[start - 1] == " ":  # " Two" is one token in BPE: the space is the turn's
            start -= 1
    else:
        got = _after_prompt(t, marked, text, found, owners, i, before, after)
        if got is None:
            raise missing("it has no content and where it starts (where the generation prompt ends) is not in "
                          "the rendering")
        start = got
    pos = max((f[1] for f in own), default=start)
    for call in calls:
        name = call["function"]["name"]
        n = text.find(name, pos, after)
        if n < 0:
            raise missing(f"its call of {name!r} is not in the rendering")
        pos = n + len(name)
    e = text.find(eot, pos, after) if eot else -1
    if e >= 0:
        end = e + len(eot or "")
    elif calls:
        raise missing("the end of its tool calls (an end-of-turn token after them) is not in the rendering")
    else:
        end = pos
    return start, max(end, start)


def _after_prompt(t: Template, marked: list[dict[str, Any]], text: str, found: Found, owners: dict[int, list[int]],
                  i: int, before: int, after: int) -> int | None:
    """Where a turn without content or header starts (marked offset): where the generation prompt ends after
    the marker the prompt for this turn ends with."""
    try:
        prompt = t.render(marked[:i], True)
    except ConfigError:
        return None
    last = None
    for m in _MARK.finditer(prompt):
        last = m
    if last is None:
        return None
    j = max((j for j in owners[int(last.group(1))] if j < i), default=None)
    at = next((f[1] for f in found if (f[2], f[3]) == (j, last.group(2))), None)
    if at is None or at < before:
        return None
    tail = prompt[last.end():]
    # A generation prompt may also open the answer (DeepSeek-R1's `<｜Assistant｜><think>\n`): the part of it
    # through its last special token is the header a turn with calls keeps.
    for cut in (tail, _through_last_special(tail, t.specials)):
        if cut and at + len(cut) <= after and text.startswith(cut, at):
            return at + len(cut)
    return None


def _through_last_special(text: str, specials: tuple[str, ...]) -> str:
    """`text` up to the end of the last special token in it ("" when it holds none)."""
    ends = [text.rfind(s) + len(s) for s in specials if s in text]
    return text[:max(ends)] if ends else ""


# --------------------------------------------------------------------------- the search, where markers do not line up


def _candidates(text: str) -> list[str]:
    """How a message's content may appear: as it is, trimmed, or (reasoning dropped) after its </think>."""
    out = [text, text.strip()]
    if "</think>" in text:
        out.append(text.rsplit("</think>", 1)[1].strip())
    return [c for i, c in enumerate(out) if c and c not in out[:i]]


def _find(full: str, candidates: list[str], start: int) -> tuple[int, int] | None:
    """The earliest occurrence at or after `start` of any candidate (the longest on a tie)."""
    hits = [(p, -len(c)) for c in candidates if (p := full.find(c, start)) >= 0]
    if not hits:
        return None
    p, neg = min(hits)
    return p, p - neg


def search(t: Template, msgs: list[dict[str, Any]], full: str, turns: list[int]) -> list[Span]:
    """Each message's content searched for in `full`, in order: where the marked rendering does not line up
    (a template that changes a text beyond trimming it, or branches on its words)."""
    header, eot, key = t.header, t.eot, t.reasoning
    out: list[Span] = []
    cursor = 0

    def missing(k: int, i: int, what: str) -> TurnNotFound:
        return TurnNotFound(
            f"assistant turn {k + 1} (message {i}): {what}, so the turn cannot be located in the rendered text "
            "for the loss mask (the template renders a conversation's prefixes differently from the whole, and "
            "changes this turn's text). Use another chat template (chat_template: chatml) or fix the row.")

    for k, i in enumerate(turns):
        # The user and tool messages before this turn move the cursor past their own text.
        for j in range(out[-1][2] + 1 if out else 0, i):
            if msgs[j]["role"] in ("user", "tool") and (hit := _find(full, _candidates(msgs[j]["content"]), cursor)):
                cursor = hit[1]
        m = msgs[i]
        calls = m.get("tool_calls") or []
        cands = _candidates(m["content"] or "")
        head = full.find(header, cursor) if header else -1
        hit = _find(full, cands, head + len(header)) if head >= 0 and cands else None
        if hit is None and cands:  # the header found may belong to a later turn: look from the cursor
            head, hit = -1, _find(full, cands, cursor)
        if hit is not None:
            start, pos = (head + len(header) if head >= 0 else hit[0]), hit[1]
            if head < 0 and key and m.get(key):  # no header: reasoning rendered before the content is the turn's
                r = full.find(str(m[key]).strip(), cursor, hit[0])
                if r >= 0:
                    lead = full[:r].rstrip()
                    start = lead.rfind("<think>") if lead.endswith("<think>") else r
            if head < 0:  # spaces before the content belong to its first token (" Two" is one token in BPE)
                while start > cursor and full[start - 1] == " ":
                    start -= 1
        elif calls:  # no content: the turn starts after its header
            bare = header.strip()
            if head < 0 and bare and (b := full.find(bare, cursor)) >= 0:
                head, header_len = b, len(bare)
            else:
                header_len = len(header)
            if head < 0:
                raise missing(k, i, "it has no content and the assistant header is not in the rendering")
            start = pos = head + header_len
        else:
            raise missing(k, i, f"its content ({m['content'][:60]!r}) is not in the rendering")
        for call in calls:
            name = call["function"]["name"]
            n = full.find(name, pos)
            if n < 0:
                raise missing(k, i, f"its call of {name!r} is not in the rendering")
            pos = n + len(name)
        limit = len(full)
        nxt = next((msgs[j] for j in range(i + 1, len(msgs)) if msgs[j]["role"] != "assistant"), None)
        if nxt is not None and (after := _find(full, _candidates(nxt["content"]), pos)):
            limit = after[0]
        e = full.find(eot, pos, limit) if eot else -1
        if e >= 0:
            end = e + len(eot or "")
        elif calls:
            raise missing(k, i, "the end of its tool calls (an end-of-turn token after them) is not in the rendering")
        else:
            end = pos
        out.append((start, end, i))
        cursor = end
    return out
