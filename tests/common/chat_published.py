"""Chat templates written here after the documented formats of published model families' templates (not copied
from them), with the constructs those templates use that a loss mask must survive: system prompts moved or folded
or defaulted, `raise_exception` on roles, `loop.last` / `add_generation_prompt` checks, trim/strip filters,
`namespace()` state, macros, second loops over the messages, special unicode tokens, generation tags.

Each entry gives the template, its tokens, `answer(message)`: the text a trained turn's labels must decode to
(the message as the template receives it, from common.chat.for_template), and `call(tool_call)`: the same for a
turn of one tool call without content; both written from the format, not from the code under test (Qwen3's
answers depend on the conversation: `qwen3_answer`).
"""
# ruff: noqa: E501 - the templates keep the line shapes of the formats they follow

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Published:
    template: str
    bos: str | None
    eos: str
    specials: tuple[str, ...]
    answer: Callable[[dict[str, Any]], str]  # the trained text of an assistant turn without tool calls
    call: Callable[[dict[str, Any]], str] | None = None  # the trained text of a turn of one call (no content)
    system: bool = True  # accepts a system message
    tools: bool = False  # renders tools and tool calls


def _trim(m: dict[str, Any]) -> str:
    return str(m["content"]).strip()


# Llama 2: [INST] around user turns, the system prompt in <<SYS>> inside the first one, BOS before every user
# turn and EOS after every answer, roles checked to alternate, contents stripped.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Llama 3.1: a system header always (knowledge date, today's date, an ipython environment line with tools),
# tools as JSON in the first user turn (taken out of the loop: `messages | length` checks), one tool call
# per turn as {"name", "parameters"}, tool results under the ipython role (tojson'd: a string is iterable).
LLAMA31 = """{{- bos_token }}
{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\\n\\n" }}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Mistral v0.1: [INST] ... [/INST] and the answer right after it with EOS; no system role (refused).
MISTRAL01 = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# Mistral v0.3: the system prompt joins the last message when it is a user one (loop.last), tools in
# [AVAILABLE_TOOLS] before the last user turn (a list of user messages read before the loop), alternation
# checked in a first loop with namespace state, calls in [TOOL_CALLS] with 9-character ids, results in
# [TOOL_RESULTS], the answer after a space, trimmed, EOS after it.
MISTRAL03 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}{{- '"' + key + '": "' + val + '"' }}
                    {%- else %}{{- '"' + key + '": ' + val|tojson }}{%- endif %}
                    {%- if not loop.last %}{{- ", " }}{%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" }}{%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" + eos_token }}{%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool" %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# Mistral Nemo: as v0.3 without the spaces ([INST]x[/INST]answer</s>), the answer not trimmed.
MISTRAL_NEMO = (MISTRAL03.replace('"[INST] "', '"[INST]"').replace('"[AVAILABLE_TOOLS] ["', '"[AVAILABLE_TOOLS]["')
                .replace('"[TOOL_CALLS] ["', '"[TOOL_CALLS]["')
                .replace('{{- " " + message["content"]|trim + eos_token}}', '{{- message["content"] + eos_token}}'))

# Mistral Small 3: a default system prompt naming today's date, [SYSTEM_PROMPT] blocks, [INST]x[/INST]answer</s>.
MISTRAL_SMALL = """{%- set today = strftime_now("%Y-%m-%d") %}
{%- set default_system_message = "You are Mistral Small 3, a Large Language Model (LLM).\\nToday is " + today + "." %}
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = default_system_message %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- '[INST]' + message['content'] + '[/INST]' }}
    {%- elif message['role'] == 'system' %}
        {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- message['content'] + eos_token }}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}"""

# Gemma 2: a system message is refused, roles alternate, the assistant is `model`, contents trimmed.
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Gemma 3: the system prompt folded into the first user turn, content as a string or a list of parts.
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

# Phi-3.5 / Phi-4-mini style: <|system|>...<|end|><|user|>...<|end|><|assistant|>...<|end|>, no newlines, tools
# in <|tool|> tags inside the system turn.
PHI4_MINI = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# Phi-4: ChatML with <|im_sep|> after the role, no newlines.
PHI4 = (
    "{% for message in messages %}{% if (message['role'] == 'system') %}"
    "{{'<|im_start|>system<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'user') %}{{'<|im_start|>user<|im_sep|>' + message['content'] + '<|im_end|>'}}"
    "{% elif (message['role'] == 'assistant') %}{{'<|im_start|>assistant<|im_sep|>' + message['content'] + "
    "'<|im_end|>'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}"
    "{% endif %}"
)

# Qwen2.5: a default system prompt, tools in <tools> in the system turn, calls as JSON in <tool_call> after the
# content, consecutive tool results in one user turn (loop.last and the neighbours read).
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" }}
    {{- "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen3: the last user query found walking the messages backwards (messages[::-1], namespace state), reasoning
# rendered only after it (from reasoning_content or a <think> block in the content), `enable_thinking`.
QWEN3 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# DeepSeek-R1: the system prompt gathered by a first loop and put first, full-width unicode special tokens,
# reasoning dropped from every answer (the text after </think>), tool calls when the content is none, tool
# outputs grouped with namespace state read after the loop, "<think>\n" in the generation prompt.
DEEPSEEK_R1 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{ '<｜User｜>' + message['content'] }}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}"
    "{{ '<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] | tojson + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>' }}{%- set ns.is_first = true -%}"
    "{%- else %}{{ '\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + "
    "'\\n' + '```json' + '\\n' + tool['function']['arguments'] | tojson + '\\n' + '```' + '<｜tool▁call▁end｜>' }}"
    "{%- endif %}{%- endfor %}{{ '<｜tool▁calls▁end｜><｜end▁of▁sentence｜>' }}"
    "{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{ '<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{ '<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}"
    "{%- set ns.is_output_first = false %}{%- else %}"
    "{{ '\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' }}{%- endif %}{%- endif %}"
    "{%- endfor -%}"
    "{% if ns.is_tool %}{{ '<｜tool▁outputs▁end｜>' }}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"
)
DEEPSEEK_TOKENS = ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
                   "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
                   "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
                   "<｜tool▁output▁end｜>")

# Zephyr: EOS ends every turn, the generation prompt added inside the loop at loop.last.
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)

# Vicuna: plain text, a default system line, "USER: ... ASSISTANT: answer</s>", the prompt ends "ASSISTANT:".
VICUNA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}{% set loop_messages = messages[1:] %}"
    "{% else %}{{ 'A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user\\'s questions. ' }}{% set loop_messages = messages %}"
    "{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{{ 'USER: ' + message['content'] + ' ' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'ASSISTANT: ' + message['content'] + eos_token + ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Alpaca: plain-text headers, EOS after each response, a macro rendering each message.
ALPACA = (
    "{% macro block(role, text) %}{% if role == 'system' %}{{ text + '\\n\\n' }}{% elif role == 'user' %}"
    "{{ '### Instruction:\\n' + text + '\\n\\n' }}{% elif role == 'assistant' %}"
    "{{ '### Response:\\n' + text + eos_token + '\\n\\n' }}{% else %}"
    "{{ raise_exception('Unknown role: ' + role) }}{% endif %}{% endmacro %}"
    "{{ bos_token }}{% for message in messages %}{{ block(message['role'], message['content']) }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

# SmolLM3 / OLMo-like ChatML with generation tags: a default system prompt with a reasoning-mode line, the
# assistant's reasoning and answer (trimmed) inside {% generation %}, a namespace counting turns.
TAGGED_CHATML = (
    "{%- set ns = namespace(turn=0) -%}"
    "{%- if messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set system = 'You are a helpful AI assistant.' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{{ '<|im_start|>system\\n## Metadata\\nReasoning Mode: /think\\n\\n' + system + '<|im_end|>\\n' }}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set ns.turn = ns.turn + 1 -%}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}"
    "{%- if message.reasoning_content -%}{{ '<think>\\n' + message.reasoning_content | trim + '\\n</think>\\n' }}"
    "{%- endif -%}{{ message['content'] | trim + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- elif message['role'] in ['user', 'tool'] -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- else -%}{{ raise_exception('Unexpected role ' + message['role']) }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# ChatML that renders a participant's name and keeps per-turn state in a namespace, messages rendered by a macro.
NAMED_CHATML = (
    "{%- macro turn(m) -%}{{ '<|im_start|>' + m['role'] }}{% if m.name %}{{ ' name=' + m.name }}{% endif %}"
    "{{ '\\n' + m['content'] | trim + '<|im_end|>\\n' }}{%- endmacro -%}"
    "{%- for message in messages -%}{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('Unsupported role: ' + message['role']) }}{%- endif -%}{{ turn(message) }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                 "<|python_tag|>")
MISTRAL_TOKENS = ("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
                  "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")
GEMMA_TOKENS = ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
PHI_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>", "<|tool|>", "<|/tool|>")


def _args(c: dict[str, Any]) -> str:
    return json.dumps(c["function"]["arguments"], ensure_ascii=False)


def _tool_call(c: dict[str, Any]) -> str:  # Hermes style (Qwen)
    return f'<tool_call>\n{{"name": "{c["function"]["name"]}", "arguments": {_args(c)}}}\n</tool_call><|im_end|>'


def _mistral_call(c: dict[str, Any], space: str = " ") -> str:
    return (f'[TOOL_CALLS]{space}[{{"name": "{c["function"]["name"]}", "arguments": {_args(c)}, '
            f'"id": "{c["id"]}"}}]</s>')


def qwen3_answer(msgs: list[dict[str, Any]], i: int) -> str:
    """Qwen3: a think block (empty when none is given) only after the last user message, for the last turn or
    a turn with reasoning; earlier turns' reasoning dropped."""
    last_query = max(j for j, m in enumerate(msgs) if m["role"] == "user")
    m = msgs[i]
    content, reasoning = str(m["content"]), m.get("reasoning_content") or ""
    if not reasoning and "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
    if i > last_query and (i == len(msgs) - 1 or reasoning):
        return f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}<|im_end|>"
    return content + "<|im_end|>"


