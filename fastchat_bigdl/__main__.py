"""``python -m fastchat_bigdl``: the ``fastchat-bigdl`` command."""
import sys

from fastchat_bigdl.cli import main

sys.exit(main())
