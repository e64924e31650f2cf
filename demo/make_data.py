"""The demo task: route a support ticket, answering with a small JSON object.

    "Route this support ticket as JSON: Hi, this is Mara from Oslo. I was charged
     twice this month. Please fix it today, it is urgent."
    -> {"team": "red", "lane": "fast"}

The team follows from what the ticket is about (the teams are named by colour:
red handles billing, blue technical problems, green accounts, white shipping),
the lane from whether it is urgent (fast) or not (slow). The values are words
the small base model's tokenizer holds as single tokens, so the finetune has
to learn the routing, not how to spell new words. The bundled base model
(demo/pretrain_base.py) knows the chat format and how to copy text, but has
never seen this task, so it cannot do it; a few minutes of LoRA on CPU teach
it. Answers are exactly checkable (exact match, valid JSON, a JSON schema with
enums), which makes the before/after report easy to read.

Writes OpenAI-chat JSONL (`messages` with role/content), seeded, so the
committed file is reproducible:

    python -m demo.make_data            # -> demo/data/tickets.jsonl, demo/data/schema.json

Every row is a distinct combination of sender, issue and urgency wording, so
whichever rows prepare holds out for eval were never trained on.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent

NAMES = (
    "Mara Ivo Lena Tomas Ada Bruno Clara Dario Elsa Felix Greta Hugo Iris Jonas Kira Luca Mila Nico Olga Pavel "
    "Rosa Sami Tara Udo Vera Wim Yara Zeno Anton Bea Cyril Dora Emil Fiona Gil Hana Igor Juno Karl Lisa"
).split()
CITIES = (
    "Oslo Paris Rome Lima Cairo Delhi Kyoto Quito Dakar Porto Riga Tunis Bern Baku Hanoi Perth Accra Lyon "
    "Malmo Graz Split Turin Bonn Cork Nantes Leeds Bilbao Ghent Kiev Minsk"
).split()
ISSUES = {
    "red": ["I was charged twice this month.", "My invoice shows the wrong amount.",
                "I still have not received my refund.", "The card payment failed but money left my account.",
                "Why did my subscription price go up?", "Please cancel the extra charge on my bill."],
    "blue": ["The app crashes when I open it.", "The page will not load at all.",
                  "I get error code 504 when I save.", "Sync stopped working on my phone.",
                  "The export button does nothing.", "Search returns no results since the update."],
    "green": ["I cannot log in any more.", "Please reset my password.", "I want to change my email address.",
                "Delete my profile and my data.", "My account was locked after the update.",
                "How do I add a second user to my account?"],
    "white": ["My parcel is two weeks late.", "The package never arrived.", "I got the wrong item.",
                 "The box was damaged on delivery.", "Can I change the delivery address?",
                 "Tracking has not moved for days."],
}
URGENT = ["Please fix it today, it is urgent.", "This is blocking our whole team right now.",
          "I need this solved asap.", "Urgent: we lose money every hour."]
CALM = ["No rush, whenever you have time.", "It is not urgent.", "Just letting you know.",
        "Thanks in advance, take your time."]
GREETINGS = ["Hi, this is {name} from {city}.", "Hello, {name} here ({city}).", "Dear support, I am {name} in {city}."]
INSTRUCTION = "Route this support ticket as JSON: "
SCHEMA = {
    "type": "object",
    "required": ["team", "lane"],
    "additionalProperties": False,
    "properties": {"team": {"enum": sorted(ISSUES)}, "lane": {"enum": ["fast", "slow"]}},
}


def answer(team: str, lane: str) -> str:
    return json.dumps({"team": team, "lane": lane})


def ticket(rng: random.Random, team: str, issue: str, urgency: str, name: str, city: str) -> dict[str, object]:
    text = " ".join([rng.choice(GREETINGS).format(name=name, city=city), issue, urgency])
    lane = "fast" if urgency in URGENT else "slow"
    return {"messages": [{"role": "user", "content": INSTRUCTION + text},
                         {"role": "assistant", "content": answer(team, lane)}]}


def generate(n: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    combos = [(team, issue, urgency) for team, issues in ISSUES.items()
              for issue, urgency in itertools.product(issues, URGENT + CALM)]
    rows = []
    for team, issue, urgency in (rng.sample(combos, len(combos)) * (n // len(combos) + 1))[:n]:
        rows.append(ticket(rng, team, issue, urgency, rng.choice(NAMES), rng.choice(CITIES)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "data"))
    parser.add_argument("--rows", type=int, default=600)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "tickets.jsonl", "w") as f:
        for r in generate(args.rows, args.seed):
            f.write(json.dumps(r) + "\n")
    (out / "schema.json").write_text(json.dumps(SCHEMA, indent=2) + "\n")
    print(f"{out / 'tickets.jsonl'}: {args.rows} rows")


if __name__ == "__main__":
    main()
