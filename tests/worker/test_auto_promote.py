"""Which screened candidates an auto-compress search fine-tunes (`choose_promoted`)."""
from __future__ import annotations

from worker.auto_search import choose_promoted


def cand(trial: int, method: str, cost: int, val: float, label: str | None = None) -> dict:
    return {"trial": trial, "method": label or method, "params": {"method": method},
            "cost": cost, "val_accuracy": val}


def test_best_of_each_method_first_then_by_accuracy() -> None:
    screened = [cand(0, "lowrank", 26000, 0.80), cand(1, "lowrank", 25000, 0.79),
                cand(2, "pcn", 26000, 0.70), cand(3, "channel_prune", 26500, 0.30),
                cand(4, "lowrank", 24000, 0.78)]
    chosen = [s["trial"] for s in choose_promoted(screened, 4)]
    assert chosen == [0, 2, 3, 1]
    assert [s["trial"] for s in choose_promoted(screened, 2)] == [0, 2]


def test_the_same_cut_is_not_fine_tuned_twice() -> None:
    # two trials whose knobs land on the same model: same method, cost and accuracy
    screened = [cand(0, "lowrank", 20186, 0.81, "lowrank (score output_perturbation)"),
                cand(1, "lowrank", 20186, 0.81, "lowrank (score output_perturbation)"),
                cand(2, "lowrank", 26150, 0.80, "lowrank (alds blocking)"),
                cand(3, "pcn", 26000, 0.70)]
    chosen = [s["trial"] for s in choose_promoted(screened, 3)]
    assert chosen == [0, 3, 2]
    # another method's label at the same numbers is another model
    screened.append(cand(4, "channel_prune", 20186, 0.81))
    assert 4 in [s["trial"] for s in choose_promoted(screened, 4)]


def test_ties_prefer_the_cheaper_candidate() -> None:
    screened = [cand(0, "lowrank", 26000, 0.8), cand(1, "lowrank", 21000, 0.8)]
    assert [s["trial"] for s in choose_promoted(screened, 1)] == [1]
