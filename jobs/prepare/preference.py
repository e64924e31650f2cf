"""Preference data in prepare: the layouts users have, read into canonical pairs, validated, split by prompt,
tokenized (common.preference.encode_pairs) and written as Parquet, with stats and a reason per dropped pair.

Prepare takes this path when the first record of its first source is a preference pair (`is_pair`); a file
that then holds a supervised row (or, on the supervised path, a preference pair) is refused with exit 3,
naming the file and line of the first row of the other kind.

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

Pairs are held in memory (preference sets are small next to SFT corpora); the split hashes the prompt (its
messages and tools), so every pair of one prompt lands on the same side, and duplicates are whole pairs.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import chat, data, stage, storage
from common import manifest as mf
from common import preference as P
from common.errors import ConfigError, InputError
from jobs.prepare import rows as R
from jobs.prepare import sources as S

LOG = logging.getLogger(__name__)

# Reasons a pair is dropped for, besides the row reasons of rows.REASONS, in the order the stats print them.
REASONS = ("identical_answers", "empty_completion", "no_prompt", "prompt_too_long", "template_error")
ENCODE_BATCH = 256
# Supervised prepare's settings that pairs do not use (fixed layout keys; answers always trained; no mixing,
# windows or near-duplicate decontamination: the split by prompt keeps a prompt on one side).
NOT_FOR_PAIRS = ("format", "columns", "train_on", "long_documents", "window_overlap", "last_window", "mix_rows",
                 "max_train_rows", "train_fraction", "decontaminate", "decontam_threshold", "guard_suites")


# --------------------------------------------------------------------------- layouts


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


# --------------------------------------------------------------------------- the job's path for pairs


@dataclass
class Kept:
    pair: Pair
    id: str
    prompt_id: str
    source: str
    split: str
    line: int
    enc: P.EncodedPair | None = None


@dataclass
class Tally:
    rows_in: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)

    def drop(self, reason: str, source: str, line: int, detail: str, rec: Any, keep: int) -> None:
        self.dropped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < keep:
            ex.append({"reason": reason, "source": source, "line": line, "detail": detail,
                       "row": json.dumps(rec, ensure_ascii=False, default=str)[:2000]})


def first_is_pair(files: list[S.RawFile], max_line_bytes: int) -> bool:
    """Whether the first readable record of the sources is a preference pair, or a KTO row this path refuses
    (prepare's switch to this path)."""
    for f in files:
        cols = S.table_columns(f)
        if cols is not None and (is_pair(cols) or not set(KTO_KEYS) <= set(cols)):
            return is_pair(cols)
        for _, rec in S.records(f, max_line_bytes=max_line_bytes):  # KTO's label is told by its value
            if isinstance(rec, dict):
                return is_pair(rec) or is_kto(rec)
    return False


def prepare(config: Any, files: list[S.RawFile], attempt: stage.Attempt, timings: dict[str, float]
            ) -> stage.Outcome:
    """Read -> pairs -> dedup -> split by prompt -> tokenize -> write; refuse when too much was dropped."""
    try:
        return _prepare(config, files, attempt, timings)
    except BaseException:
        for art in attempt.writer.artifacts:  # a refused run leaves no data behind
            storage.delete(art.uri)
        raise


def _prepare(config: Any, files: list[S.RawFile], attempt: stage.Attempt, timings: dict[str, float]
             ) -> stage.Outcome:
    t0 = time.monotonic()
    _check_settings(config)
    roles = {**R.DEFAULT_ROLES, **config.roles}
    tally = Tally()
    kept = _read(config, files, roles, tally)
    timings["read"] = time.monotonic() - t0
    _split(config, kept)
    model_info: dict[str, Any] = {}
    if config.tokenizer:
        t = time.monotonic()
        model_info = _tokenize(config, kept, tally)
        timings["tokenize"] = time.monotonic() - t
    n_dropped = sum(tally.dropped.values())
    fraction = n_dropped / tally.rows_in if tally.rows_in else 0.0
    out = [k for k in kept if k.enc is None or k.enc.drop_reason is None]
    if fraction > config.max_drop_fraction or not out:
        raise InputError(_too_many(tally, len(out), fraction, config.max_drop_fraction))
    if not any(k.split == "train" for k in out) and not all(s.split == "eval" for s in config.source_specs()):
        raise ConfigError(f"every one of the {len(out)} pairs went to eval (the split hashes prompts; with this "
                          "few prompts that can happen). Set eval_size, or lower eval_fraction.")
    t = time.monotonic()
    counts = _write(config, out, attempt.writer)
    stats = _stats(config, tally, out, counts, fraction)
    drops = "".join(json.dumps(e, ensure_ascii=False) + "\n" for r in (*R.REASONS, *REASONS)
                    for e in tally.examples.get(r, []))
    attempt.writer.add_bytes(drops.encode(), "drops.jsonl", name="drops", rows=drops.count("\n"))
    attempt.writer.add_bytes(storage.json_bytes(stats), "stats.json", name="stats")
    timings["write"] = time.monotonic() - t
    LOG.info("preference pairs in %d, out %d (train %d, eval %d), dropped %d%s", tally.rows_in, len(out),
             counts["train"], counts["eval"], n_dropped,
             "".join(f"\n  {r:<24} {n:>8,}" for r, n in tally.dropped.most_common()))
    return stage.Outcome(stats=stats, timings=timings, model=model_info, run_id=config.run_id)


def _check_settings(config: Any) -> None:
    """Refuse a source's mixing settings (pairs are not mixed: its max_rows would be ignored), and name in the
    log the supervised settings set that pairs do not use. Those are not refused: a pipeline's
    prepare-preference step inherits the SFT step's `prepare` section."""
    mixed = [f"{s.path} {k}" for s in config.source_specs() for k in ("weight", "max_rows", "repeat") if getattr(s, k)]
    if mixed:
        raise ConfigError(f"preference pairs are not mixed or subsampled: {', '.join(mixed)} would be ignored. Remove "
                          "it from the source, and cut the file to the pairs you want instead.")
    fields = type(config).model_fields
    ignored = []
    for k in NOT_FOR_PAIRS:
        value, default = getattr(config, k), fields[k].get_default(call_default_factory=True)
        if hasattr(value, "model_dump"):  # `columns`: the keys that were changed
            now, was = value.model_dump(), default.model_dump()
            ignored += [f"{k}.{c}={v}" for c, v in now.items() if v != was[c]]
        elif value != default:
            ignored.append(f"{k}={value}")
    if ignored:
        LOG.warning("settings that do not apply to preference pairs are ignored: %s (docs/preference.md)",
                    ", ".join(ignored))


def _read(config: Any, files: list[S.RawFile], roles: dict[str, str], tally: Tally) -> list[Kept]:
    seen_exact: set[int] = set()
    seen_norm: set[int] = set()
    kept: list[Kept] = []
    for f in files:
        split = f.split
        n_file = 0
        for line, rec in S.records(f, max_line_bytes=config.max_line_bytes):
            n_file += 1
            tally.rows_in += 1
            if isinstance(rec, S.Bad):
                if not config.skip_bad_lines:
                    raise InputError(f"{f.uri} line {line}: {rec.detail}. Fix the file, or set skip_bad_lines: "
                                     "true to drop such lines (they are counted in the manifest).")
                tally.drop(rec.reason, f.uri, line, rec.detail, rec.preview, config.drop_examples)
                continue
            assert isinstance(rec, dict)  # records come decoded here
            kind = layout(rec)
            if kind is None and is_kto(rec):
                raise InputError(f"{f.uri} line {line}: an unpaired KTO row (prompt, completion, label): prepare reads "
                                 "preference pairs, a chosen and a rejected answer to one prompt, and KTO is not "
                                 "supported. Pair each prompt's desirable and undesirable completions as chosen/"
                                 "rejected (docs/preference.md), or train SFT on the desirable ones (label true) "
                                 "without the label column.")
            if kind is None:
                raise InputError(f"{f.uri} line {line}: a supervised row ({', '.join(list(map(str, rec))[:6])}) "
                                 "among preference pairs (the sources start with a pair). A run holds one kind of "
                                 "data: prepare the supervised rows and the pairs separately.")
            tally.layouts.setdefault(f.uri, layout_name(rec))
            try:
                pair = to_pair(rec, roles, config.max_chars, config.max_messages)
            except R.Drop as d:
                if d.reason in R.FATAL and not config.skip_bad_lines:
                    raise InputError(f"{f.uri} line {line}: {d.detail}. Fix the file, or set skip_bad_lines: true "
                                     "to drop such rows (they are counted in the manifest).") from None
                tally.drop(d.reason, f.uri, line, d.detail, rec, config.drop_examples)
                continue
            pid, prompt_id, exact, norm = keys(pair)
            if config.dedup != "none":
                if exact in seen_exact or (config.dedup == "normalized" and norm in seen_norm):
                    reason = "duplicate_exact" if exact in seen_exact else "duplicate_normalized"
                    tally.drop(reason, f.uri, line, "the same pair came earlier", rec, config.drop_examples)
                    continue
                seen_exact.add(exact)
                seen_norm.add(norm)
            kept.append(Kept(pair, pid, prompt_id, f.uri, split, line))
        if n_file == 0 and not config.skip_bad_lines:
            raise InputError(f"{f.uri} holds no records (empty file). Remove it from the sources, or set "
                             "skip_bad_lines: true to skip empty files.")
    return kept


def _split(config: Any, kept: list[Kept]) -> None:
    """train/eval by the prompt's hash: every pair of one prompt on the same side."""
    auto = [k for k in kept if k.split == "auto"]
    if config.eval_size is not None:
        points = sorted({k.prompt_id: R.split_point(k.prompt_id, config.seed) for k in auto}.items(),
                        key=lambda kv: kv[1])
        per_prompt = Counter(k.prompt_id for k in auto)
        chosen: set[str] = set()
        n = 0
        for pid, _ in points:  # the lowest-hash prompts until eval holds eval_size pairs
            if n >= config.eval_size:
                break
            chosen.add(pid)
            n += per_prompt[pid]
        for k in auto:
            k.split = "eval" if k.prompt_id in chosen else "train"
        return
    fraction = config.effective_eval_fraction()
    for k in auto:
        k.split = "eval" if R.split_point(k.prompt_id, config.seed) < fraction else "train"


def load_tokenizer(source: str, override: str | None) -> tuple[Any, chat.ChatFormat, dict[str, Any]]:
    """The tokenizer, chat format and manifest model block for `source` (a model folder, s3:// prefix, HF id)."""
    from common import models
    from jobs.prepare.encode import load_tokenizer as load

    ref = models.resolve(source, tokenizer_only=True)
    try:
        tok = load(str(ref.path))
    except Exception as exc:
        raise InputError(f"Could not load a tokenizer from {source} ({type(exc).__name__}: {exc})") from None
    fmt = chat.chat_format(tok, override)
    info = {"tokenizer": chat.tokenizer_identity(tok), "tokenizer_source": source, "tokenizer_revision": ref.revision,
            "template_hash": fmt.hash, "chat_template": fmt.template}
    return tok, fmt, info


def _tokenize(config: Any, kept: list[Kept], tally: Tally) -> dict[str, Any]:
    tok, fmt, info = load_tokenizer(config.tokenizer, config.chat_template)
    info = mf.PrepareModel(**info, train_on="completion", max_length=config.max_length).model_dump(mode="json")
    for start in range(0, len(kept), ENCODE_BATCH):
        batch = kept[start:start + ENCODE_BATCH]
        encoded = P.encode_pairs(tok, fmt, [(k.pair.prompt, k.pair.chosen, k.pair.rejected, k.pair.tools)
                                            for k in batch], max_length=config.max_length)
        for k, e in zip(batch, encoded, strict=True):
            if e.drop_reason is None and e.truncated and config.on_too_long == "drop":
                e.drop_reason, e.detail = "too_long_tokens", f"{e.num_tokens} tokens > max_length {config.max_length}"
            k.enc = e
            if e.drop_reason is not None:
                tally.drop(e.drop_reason, k.source, k.line, e.detail,
                           {"prompt": k.pair.prompt, "chosen": k.pair.chosen, "rejected": k.pair.rejected},
                           config.drop_examples)
    LOG.info("tokenized pairs with %s (template sha256 %s, max_length %s)", config.tokenizer, fmt.hash[:12],
             config.max_length)
    return info


def _write(config: Any, out: list[Kept], writer: mf.ArtifactWriter) -> dict[str, int]:
    return write_pairs(out, writer, tokenized=bool(config.tokenizer), rows_per_shard=config.rows_per_shard,
                       row_group_rows=config.row_group_rows)


def write_pairs(out: list[Kept], writer: mf.ArtifactWriter, *, tokenized: bool, rows_per_shard: int = 100_000,
                row_group_rows: int = 8192) -> dict[str, int]:
    """Pairs as `<split>/part-NNNNN` Parquet shards (common.preference.schema); returns pairs per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = P.schema(tokenized)
    counts = {s: 0 for s in data.SPLITS}
    with tempfile.TemporaryDirectory(prefix="ftjobs-prepare-pairs-") as tmp:
        for split in data.SPLITS:
            rows = [k for k in out if k.split == split]
            counts[split] = len(rows)
            for shard, start in enumerate(range(0, len(rows), rows_per_shard)):
                part = rows[start:start + rows_per_shard]
                table = pa.Table.from_pylist([_row(k, split, tokenized) for k in part], schema=schema)
                local = Path(tmp) / f"{split}-{shard:05d}.parquet"
                pq.write_table(table, local, compression="zstd", row_group_size=row_group_rows)
                name = f"{split}/part-{shard:05d}"
                writer.add_file(local, f"data/{name}.parquet", name=name, rows=len(part))
    return counts


def _row(k: Kept, split: str, tokenized: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"id": k.id, "prompt_id": k.prompt_id, "prompt": k.pair.prompt, "chosen": k.pair.chosen,
                           "rejected": k.pair.rejected, "tools": data.tools_json(k.pair.tools), "split": split,
                           "source": k.source}
    if tokenized and k.enc is not None:
        e = k.enc
        row.update(prompt_ids=e.prompt_ids, chosen_ids=e.chosen_ids, chosen_labels=e.chosen_labels,
                   rejected_ids=e.rejected_ids, rejected_labels=e.rejected_labels, num_tokens=e.num_tokens,
                   truncated=e.truncated)
    return row


def _lengths(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    s = sorted(values)
    return {"count": len(s), "mean": round(sum(s) / len(s), 1), "min": s[0], "max": s[-1],
            "p50": s[len(s) // 2], "p95": s[min(len(s) - 1, int(0.95 * len(s)))]}


def _stats(config: Any, tally: Tally, out: list[Kept], counts: dict[str, int], fraction: float) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "kind": P.KIND, "rows_in": tally.rows_in, "rows_out": len(out), "pairs": len(out), **counts,
        "splits": dict(counts), "prompts": {s: len({k.prompt_id for k in out if k.split == s}) for s in data.SPLITS},
        "dropped": {r: tally.dropped[r] for r in (*R.REASONS, *REASONS) if tally.dropped[r]},
        "drop_fraction": round(fraction, 6), "layouts": dict(tally.layouts),
        "truncated": sum(1 for k in out if k.enc is not None and k.enc.truncated),
        "eval_fraction": config.effective_eval_fraction() if config.eval_size is None else None,
    }
    encs = [k.enc for k in out if k.enc is not None]
    if encs:
        stats["tokens"] = {"prompt": _lengths([len(e.prompt_ids) for e in encs]),
                           "chosen": _lengths([len(e.chosen_ids) for e in encs]),
                           "rejected": _lengths([len(e.rejected_ids) for e in encs]),
                           "truncated_pairs": stats["truncated"]}
    return stats


def _too_many(tally: Tally, kept: int, fraction: float, limit: float) -> str:
    return R.drop_table(tally.dropped, tally.examples, tally.rows_in, kept, fraction, limit, "preference pairs",
                        "Fix the data, or raise max_drop_fraction if these drops are expected.")
