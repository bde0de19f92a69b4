"""``python -m fastchat_bigdl.web``: FastChat's gradio chat page for this package's stack
(``fastchat-bigdl serve --web`` starts it)."""
from fastchat_bigdl.web.server import main

if __name__ == "__main__":
    main()
