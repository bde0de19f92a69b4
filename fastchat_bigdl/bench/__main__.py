"""``python -m fastchat_bigdl.bench``: the same as ``fastchat-bigdl bench``."""
import sys

from fastchat_bigdl.bench.main import main

sys.exit(main())
