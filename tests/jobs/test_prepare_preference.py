"""Preference data through prepare: every layout in tests/data/preference (OpenAI, TRL plain/conversational,
explicit/implicit prompts, LLaMA-Factory ranking), masks per template family, drops, the split by prompt,
and the refusals (mixed kinds, bad rows) with exit 3 naming file and line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from common import chat, chat_encode, data
from common import config as cfg
from common import manifest as mf
from common import preference as P
from common.errors import InputError
from jobs import prepare
from tests.common.chat_families import FAMILIES, tokenizer

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PREF = REPO / "tests" / "data" / "preference"
LAYOUT_FILES = {"openai.jsonl": "openai", "trl_standard.jsonl": "trl", "trl_implicit_text.jsonl": "trl",
                "trl_conversational.jsonl": "trl", "trl_implicit_conversational.jsonl": "trl",
                "sharegpt_ranking.json": "sharegpt", "alpaca_ranking.json": "alpaca"}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from common import tinymodel

    path = tmp_path_factory.mktemp("tok") / "tok"
    tinymodel.build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def run(**kw: Any) -> mf.Loaded:
    kw.setdefault("eval_fraction", 0.0)
    return prepare.run(cfg.validate(prepare.Config, kw))


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pairs_of(loaded: mf.Loaded, split: str = "train") -> list[dict]:
    return data.read_split(loaded, split, columns=[f.name for f in P.schema(True)]).to_pylist()


def texts(tok: Any, row: dict) -> tuple[str, str, str]:
    """The trained text of each answer, and the prompt's last line."""
    def trained(labels: list[int]) -> str:
        return tok.decode([x for x in labels if x != chat.IGNORE_INDEX])
    return trained(row["chosen_labels"]), trained(row["rejected_labels"]), tok.decode(row["prompt_ids"])


