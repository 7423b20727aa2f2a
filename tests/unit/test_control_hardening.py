"""Control-plane hardening with plain values: atomic state writes, undoing a change
that could not be saved, deep JSON in saved files, the demo's tokens, the audit
log line, and overlapping listeners in the config."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from zdproxy.balancing.model import Health
from zdproxy.config.loader import ConfigError, load_config_text
from zdproxy.config.schema import Address, Config, addresses_overlap
from zdproxy.control.events import Event, EventLog, describe, read_tail
from zdproxy.control.runtime import Runtime
from zdproxy.control.store import FileStore, MemoryStore, Persistence, StoreError
from zdproxy.demo import demo_token

DEEP = b"[" * 30_000 + b"]" * 30_000


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_config(health_checks: bool = False) -> Config:
    return Config.model_validate(
        {
            "listen": ["127.0.0.1:8080"],
            "state": {"path": None},
            "health_check": {"enabled": health_checks},
            "draining": {"timeout": "10s"},
            "pools": {
                "blue": {
                    "weight": 100,
                    "backends": [
                        {"id": "blue-1", "address": "127.0.0.1:9001"},
                        {"id": "blue-2", "address": "127.0.0.1:9002"},
                    ],
                },
                "green": {
                    "weight": 0,
                    "backends": [
                        {"id": "green-1", "address": "127.0.0.1:9003"},
                        {"id": "green-2", "address": "127.0.0.1:9004"},
                    ],
                },
            },
        }
    )


# ---- the state file is replaced atomically ------------------------------------------


def _temp_files(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


def test_each_save_renames_a_new_file_over_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = FileStore(str(path))
    store.save({"format": 1, "n": 1})
    first = path.stat().st_ino
    # a reader holding the old file keeps reading the old, whole content
    with open(path, "rb") as reader:
        store.save({"format": 1, "n": 2})
        assert json.loads(reader.read()) == {"format": 1, "n": 1}
    second = path.stat().st_ino
    assert second != first  # a new file (temp + rename), never the old one rewritten
    assert json.loads(path.read_bytes()) == {"format": 1, "n": 2}
    assert _temp_files(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["state.json"]


def test_a_failed_save_leaves_no_temp_file_and_the_old_state(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store = FileStore(str(path))
    store.save({"format": 1, "n": 1})
    saved = path.read_bytes()
    # make the rename fail: the new file is written, then cannot replace the target
    moved = tmp_path / "saved.json"
    path.rename(moved)
    path.mkdir()
    (path / "keep").write_text("x")
    with pytest.raises(OSError):
        store.save({"format": 1, "n": 2})
    assert _temp_files(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == ["saved.json", "state.json"]
    assert moved.read_bytes() == saved


def test_a_save_into_a_missing_directory_fails_cleanly(tmp_path: Path) -> None:
    blocker = tmp_path / "dir"
    blocker.write_text("a file where the state directory should be")
    store = FileStore(str(blocker / "state.json"))
    with pytest.raises(StoreError, match=f"^{blocker} is not a directory$"):
        store.save({"format": 1})
    assert sorted(os.listdir(tmp_path)) == ["dir"]


# ---- deep JSON in saved files ---------------------------------------------------------


def test_a_deeply_nested_state_file_is_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(DEEP)
    store = FileStore(str(path))
    assert store.load() is None
    assert not path.exists()
    aside = list(tmp_path.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == DEEP
    store.save({"format": 1})  # and saving works again
    assert store.read_only_reason is None


def test_a_deeply_nested_audit_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    good = {"id": 1, "action": "flip"}
    path.write_bytes(json.dumps(good).encode() + b"\n" + DEEP + b"\n")
    assert read_tail(str(path), 10) == [good]


# ---- a change that cannot be saved is undone -------------------------------------------


class FailingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.failing = False

    def save(self, state: dict[str, Any]) -> None:
        if self.failing:
            raise OSError(28, "No space left on device")
        super().save(state)


def _view(runtime: Runtime) -> Any:
    """Everything an operator change may touch, comparable."""
    state = runtime.export_state()
    del state["saved_at"]
    snapshot = runtime.snapshot
    routing = {
        name: ([b.id for b in view.routable], list(view.routable_weights), view.weight)
        for name, view in snapshot.pools.items()
    }
    backends = {
        b.id: (b.admin.value, b.health.value, b.state.value) for b in runtime.backends.values()
    }
    return (
        state,
        routing,
        backends,
        dict(runtime.drain_started),
        dict(runtime.removing),
        runtime.events.list(),
    )


MUTATIONS = [
    ("split", lambda r: r.split({"blue": 60, "green": 40}, "ops")),
    ("flip", lambda r: r.flip("green", "ops")),
    ("add", lambda r: r.add_backend("green", "127.0.0.1:9005", "green-3", 2, "ops")),
    ("remove idle", lambda r: r.remove_backend("blue-2", "ops")),
    ("remove busy", lambda r: r.remove_backend("blue-1", "ops")),
    ("drain", lambda r: r.drain("blue-1", "ops")),
    ("disable", lambda r: r.disable("blue-2", "ops")),
    ("enable", lambda r: r.enable("green-2", "ops")),
]


@pytest.mark.parametrize(("name", "mutate"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
@pytest.mark.parametrize("health_checks", [False, True])
async def test_a_change_that_cannot_be_saved_is_undone(
    name: str, mutate: Any, health_checks: bool
) -> None:
    runtime = Runtime(make_config(health_checks), clock=Clock())
    for backend_id in runtime.backends:
        runtime.set_health(backend_id, Health.UP)
    store = FailingStore()
    persistence = Persistence(runtime, store, None)
    persistence.attach()
    runtime.disable("green-2", "setup")  # something for enable to undo
    runtime.backends["blue-1"].in_flight = 1  # remove busy drains first
    assert await persistence.commit(0) is None
    before = _view(runtime)
    saved = store.state

    store.failing = True
    checkpoint = runtime.checkpoint()
    mark = persistence.mark()
    mutate(runtime)
    assert _view(runtime) != before  # the change did happen in memory
    problem = await persistence.commit(mark)
    assert problem is not None and "No space left on device" in problem
    runtime.rollback(checkpoint)
    assert _view(runtime) == before
    assert store.state == saved

    # once the disk is back, the same change goes through and is saved
    store.failing = False
    mark = persistence.mark()
    mutate(runtime)
    assert await persistence.commit(mark) is None
    assert store.state is not None
    assert {k: v for k, v in store.state.items() if k != "saved_at"} == {
        k: v for k, v in runtime.export_state().items() if k != "saved_at"
    }
    await persistence.close()


async def test_commit_with_nothing_to_save_is_fine_even_after_a_failure() -> None:
    runtime = Runtime(make_config(), clock=Clock())
    store = FailingStore()
    persistence = Persistence(runtime, store, None)
    persistence.attach()
    store.failing = True
    mark = persistence.mark()
    runtime.flip("green", "ops")
    assert await persistence.commit(mark) is not None
    mark = persistence.mark()
    assert await persistence.commit(mark) is None  # no change since the mark
    await persistence.close()


def test_rolled_back_events_leave_the_ring_and_ids_are_not_reused() -> None:
    log = EventLog(10)
    log.record("a", "flip", "green", None, None)
    first = log.next_id
    log.record("a", "flip", "blue", None, None)
    log.record("a", "split", "x", None, None)
    log.discard_from(first)
    assert [e["id"] for e in log.list()] == [1]
    assert log.record("a", "flip", "green", None, None).id == 4


# ---- the audit log line -----------------------------------------------------------------


def test_audit_events_read_as_one_line() -> None:
    runtime = Runtime(make_config(), clock=Clock())
    seen: list[Event] = []
    runtime.events.subscribe(seen.append)
    runtime.flip("green", "deploy")
    runtime.drain("blue-1", "ops")
    runtime.backends["green-2"].in_flight = 1
    runtime.remove_backend("green-2", "ops")
    runtime.add_backend("green", "127.0.0.1:9005", "green-3", 1, "ops")
    runtime.disable("green-1", "ops")
    runtime.disable("green-3", "ops")
    runtime.split({"blue": 100, "green": 0}, "ops")
    runtime.flip("green", "ops", force=True)
    assert [describe(event) for event in seen] == [
        "flip green by deploy: blue=100 green=0 -> blue=0 green=100",
        "backend.drain blue-1 by ops: up -> draining",
        "backend.remove green-2 by ops: up -> draining (removing)",
        "backend.add green-3 by ops: - -> up",
        "backend.disable green-1 by ops: up -> disabled",
        "backend.disable green-3 by ops: up -> disabled",
        "split blue,green by ops: blue=0 green=100 -> blue=100 green=0",
        "flip green by ops: blue=100 green=0 -> blue=0 green=100 "
        "(forced: pool 'green' has no usable backend (none is up))",
    ]


# ---- the demo's token ---------------------------------------------------------------------


def test_demo_tokens_never_start_with_a_dash() -> None:
    tokens = [demo_token() for _ in range(10_000)]
    assert not [t for t in tokens if t.startswith("-")]
    assert len(set(tokens)) == len(tokens)
    assert all(len(t) >= 32 for t in tokens)


# ---- overlapping listeners ------------------------------------------------------------------


def _problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(textwrap.dedent(text), "test.yaml")
    return [str(problem) for problem in info.value.problems]


POOLS = """\
pools:
  blue:
    weight: 100
    backends: [{address: 127.0.0.1:9000}]
