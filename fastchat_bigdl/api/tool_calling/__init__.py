"""OpenAI tool calling (``tools`` / ``tool_choice`` and legacy ``functions``) on top of
FastChat's API server, with calls constrained to the tools' JSON schemas.

- ``spec``: read and check the request's tools, tool choice and tool messages;
- ``grammar``: the grammar a tool call must follow (Hermes ``<tool_call>`` format);
- ``prompt``: render tools and tool messages into the model's prompt;
- ``parse``: find the calls in generated text, whole or streamed;
- ``route``: the chat completions handler for requests that use tools.

The worker side (``fastchat_bigdl.worker.grammar_constraint``) enforces the grammar while decoding.
"""
