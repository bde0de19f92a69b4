"""Everything that runs inside the ``--bigdl_load`` worker process: FastChat's
``ModelWorker`` extended to serve a low-bit model (``bigdl_worker``), its command line
(``arguments``, ``main``), the token loop of one request (``generation``) with its
token choice (``sampler``) and its text (``output_stream``), KV prefix reuse
(``prefix_cache``), grammar-constrained decoding (``grammar_constraint``), bounded
queueing (``admission``), request checks and extra routes.

May import: ``engine`` (the thread that runs every loop, the lean forward), ``lowbit``,
``common``, the package's adapter. Never imports ``api``, ``stack`` or ``bench``.
"""
