"""The demo task: pull a person's record out of a sentence as JSON.

    "Extract the record as JSON: Mara is 31 and lives in Oslo."
    -> {"name": "Mara", "age": 31, "city": "Oslo"}

The bundled base model (demo/pretrain_base.py) has learned the chat format and
to copy text, but has never seen this task, so it cannot do it; a few minutes
of LoRA on CPU teach it. Answers are exactly checkable (exact match, valid
JSON, a JSON schema), which makes the before/after report easy to read.

Writes OpenAI-chat JSONL (`messages` with role/content), seeded, so the
committed files are reproducible:

    python -m demo.make_data            # -> demo/data/train.jsonl, demo/data/eval.jsonl

Eval rows use (name, city, age) combinations that never occur in train.
"""

from __future__ import annotations

import argparse
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
TEMPLATES = (
    "{name} is {age} and lives in {city}.",
    "{name}, {age}, from {city}.",
    "{name} lives in {city} and is {age} years old.",
)
INSTRUCTION = "Extract the record as JSON: "
SCHEMA = {
    "type": "object",
    "required": ["name", "age", "city"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"}},
}


def answer(name: str, age: int, city: str) -> str:
    return json.dumps({"name": name, "age": age, "city": city})


def row(rng: random.Random, name: str, age: int, city: str) -> dict[str, object]:
    sentence = rng.choice(TEMPLATES).format(name=name, age=age, city=city)
    return {"messages": [{"role": "user", "content": INSTRUCTION + sentence},
                         {"role": "assistant", "content": answer(name, age, city)}]}


def generate(n_train: int, n_eval: int, seed: int) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    rng = random.Random(seed)
    combos = [(n, a, c) for n in NAMES for c in CITIES for a in range(18, 90)]
    rng.shuffle(combos)
    evals = combos[:n_eval]
    trains = combos[n_eval:n_eval + n_train]
    return [row(rng, *c) for c in trains], [row(rng, *c) for c in evals]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "data"))
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--eval", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, evals = generate(args.train, args.eval, args.seed)
    for name, rows in (("train", train), ("eval", evals)):
        with open(out / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        print(f"{out / name}.jsonl: {len(rows)} rows")
    (out / "schema.json").write_text(json.dumps(SCHEMA, indent=2) + "\n")


if __name__ == "__main__":
    main()
