"""``python -m fastchat_bigdl.web``: FastChat's gradio chat page against a controller,
on loopback, offline, with the two adaptations of this package (``gradio_compat``,
``templates``).

The page itself is FastChat's (``build_demo``, its handlers, its conversation logs in
$LOGDIR); this module only parses the few options ``serve --web`` passes and launches it
the way FastChat's own ``__main__`` does, with sharing and gradio's analytics off.
"""
from __future__ import annotations

import argparse
import os
from typing import List, Optional

# gradio reads these at import: no usage analytics, no version check against the internet.
OFFLINE_ENV = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--controller-url", default="http://127.0.0.1:21001")
    parser.add_argument("--concurrency-count", type=int, default=10,
                        help="Chats answered at once (FastChat's option; the worker queues the rest)")
    return parser.parse_args(argv)


def build_page(controller_url: str):
    """FastChat's page (gradio Blocks) for the models the controller lists now; the list
    is re-read on every page load (FastChat's ``--model-list-mode reload``)."""
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    import gradio
    from fastchat.serve import gradio_web_server as page

    from fastchat_bigdl.common.logs import log_dir
    from fastchat_bigdl.web.gradio_compat import for_fastchat_page
    from fastchat_bigdl.web.templates import use_worker_templates

    # fastchat_bigdl imports FastChat with LOGDIR empty (common.logs): the page's
    # conversation log goes where this process logs, not to the working directory.
    page.LOGDIR = str(log_dir())
    page.gr = for_fastchat_page(gradio)
    use_worker_templates(controller_url)
    # FastChat's page reads its options from its module's `args` (set by its __main__).
    page.args = argparse.Namespace(model_list_mode="reload", register_api_endpoint_file=None,
                                   show_terms_of_use=False)
    page.set_global_vars(controller_url, False)  # no moderation
    models, _ = page.get_model_list(controller_url, None, False)
    return page.build_demo(models)


def main(argv: Optional[List[str]] = None) -> None:
    from fastchat_bigdl.common.logs import log_to_file, plain_console

    with plain_console():
        args = parse_args(argv)
    demo = build_page(args.controller_url)
    log_to_file("gradio_web_server.log")
    demo.queue(default_concurrency_limit=args.concurrency_count, status_update_rate=10, api_open=False).launch(
        server_name=args.host, server_port=args.port, share=False, max_threads=200)