@pytest.fixture
def all_layouts(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path, subprocess_env: dict[str, str]
                ) -> tuple[mf.Loaded, Any]:
    """Every layout file through the CLI in one run, tokenized with the tiny model's ChatML template."""
    out = tmp_path_factory.mktemp("pref") / "all"
    cmd = [sys.executable, "-m", "jobs.cli", "prepare", "--tokenizer", str(tok_dir), "--output", str(out),
           "--set", "eval_fraction=0.0"]
    for name in LAYOUT_FILES:
        cmd += ["--source", str(PREF / name)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return mf.load(str(out)), proc


def test_every_layout_is_read_through_the_cli_with_each_answer_trained_after_one_prompt(all_layouts, tok):
    loaded, _ = all_layouts
    stats = loaded.manifest.stats
    assert stats["kind"] == "preference" and P.is_preference_run(loaded)
    n_in = sum(len(json.loads((PREF / n).read_text())) if n.endswith(".json") else
               len((PREF / n).read_text().splitlines()) for n in LAYOUT_FILES)
    # The same pair in two layouts (the sky is blue, in the plain and the conversational files) is a duplicate.
    assert stats["rows_in"] == n_in and stats["dropped"] == {"duplicate_exact": 3}
    assert stats["pairs"] == n_in - 3 == stats["train"]
    assert {Path(k).name: v for k, v in stats["layouts"].items()} == LAYOUT_FILES
    assert stats["tokens"]["prompt"]["count"] == n_in - 3 and stats["truncated"] == 0
    rows = {(Path(r["source"]).name, r["prompt"][-1]["content"]): r for r in pairs_of(loaded)}
    expect = {  # (file, last prompt message) -> trained chosen text, trained rejected text
        ("openai.jsonl", "Is the shop open on Sundays?"): ("Yes, from ten to four.", "Maybe."),
        ("openai.jsonl", "Name a primary colour."): ("Red.", "Purple."),  # one message object, not a list
        ("openai.jsonl", "Translate 'cat' to French."): ("chat", "chien"),  # text parts
        ("trl_standard.jsonl", "The sky is"): ("blue.", "green."),
        ("trl_implicit_text.jsonl", "Snow is"): ("cold.", "hot."),  # the shared text, cut at whitespace
        ("trl_conversational.jsonl", "Count to three."): ("1, 2, 3.", "1, 3, 2."),
        ("trl_implicit_conversational.jsonl", "Bye"): ("Goodbye!", "What?"),  # shared turns are the prompt
        ("trl_implicit_conversational.jsonl", "Largest planet?"): ("Jupiter.", "Mars."),  # UltraFeedback shape
        ("sharegpt_ranking.json", "Say bye."): ("Bye!", "Hello again!"),
        ("alpaca_ranking.json", "Translate to German.\n\ngood morning"): ("Guten Morgen", "Gute Nacht"),
    }
    for key, (chosen, rejected) in expect.items():
        row = rows[key]
        c, r, prompt = texts(tok, row)
        assert (c, r) == (f"{chosen}<|im_end|>", f"{rejected}<|im_end|>"), key
        assert prompt.endswith("<|im_start|>assistant\n") and chosen not in prompt, key
        assert row["chosen_ids"][:len(row["chosen_labels"])] == row["chosen_ids"]
    # System prompts, earlier turns and tools stay in the prompt; a preferred tool call is trained as one.
    hi = rows[("trl_implicit_conversational.jsonl", "Bye")]
    assert [m["role"] for m in hi["prompt"]] == ["user", "assistant", "user"]
    assert rows[("sharegpt_ranking.json", "Colour of grass?")]["prompt"][0]["content"] == "Answer with one word."
    call = rows[("openai.jsonl", "What's the weather in Oslo?")]
    assert json.loads(call["tools"])[0]["function"]["name"] == "get_weather"
    assert '"get_weather"' in texts(tok, call)[0] and "get_weather" in texts(tok, call)[2]
    sg = rows[("sharegpt_ranking.json", "Weather in Paris?")]
    assert sg["chosen"][0]["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_pair_masks_are_exactly_the_sft_masks_of_each_answer(tok: Any, name: str) -> None:
    """prompt_ids + an answer's ids and labels are what SFT builds for prompt + that answer (last turn)."""
    family_tok = tokenizer(FAMILIES[name], tok)
    fmt = chat.chat_format(family_tok)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One plus one?"},
              {"role": "assistant", "content": "Two."}, {"role": "user", "content": "Two plus two?"}]
    chosen, rejected = [{"role": "assistant", "content": "Four."}], [{"role": "assistant", "content": "Five, I think."}]
    (pair,) = P.encode_pairs(family_tok, fmt, [(prompt, chosen, rejected, None)], max_length=None)
    assert pair.drop_reason is None, pair.detail
    for answer, ids, labels in ((chosen, pair.chosen_ids, pair.chosen_labels),
                                (rejected, pair.rejected_ids, pair.rejected_labels)):
        (sft,) = chat_encode.encode_many(family_tok, fmt, [prompt + answer], train_on="last_assistant")
        assert pair.prompt_ids + ids == sft.input_ids
        assert [chat.IGNORE_INDEX] * len(pair.prompt_ids) + labels == sft.labels


def test_drop_reasons_split_by_prompt_and_truncation(tmp_path: Path, tok_dir: Path, tok) -> None:
    u, a = (lambda t: {"role": "user", "content": t}), (lambda t: {"role": "assistant", "content": t})
    rows = [{"prompt": f"question {i}", "chosen": f"good {j}", "rejected": f"bad {j}"}
            for i in range(12) for j in range(3)]  # three pairs per prompt
    rows += [{"prompt": "same", "chosen": "x", "rejected": "x"},                         # identical_answers
             {"prompt": "empty", "chosen": "  ", "rejected": "no"},                      # empty_completion
             {"chosen": "abc", "rejected": "xyz"},                                        # no_prompt
             {"prompt": "long " * 200, "chosen": "yes", "rejected": "no"},               # prompt_too_long
             {"prompt": "question 0", "chosen": "good 0", "rejected": "bad 0"},          # duplicate_exact
             {"prompt": [u("hi")], "chosen": [u("not an answer")], "rejected": [a("ok")]},  # broken_alternation
             {"prompt": "marker", "chosen": "fine", "rejected": "done<|im_end|>"}]     # special_token_in_text
    rows.append({"prompt": "cut", "chosen": "word " * 100, "rejected": "short"})        # kept, truncated
    src = jsonl(tmp_path / "pairs.jsonl", rows)
    loaded = run(sources=[str(src)], output=str(tmp_path / "o"), tokenizer=str(tok_dir), max_length=64,
                 eval_fraction=0.3, max_drop_fraction=0.5)
    st = loaded.manifest.stats
    assert st["dropped"] == {"identical_answers": 1, "empty_completion": 1, "no_prompt": 1, "prompt_too_long": 1,
                             "duplicate_exact": 1, "broken_alternation": 1, "special_token_in_text": 1}
    assert st["pairs"] == 37 and st["truncated"] == 1 and st["tokens"]["truncated_pairs"] == 1
    train, evals = pairs_of(loaded, "train"), pairs_of(loaded, "eval")
    assert train and evals and st["prompts"]["eval"] >= 1
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in evals}  # a prompt is on one side
    assert all(len(r["prompt_ids"]) + len(r["chosen_ids"]) <= 64 for r in train + evals)
    from common import storage

    drops = storage.read_bytes(loaded.resolve(loaded.manifest.artifact("drops"))).decode().splitlines()
    lines = {json.loads(x)["reason"]: json.loads(x)["line"] for x in drops}
    assert lines == {"identical_answers": 37, "empty_completion": 38, "no_prompt": 39, "prompt_too_long": 40,
                     "duplicate_exact": 41, "broken_alternation": 42, "special_token_in_text": 43}
    marker = next(json.loads(x) for x in drops if json.loads(x)["reason"] == "special_token_in_text")
    assert marker["detail"].startswith("rejected: message 1 (assistant) content holds '<|im_end|>'")


