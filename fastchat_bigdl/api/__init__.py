"""Everything that runs inside the OpenAI API server process: FastChat's API server with
request checks (``request_checks``), clear errors for failures behind it
(``server_errors``) and OpenAI tool calling / JSON replies (``tool_calling``), assembled
in ``server``.

May import: ``common``. Never imports ``worker``, ``lowbit``, ``stack`` or ``bench``
(the API server loads no model).
"""

# API keys reach the API server by environment, so they stay out of argv and logs.
API_KEYS_ENV = "FASTCHAT_BIGDL_API_KEYS"
# A chat request without max_tokens gets this many at most (0: FastChat's behaviour, the
# rest of the context: minutes of local decode for a small model that rarely stops).
DEFAULT_MAX_TOKENS_ENV = "FASTCHAT_BIGDL_DEFAULT_MAX_TOKENS"
DEFAULT_MAX_TOKENS = 512
