"""``python -m fastchat_bigdl.model_worker``: FastChat's model worker plus ``--bigdl_load``
(see ``fastchat_bigdl.worker``)."""
from fastchat_bigdl.worker.bigdl_worker import BigDLModelWorker
from fastchat_bigdl.worker.main import main

__all__ = ["BigDLModelWorker", "main"]

if __name__ == "__main__":
    main()