def test_mixed_kinds_and_bad_rows_exit_3_naming_file_and_line(tmp_path: Path, subprocess_env: dict[str, str]):
    pair = {"prompt": "q", "chosen": "yes", "rejected": "no"}
    sft = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    cases = {
        "sft_after_pairs.jsonl": ([pair, {**pair, "prompt": "r"}, sft], "line 3: a supervised row"),
        "pairs_after_sft.jsonl": ([sft, pair], "line 2: a preference pair (chosen / rejected"),
        "bad_tools.jsonl": ([pair, {**pair, "tools": "not json"}], "line 2: column 'tools'"),
        "kto.jsonl": ([{"prompt": "q", "completion": "yes", "label": True}], "line 1: an unpaired KTO row"),
        # after a supervised row the file is read as prompt/completion: a KTO row there would train its
        # undesirable completion as an answer, its label lost
        "kto_after_sft.jsonl": ([{"prompt": "q", "completion": "a"}, {"prompt": "q", "completion": "no",
                                                                      "label": False}], "line 2: an unpaired KTO row"),
    }
    for name, (records, message) in cases.items():
        src = jsonl(tmp_path / name, records)
        proc = subprocess.run([sys.executable, "-m", "jobs.cli", "prepare", "--source", str(src), "--output",
                               str(tmp_path / f"o-{name}")], capture_output=True, text=True, cwd=REPO,
                              env=subprocess_env, timeout=120)
        assert proc.returncode == 3, (name, proc.stderr[-2000:])
        assert f"{src} {message}" in proc.stderr, (name, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and not (tmp_path / f"o-{name}" / "manifest.json").exists()
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(pair) + "\n{not json\n")
    with pytest.raises(InputError, match=r"broken.jsonl line 2: not valid JSON"):
        run(sources=[str(broken)], output=str(tmp_path / "o-broken"))


# --------------------------------------------------------------------------- layouts users bring besides TRL's

