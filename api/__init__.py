"""The slimline HTTP API (FastAPI). Imports service/ only: never torch, core or worker."""
