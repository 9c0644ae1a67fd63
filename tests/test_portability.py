"""Code that runs on Linux alone has one home, with a fallback for macOS and Windows."""

import os
from pathlib import Path

import idcscope
from idcscope.cpus import usable_cpus


def test_usable_cpus_without_affinity(monkeypatch):
    """macOS and Windows have no ``os.sched_getaffinity``: the count comes from elsewhere."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "process_cpu_count", lambda: 3, raising=False)
    assert usable_cpus() == 3
    monkeypatch.delattr(os, "process_cpu_count")
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # "undeterminable" is allowed
    assert usable_cpus() == 1


def test_affinity_is_read_in_one_place():
    package = Path(idcscope.__file__).parent
    users = sorted(
        p.relative_to(package).as_posix()
        for p in package.rglob("*.py")
        if "sched_getaffinity" in p.read_text()
    )
    assert users == ["cpus.py"]
