"""``python -m fastchat_bigdl.openai_api_server``: FastChat's OpenAI API server with this
package's validation, error handling and tool calling (see ``fastchat_bigdl.api``)."""
from fastchat_bigdl.api.server import build_app, main

__all__ = ["build_app", "main"]

if __name__ == "__main__":
    main()
