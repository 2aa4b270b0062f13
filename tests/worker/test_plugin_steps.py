"""The method plug-ins: every registered spec model has a handler (and the handler table has no
op without a spec), the plateau hook is the pcn module's, plots come from registrations, and
the worker's fold of its own events is the API's."""
from __future__ import annotations

from service import curves
from service.registry import available_ops, step_models
from worker import steps
from worker.plots import PLOTS
from worker.registry import HANDLERS, TRAIN_HOOKS


def test_every_registered_spec_has_a_handler_and_no_handler_lacks_a_spec():
    missing = [op for op in available_ops() if op not in HANDLERS]
    assert not missing, (f"ops {missing} have a spec model but no handler: add "
                         "`@handler(<SpecModel>)` in worker/step_<name>.py")
    assert set(HANDLERS) == set(available_ops())
    for model in step_models():
        module = model.__module__.rsplit(".", 1)[-1]
        assert f"worker.step_{module}" in steps.handler_modules()


def test_train_hooks_and_plots_come_from_the_step_modules():
    assert set(TRAIN_HOOKS) == {"pcn"}
    assert TRAIN_HOOKS["pcn"].__module__ == "worker.step_pcn"
    assert list(PLOTS)[:9] == ["training.png", "effective_dim.png", "pruning.png", "lowrank.png",
                           "dctps.png", "unit_pruning.png", "spectrum.png", "elbow.png",
                           "angles.png"]


def test_worker_fold_equals_the_fold_of_the_events():
    """ctx.emit folds each event as it is emitted; folding the list afterwards (the API) gives
    the same curves."""
    events = [
        ("status", {"status": "running"}),
        ("epoch", {"step": 0, "epoch": 1, "global_epoch": 1, "loss": 1.0, "accuracy": 0.5,
                   "val_loss": 1.1, "val_accuracy": 0.4, "lr": 0.1, "wall_s": 0.2}),
        ("pruning", {"step": 1, "op": "snip", "layers": {}}),
        ("analysis", {"step": 2, "global_epoch": 1, "kind": "elbow",
                      "layers": {"fc1": {"knee": 2}}}),
    ]
    live = curves.empty()
    for kind, data in events:
        curves.add(live, kind, data)
    assert live == curves.fold(events)
    assert live["pruning"] == [{"step": 1, "op": "snip", "layers": {}}]
    assert live["analysis"] == {"elbow": {"fc1": [{"step": 2, "global_epoch": 1, "knee": 2}]}}


def test_curves_of_an_older_checkpoint_get_the_missing_keys():
    old = {"training": [], "effective_dim": {}, "spectra": {}, "transforms": [], "pruning": []}
    curves.add(old, "dctps", {"step": 0})
    assert old["dctps"] == [{"step": 0}] and old["lowrank"] == [] and old["analysis"] == {}
