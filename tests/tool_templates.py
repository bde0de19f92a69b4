"""Chat templates written like the real ones of three tool-trained families, reduced to
what matters for tools: where tools go, how calls and results are written back, and
what each refuses (Mistral's nine-character ids, alternating roles)."""

QWEN_STYLE = (
    "{%- if tools %}<|im_start|>system\n{{ messages[0]['content'] }}\n<tools>\n"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools><|im_end|>\n{%- endif %}"
    "{%- for m in messages[1:] %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant"
    "{%- for c in m.tool_calls %}\n<tool_call>\n{{ c.function | tojson }}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

# Llama 3.1/3.2: tools and Meta's instruction in the system turn; a call is the whole
# assistant turn as {"name": ..., "parameters": ...}; results come back as ipython.
LLAMA3_STYLE = (
    "{{- bos_token + '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if tools %}"
    "{{- 'You have access to the following functions. To call a function, please respond with JSON for a "
    "function call. Respond in the format {\"name\": function name, \"parameters\": dictionary of argument "
    "name and its value}. Do not use variables.\\n\\n' }}"
    "{%- for t in tools %}{{- t | tojson }}{{- '\\n\\n' }}{%- endfor %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- endif %}<|eot_id|>"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}"
    "{%- elif m.tool_calls %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{{- '{\"name\": \"' + m.tool_calls[0].function.name + '\", \"parameters\": ' }}"
    "{{- m.tool_calls[0].function.arguments | tojson }}}<|eot_id|>"
    "{%- elif m.role == 'tool' %}{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}"
    "{{- {'output': m.content} | tojson }}<|eot_id|>"
    "{%- else %}{{- '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Mistral 7B v0.3: tools before the last user turn, calls after the special token
# [TOOL_CALLS] as a JSON list, ids of exactly nine alphanumerics, alternating roles.
MISTRAL_STYLE = (
    "{%- set ns = namespace(system='') %}"
    "{%- set loop_messages = messages %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set ns.system = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- endif %}"
    "{%- for m in loop_messages | rejectattr('role', 'equalto', 'tool') | selectattr('tool_calls', 'undefined') %}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{%- endif %}{%- endfor %}"
    "{%- set users = loop_messages | selectattr('role', 'equalto', 'user') | list %}"
    "{{- bos_token }}"
    "{%- for m in loop_messages %}"
    "{%- if m['role'] == 'user' %}"
    "{%- if tools and m == users[-1] %}[AVAILABLE_TOOLS] {{- tools | tojson }}[/AVAILABLE_TOOLS]{%- endif %}"
    "{%- if m == users[-1] and ns.system %}[INST] {{ ns.system }}\n\n{{ m['content'] }}[/INST]"
    "{%- else %}[INST] {{ m['content'] }}[/INST]{%- endif %}"
    "{%- elif m.tool_calls is defined %}[TOOL_CALLS] ["
    "{%- for c in m.tool_calls %}"
    "{%- if c.id is not defined or c.id | length != 9 %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
    "{{- {'name': c.function.name, 'arguments': c.function.arguments, 'id': c.id} | tojson }}"
    "{%- if not loop.last %}, {% endif %}{%- endfor %}]{{ eos_token }}"
    "{%- elif m['role'] == 'tool' %}"
    "{%- if m.tool_call_id is not defined or m.tool_call_id | length != 9 %}"
    "{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
    "[TOOL_RESULTS] {{- {'content': m.content, 'call_id': m.tool_call_id} | tojson }}[/TOOL_RESULTS]"
    "{%- elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}"
    "{%- endif %}{%- endfor %}"
)

LLAMA3_SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>")
MISTRAL_SPECIALS = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_RESULTS]", "[/TOOL_RESULTS]")
