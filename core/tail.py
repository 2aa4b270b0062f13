"""Run a model once, then re-run only the part that depends on one layer's output.

Scoring a perturbation of one layer (low-rank output perturbation, seed 003) needs the network's
output for many variants of that layer's output, with everything upstream unchanged. A full
forward per variant recomputes the head of the network every time; `TailRunner` traces the model
with `torch.fx`, runs it once on a batch (`prime`), caches the values the downstream part reads
from upstream (e.g. a ResNet shortcut), and then evaluates the downstream nodes only (`tail`) on
a stack of `G` variants of the layer output at once: `(G*N, ...)` in, `(G, N, ...)` out.

An imported model is already a `torch.fx.GraphModule` (aten ops and call_module nodes) and is
split as it is. Non-tensor values the tail reads from the head (a dynamic batch size
`aten.sym_size.int(x, 0)` feeding a reshape, `x.size(0)`) are recomputed in the tail from their
batch-repeated inputs, so they see `G*N` samples there.

Models that `torch.fx` cannot trace raise `TailUnavailable`; callers fall back to full forwards
(`HookTailRunner` gives the same interface that way).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn


class TailUnavailable(RuntimeError):
    """The model cannot be split at the layer (not traceable, or the layer is called != once)."""


def _batch_sized(value: Any, n: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n


class TailRunner:
    """Head once, tail many times, for the module called `name` inside `model` (eval, no_grad).

    `prime(x)` returns `(y, a, z)`: the model output, the layer's input and its output for `x`.
    `tail(z_stack)` takes `(G, N, *z.shape[1:])` layer outputs and returns the model outputs
    `(G, N, *y.shape[1:])` with the head's cached values broadcast over the `G` variants.
    """

    def __init__(self, model: nn.Module, name: str):
        if isinstance(model, fx.GraphModule):
            self.gm = model  # an imported graph: already a graph of call_module/aten nodes
        else:
            try:
                self.gm = fx.symbolic_trace(model)
            except Exception as exc:  # fx raises many types on untraceable Python
                raise TailUnavailable(f"cannot trace the model with torch.fx: {exc}") from exc
        nodes = list(self.gm.graph.nodes)
        hits = [n for n in nodes if n.op == "call_module" and n.target == name]
        if len(hits) != 1:
            raise TailUnavailable(f"layer {name!r} is called {len(hits)} times in the trace")
        self.layer_node = hits[0]
        downstream: set[fx.Node] = {self.layer_node}
        for node in nodes:  # graph order is topological
            if any(arg in downstream for arg in node.all_input_nodes):
                downstream.add(node)
        self.tail_nodes = [n for n in nodes if n in downstream and n is not self.layer_node]
        self.needed = {arg for n in self.tail_nodes for arg in n.all_input_nodes
                       if arg not in downstream}
        self.interp = fx.Interpreter(self.gm)
        self.cache: dict[fx.Node, Any] = {}
        self.n = 0
        self.shapes_moved = False

    def prime(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        env: dict[fx.Node, Any] = {}
        self.interp.env = env
        out: Any = None
        args = iter((x,))
        self.interp.args_iter = args  # placeholders read from this iterator
        for node in self.gm.graph.nodes:
            value = self.interp.run_node(node)
            if node.op == "output":
                out = value
            else:
                env[node] = value
        a = env[self.layer_node.all_input_nodes[0]]
        z = env[self.layer_node]
        self.n = x.shape[0]
        if not self.shapes_moved:
            self._recompute_shapes(env)
        self.cache = {node: env[node] for node in self.needed}
        return out, a, z

    def _recompute_shapes(self, env: dict[fx.Node, Any]) -> None:
        """Move the head's non-tensor values the tail reads (sizes such as a dynamic batch size
        `aten.sym_size.int(x, 0)` of an imported graph, `x.size(0)`, tuples of tensors) into
        the tail, so they are recomputed there from their batch-repeated inputs: a batch size
        cached from the head would be N where the tail runs G*N samples."""
        self.shapes_moved = True
        tail = set(self.tail_nodes) | {self.layer_node}
        moved: set[fx.Node] = set()
        for node in reversed(list(self.gm.graph.nodes)):  # users before their inputs
            if node in tail or node.op in ("placeholder", "get_attr", "output"):
                continue
            if isinstance(env.get(node), torch.Tensor) or not node.all_input_nodes:
                continue
            if any(user in tail or user in moved for user in node.users):
                moved.add(node)
        if not moved:
            return
        inside = tail | moved
        self.tail_nodes = [n for n in self.gm.graph.nodes
                           if n in inside and n is not self.layer_node]
        self.needed = {arg for n in self.tail_nodes for arg in n.all_input_nodes
                       if arg not in inside}

    def tail(self, z_stack: torch.Tensor) -> torch.Tensor:
        g = z_stack.shape[0]
        env: dict[fx.Node, Any] = {
            node: (val.repeat(g, *([1] * (val.dim() - 1)))
                   if node.op != "get_attr" and _batch_sized(val, self.n) else val)
            for node, val in self.cache.items()}
        env[self.layer_node] = z_stack.reshape(g * self.n, *z_stack.shape[2:])
        self.interp.env = env
        out: Any = None
        for node in self.tail_nodes:
            value = self.interp.run_node(node)
            if node.op == "output":
                out = value
            else:
                env[node] = value
        if out is None:  # the layer feeds nothing: cannot happen for a used layer
            raise TailUnavailable("the layer's output does not reach the model output")
        return out.reshape(g, self.n, *out.shape[1:])


class HookTailRunner:
    """Same interface as `TailRunner` by full forwards: the batch is repeated `G` times and a
    forward hook swaps the layer output for the stacked variants. Fallback for untraceable
    models; costs a head forward per variant."""

    def __init__(self, model: nn.Module, layer: nn.Module):
        self.model, self.layer = model, layer
        self.state: dict[str, Any] = {}
        self.x: torch.Tensor | None = None

    def _hook(self, _mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> Any:
        if "z_stack" in self.state:
            return self.state["z_stack"]
        self.state["a"], self.state["z"] = inp[0].detach(), out.detach()
        return None

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        handle = self.layer.register_forward_hook(self._hook)
        try:
            return self.model(x)
        finally:
            handle.remove()

    def prime(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.state.clear()
        self.x = x
        y = self._run(x)
        return y, self.state["a"], self.state["z"]

    def tail(self, z_stack: torch.Tensor) -> torch.Tensor:
        assert self.x is not None, "prime() first"
        g, n = z_stack.shape[:2]
        self.state["z_stack"] = z_stack.reshape(g * n, *z_stack.shape[2:])
        try:
            y = self._run(torch.cat([self.x] * g))
        finally:
            self.state.pop("z_stack")
        return y.reshape(g, n, *y.shape[1:])


def tail_runner(model: nn.Module, name: str, layer: nn.Module) -> TailRunner | HookTailRunner:
    """`TailRunner` where the model traces, else the full-forward `HookTailRunner`."""
    try:
        return TailRunner(model, name)
    except TailUnavailable:
        return HookTailRunner(model, layer)


__all__ = ["HookTailRunner", "TailRunner", "TailUnavailable", "tail_runner"]
