"""A stand-in for `python -m worker.inspect` (no torch): same command line and reply protocol.

Models: inputs containing b"INVALID" are refused with a 422, b"CRASH" exits 1 with a traceback,
b"SLOW" sleeps FAKE_INSPECT_SLOW_S seconds (default 3) first, b"HOG" allocates 1 GiB (a
MemoryError under a smaller address-space cap), b"SPIN" burns CPU until a limit stops it; others
are copied to --output.
Datasets: validated by the real inspector code (numpy only, no torch)."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", default="model")
    for flag in ("--input", "--format"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--arch", default="")
    parser.add_argument("--output", default="")
    args, _ = parser.parse_known_args()
    if args.kind == "dataset":
        from worker.inspect import main as real_main

        return real_main(sys.argv[1:])
    with open(args.input, "rb") as f:
        data = f.read()
    if b"SLOW" in data:
        time.sleep(float(os.environ.get("FAKE_INSPECT_SLOW_S", "3")))
    if b"HOG" in data:
        hog = bytearray(1024 * 1024 * 1024)
        hog[::4096] = b"x" * len(hog[::4096])
    if b"SPIN" in data:
        while True:
            sum(range(100_000))
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
