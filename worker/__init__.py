"""The slimline worker: the Celery app, a thin task, the plain-Python job runner and its step
handlers, and the checkpoint inspector the API runs in a subprocess."""
