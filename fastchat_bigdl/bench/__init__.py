"""``fastchat-bigdl bench``: this package against stock FastChat (and llama.cpp) on the same
model, through the same HTTP API, one stack after the other.

``settings`` (what is measured) -> ``measure`` (timing one stack) -> ``report`` (ratios,
table, plot) -> ``main`` (the command); ``llama_cpp_peer`` measures llama.cpp (run by ``llama_cpp_server``),
``random_model`` builds random-weight checkpoints. May import every other role.
"""
