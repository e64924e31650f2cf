"""Preference layouts: one record of a user's preference file read into a canonical, validated pair
(jobs/prepare/preference.py runs them through prepare).

Layouts (the key names are fixed, but roles map through the config's `roles`):

- OpenAI's preference fine-tuning JSONL: `input` {`messages`, optional `tools`, other keys such as
  `parallel_tool_calls` ignored}, `preferred_output` and `non_preferred_output` (lists of assistant messages;
  one message object is read as a list of one).
- TRL's `prompt` / `chosen` / `rejected`: plain text (the prompt becomes a user message and each answer an
  assistant message) or conversational (lists of messages; a `tools` column as TRL reads it; a `system` text
  column opens the prompt unless it has a system message). The prompt may also be called `question`
  (Intel/orca_dpo_pairs) or `input` (argilla's distilabel Orca pairs), or be a `messages` list ending in a
  user turn (LLaMA-Factory's sharegpt ranking with role/content tags). Without a prompt (TRL's implicit
  prompt) the prompt is what chosen and rejected share: for conversations the longest common run of leading
  messages, for text the longest common prefix cut back to whitespace (TRL's `extract_prompt` rule).
  Conversational chosen/rejected that repeat the prompt's messages (UltraFeedback binarized: `prompt` text,
  full conversations as answers) are read the same way, the `prompt` text checked against the shared user
  turn. Extra keys (`score_chosen`, `prompt_id`, `messages`, ratings, ...) are ignored. Message lists in text
  cells (CSV, Parquet string columns) are parsed when the JSON has the shape of messages; other answer text
  (a JSON answer such as `{"name": ...}`) stays text.
- Anthropic HH-RLHF: `chosen` / `rejected` as whole dialogues in text ("\n\nHuman: ...\n\nAssistant: ...").
  Their turns are parsed into messages (as TRL's hh-rlhf script does) and read as implicit-prompt
  conversations: the shared turns are the prompt, each answer the turns after them. A `prompt` transcript
  that ends in an open "Assistant:" turn (Dahoas' HH sets) is parsed the same way.
- LLaMA-Factory's ranking (`ranking: true`) layouts: sharegpt `conversations` + `chosen` / `rejected` as one
  `{from, value}` turn each (optional `system`, `tools`), and alpaca `instruction` (+ `input`, `system`,
  `history`) + `chosen` / `rejected` text.
- KTO's unpaired rows (`prompt`, `completion`, `label`) are refused with exit 3 (not supported).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from jobs.prepare import rows as R

# The prompt column of a `chosen` / `rejected` record, first found wins: TRL's `prompt`, Intel/orca_dpo_pairs'
# `question`, argilla's distilabel Orca pairs' `input` (LLaMA-Factory's alpaca `instruction` is its own layout).
PROMPT_KEYS = ("prompt", "question", "input")
# KTO's unpaired rows (one completion and a desirable/undesirable label): recognised so that prepare refuses
# them instead of reading `prompt` / `completion` as a supervised row (which would train on the bad answers).
KTO_KEYS = ("completion", "label")
# Anthropic HH-RLHF: each answer is the whole dialogue as text, turns opened by "\n\nHuman: " / "\n\nAssistant: ".
HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def layout(keys: Iterable[str]) -> str | None:
    """The preference layout a record's keys say, or None for a record that is not a pair."""
    k = set(keys)
    if set(R.PREFERENCE_KEYS) <= k:
        return "openai"
    if set(R.PAIR_KEYS) <= k:
        if "conversations" in k:
            return "sharegpt"
        if "instruction" in k:
            return "alpaca"
        return "trl"
    return None


def is_pair(keys: Iterable[str]) -> bool:
    return layout(keys) is not None


def is_kto(rec: Mapping[str, Any]) -> bool:
    """A KTO row: `completion` and a boolean `label` (true/false text in CSV), no chosen/rejected. A
    prompt/completion row with some other `label` (a class id, say) is a supervised row."""
    label = rec.get("label")
    return (set(KTO_KEYS) <= rec.keys() and not is_pair(rec)
            and (isinstance(label, bool) or str(label).strip().lower() in ("true", "false")))


