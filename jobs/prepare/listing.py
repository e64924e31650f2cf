"""The raw inputs a prepare manifest records: one entry per file, or, past `LISTED_MAX` raw files, one
digest per source (folder, glob or prefix) with the full list as the `inputs` artifact.

Every later step reads the prepare manifest (train, infer, evaluate, lineage); 3,000 small files as 3,000
entries made a 1.2 MB manifest. A source's digest entry has role `data-listing`, its URI is the source as
configured, and its sha256 is the sha256 of the source's listing lines, sorted ("<sha256> <bytes> <uri>\\n"
per file): the same files with the same bytes give the same digest, so the run's identity (the "already done"
check) is unchanged in meaning. The listing itself (`inputs.jsonl`: uri, sha256, bytes, source per file) is an
artifact of the manifest, checksummed like the data. Synth manifests used as sources stay entries of their
own (they are lineage links, not raw files).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from common import manifest as mf
from common import storage

LISTED_MAX = 100  # raw files listed one by one in the manifest; past this, one digest per source
ROLE = "data-listing"


def source_uri(path: str) -> str:
    if storage.is_s3(path) or path.startswith("hf://"):
        return path
    return str(storage.local_path(path).expanduser().absolute())


def refs(files: list[Any], source_of: dict[str, int], specs: list[Any]) -> tuple[list[mf.InputRef], bytes | None]:
    """The manifest's input entries for these files, and the listing artifact's bytes (None: none needed)."""
    raw = [f for f in files if f.manifest is None]
    linked = [f.input_ref() for f in files if f.manifest is not None]
    if len(raw) <= LISTED_MAX:
        return list({(r.uri, r.sha256): r for r in (f.input_ref() for f in files)}.values()), None
    by_source: dict[int, list[Any]] = {}
    for f in raw:
        by_source.setdefault(source_of[f.uri], []).append(f)
    out = list({(r.uri, r.sha256): r for r in linked}.values())
    lines = []
    for s, group in sorted(by_source.items()):
        uri = source_uri(specs[s].path)
        text = "".join(sorted(f"{f.sha256} {f.size} {f.uri}\n" for f in group))
        out.append(mf.InputRef(uri=uri, sha256=hashlib.sha256(text.encode()).hexdigest(), stage=None, role=ROLE))
        lines += [json.dumps({"uri": f.uri, "sha256": f.sha256, "bytes": f.size, "source": uri}) + "\n"
                  for f in sorted(group, key=lambda f: f.uri)]
    return out, "".join(lines).encode()


def compact(stats: dict[str, Any], source_of: dict[str, int], specs: list[Any]) -> dict[str, Any]:
    """The manifest's stats when the inputs are listed: per-file counts (`sources`, `formats`) summed per
    configured source; the per-file detail stays in the stats.json artifact."""
    sources: dict[str, dict[str, int]] = {}
    formats: dict[str, dict[str, int]] = {}
    for uri, counts in stats["sources"].items():
        key = source_uri(specs[source_of[uri]].path) if uri in source_of else uri
        agg = sources.setdefault(key, {"files": 0, "rows_in": 0, "rows_out": 0, "dropped": 0})
        agg["files"] += 1
        for k in ("rows_in", "rows_out", "dropped"):
            agg[k] += counts[k]
    for uri, fmt in stats["formats"].items():
        key = source_uri(specs[source_of[uri]].path) if uri in source_of else uri
        formats.setdefault(key, {}).setdefault(fmt, 0)
        formats[key][fmt] += 1
    return {**stats, "sources": sources, "formats": formats, "per_file_stats": "stats.json"}
