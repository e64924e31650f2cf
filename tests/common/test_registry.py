"""The model registry (common/registry.py, `ftjobs promote`, `ftjobs models`) on the local store and the S3 server.

Models are real merge manifests of the tiny model (tests/jobs/builders.publish_merged); promotions run
through the CLI as a user runs them, and the race runs real threads against create-only writes.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from common import manifest as mf
from common import registry, storage
from common.errors import EXIT_CONFIG, EXIT_GATE, EXIT_INPUT, ConfigError, InputError
from jobs.cli import main
from tests.jobs.builders import publish_merged

pytestmark = pytest.mark.integration


@pytest.fixture
def merges(store_root: str, tiny_model: Path) -> list[str]:
    """Three merged models (different weights) under the store root."""
    return [publish_merged(f"{store_root}/runs/r{i}/merge", tiny_model, seed=i, noise=0.01 * i).uri
            for i in range(3)]


def promote(root: str, manifest: str, name: str = "tickets", *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["promote", manifest, "--name", name, "--root", root, *extra])
    return result.exit_code, result.output


def test_promote_show_and_rollback_move_the_champion_and_keep_history(store_root: str, merges: list[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GITHUB_RUN_ID", "4242")
    code, out = promote(store_root, merges[0])
    assert code == 0, out
    assert out.strip().splitlines()[-1] == f"{store_root}/models/tickets/versions/1.json"
    assert registry.resolve("models:/tickets", store_root).manifest == merges[0]
    code, out = promote(store_root, merges[1], "tickets", "--note", "second")
    assert code == 0, out
    v2 = registry.resolve("models:/tickets", store_root)
    assert (v2.version, v2.manifest, v2.note, v2.promoted_by.ci["GITHUB_RUN_ID"]) == (2, merges[1], "second", "4242")
    assert v2.manifest_sha256 == mf.load(merges[1]).sha256 and v2.run_id == mf.load(merges[1]).manifest.run_id
    # An older version stays addressable, and rollback makes it champion again with a new pointer.
    assert registry.resolve("models:/tickets/1", store_root).manifest == merges[0]
    result = CliRunner().invoke(main, ["models", "rollback", "tickets", "--to", "1", "--root", store_root])
    assert result.exit_code == 0, result.output
    assert registry.resolve("models:/tickets", store_root).version == 1
    assert [(p.seq, p.version, p.action) for p in registry.history("tickets", store_root)] == [
        (1, 1, "promote"), (2, 2, "promote"), (3, 1, "rollback")]
    shown = CliRunner().invoke(main, ["models", "show", "tickets", "--root", store_root])
    assert shown.exit_code == 0, shown.output
    assert " * v1" in shown.output and "   v2" in shown.output and "rollback -> v1 (was v2)" in shown.output
    listed = CliRunner().invoke(main, ["models", "list", "--root", store_root, "--json"])
    assert json.loads(listed.output) == [{"name": "tickets", "versions": 2, "champion": 1,
                                          "since": registry.history("tickets", store_root)[-1].at,
                                          "model": merges[0]}]
    # Promoting the same model again is not a new version: it already is one (a re-run after a kill).
    assert promote(store_root, merges[0])[0] == 0
    assert len(registry.versions("tickets", store_root)) == 2


def test_bad_promotions_exit_3_naming_the_manifest(store_root: str, merges: list[str]) -> None:
    # Not a model: an evaluate-like manifest with no model files.
    other = mf.publish(f"{store_root}/runs/x/evaluate", mf.build(stage="evaluate", run_id="x", config={},
                                                                 inputs=[], artifacts=[]))
    code, out = promote(store_root, other)
    assert code == EXIT_INPUT and "it is a evaluate manifest" in out and other in out
    code, out = promote(store_root, f"{store_root}/runs/nothing/merge")
    assert code == EXIT_INPUT and f"{store_root}/runs/nothing/merge" in out
    # A file changed after publishing (same size, other bytes) fails --verify full.
    loaded = mf.load(merges[2])
    art = next(a for a in loaded.manifest.artifacts if a.name.endswith("config.json"))
    where = loaded.resolve(art)
    data = storage.read_bytes(where)
    storage.write_bytes(where, data.replace(b"{", b" ", 1) if data.startswith(b"{") else b" " + data[1:])
    code, out = promote(store_root, merges[2])
    assert code == EXIT_INPUT and "cannot promote" in out and "sha256" in out
    assert registry.names(store_root) == []  # nothing recorded


def test_unknown_names_exit_2_listing_the_names(store_root: str, merges: list[str]) -> None:
    assert promote(store_root, merges[0], "tickets")[0] == 0
    result = CliRunner().invoke(main, ["models", "show", "tikets", "--root", store_root])
    assert result.exit_code == EXIT_CONFIG and "names: tickets" in result.output
    with pytest.raises(ConfigError, match="no version 7 .versions: 1"):
        registry.resolve("models:/tickets/7", store_root)
    with pytest.raises(ConfigError, match="not a model name"):
        registry.resolve("models:/../etc", store_root)
    result = CliRunner().invoke(main, ["models", "rollback", "nope", "--to", "1", "--root", store_root])
    assert result.exit_code == EXIT_CONFIG and "names: tickets" in result.output


def test_a_champion_whose_files_are_gone_is_reported_never_replaced(store_root: str, merges: list[str]) -> None:
    assert promote(store_root, merges[0])[0] == 0
    assert promote(store_root, merges[1])[0] == 0
    loaded = mf.load(merges[1])
    storage.delete(loaded.resolve(loaded.manifest.artifacts_named("model/model.safetensors")[0]))
    with pytest.raises(InputError, match="version 2 cannot be served: its files are gone"):
        registry.resolve("models:/tickets", store_root)
    shown = CliRunner().invoke(main, ["models", "show", "tickets", "--root", store_root])
    assert shown.exit_code == EXIT_INPUT and "rollback" in shown.output
    assert registry.champion("tickets", store_root).version.version == 2  # reported, not replaced
    assert registry.resolve("models:/tickets/1", store_root).manifest == merges[0]


def test_a_promotion_race_has_exactly_one_winner(store_root: str, merges: list[str]) -> None:
    """Several promotions that all compared with the same champion (none): one moves it, the others are refused."""
    outcomes: dict[int, object] = {}
    start = threading.Barrier(len(merges))

    def attempt(i: int) -> None:
        start.wait()
        try:
            outcomes[i] = registry.promote(merges[i], "tickets", store_root, expect_champion=None, verify="size")
        except registry.ChampionMoved as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(merges))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, o in outcomes.items() if not isinstance(o, Exception)]
    losers = [o for o in outcomes.values() if isinstance(o, registry.ChampionMoved)]
    assert len(winners) == 1 and len(losers) == len(merges) - 1
    assert all(exc.exit_code == EXIT_GATE for exc in losers)
    assert all("moved the champion first" in str(e) or "champion changed" in str(e) for e in losers)
    current = registry.champion("tickets", store_root)
    assert current is not None and current.version.manifest == merges[winners[0]]
    assert [p.seq for p in registry.history("tickets", store_root)] == [1]


@pytest.mark.unit
@pytest.mark.parametrize("args", [["promote"], ["models"], ["models", "list"], ["models", "show"],
                                  ["models", "rollback"], ["try"], ["infer"]])
def test_every_registry_command_has_help_naming_the_root(args: list[str]) -> None:
    result = CliRunner().invoke(main, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "--root" in result.output or args == ["models"]