def kto_error(uri: str, where: str) -> str:
    """Why a KTO row is refused, wherever it turns up (a preference run's file, or a supervised one)."""
    return (f"{uri} {where}: an unpaired KTO row (prompt, completion, label): prepare reads preference pairs, a "
            "chosen and a rejected answer to one prompt, and KTO is not supported. Pair each prompt's desirable and "
            "undesirable completions as chosen/rejected (docs/preference.md), or train SFT on the desirable ones "
            "(label true) without the label column.")


def layout_name(rec: Mapping[str, Any]) -> str:
    """What the stats call a record's layout: `layout`, told apart further for TRL-keyed files (HH-RLHF
    transcripts, Orca-style `question` / `input` prompts, full conversations with a `prompt` text)."""
    kind = layout(rec) or "unknown"
    if kind != "trl":
        return kind
    if "prompt" not in rec and isinstance(rec.get("chosen"), str) and _hh(rec["chosen"]) is not None:
        return "hh-rlhf"
    if "prompt" not in rec and any(k in rec for k in PROMPT_KEYS):
        return "orca"
    return kind


@dataclass
class Pair:
    prompt: list[dict[str, Any]]
    chosen: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None


def to_pair(rec: Mapping[str, Any], roles: Mapping[str, str], max_chars: int, max_messages: int | None = None
            ) -> Pair:
    """One record as a validated pair; raises rows.Drop with the reason."""
    kind = layout(rec)
    if kind == "openai":
        inp = rec.get("input")
        if isinstance(inp, str):  # a CSV or Parquet cell holding the JSON text
            try:
                inp = json.loads(inp)
            except json.JSONDecodeError:
                pass
        if not isinstance(inp, dict):
            raise R.Drop("missing_field" if inp is None else "wrong_type",
                         f"input is {type(inp).__name__}, expected an object with messages (and tools)")
        prompt = _messages(inp.get("messages"), "input.messages", roles)
        tools = R.to_tools(inp, {"tools": "tools"})
        pair = Pair(prompt, _completion(rec.get("preferred_output"), "preferred_output", roles),
                    _completion(rec.get("non_preferred_output"), "non_preferred_output", roles), tools)
    elif kind == "sharegpt":
        prompt = _messages(rec.get("conversations"), "conversations", roles, "from", "value")
        system = R._text(rec.get("system"), "system", required=False)
        if system and not (prompt and prompt[0]["role"] == "system"):
            prompt.insert(0, {"role": "system", "content": system})
        pair = Pair(prompt, _completion(rec.get("chosen"), "chosen", roles, "from", "value"),
                    _completion(rec.get("rejected"), "rejected", roles, "from", "value"),
                    R.to_tools(rec, {"tools": "tools"}))
    elif kind == "alpaca":
        pair = Pair(_alpaca_prompt(rec, roles), _completion(rec.get("chosen"), "chosen", roles),
                    _completion(rec.get("rejected"), "rejected", roles), R.to_tools(rec, {"tools": "tools"}))
    elif kind == "trl":
        pair = _trl(rec, roles)
    else:
        raise R.Drop("missing_field", "not a preference pair: expected chosen/rejected or preferred_output/"
                     "non_preferred_output")
    return validated(pair, max_chars, max_messages)


def _messages(value: Any, where: str, roles: Mapping[str, str], role_key: str = "role",
              content_key: str = "content") -> list[dict[str, Any]]:
    return R._chat_list(R._json_list(value, where), role_key, content_key, roles, where)


def _completion(value: Any, where: str, roles: Mapping[str, str], role_key: str = "role",
                content_key: str = "content") -> list[dict[str, Any]]:
    """An answer: text (one assistant message), one message object, or a list of messages."""
    value = _decoded(value)
    if value is None:
        raise R.Drop("missing_field", f"{where} is missing")
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], dict) and role_key not in value[0] \
            and "from" in value[0]:
        role_key, content_key = "from", "value"  # sharegpt-style turns where role/content were expected
    return _messages(value, where, roles, role_key, content_key)


