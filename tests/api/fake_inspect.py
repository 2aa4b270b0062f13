"""A stand-in for `python -m worker.inspect` (no torch): same command line and reply protocol.
Inputs containing b"INVALID" are refused with a 422; others are copied to --output."""
from __future__ import annotations

import argparse
import json
import shutil
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    for flag in ("--input", "--format", "--arch", "--output"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    with open(args.input, "rb") as f:
        data = f.read()
    if b"INVALID" in data:
        print(json.dumps({"ok": False, "status": 422, "error": "InvalidCheckpoint",
                          "detail": "fc1.weight has shape (10, 784) but lenet300 expects "
                                    "(300, 784)"}))
        return 0
    if b"CRASH" in data:
        print("Traceback (most recent call last): boom", file=sys.stderr)
        return 1
    shutil.copyfile(args.input, args.output)
    arch = json.loads(args.arch) if args.arch else {"name": "lenet300"}
    arch.setdefault("num_classes", 10)
    print("some log line")
    print(json.dumps({"ok": True, "arch": arch,
                      "params": {"total": 266610, "trainable": 266610, "nonzero": 266600}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
