"""An inspector (`python -m tests.api.ansi_inspect`) whose every refusal carries terminal
escapes, as torch's messages do: the API must pass them on as plain text."""
from __future__ import annotations

import json
import sys

if __name__ == "__main__":
    print(json.dumps({"ok": False, "status": 422, "error": "InvalidCheckpoint",
                      "detail": "Weights only load failed, \x1b[1mdo those steps only if you "
                                "trust the source\x1b[0m.\x1b]8;;https://x\x07 \x1b[31mred\x1b[m"}))
    sys.exit(0)
