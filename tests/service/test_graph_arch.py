"""service.archcheck on imported models' archs (`{"name": "graph", ...}`) and on `preprocessing`:
the torch-free form check accepts what core accepts and refuses, naming the field, what core
refuses; the mirror of core's names is exact."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest

from core.arch import GRAPH, GRAPH_KWARGS, LAYOUTS, normalize_arch
from core.errors import SpecError
from service.archcheck import GRAPH as CHECK_GRAPH
from service.archcheck import GRAPH_KWARGS as CHECK_GRAPH_KWARGS
from service.archcheck import LAYOUTS as CHECK_LAYOUTS
from service.archcheck import arch_size, check_arch, check_graph_arch, is_graph_arch
from service.auth import get_or_create_tenant
from service.db import dispose_engines, session_scope, upgrade_db
from service.errors import InvalidSpec
from service.orm import Model
from service.settings import Settings
from service.spec import JobSpec
from service.submission import create_job
from tests.pg import temporary_database

SHA = "ab" * 32
ARCH = {"name": "graph", "graph": SHA, "input_shape": [1, 28, 28], "num_classes": 10,
        "init": "torch", "edits": [{"op": "lowrank", "layer": "features.0.0",
                                    "blocking": "none", "ranks": [3]}],
        "preprocessing": {"layout": "NCHW", "mean": [0.5], "std": [0.25]}}
LIMITS = {"max_params": 1000, "max_macs": 1000}


def test_the_mirror_of_core_is_exact():
    assert CHECK_GRAPH == GRAPH and CHECK_GRAPH_KWARGS == GRAPH_KWARGS
    assert set(CHECK_LAYOUTS) == set(LAYOUTS)


def test_a_graph_arch_passes_its_form_check_and_skips_the_size_limits():
    assert check_graph_arch(ARCH) == SHA and is_graph_arch(ARCH)
    # its size was checked when the graph was uploaded: tiny limits do not apply
    assert check_arch(ARCH, **LIMITS) is None
    normalize_arch(ARCH)  # core accepts it too
    minimal = {"name": "graph", "graph": SHA, "input_shape": [784], "num_classes": 2}
    assert check_graph_arch(minimal) == SHA
    with pytest.raises(InvalidSpec, match="size is known from the stored graph"):
        arch_size(ARCH)


@pytest.mark.parametrize(("change", "field"), [
    (lambda a: a.update(graph="xyz"), "model.arch.graph"),
    (lambda a: a.update(graph=SHA.upper()), "model.arch.graph"),
    (lambda a: a.pop("graph"), "model.arch: an imported graph's arch needs graph"),
    (lambda a: a.pop("input_shape"), "needs input_shape"),
    (lambda a: a.update(input_shape=[]), "model.arch.input_shape"),
    (lambda a: a.update(input_shape=[1, 0, 28]), "model.arch.input_shape[1]"),
    (lambda a: a.update(input_shape=[1, "28", 28]), "model.arch.input_shape[1]"),
    (lambda a: a.update(num_classes=0), "model.arch.num_classes"),  # core: when it builds
    (lambda a: a.update(num_classes=True), "model.arch.num_classes"),
    (lambda a: a.update(init="glorot"), "model.arch.init"),
    (lambda a: a.update(widths=[3]), "model.arch.widths"),
    (lambda a: a.update(edits=[{"op": "nope"}]), "model.arch.edits[0]"),
    (lambda a: a.update(preprocessing={"layout": "NWHC"}), "model.arch.preprocessing.layout"),
    (lambda a: a.update(preprocessing={"std": [0.0]}), "model.arch.preprocessing.std"),
    (lambda a: a.update(preprocessing={"mean": [1, 2], "std": [1]}),
     "model.arch.preprocessing: mean (2 values) and std (1 values)"),
    (lambda a: a.update(preprocessing={"scale": 2}), "model.arch.preprocessing.scale"),
    (lambda a: a.update(preprocessing=[0.5]), "model.arch.preprocessing"),
])
def test_a_bad_graph_arch_is_refused_naming_the_field(change, field):
    arch = copy.deepcopy(ARCH)
    change(arch)
    with pytest.raises(InvalidSpec) as err:
        check_arch(arch, **LIMITS)
    assert field in err.value.detail
    if "num_classes" not in field:  # core refuses it too (num_classes: when it builds)
        with pytest.raises(SpecError):
            normalize_arch(arch)


def test_a_zoo_arch_may_carry_preprocessing():
    arch = {"name": "lenet300", "preprocessing": {"layout": "NCHW", "mean": [0.1], "std": [2]}}
    assert check_arch(arch, max_params=10**9, max_macs=10**9) == arch_size({"name": "lenet300"})
    normalize_arch(arch)
    with pytest.raises(InvalidSpec, match=r"model.arch.preprocessing.mean"):
        arch_size({"name": "lenet300", "preprocessing": {"mean": ["a"]}})


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path) -> Iterator[Settings]:
    with contextlib.ExitStack() as stack:
        url = (stack.enter_context(temporary_database("slimline_graph"))
               if request.param == "postgresql" else "")
        s = Settings(home=tmp_path, database_url=url)
        upgrade_db(s)
        yield s
        dispose_engines()


def test_a_graph_arch_is_submitted_only_on_a_graph_of_the_tenant(settings):
    """The JSON lookup of `check_graph_known` on both databases: the graph must be one the
    tenant's models are built on (not another tenant's)."""
    spec = JobSpec.model_validate({"model": {"arch": ARCH}, "dataset": "synthetic-blobs",
                                   "steps": [{"op": "evaluate"}]})
    with session_scope(settings) as session:
        alice = get_or_create_tenant(session, "alice").id
        bob = get_or_create_tenant(session, "bob").id
        session.add(Model(tenant_id=bob, name="bobs", arch=ARCH, format="safetensors",
                          size_bytes=1, sha256="0" * 64, params={}, storage_key="k"))
        session.add(Model(tenant_id=alice, name="zoo", arch={"name": "lenet300"},
                          format="safetensors", size_bytes=1, sha256="0" * 64, params={},
                          storage_key="k2"))
    with session_scope(settings) as session, pytest.raises(
            InvalidSpec, match=f"model.arch.graph: none of your models is built on graph {SHA}"):
        create_job(session, alice, spec)
    with session_scope(settings) as session:
        job, created = create_job(session, bob, spec)
        assert created and job.spec["model"]["arch"]["graph"] == SHA