def u(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def a(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def read_pair(rec: dict[str, Any]) -> Any:
    from jobs.prepare import pref_layouts as pref
    from jobs.prepare import rows as R

    return pref.to_pair(rec, R.DEFAULT_ROLES, 200_000)


@pytest.mark.unit
def test_hh_rlhf_dialogues_are_parsed_into_turns_with_the_shared_turns_as_prompt() -> None:
    from jobs.prepare import pref_layouts as pref

    head = "\n\nHuman: Any cuss words?\n\nAssistant: Why do you ask?\n\nHuman: Just curious."
    rec = {"chosen": head + "\n\nAssistant: I'd rather not.", "rejected": head + "\n\nAssistant: Sure: ..."}
    pair = read_pair(rec)
    assert pair.prompt == [u("Any cuss words?"), a("Why do you ask?"), u("Just curious.")]
    assert (pair.chosen, pair.rejected) == ([a("I'd rather not.")], [a("Sure: ...")])
    assert pref.layout_name(rec) == "hh-rlhf"
    with pytest.raises(pref.R.Drop, match="rejected answer is empty"):  # HH rows whose answer is a bare "Assistant:"
        read_pair({**rec, "rejected": head + "\n\nAssistant:"})
    # Dahoas' HH sets: the prompt transcript ends in an open "Assistant:" turn, answers follow after its space.
    dahoas = read_pair({"prompt": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: How are you?\n\nAssistant:",
                        "chosen": " Fine, thanks.", "rejected": " Bad."})
    assert dahoas.prompt == [u("Hi"), a("Hey"), u("How are you?")] and dahoas.chosen == [a("Fine, thanks.")]


@pytest.mark.unit
def test_orca_prompt_columns_a_system_column_and_alpaca_history_reach_the_prompt() -> None:
    intel = read_pair({"system": "You are helpful.", "question": "Sky colour?", "chosen": "Blue", "rejected": "Red"})
    assert intel.prompt == [{"role": "system", "content": "You are helpful."}, u("Sky colour?")]
    argilla = read_pair({"system": "", "input": "2+2?", "chosen": "4", "rejected": "5", "rating": [9, 2],
                         "status": "tie", "generations": ["4", "5"]})
    assert argilla.prompt == [u("2+2?")] and argilla.chosen == [a("4")]
    trl = read_pair({"system": "Pirate.", "prompt": [u("Hello")], "chosen": [a("Arr!")], "rejected": [a("Hi.")]})
    assert trl.prompt[0] == {"role": "system", "content": "Pirate."}
    lf = read_pair({"instruction": "And now?", "input": "", "system": "Be brief.", "chosen": "b", "rejected": "c",
                    "history": [["First?", "One."]]})
    assert lf.prompt == [{"role": "system", "content": "Be brief."}, u("First?"), a("One."), u("And now?")]
    # LLaMA-Factory sharegpt ranking mapped to a `messages` column (role/content or from/value tags) ...
    tagged = read_pair({"messages": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hey"},
                        "rejected": {"from": "gpt", "value": "Go."}})
    assert (tagged.prompt, tagged.chosen, tagged.rejected) == ([u("Hi")], [a("Hey")], [a("Go.")])
    # ... but UltraFeedback's `messages` (the chosen conversation, answer included) is not a prompt.
    uf = read_pair({"chosen": [u("Q"), a("good")], "rejected": [u("Q"), a("bad")], "messages": [u("Q"), a("good")]})
    assert (uf.prompt, uf.chosen) == ([u("Q")], [a("good")])


@pytest.mark.unit
def test_message_lists_in_text_cells_are_messages_but_json_answers_stay_text() -> None:
    from jobs.prepare import pref_layouts as pref

    csv_row = {"prompt": json.dumps([u("Count to 3.")]), "chosen": json.dumps([a("1 2 3")]),
               "rejected": json.dumps({"role": "assistant", "content": "1 3 2"})}
    pair = read_pair(csv_row)
    assert (pair.prompt, pair.chosen, pair.rejected) == ([u("Count to 3.")], [a("1 2 3")], [a("1 3 2")])
    uf = read_pair({"prompt": "Largest planet?", "chosen": json.dumps([u("Largest planet?"), a("Jupiter.")]),
                    "rejected": json.dumps([u("Largest planet?"), a("Mars.")]), "score_chosen": "9.0"})
    assert uf.prompt == [u("Largest planet?")] and uf.chosen == [a("Jupiter.")]
    for layout_row in ({"prompt": "Extract.", "chosen": '{"name": "x"}', "rejected": '{"role": "bad"}'},
                       {"instruction": "Extract.", "chosen": '{"name": "x"}', "rejected": "[1, 2]"}):
        pair = read_pair(layout_row)
        assert pair.chosen == [a('{"name": "x"}')], layout_row
    with pytest.raises(pref.R.Drop, match="prompt is null") as null:  # not silently an implicit prompt
        read_pair({"prompt": None, "chosen": "Q: x A: good", "rejected": "Q: x A: bad"})
    assert null.value.reason == "missing_field"


def test_hh_csv_and_parquet_with_null_columns_prepare_and_inspect_as_pairs(tmp_path: Path, tok_dir: Path, tok):
    """Real files: HH-RLHF Parquet with an all-null extra column (once a crash in the row-size guard), a CSV
    with message lists in JSON cells; `ftjobs inspect` shows each pair as its two sequences."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from jobs.cli import main

    hh = [{"chosen": f"\n\nHuman: Hi {i}\n\nAssistant: Hello!", "rejected": f"\n\nHuman: Hi {i}\n\nAssistant: Go.",
           "margin": None} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(hh), tmp_path / "hh.parquet")
    with open(tmp_path / "conv.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerow([json.dumps([u("Count to 3.")]), json.dumps([a("1 2 3")]), json.dumps([a("1 3 2")])])
    loaded = run(sources=[str(tmp_path / "hh.parquet"), str(tmp_path / "conv.csv")], output=str(tmp_path / "o"),
                 tokenizer=str(tok_dir))
    st = loaded.manifest.stats
    assert st["pairs"] == 4 and not st["dropped"]
    assert sorted(Path(k).name + ":" + v for k, v in st["layouts"].items()) == ["conv.csv:trl", "hh.parquet:hh-rlhf"]
    rows = {r["prompt"][-1]["content"]: r for r in pairs_of(loaded)}
    assert texts(tok, rows["Hi 0"])[:2] == ("Hello!<|im_end|>", "Go.<|im_end|>")
    assert texts(tok, rows["Count to 3."])[:2] == ("1 2 3<|im_end|>", "1 3 2<|im_end|>")
    assert "Human:" not in texts(tok, rows["Hi 0"])[2]
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "o"), "--rows", "1", "--color", "never"])
    assert res.exit_code == 0, res.output
    assert "answer=chosen" in res.output and "answer=rejected" in res.output
    assert res.output.count("«") == 2 and "preference pairs: 4 (train 4, eval 0) of 4 read" in res.output
    trained = re.findall("«(.*?)»", res.output, re.S)
    assert all(t.endswith("<|im_end|>") and "<|im_start|>" not in t for t in trained), trained  # answers only


def test_supervised_settings_are_named_as_ignored_and_a_source_max_rows_is_refused(tmp_path: Path, caplog) -> None:
    import logging

    from common.errors import ConfigError

    src = jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "yes", "rejected": "no"}])
    with caplog.at_level(logging.WARNING, logger="jobs.prepare.preference"):
        loaded = run(sources=[str(src)], output=str(tmp_path / "o"), columns={"prompt": "question"},
                     max_train_rows=5)
    assert loaded.manifest.stats["pairs"] == 1
    assert "ignored: columns.prompt=question, max_train_rows=5" in caplog.text
    with pytest.raises(ConfigError, match=r"p.jsonl max_rows would be ignored"):
        run(sources=[{"path": str(src), "max_rows": 1}], output=str(tmp_path / "o2"))
    too_many = jsonl(tmp_path / "m.jsonl", [{"prompt": [u("q"), a("x")] * 3 + [u("q")], "chosen": "y", "rejected": "n"},
                                            {"prompt": "q", "chosen": "y", "rejected": "n"}])
    st = run(sources=[str(too_many)], output=str(tmp_path / "o3"), max_messages=4,
             max_drop_fraction=0.5).manifest.stats
    assert st["dropped"] == {"too_many_messages": 1} and st["pairs"] == 1
