"""One render of a conversation that also gives the texts of its prefixes, for templates whose message loop
is shown, from the template's own syntax tree, to render each message from what came before it only.

The prefix method of common/chat.py locates assistant turn i with two more renders of the conversation cut
short: messages[:i] with the generation prompt (where the turn starts) and messages[:i+1] (where it ends),
so a row of T turns renders 2T times (quadratic in the turns: each render walks the conversation so far).
For most templates those texts are already inside the full rendering. A template has this shape:

    {# before the loop: BOS, a system turn, tools... #}
    {% for message in messages %} ...one message... {% endfor %}
    {% if add_generation_prompt %}<the generation prompt>{% endif %}

and when nothing in it can see a message after the one being rendered, rendering messages[:n] runs exactly
the same code as rendering the whole conversation up to where iteration n would begin, then leaves the
loop and renders what follows it. So render(messages[:n], gen) == full[:start of iteration n] + after(gen),
where after(gen) is what follows the loop, a text that may depend on add_generation_prompt only.

`plan(template)` proves that shape or says why it cannot (a `str`), conservatively, from the parsed
template: exactly one loop over the messages, at the top level, with no filter, `else`, `{% break %}` or
recursion, over `messages` or a name set to it or to a slice `messages[k:]` before the loop (never to
anything else, and never a name the render itself passes); what follows the loop only text, the special
tokens' variables (never set by the template) and `{% if add_generation_prompt %}`; no includes, imports,
blocks, context access, macros that read the messages, or extension tags (`{% generation %}` templates are
located by their tags). Anything else: no plan, and the caller renders every prefix as before.

Inside that shape, what could see past a prefix is checked per row instead, because templates read it only
in some branches (Llama 3.2 reads `messages | length` only when there are tools, Qwen2.5 reads `loop.last`
only at tool results): the messages used whole (their length, a filter, another loop over them), read at an
index that is not a constant >= 0, `loop.last` / `loop.length` / `loop.revindex` / `loop.nextitem` (or
`loop` passed on whole) in the message loop's own iterations, `add_generation_prompt` before the loop ends.
Each such read is wrapped in a call (TAINT) that passes its value through and notes it: a row whose
render performed one gets no prefix read off (its prefixes are rendered). That is sound because a render
that performed none only read, of the messages, the ones each iteration renders and those at constant
indices; so rendering messages[:n] performs the same steps up to iteration n, which reads nothing either.
A constant index k is the same in every prefix that holds message k: a prefix shorter than the indices
reach (`Plan.min_prefix`) is rendered.

The render itself (`Plan.render`) is the template with a marker added as the first output of the loop's body;
the markers' offsets are where the iterations began, and the text with them cut out is the template's own
output, character for character. A `{% break %}` in the loop is refused too: the loop then runs once for
each message of the suffix it walks, so the iterations map onto the last messages in order.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, NamedTuple

from common.jinja_render import Renderer

# Output at the start of each iteration of the message loop, then cut out of the text. Random per process (as a
# multipart boundary is), so no row holds it but by a 2**-64 chance.
ITERATION = f"\x00ftjobs-iteration-{secrets.token_hex(8)}\x00"
# Called around each read that may see past a prefix (see `_Checker`): a row whose render calls it is
# rendered prefix by prefix. A template that names it is refused.
TAINT = "ftjobs_prefix_read"
# What an iteration of the loop may read of `loop` (all about this iteration and the ones before it).
LOOP_BEFORE = frozenset({"index", "index0", "first", "previtem", "depth", "depth0", "cycle", "changed"})
# Nodes whose effect cannot be seen from the template itself (other templates, the context, extensions).
OPAQUE = ("Extends", "Include", "Import", "FromImport", "Block", "ContextReference", "DerivedContextReference",
          "ExtensionAttribute", "ImportedName", "InternalName", "Scope", "OverlayScope", "EvalContextModifier",
          "ScopedEvalContextModifier")
# What may follow the loop: text and the special tokens' variables, under {% if add_generation_prompt %}.
AFTER_LOOP = ("Output", "TemplateData", "Const", "Name", "If", "Not", "Add", "Concat", "CondExpr", "And", "Or",
              "Compare", "Operand", "Filter")
GENERATION_PROMPT = "add_generation_prompt"


class NotProven(Exception):
    """What in the template keeps its prefixes from being read off the full rendering."""


class Rendered(NamedTuple):  # a tuple: made once per row, and a frozen dataclass costs ~1 us to build
    """A conversation's full text and where the loop's iterations started in it."""

    text: str
    starts: list[int]  # offset in text where each iteration of the message loop began, in order
    first: int  # the message the first iteration rendered: the loop runs over messages[first:]
    loop_end: int | None  # offset where the loop ended (None: the text does not end as the plan says)


@dataclass(frozen=True)
class Plan:
    """An instrumented template and what follows its loop."""

    renderer: Renderer
    min_prefix: int  # the shortest prefix whose text can be read off (the constant indices it reads)
    after: tuple[str, str]  # the text after the loop without and with add_generation_prompt
    checked_reads: int = 0  # reads wrapped in TAINT: a row that performs one is rendered prefix by prefix

    def render(self, messages: Sequence[Mapping[str, Any]], variables: Mapping[str, Any]) -> Rendered:
        """The text (the template's own, character for character) and where its iterations began."""
        reads = _Reads() if self.checked_reads else None
        extra = {TAINT: reads} if reads is not None else {}
        pieces = self.renderer.render(messages=messages, **variables, **extra).split(ITERATION)
        text = "".join(pieces) if len(pieces) > 1 else pieces[0]
        starts = list(accumulate(map(len, pieces[:-1])))
        # The loop runs over a suffix of the messages (the check proved it) to its end (no break), so it ran
        # once for each of the last len(starts) messages; what follows it is after[False]. A render that
        # read past a prefix (reads.seen) gives no prefix.
        ok = (reads is None or not reads.seen) and len(starts) <= len(messages) \
            and text.endswith(self.after[False])
        return Rendered(text, starts, len(messages) - len(starts), len(text) - len(self.after[False]) if ok else None)

    def prefix(self, rendered: Rendered, n: int, add_generation_prompt: bool) -> str | None:
        """The text of the rendered messages[:n] (None when it cannot be read off: render it instead)."""
        if n < self.min_prefix or rendered.loop_end is None:
            return None
        if n == rendered.first + len(rendered.starts):  # all of them
            at = rendered.loop_end
        elif n >= rendered.first:
            at = rendered.starts[n - rendered.first]
        else:  # a message the loop does not render (a system turn sliced off before it)
            return None
        return rendered.text[:at] + self.after[add_generation_prompt]


class _Reads:
    """TAINT for one render: passes the value read through and says it was read."""

    __slots__ = ("seen",)

    def __init__(self) -> None:
        self.seen = False

    def __call__(self, value: Any) -> Any:
        self.seen = True
        return value


def plan(compiled: Any, source: str, variables: Mapping[str, Any]) -> Plan | str:
    """A Plan for the template `source` (compiled by `compiled`'s environment), or why there is none."""
    env = compiled.environment
    if env.is_async:
        return "the template environment renders asynchronously"
    tree = env.parse(source)
    try:
        passed = frozenset({*variables, *env.globals, "tools", "documents", GENERATION_PROMPT})
        loop, min_prefix, checked = _check(tree, frozenset(variables), passed)
    except NotProven as exc:
        return str(exc)
    after = _after_loop(env, tree, loop, variables)
    _instrument(loop)
    code = env.compile(tree)
    return Plan(Renderer(env.template_class.from_code(env, code, env.make_globals(None))), min_prefix, after,
                checked)


# --------------------------------------------------------------------------- the proof


def _check(tree: Any, variables: frozenset[str], given: frozenset[str]) -> tuple[Any, int, int]:
    """The loop over the messages, the shortest prefix that holds every constant index read, and how many
    reads were wrapped in TAINT (the tree is changed in place); raises NotProven."""
    from jinja2 import nodes

    checker = _Checker(given)
    at = None
    for k, node in enumerate(tree.body):  # before the loop: find it while following what names the messages
        if isinstance(node, nodes.For) and isinstance(node.iter, nodes.Name) and node.iter.name in checker.offset:
            at = k
            break
        tree.body[k] = checker.visit(node, top=True)
    if at is None:
        raise NotProven("no loop over the messages at the template's top level")
    loop = tree.body[at]
    if not isinstance(loop.target, nodes.Name) or loop.test is not None or loop.else_ or loop.recursive:
        raise NotProven("the message loop unpacks, filters, recurses or has an else branch")
    loop.body = [checker.visit(node, in_loop=True) for node in loop.body]
    # What follows the loop is rendered apart, from the values the render passes: a name the template sets
    # anywhere may hold something else by then.
    variables = variables - {n.name for n in tree.find_all(nodes.Name) if n.ctx != "load"}
    for node in tree.body[at + 1:]:
        if any(isinstance(n.iter, nodes.Name) and n.iter.name in checker.offset
               for n in (node, *node.find_all(nodes.For)) if isinstance(n, nodes.For)):
            raise NotProven("a second loop over the messages (the first looks ahead, say for the last user turn)")
        _check_after(node, variables)
    return loop, checker.min_prefix, checker.tainted


class _Checker:
    """Walks the template before and inside the message loop (see the module docstring for the rules): what
    can never be read off raises NotProven; a read that may see past a prefix is wrapped in a call of TAINT,
    so a row whose render performs it is rendered prefix by prefix. `visit` returns the node to keep."""

    def __init__(self, given: frozenset[str]) -> None:
        # Names that hold the messages, with the largest offset they may start at (`x = messages[1:]`: 1).
        self.offset: dict[str, int] = {"messages": 0}
        self.min_prefix = 0
        # Names the render passes or the environment defines: one set to the messages in one branch only
        # would hold something else in the other, and the loop over it would walk that.
        self.given = given - {"messages"}
        self.tainted = 0  # reads wrapped

    def visit(self, node: Any, *, top: bool = False, in_loop: bool = False, nested: bool = False) -> Any:
        from jinja2 import nodes

        kind = type(node).__name__
        if kind in OPAQUE:
            raise NotProven(f"the template uses {kind}, which this check cannot follow")
        own_loop = in_loop and not nested
        if isinstance(node, nodes.Name):
            return self._name(node, own_loop)
        if isinstance(node, nodes.Getitem) and isinstance(node.node, nodes.Name) and node.node.name in self.offset:
            if not (isinstance(node.arg, nodes.Const) and type(node.arg.value) is int and node.arg.value >= 0):
                return self._taint(node)  # messages[i - 1], messages[-1]: read, then the row is rendered
            self.min_prefix = max(self.min_prefix, self.offset[node.node.name] + node.arg.value + 1)
            return node
        if own_loop and isinstance(node, nodes.Break):
            raise NotProven("the message loop can stop early ({% break %})")
        if own_loop and isinstance(node, nodes.Getattr) and isinstance(node.node, nodes.Name) \
                and node.node.name == "loop":
            return node if node.attr in LOOP_BEFORE else self._taint(node)  # loop.last looks ahead
        if top and isinstance(node, nodes.Assign) and isinstance(node.target, nodes.Name) \
                and (start := self._messages_slice(node.node)) is not None:
            name, k = start
            if node.target.name in self.given:
                raise NotProven(f"the messages are set to {node.target.name}, a name the render also passes")
            self.offset[node.target.name] = max(self.offset.get(node.target.name, 0), self.offset[name] + k)
            return node
        if isinstance(node, nodes.Macro | nodes.CallBlock) and self._reads_messages(node):
            raise NotProven("a macro or call block reads the messages")
        if isinstance(node, nodes.For):  # a loop over something else (or a second one over the messages, whose
            # iterable is a whole-list read): `loop` inside its body is its own
            node.iter = self.visit(node.iter, in_loop=in_loop, nested=nested)
            node.target = self.visit(node.target, in_loop=in_loop, nested=nested)
            node.body = [self.visit(child, in_loop=in_loop, nested=True) for child in node.body]
            node.test = node.test and self.visit(node.test, in_loop=in_loop, nested=True)
            node.else_ = [self.visit(child, in_loop=in_loop, nested=nested) for child in node.else_]
            return node
        keep_top = top and isinstance(node, nodes.If)  # a set inside a top-level if is still top-level
        for name in node.fields:
            value = getattr(node, name, None)
            if isinstance(value, nodes.Node):
                setattr(node, name, self.visit(value, top=keep_top, in_loop=in_loop, nested=nested))
            elif isinstance(value, list):
                setattr(node, name, [self.visit(v, top=keep_top, in_loop=in_loop, nested=nested)
                                     if isinstance(v, nodes.Node) else v for v in value])
        return node

    def _name(self, node: Any, own_loop: bool) -> Any:
        if node.name == TAINT:
            raise NotProven(f"the template names {TAINT}")
        if node.ctx != "load":
            if node.name in self.offset:
                raise NotProven(f"{node.name} is set to something other than the messages or a slice of them")
            return node
        if node.name in self.offset:  # its length, a filter, another loop over it: read, then rendered
            return self._taint(node)
        if node.name == GENERATION_PROMPT:  # the prefixes before a turn are rendered with it set
            return self._taint(node)
        if own_loop and node.name == "loop":  # passed on whole
            return self._taint(node)
        return node

    def _taint(self, node: Any) -> Any:
        from jinja2 import nodes

        self.tainted += 1
        return nodes.Call(nodes.Name(TAINT, "load"), [node], [], None, None, lineno=node.lineno)

    def _messages_slice(self, value: Any) -> tuple[str, int] | None:
        """(name, k) when value is a messages name or its slice [k:] with a constant k >= 0."""
        from jinja2 import nodes

        if isinstance(value, nodes.Name) and value.name in self.offset:
            return value.name, 0
        if isinstance(value, nodes.Getitem) and isinstance(value.node, nodes.Name) and value.node.name in self.offset \
                and isinstance(value.arg, nodes.Slice) and value.arg.stop is None and value.arg.step is None:
            start = value.arg.start
            if start is None:
                return value.node.name, 0
            if isinstance(start, nodes.Const) and type(start.value) is int and start.value >= 0:
                return value.node.name, start.value
        return None

    def _reads_messages(self, node: Any) -> bool:
        from jinja2 import nodes

        return any(n.name in self.offset or n.name == GENERATION_PROMPT for n in node.find_all(nodes.Name))


def _check_after(node: Any, variables: frozenset[str]) -> None:
    """After the loop: text, the special tokens' variables and add_generation_prompt, nothing else."""
    from jinja2 import nodes

    for n in (node, *node.find_all(nodes.Node)):
        kind = type(n).__name__
        if kind not in AFTER_LOOP:
            raise NotProven(f"after the message loop the template has a {kind} (only text and "
                            f"{{% if {GENERATION_PROMPT} %}} are read off)")
        if isinstance(n, nodes.Name) and n.name != GENERATION_PROMPT and n.name not in variables:
            raise NotProven(f"after the message loop the template reads {n.name}")


def _after_loop(env: Any, tree: Any, loop: Any, variables: Mapping[str, Any]) -> tuple[str, str]:
    """What the template renders after its loop, without and with the generation prompt."""
    from jinja2 import nodes

    rest = nodes.Template(tree.body[tree.body.index(loop) + 1:], lineno=1)
    tmpl = env.template_class.from_code(env, env.compile(rest), env.make_globals(None))
    return (tmpl.render(**variables, **{GENERATION_PROMPT: False}),
            tmpl.render(**variables, **{GENERATION_PROMPT: True}))


def _instrument(loop: Any) -> None:
    """Output ITERATION as the first thing in each iteration of the message loop."""
    from jinja2 import nodes

    loop.body.insert(0, nodes.Output([nodes.TemplateData(ITERATION)], lineno=loop.lineno))