"""


def test_check_catches_a_specific_address_under_a_wildcard() -> None:
    text = (
        "listen:\n"
        "  - 0.0.0.0:8080\n"
        "  - 127.0.0.1:8080\n"
        '  - "[::]:8081"\n'
        "  - 127.0.0.1:8081\n"
        "  - 127.0.0.1:8082\n"
        '  - "[::1]:8080"\n' + POOLS
    )
    assert _problems(text) == [
        "test.yaml:3: listen.1: 127.0.0.1:8080 overlaps 0.0.0.0:8080 (at listen.0): "
        "0.0.0.0:8080 takes port 8080 on every address, so both cannot be bound",
        "test.yaml:5: listen.3: 127.0.0.1:8081 overlaps [::]:8081 (at listen.2): "
        "[::]:8081 takes port 8081 on every address, so both cannot be bound",
    ]


def test_check_catches_the_admin_listener_under_a_data_wildcard() -> None:
    text = "listen: [0.0.0.0:9901]\nadmin:\n  listen: 127.0.0.1:9901\n" + POOLS
    assert _problems(text) == [
        "test.yaml:3: admin.listen: 127.0.0.1:9901 overlaps the data listener 0.0.0.0:9901 "
        "(at listen.0): 0.0.0.0:9901 takes port 9901 on every address, so both cannot be bound"
    ]
    disabled = "listen: [0.0.0.0:9901]\nadmin:\n  listen: 127.0.0.1:9901\n  enabled: false\n"
    load_config_text(disabled + POOLS, "test.yaml")  # no admin listener: no overlap


def _a(text: str) -> Address:
    host, _, port = text.rpartition(":")
    return Address(host=host.strip("[]"), port=int(port))


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("0.0.0.0:80", "127.0.0.1:80", True),
        ("0.0.0.0:80", "10.1.2.3:80", True),
        ("0.0.0.0:80", "localhost:80", True),  # names are bound as IPv4
        ("0.0.0.0:80", "[::]:80", True),  # [::] is dual-stack
        ("[::]:80", "127.0.0.1:80", True),
        ("[::]:80", "[::1]:80", True),
        ("[::1]:80", "[0:0::1]:80", True),
        ("0.0.0.0:80", "[::1]:80", False),  # the IPv4 wildcard leaves IPv6 alone
        ("0.0.0.0:80", "127.0.0.1:81", False),
        ("127.0.0.1:80", "127.0.0.2:80", False),
        ("[::1]:80", "127.0.0.1:80", False),
    ],
)
def test_addresses_overlap(a: str, b: str, overlap: bool) -> None:
    assert addresses_overlap(_a(a), _a(b)) is overlap
    assert addresses_overlap(_a(b), _a(a)) is overlap