def _decoded(value: Any) -> Any:
    """A text cell (CSV, or a Parquet string column) holding a message list or one message object as JSON,
    parsed; anything else as given. Only JSON shaped like messages (every object with role and content, or
    from and value) is parsed, so an answer whose text is JSON (`{"name": ...}`) stays text."""
    if not (isinstance(value, str) and value.lstrip()[:1] in ("[", "{")):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return value
    items = [parsed] if isinstance(parsed, dict) else parsed
    shaped = isinstance(items, list) and bool(items) and all(
        isinstance(m, dict) and ({"role", "content"} <= m.keys() or {"from", "value"} <= m.keys()) for m in items)
    return parsed if shaped else value


def _alpaca_prompt(rec: Mapping[str, Any], roles: Mapping[str, str]) -> list[dict[str, Any]]:
    """LLaMA-Factory's alpaca prompt (system, history pairs, instruction + input), read by the supervised
    alpaca reader (rows.to_messages) with a placeholder output that is then cut off: one reading of `history`."""
    cols = {k: k for k in ("instruction", "input", "output", "system", "history")}
    return R.to_messages({**rec, "output": ""}, "alpaca", cols, roles)[:-1]


def _hh(text: str) -> list[dict[str, Any]] | None:
    """An HH-RLHF transcript ("\n\nHuman: ...\n\nAssistant: ...", leading newlines optional) as messages;
    None when the text is not one (it must open with a Human turn and hold an Assistant turn)."""
    body = "\n\n" + text.lstrip("\n")
    if not body.startswith("\n\nHuman:") or "\n\nAssistant:" not in body:
        return None
    parts = HH_TURN.split(body)  # ["", "Human", text, "Assistant", text, ...]
    return [{"role": HH_ROLES[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts) - 1, 2)]


def _trl(rec: Mapping[str, Any], roles: Mapping[str, str]) -> Pair:
    """TRL's layouts (and the HH-RLHF, Orca and UltraFeedback shapes of them), with an optional `system` text."""
    key = next((k for k in PROMPT_KEYS if k in rec), None)
    if key is not None and rec[key] is None:
        raise R.Drop("missing_field", f"{key} is null; give the prompt, or leave the {key} key out of every row "
                     "of the file to take the shared start of chosen and rejected as the prompt")
    prompt = _decoded(rec.get(key)) if key else _turns_before_answer(rec.get("messages"), roles)
    pair = _trl_pair(prompt, key or "messages", _decoded(rec.get("chosen")), _decoded(rec.get("rejected")), roles,
                     R.to_tools(rec, {"tools": "tools"}))
    system = R._text(rec.get("system"), "system", required=False)
    if system and system.strip() and not (pair.prompt and pair.prompt[0]["role"] == "system"):
        pair.prompt.insert(0, {"role": "system", "content": system})
    return pair


def _turns_before_answer(value: Any, roles: Mapping[str, str]) -> list[dict[str, Any]] | None:
    """A `messages` column that is the prompt (LLaMA-Factory's sharegpt ranking with role/content tags: the
    turns before the answers, ending in a user turn); None otherwise: UltraFeedback's `messages` is the chosen
    conversation, answer included, and is ignored."""
    value = _decoded(value)
    if not (isinstance(value, list) and value and all(isinstance(m, dict) for m in value)):
        return None
    role_key, content_key = ("from", "value") if "from" in value[0] else ("role", "content")
    msgs = _messages(value, "messages", roles, role_key, content_key)
    return msgs if msgs[-1]["role"] != "assistant" else None


