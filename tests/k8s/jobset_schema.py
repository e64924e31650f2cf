"""The JobSet (jobset.x-k8s.io/v1alpha2) schema, built offline, for validating what `ftjobs k8s render
--engine jobset` prints without a cluster.

kubernetes-validate knows only the core API. The JobSet API types are published on PyPI inside
`kubeflow-trainer-api` (Kubeflow Trainer's OpenAPI models: `JobsetV1alpha2*`, generated from the JobSet
v1alpha2 API, with the core types they embed). Their pydantic JSON schema is the JobSet document's
schema; here it is closed (an object refuses properties it does not declare, as `kubernetes-validate
--strict` does for core types) and checked with jsonschema. Two scalar types the generator turned into
objects get their OpenAPI meaning back: a Quantity (`"8"`, `96Gi`) and an IntOrString are strings or
numbers. The child Job template is core API: the tests also hand it to kubernetes-validate as a Job.
"""

from __future__ import annotations

import functools
from typing import Any


def available() -> bool:
    try:
        import jsonschema  # noqa: F401
        from kubeflow_trainer_api.models.jobset_v1alpha2_job_set import JobsetV1alpha2JobSet  # noqa: F401
    except ImportError:
        return False
    return True


def _closed(node: Any) -> Any:
    if isinstance(node, dict):
        if "properties" in node and node.get("type", "object") == "object":
            node.setdefault("additionalProperties", False)
        for value in node.values():
            _closed(value)
    elif isinstance(node, list):
        for value in node:
            _closed(value)
    return node


SCALARS = {"IoK8sApimachineryPkgApiResourceQuantity": {"type": ["string", "number"]},
           "IoK8sApimachineryPkgUtilIntstrIntOrString": {"type": ["string", "integer"]}}


@functools.cache
def schema() -> dict[str, Any]:
    from kubeflow_trainer_api.models.jobset_v1alpha2_job_set import JobsetV1alpha2JobSet

    closed = _closed(JobsetV1alpha2JobSet.model_json_schema(by_alias=True))
    for name, scalar in SCALARS.items():
        if name in closed["$defs"]:
            closed["$defs"][name] = scalar
    return closed


def _leaves(error: Any) -> Any:
    """The innermost errors under an anyOf (every optional field is `anyOf: [its type, null]`)."""
    if not error.context:
        yield error
        return
    for sub in error.context:
        if sub.validator == "type" and sub.validator_value == "null":
            continue
        yield from _leaves(sub)


def violations(doc: dict[str, Any]) -> list[str]:
    """What the JobSet schema rejects in `doc` ([] when it validates)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    out = sorted({f"{'/'.join(map(str, leaf.absolute_path)) or '.'}: {leaf.message[:200]}"
                  for error in validator.iter_errors(doc) for leaf in _leaves(error)})
    if doc.get("apiVersion") != "jobset.x-k8s.io/v1alpha2" or doc.get("kind") != "JobSet":
        out.append(f"apiVersion/kind {doc.get('apiVersion')}/{doc.get('kind')}: expected jobset.x-k8s.io/v1alpha2 "
                   "JobSet")
    return out
