"""A stand-in for `python -m worker.export_file` (no torch): same command line and reply.

FAKE_EXPORT_LOG: a file each run appends one line to (how many exports ran).
FAKE_EXPORT_SLOW_S: sleep that long first. FAKE_EXPORT_FAIL=1: write half a file, then refuse
with the exporter's message naming the layer; FAKE_EXPORT_CRASH=1: exit 1 without a reply.
Otherwise --output gets b"FAKE-" + the format + the input's bytes."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    for flag in ("--input", "--format", "--output"):
        parser.add_argument(flag, required=True)
    args, _ = parser.parse_known_args()
    log = os.environ.get("FAKE_EXPORT_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{args.format}\n")
    time.sleep(float(os.environ.get("FAKE_EXPORT_SLOW_S", "0")))
    output = Path(args.output)
    if os.environ.get("FAKE_EXPORT_CRASH"):
        print("Traceback (most recent call last): boom", file=sys.stderr)
        return 1
    if os.environ.get("FAKE_EXPORT_FAIL"):
        output.write_bytes(b"half a file")
        print(json.dumps({"ok": False, "status": 422, "error": "ExportError",
                          "detail": "layer 'fc1' (op aten::weird_op) cannot be exported to "
                                    "ONNX: no symbolic for it; replace the layer"}))
        return 0
    output.write_bytes(b"FAKE-" + args.format.encode() + Path(args.input).read_bytes())
    print("exporter progress line")
    print(json.dumps({"ok": True, "format": args.format, "bytes": output.stat().st_size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