def _trl_pair(prompt: Any, key: str, chosen: Any, rejected: Any, roles: Mapping[str, str],
              tools: list[dict[str, Any]] | None) -> Pair:
    if isinstance(chosen, str) and isinstance(rejected, str):
        hh = (_hh(chosen), _hh(rejected)) if prompt is None else (None, None)
        if hh[0] is not None and hh[1] is not None:  # HH-RLHF: the dialogue's turns, as a conversation
            chosen, rejected = hh
        elif prompt is None:  # implicit prompt, TRL's rule: the common prefix, cut back to whitespace
            return _text_prefix_pair(chosen, rejected, tools)
        else:
            hh_prompt = _hh(prompt) if isinstance(prompt, str) else None
            if hh_prompt and hh_prompt[-1]["role"] == "assistant" and not hh_prompt[-1]["content"].strip():
                # a prompt transcript ending in an open "Assistant:" turn (Dahoas' HH sets): its turns; the
                # answers then start after "Assistant:", with the space the transcript puts there
                return Pair(hh_prompt[:-1], [{"role": "assistant", "content": chosen.removeprefix(" ")}],
                            [{"role": "assistant", "content": rejected.removeprefix(" ")}], tools)
            return Pair(_prompt(prompt, key, roles), [{"role": "assistant", "content": chosen}],
                        [{"role": "assistant", "content": rejected}], tools)
    c, r = _completion(chosen, "chosen", roles), _completion(rejected, "rejected", roles)
    shared = 0  # leading messages both answers repeat: the (implicit) prompt
    while shared < min(len(c), len(r)) - 1 and c[shared] == r[shared]:
        shared += 1
    while shared > 0 and c[shared - 1]["role"] == "assistant" and c[shared]["role"] == "assistant":
        shared -= 1  # an answer starts at an assistant turn that follows a non-assistant one
    if shared == 0:
        if prompt is None:
            raise R.Drop("no_prompt", "no prompt column, and chosen and rejected are not conversations that share "
                         "their leading (prompt) messages; give a prompt column")
        return Pair(_prompt(prompt, key, roles), c, r, tools)
    implicit = c[:shared]
    if prompt is not None:
        given = _prompt(prompt, key, roles)
        if given != implicit and not (isinstance(prompt, str) and implicit[-1]["content"].strip() == prompt.strip()):
            raise R.Drop("wrong_type", f"{key} and the leading messages of chosen/rejected are both given and "
                         "differ; give the prompt once (prompt + answers, or full conversations without prompt)")
    return Pair(implicit, c[shared:], r[shared:], tools)


def _text_prefix_pair(chosen: str, rejected: str, tools: list[dict[str, Any]] | None) -> Pair:
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and not chosen[n - 1].isspace() and n < min(len(chosen), len(rejected)):
        n -= 1
    if not chosen[:n].strip():
        raise R.Drop("no_prompt", "no prompt column and chosen and rejected share no leading text to take as the "
                     f"prompt; give a prompt column ({', '.join(PROMPT_KEYS)})")
    return Pair([{"role": "user", "content": chosen[:n].rstrip()}], [{"role": "assistant", "content": chosen[n:]}],
                [{"role": "assistant", "content": rejected[n:]}], tools)


def _prompt(value: Any, key: str, roles: Mapping[str, str]) -> list[dict[str, Any]]:
    if isinstance(value, str) or value is None:
        return [{"role": "user", "content": R._text(value, key) or ""}]
    if isinstance(value, dict):
        value = [value]
    return _messages(value, key, roles)


def validated(pair: Pair, max_chars: int, max_messages: int | None = None) -> Pair:
    for name in ("chosen", "rejected"):
        msgs = getattr(pair, name)
        if not msgs or all(not m["content"].strip() and not m.get("tool_calls") for m in msgs):
            raise R.Drop("empty_completion", f"the {name} answer is empty")
        if msgs[0]["role"] != "assistant":
            raise R.Drop("broken_alternation", f"the {name} answer starts with a {msgs[0]['role']} message; an "
                         "answer is assistant messages (with tool results between them)")
        R.validate([*pair.prompt, *msgs], max_chars, max_messages)  # the conversation each answer makes, as SFT
    pair.prompt = [m for m in pair.prompt if not (m["role"] == "system" and not m["content"].strip())]
    if _norm(pair.chosen) == _norm(pair.rejected):
        raise R.Drop("identical_answers", "chosen and rejected are the same answer: nothing to prefer")
    return pair


def _norm(msgs: list[dict[str, Any]]) -> str:
    return json.dumps([{**m, "content": " ".join(m["content"].split())} for m in msgs], sort_keys=True)


def keys(pair: Pair) -> tuple[str, str, int, int]:
    """(pair id, prompt id, exact key, normalized key): ids hash the canonical JSON (rows.row_id)."""
    canon = json.dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected,
                        "tools": pair.tools}, ensure_ascii=False, separators=(",", ":"))
    sep = [{"role": "\x1d", "content": ""}]
    return (R.row_id(canon), R.row_id(R.canonical(pair.prompt, pair.tools)), R.exact_key(canon),
            R.normalized_key([*pair.prompt, *sep, *pair.chosen, *sep, *pair.rejected], pair.tools))
