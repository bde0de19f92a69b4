"""FastChat's own gradio chat page (``fastchat.serve.gradio_web_server``) against this
package's stack, on the gradio that installs next to pydantic 2.

FastChat 0.2.36's page was written for gradio 3/4; ``gradio_compat`` adapts the one
component it builds differently in gradio 6 (the chatbot), scoped to FastChat's page
module. ``templates`` gives the page each served model's prompt template from its worker,
as FastChat's API server does, instead of a guess from the model's name. ``server`` is the
launcher ``serve --web`` starts (``python -m fastchat_bigdl.web``).
"""
