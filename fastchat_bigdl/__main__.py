import sys

from fastchat_bigdl.cli import main

sys.exit(main())
