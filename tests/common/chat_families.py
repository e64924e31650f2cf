"""Small chat templates that behave like the major model families' templates, for the loss-mask tests.

Written here, not copied: each reproduces the one behaviour of its family that a loss mask or a prompt
must survive (named in its entry), with that family's special tokens. `tokenizer(family, base)` gives the
tiny test tokenizer with those tokens added as special tokens and the family's BOS/EOS, so end-of-turn
tokens are single tokens as they are in the real vocabularies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common import chat


@dataclass(frozen=True)
class Family:
    template: str
    bos: str | None
    eos: str
    specials: tuple[str, ...]
    method: str  # how common.chat finds the assistant turns in a multi-turn row
    doc: str


# Llama 3: a system header always rendered, with a knowledge-cutoff line and today's date (strftime_now);
# header tokens around each role; <|eot_id|> ends each turn; contents trimmed; tools as JSON in the system
# turn and calls as {"name", "parameters"} objects; tool results under the ipython role.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: ' + strftime_now('%d %b %Y') + '\n\n' }}"
    "{%- if tools %}{{- 'You may call these functions:\n\n' }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\n\n' }}{%- endfor %}{%- endif %}"
    "{{- system + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- for c in message.tool_calls %}"
    "{{- '{\"name\": \"' + c.function.name + '\", \"parameters\": ' }}{{- c.function.arguments | tojson }}{{- '}' }}"
    "{%- endfor %}{{- '<|eot_id|>' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)

# Gemma: no system role (the system prompt is folded into the first user turn), the assistant is `model`,
# roles must alternate (raise_exception otherwise), <end_of_turn> ends each turn.
GEMMA = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set first = messages[0]['content'] + '\n\n' %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set first = '' %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{- '<start_of_turn>' + role + '\n' + (first if loop.first else '') + message['content'] | trim }}"
    "{{- '<end_of_turn>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\n' }}{%- endif %}"
)

# Mistral: [INST] ... [/INST] around user turns, the answer after a space and EOS (</s>) right after it,
# no generation prompt, and the system prompt moved into the last user turn (as the v3 templates do), so
# a prefix of the conversation puts the system prompt elsewhere than the whole conversation does.
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system = none %}{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in loop_messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{{- bos_token }}"
    "{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.index0 == ns.last_user and system %}"
    "{{- '[INST] ' + system + '\n\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] | trim + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported') }}{%- endif %}"
    "{%- endfor %}"
)

# Phi-3: <|user|>/<|assistant|> headers, <|end|> ends each turn (not the EOS <|endoftext|>), and EOS once
# at the end of a conversation rendered without a generation prompt: messages[:i+1] is not a prefix.
PHI3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '<|end|>\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# Qwen3: ChatML turns; reasoning (`reasoning_content`, or a <think> block in the content) is rendered only
# for assistant turns after the last user message and dropped from earlier ones; tools in the system turn;
# calls in <tool_call> tags; tool results as user turns in <tool_response> tags.
QWEN3 = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n<tools>' }}{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\n</tools><|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '<|im_start|>user\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query and reasoning %}"
    "{{- '<|im_start|>assistant\n<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\n' + content }}{%- endif %}"
    "{%- for tc in message.tool_calls or [] %}"
    "{{- '\n<tool_call>\n{\"name\": \"' + tc.function.name + '\", \"arguments\": ' }}"
    "{{- tc.function.arguments | tojson }}{{- '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message.content + '\n</tool_response><|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Generation tags: ChatML whose assistant text (content and <|im_end|>) sits in {% generation %} blocks,
# the way templates that support transformers' return_assistant_tokens_mask mark it.
TAGGED = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# An indented community template with plain {% %} tags (no whitespace control): output lines keep their
# indentation, and the generation prompt sits at another indentation than the turns, so the prompt of a
# conversation is not a prefix of its rendering.
INDENTED = """{% for message in messages %}
    {% if message['role'] == 'system' %}
        {{ '<|system|>\n' + message['content'] + '<|end|>\n' }}
    {% elif message['role'] == 'user' %}
        {{ '<|user|>\n' + message['content'] + '<|end|>\n' }}
    {% elif message['role'] == 'assistant' %}
        {{ '<|assistant|>\n' + message['content'] + '<|end|>\n' }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{ '<|assistant|>\n' }}
{% endif %}
"""

PHI_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")
FAMILIES = {
    "llama3": Family(LLAMA3, "<|begin_of_text|>", "<|eot_id|>",
                     ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), "prefix",
                     "headers, a date line, <|eot_id|>"),
    "gemma": Family(GEMMA, "<bos>", "<eos>", ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"), "prefix",
                    "system folded into the first user turn, the model role"),
    "mistral": Family(MISTRAL, "<s>", "</s>", ("[INST]", "[/INST]", "</s>"), "located",
                      "[INST], EOS after the answer, system prompt in the last user turn"),
    "phi3": Family(PHI3, "<s>", "<|endoftext|>", PHI_TOKENS, "located", "<|end|> ends a turn, EOS at the end"),
    "chatml": Family(chat.CHATML, "<s>", "<|im_end|>", ("<|im_start|>", "<|im_end|>"), "prefix", "ChatML"),
    "qwen3": Family(QWEN3, None, "<|im_end|>", ("<|im_start|>", "<|im_end|>"), "located",
                    "earlier turns' reasoning stripped"),
    "tagged": Family(TAGGED, None, "<|im_end|>", ("<|im_start|>", "<|im_end|>"), "tags", "generation tags"),
    "indented": Family(INDENTED, None, "<|endoftext|>", PHI_TOKENS, "located", "indented, no whitespace control"),
}


def tokenizer(family: Family, base: Any) -> Any:
    """A copy of the tiny tokenizer with the family's special tokens, BOS and EOS."""
    import copy

    tok = copy.deepcopy(base)
    tok.add_tokens(list(family.specials), special_tokens=True)
    tok.add_special_tokens({"eos_token": family.eos, **({"bos_token": family.bos} if family.bos else {})})
    if family.bos is None:
        tok.bos_token = None
    tok.chat_template = family.template
    return tok
