"""common.jinja_render.Renderer renders what Template.render renders, and fails the same way."""

from __future__ import annotations

import pytest

from common.jinja_render import Renderer
from tests.common.chat_families import FAMILIES

pytestmark = pytest.mark.unit

CONVERSATIONS = [
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": "Bye."}],
]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_renders_as_template_render_every_family(family: str) -> None:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = _compile_jinja_template(FAMILIES[family].template)
    fast = Renderer(template)
    # Twice over, alternating: a template that sets a top-level variable (llama3 drops the system message
    # with `set messages = messages[1:]`) must not carry it into the next render.
    for _ in range(2):
        for msgs in CONVERSATIONS:
            for prompt in (False, True):
                kwargs = {"messages": msgs, "tools": None, "documents": None, "add_generation_prompt": prompt,
                          "bos_token": "<s>", "eos_token": "</s>"}
                assert fast.render(**kwargs) == template.render(**kwargs)


def test_a_template_error_is_raised_as_template_render_raises_it() -> None:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    template = _compile_jinja_template("{% if messages[0]['role'] != 'user' %}"
                                       "{{ raise_exception('the first message must be a user message') }}{% endif %}"
                                       "{{ messages[0]['content'] }}")
    fast = Renderer(template)
    assert fast.render(messages=[{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(Exception) as slow_exc:
        template.render(messages=[{"role": "assistant", "content": "x"}])
    with pytest.raises(type(slow_exc.value), match="the first message must be a user message"):
        fast.render(messages=[{"role": "assistant", "content": "x"}])
