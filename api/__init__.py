"""The slimline HTTP API (FastAPI). Imports jobs/ only: never torch, core or worker."""