PUBLISHED: dict[str, Published] = {
    "llama2": Published(LLAMA2, "<s>", "</s>", (), lambda m: f" {_trim(m)} </s>"),
    "llama3.1": Published(LLAMA31, "<|begin_of_text|>", "<|eot_id|>", LLAMA3_TOKENS,
                          lambda m: _trim(m) + "<|eot_id|>", tools=True,
                          call=lambda c: f'{{"name": "{c["function"]["name"]}", "parameters": {_args(c)}}}<|eot_id|>'),
    "mistral0.1": Published(MISTRAL01, "<s>", "</s>", (), lambda m: m["content"] + "</s>", system=False),
    "mistral0.3": Published(MISTRAL03, "<s>", "</s>", MISTRAL_TOKENS, lambda m: f" {_trim(m)}</s>", tools=True,
                            call=_mistral_call),
    "mistral-nemo": Published(MISTRAL_NEMO, "<s>", "</s>", MISTRAL_TOKENS, lambda m: m["content"] + "</s>",
                              tools=True, call=lambda c: _mistral_call(c, "")),
    "mistral-small": Published(MISTRAL_SMALL, "<s>", "</s>", MISTRAL_TOKENS, lambda m: m["content"] + "</s>"),
    "gemma2": Published(GEMMA2, "<bos>", "<eos>", GEMMA_TOKENS, lambda m: _trim(m) + "<end_of_turn>", system=False),
    "gemma3": Published(GEMMA3, "<bos>", "<eos>", GEMMA_TOKENS, lambda m: _trim(m) + "<end_of_turn>"),
    "phi4-mini": Published(PHI4_MINI, None, "<|endoftext|>", PHI_TOKENS, lambda m: m["content"] + "<|end|>"),
    "phi4": Published(PHI4, None, "<|im_end|>", (*CHATML_TOKENS, "<|im_sep|>"), lambda m: m["content"] + "<|im_end|>"),
    "qwen2.5": Published(QWEN25, None, "<|im_end|>", CHATML_TOKENS, lambda m: m["content"] + "<|im_end|>",
                         tools=True, call=_tool_call),
    # qwen3's answers depend on the conversation: qwen3_answer
    "qwen3": Published(QWEN3, None, "<|im_end|>", CHATML_TOKENS, lambda m: "", tools=True, call=_tool_call),
    "deepseek-r1": Published(DEEPSEEK_R1, "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", DEEPSEEK_TOKENS,
                             lambda m: str(m["content"]).split("</think>")[-1] + "<｜end▁of▁sentence｜>"),
    "zephyr": Published(ZEPHYR, "<s>", "</s>", ("<|system|>", "<|user|>", "<|assistant|>"),
                        lambda m: m["content"] + "</s>"),
    "vicuna": Published(VICUNA, "<s>", "</s>", (), lambda m: f" {m['content']}</s>"),
    "alpaca": Published(ALPACA, "<s>", "</s>", (), lambda m: m["content"] + "</s>"),
    "tagged-chatml": Published(TAGGED_CHATML, None, "<|im_end|>", CHATML_TOKENS, lambda m: (
        f"<think>\n{m['reasoning_content'].strip()}\n</think>\n" if m.get("reasoning_content") else "")
        + _trim(m) + "<|im_end|>"),
    "named-chatml": Published(NAMED_CHATML, None, "<|im_end|>", CHATML_TOKENS, lambda m: _trim(m) + "<|im_end|>"),
}


def tokenizer(family: Published, base: Any) -> Any:
    """A copy of the tiny tokenizer with the family's special tokens, BOS and EOS, and its template."""
    import copy

    tok = copy.deepcopy(base)
    tok.add_tokens([t for t in (*family.specials, family.bos, family.eos) if t], special_tokens=True)
    tok.add_special_tokens({"eos_token": family.eos, **({"bos_token": family.bos} if family.bos else {})})
    if family.bos is None:
        tok.bos_token = None
    tok.chat_template = family.template
    return tok

