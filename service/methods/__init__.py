"""One torch-free module per method: its spec model(s), registered with
`service.registry.register_step`, and the curves its events fold into. The worker's handler of the
methods in `service/methods/<name>.py` is `worker/step_<name>.py`.

Importing this package registers every method: the built-ins in their historical order (the
order of the `Step` union, hence of the JSON schema's `oneOf`), then every other module of the
package in name order — a new method is found without being listed anywhere.
"""
from __future__ import annotations

import importlib
import pkgutil

BUILTIN_ORDER = ("train", "evaluate", "pcn", "prune", "lowrank", "dctps", "analyze")


def method_modules() -> list[str]:
    """Names of the method modules, in registration order."""
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return [n for n in BUILTIN_ORDER if n in found] + [n for n in found if n not in BUILTIN_ORDER]


for _name in method_modules():
    importlib.import_module(f"{__name__}.{_name}")
