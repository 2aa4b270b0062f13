"""The `slimline` program: the command line (cli/app.py), its HTTP client helpers
(cli/client.py), process helpers (cli/processes.py) and the end-to-end demo (cli/demo.py).

A program, not a library: it may import every package (api/, worker/, service/, core/); nothing
imports it back (tests/test_layering.py enforces that).
"""
