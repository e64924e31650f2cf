"""A compiled Jinja template rendered without rebuilding its globals on every call.

`Template.render` builds a fresh context per call from `Template.globals`, a ChainMap (the template's own
globals over the environment's): `dict(ChainMap, **vars)` and `set(ChainMap)` walk it key by key in Python,
about half the cost of rendering a short chat prefix. prepare renders each row about four times (the whole
and the prefixes around each assistant turn), so `Renderer` flattens the globals once and builds the same
context (same parent mapping, same global keys, a fresh Context per call, so nothing a render sets leaks
into the next) from the flat copy. The output and errors are `Template.render`'s: the same root render
function, the same `environment.handle_exception` on a failure.

The flat copy is taken when the Renderer is made; transformers sets its environment's globals once, when it
compiles a template (and caches the compiled template), so a Renderer made after that sees what
`Template.render` would.
"""

from __future__ import annotations

from typing import Any


class Renderer:
    """`render(**variables)` as `template.render(**variables)` returns it."""

    __slots__ = ("template", "globals")

    def __init__(self, template: Any):
        self.template = template
        self.globals: dict[str, Any] = dict(template.globals)

    def render(self, **variables: Any) -> str:
        t = self.template
        env = t.environment
        if env.is_async:  # render() runs the async path itself
            return str(t.render(**variables))
        ctx = env.context_class(env, {**self.globals, **variables}, t.name, t.blocks, globals=self.globals)
        try:
            return str(env.concat(t.root_render_func(ctx)))
        except Exception:  # noqa: BLE001 - as Template.render: jinja rewrites the traceback and re-raises
            env.handle_exception()
            raise  # pragma: no cover - handle_exception always raises
