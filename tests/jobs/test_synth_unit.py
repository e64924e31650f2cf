"""synth's rules without a model: reading completions into rows, the length and near-duplicate checks, the
order in which a batch of completions is kept or rejected, the teacher's prompts, seeds and config."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from common import config as cfg
from common import neardup as dedup
from common.errors import ConfigError, InputError
from jobs import pipeline
from jobs.synth import job as synth
from jobs.synth import rows as R

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def msgs(*turns: tuple[str, str]) -> dict[str, object]:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def reason(fn: object, *args: object, **kw: object) -> str:
    with pytest.raises(R.Reject) as exc:
        fn(*args, **kw)  # type: ignore[operator]
    return exc.value.reason


def test_completions_become_rows_of_the_declared_format_or_a_named_reject() -> None:
    good = json.dumps(msgs(("user", "What is 2 plus 3?"), ("assistant", "5")))
    assert R.parse_completion(f"Here it is:\n```json\n{good}\n```", "stop", "messages", None) == json.loads(good)
    assert R.parse_completion(good + "\nHope this helps!", "stop", "messages", None)["messages"][1]["content"] == "5"
    assert reason(R.parse_completion, good, "length", "messages", None) == "truncated"
    assert reason(R.parse_completion, "What is 4 plus 4? 8", "stop", "messages", None) == "not_json"
    assert reason(R.parse_completion, '{"messages": [{"role": "user", "content": "hi"', "stop", "messages",
                  None) == "not_json"
    for bad in (msgs(("assistant", "5"), ("user", "hi")), msgs(("user", "a"), ("user", "b")), msgs(("user", "a")),
                msgs(("user", "a"), ("tool", "b")), {"messages": "hi"}, {"prompt": "a", "completion": "b"},
                {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}):
        assert reason(R.to_row, bad, "messages") == "wrong_format", bad
    system = msgs(("system", "Be brief."), ("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))
    assert R.to_row(system, "messages") == system
    # Extra keys a teacher adds are not carried into the row.
    assert R.to_row({"prompt": "p", "completion": "c", "note": "x"}, "prompt_completion") == {"prompt": "p",
                                                                                             "completion": "c"}
    assert reason(R.to_row, {"prompt": "p"}, "prompt_completion") == "wrong_format"


def test_seeds_may_convert_between_messages_and_prompt_completion_completions_may_not() -> None:
    pc = {"prompt": "p", "completion": "c"}
    assert R.to_row(pc, "messages", convert=True) == msgs(("user", "p"), ("assistant", "c"))
    assert R.to_row(msgs(("user", "p"), ("assistant", "c")), "prompt_completion", convert=True) == pc
    assert reason(R.to_row, pc, "messages") == "wrong_format"
    assert reason(R.to_row, msgs(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")),
                  "prompt_completion", convert=True) == "wrong_format"


def test_json_format_checks_the_schema_and_names_where_it_fails() -> None:
    schema = {"type": "object", "required": ["instruction", "output"],
              "properties": {"instruction": {"type": "string"}, "output": {"type": "string", "maxLength": 5}}}
    v = cfg.json_schema_validator(schema, "json_schema")
    assert R.to_row({"instruction": "i", "output": "o"}, "json", v) == {"instruction": "i", "output": "o"}
    with pytest.raises(R.Reject, match="at output: 'toolong' is too long") as exc:
        R.to_row({"instruction": "i", "output": "toolong"}, "json", v)
    assert exc.value.reason == "schema_invalid"


def test_length_limits() -> None:
    row = msgs(("user", "  a "), ("assistant", "bbbb"))
    assert reason(R.check_length, row, "messages", 2, 100) == "too_short"
    assert reason(R.check_length, row, "messages", 1, 7) == "too_long"
    R.check_length(row, "messages", 1, 8)


def test_near_duplicates_are_jaccard_of_character_ngrams_at_the_threshold() -> None:
    a = "Route this ticket as JSON: the export button does nothing since Monday."
    b = "Route this ticket as JSON: the export button does nothing since Tuesday."
    c = "Why did my subscription price go up? Just letting you know."
    sim = dedup.jaccard(dedup.shingles(a, 5), dedup.shingles(b, 5))
    assert 0.7 < sim < 0.9
    assert dedup.normalize("The EXPORT  button,  does-nothing!") == "the export button does nothing"
    for threshold, found in ((sim, True), (sim + 0.01, False)):  # at the threshold counts, just above does not
        index = dedup.Index(threshold)
        index.add("a", a)
        hit = index.nearest(b)
        assert (hit is not None) is found
        if hit:
            assert hit[0] == "a" and hit[1] == pytest.approx(sim)
    index = dedup.Index(0.8)
    index.add("a", a)
    index.add("c", c)
    assert index.nearest(c.upper() + "  ") == ("c", 1.0)  # case and spacing do not make a row new
    assert index.nearest("Completely different words about rivers and mountains.") is None


def test_lsh_finds_every_pair_above_the_threshold_that_an_exhaustive_check_finds() -> None:
    import random

    rng = random.Random(0)
    words = "red green blue cat dog bird fish tree house car road city river sun moon star".split()
    base = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(40)]
    variants = [" ".join(t.split()[:-1] + [rng.choice(words)]) for t in base]  # one word changed
    for threshold in (0.3, 0.5, 0.8):
        index = dedup.Index(threshold)
        for i, t in enumerate(base):
            index.add(str(i), t)
        sets = [dedup.shingles(t, 5) for t in base]
        for v in variants:
            s = dedup.shingles(v, 5)
            exact = max((dedup.jaccard(s, x), str(i)) for i, x in enumerate(sets))
            hit = index.nearest(v)
            if exact[0] >= threshold:
                assert hit is not None and hit[1] == pytest.approx(exact[0]), (threshold, v)
            else:
                assert hit is None


def record(key: str, sample: int, text: str, finish: str = "stop", error: str | None = None) -> dict[str, object]:
    return {"key": key, "sample": sample, "completion": text, "finish_reason": finish, "prompt_tokens": 10,
            "completion_tokens": 5, "error": error}


def test_a_batch_of_completions_is_kept_in_order_every_reject_counted_by_reason() -> None:
    config = cfg.validate(synth.Config, {"seeds": ["s.jsonl"], "teacher": "t", "output": "o",
                                         "limits": {"max_chars": 60}, "reject_examples": 1})
    seeds = [R.Seed(msgs(("user", "What is 12 plus 30?"), ("assistant", "42")), "seeds.jsonl line 1")]

    def row(q: str, a: str) -> str:
        return json.dumps(msgs(("user", q), ("assistant", a)))

    records = [record("p0", 0, row("What is 12 plus 30?", "42")),              # the seed itself
               record("p0", 1, row("Name a blue animal, please.", "A blue jay.")),
               record("p1", 0, row("Name a blue animal, please!", "A blue jay.")),  # near the kept p0-1
               record("p1", 1, "garbage"), record("p2", 0, row("x" * 50, "y" * 20)),
               record("p2", 1, row("a", "b"), finish="length"), record("p3", 0, "", error="prompt too long"),
               record("p3", 1, row("What colour is the sky at noon?", "Blue.")),
               record("p4", 0, row("What colour is the sky at noon?", "Blue.")[:-1])]
    tally = synth.Tally(keep_examples=1)
    candidates = synth.check_completions(config, records, seeds, None, tally)
    synth.keep_new(config, candidates, tally)
    assert [r["id"] for r in tally.kept] == ["synth-p0-1", "synth-p3-1"]
    assert dict(tally.rejected) == {"near_duplicate_of_seed": 1, "near_duplicate": 1, "not_json": 2, "too_long": 1,
                                    "truncated": 1, "prompt_too_long": 1}
    assert len(tally.kept) + sum(tally.rejected.values()) == len(records)
    assert [e["key"] for e in tally.examples["not_json"]] == ["p1-1"]  # first example per reason only
    assert "with seeds.jsonl line 1" in tally.examples["near_duplicate_of_seed"][0]["detail"]
    assert set(tally.rejected) <= set(R.REASONS)
    message = synth.refusal(tally, len(records), 5)
    assert "synth kept 2 of 9 completions; min_rows is 5" in message and "not_json" in message


def test_guided_schema_accepts_the_rows_the_checks_keep_and_nothing_else() -> None:
    schema = R.guided_schema("messages", None, 1, 40, 4)
    v = jsonschema.Draft202012Validator(schema)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert v.is_valid(msgs(("user", "a"), ("assistant", "b")))
    assert v.is_valid(msgs(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")))
    assert not v.is_valid(msgs(("assistant", "a"), ("user", "b")))
    assert not v.is_valid(msgs(("user", "a" * 11), ("assistant", "b")))  # 40 characters over 4 turns
    assert not v.is_valid(msgs(*[("user", "a"), ("assistant", "b")] * 3))
    pc = jsonschema.Draft202012Validator(R.guided_schema("prompt_completion", None, 1, 40, 4))
    assert pc.is_valid({"prompt": "p", "completion": "c"}) and not pc.is_valid({"prompt": "p"})


def test_each_prompt_draws_its_own_seeds_the_same_way_in_every_attempt() -> None:
    seeds = [R.Seed({"prompt": str(i), "completion": "c"}, f"line {i}") for i in range(20)]
    first = [R.draw_shots(seeds, 3, 7, i) for i in range(5)]
    assert first == [R.draw_shots(seeds, 3, 7, i) for i in range(5)]
    assert len({json.dumps(x) for x in first}) == 5 and all(len(x) == 3 for x in first)
    few = R.draw_shots(seeds[:2], 3, 7, 0)  # fewer seeds than shots: all of them
    assert sorted(json.dumps(x) for x in few) == sorted(json.dumps(s.row) for s in seeds[:2])
    prompt = R.teacher_prompt("Write a new one.", "Be exact.", first[0], "prompt_completion", None)
    assert prompt[0] == {"role": "system", "content": "Be exact."}
    text = prompt[1]["content"]
    assert text.startswith("Write a new one.\n\nExamples:\n" + R.shown(first[0][0]))
    assert 'Format: {"prompt": "...", "completion": "..."}' in text and text.endswith("and nothing else.")


def test_seed_files_are_read_by_the_format_rules_and_bad_ones_named(tmp_path: Path) -> None:
    good = tmp_path / "seeds.jsonl"
    good.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n\n"
                    + json.dumps(msgs(("user", "u"), ("assistant", "a"))) + "\n")
    seeds = R.read_seeds([R.seed_input(str(good))], "messages", None, "train")
    assert [s.row for s in seeds] == [msgs(("user", "p"), ("assistant", "c")), msgs(("user", "u"), ("assistant", "a"))]
    assert seeds[1].where == f"{good} line 3"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(msgs(("user", "u"), ("assistant", "a"))) + "\n" + json.dumps({"text": "t"}) + "\n")
    with pytest.raises(InputError, match=rf"{bad} line 2: this seed is not a messages row \(wrong_format"):
        R.read_seeds([R.seed_input(str(bad))], "messages", None, "train")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p", "completion": \n')
    with pytest.raises(InputError, match=rf"{broken} line 1: not valid JSON"):
        R.read_seeds([R.seed_input(str(broken))], "messages", None, "train")
    with pytest.raises(ConfigError, match="synth reads JSON Lines"):
        R.seed_input(str(tmp_path / "seeds.csv"))
    with pytest.raises(InputError, match="does not exist"):
        R.seed_input(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(InputError, match="No seed examples"):
        R.read_seeds([R.seed_input(str(empty))], "messages", None, "train")


@pytest.mark.parametrize("fields, message", [
    ({"format": "json"}, "format json needs json_schema"),
    ({"json_schema": {"type": "object"}}, "json_schema is only read with format json"),
    ({"guided": True, "engine": "transformers"}, "guided: true needs engine: vllm"),
    ({"judge": {"model": "j", "min_score": 11}}, "min_score 11 is off the scale 1..10"),
    ({"judge": {"model": "j", "min_score": 5, "sampling": {"n": 2, "temperature": 1}}}, "judge sampling.n is 2"),
    ({"sampling": {"n": 3, "temperature": 0}}, "n=3 with temperature 0"),
    ({"limits": {"min_chars": 10, "max_chars": 5}}, "limits.min_chars 10 exceeds limits.max_chars 5"),
    ({"output": "s.jsonl"}, "output must be a prefix of its own"),
])
def test_contradictory_settings_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cfg.validate(synth.Config, {"seeds": ["s.jsonl"], "teacher": "t", "output": "o", **fields})


def test_shipped_configs_validate() -> None:
    conf = cfg.load_config(synth.Config, file=str(REPO / "configs/synth.yaml"),
                           flags={"seeds": ["s.jsonl"], "teacher": "t", "output": "o"})
    assert conf.guided and conf.sampling.n == 4 and conf.near_duplicates.threshold == 0.8
    run = cfg.load_config(pipeline.Config, file=str(REPO / "configs/pipeline-synth-judge.yaml"))
    resolved = pipeline.check_sections(run)
    assert list(resolved)[:2] == ["synth", "prepare"]
    assert resolved["evaluate"].judge.mode == "pairwise" and resolved["evaluate"].fail_if_worse == "judge"


def test_help_names_what_each_option_takes() -> None:
    from click.testing import CliRunner

    from jobs.cli import main

    result = CliRunner().invoke(main, ["synth", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--seeds", "--teacher", "--output", "--engine", "--config", "--set"):
        assert option in result.output
    assert "ftjobs prepare --source URI" in result.output
