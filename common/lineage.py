"""Lineage: a manifest's inputs walked back to the raw data, each one verified.

`ftjobs show` prints the tree (`render_tree`) or its JSON (`tree_dict`) and
exits 3 when any node fails (`all_ok`, `first_failure`). A broken ancestor is
a FAILED node in the tree, never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from common import storage
from common.manifest import InputRef, as_manifest_uri, load


@dataclass
class Node:
    """One manifest or raw input in the tree: whether it verified, and why not."""

    uri: str
    stage: str | None
    run_id: str | None
    ok: bool
    note: str
    children: list[Node] = field(default_factory=list)


def lineage(uri: str, *, verify: Literal["none", "size", "full"] = "size", _sha: str | None = None,
            _seen: set[str] | None = None) -> Node:
    """Walk input manifests recursively; each node says whether it verified."""
    # `seen` holds the manifests on the current path only: an ancestor two inputs share
    # (infer reads merge -> train -> prepare and prepare itself) is a diamond, not a cycle.
    seen = _seen if _seen is not None else set()
    uri = as_manifest_uri(uri)
    if uri in seen:
        return Node(uri, None, None, False, "cycle")
    seen.add(uri)
    try:
        loaded = load(uri, verify=verify, expect_sha256=_sha)
    except Exception as exc:  # a broken ancestor is reported in the tree, not raised
        seen.discard(uri)
        return Node(uri, None, None, False, str(exc))
    m = loaded.manifest
    node = Node(uri, m.stage, m.run_id, True, f"{len(m.artifacts)} artifacts verified ({verify})")
    for ref in m.inputs:
        if ref.stage is None:
            node.children.append(_raw_node(ref, verify))
        else:
            node.children.append(lineage(ref.uri, verify=verify, _sha=ref.sha256, _seen=seen))
    seen.discard(uri)
    return node


def _raw_node(ref: InputRef, verify: str) -> Node:
    if ref.role == "data-listing":  # prepare past 100 raw files: a digest of a source's files (its inputs artifact)
        return Node(ref.uri, None, None, True, f"raw inputs, a folder or prefix listed in the manifest's inputs "
                    f"artifact (digest {ref.sha256[:12]})")
    if verify == "full":
        try:
            ok = storage.sha256_uri(ref.uri) == ref.sha256
            note = "raw input, sha256 matches" if ok else "raw input CHANGED since it was read"
        except FileNotFoundError:
            ok, note = False, "raw input missing"
        except Exception as exc:
            ok, note = False, f"raw input unreadable: {exc}"
        return Node(ref.uri, None, None, ok, note)
    return Node(ref.uri, None, None, True, f"raw input sha256 {ref.sha256[:12]}")


def render_tree(node: Node, prefix: str = "", last: bool = True, root: bool = True) -> str:
    mark = "ok" if node.ok else "FAILED"
    label = (f"{node.stage} {node.run_id}" if node.stage else "raw" if node.note.startswith("raw input")
             else "manifest")
    branch = "" if root else ("└── " if last else "├── ")
    line = f"{prefix}{branch}[{mark}] {label}  {node.uri}  ({node.note})"
    lines = [line]
    child_prefix = prefix if root else prefix + ("    " if last else "│   ")
    for i, child in enumerate(node.children):
        lines.append(render_tree(child, child_prefix, i == len(node.children) - 1, root=False))
    return "\n".join(lines)


def tree_dict(node: Node) -> dict[str, Any]:
    return {
        "uri": node.uri, "stage": node.stage, "run_id": node.run_id, "ok": node.ok, "note": node.note,
        "inputs": [tree_dict(c) for c in node.children],
    }


def all_ok(node: Node) -> bool:
    return node.ok and all(all_ok(c) for c in node.children)


def first_failure(node: Node) -> Node | None:
    if not node.ok:
        return node
    return next((f for c in node.children if (f := first_failure(c)) is not None), None)
