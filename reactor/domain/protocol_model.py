"""A model of the claim / lease / fence / ledger protocol, explored exhaustively.

Every interleaving of every replica's steps is tried — so a replica that stalls is simply one
that is not scheduled for a while, and a failed renewal is a heartbeat that never happens —
together with crashes (a replica loses everything it held in memory) and wall clocks that are
off (a replica judges time by its own clock only where the protocol lets it). The database is
one state: the campaign's epoch, owner and lease, and one ledger row per customer.

Two properties are checked:

- **at most once** in every reachable state: no customer was handed to the provider twice;
- **everyone ends final**: from every reachable state, a replica that takes over once the lease
  has run out, and finishes the run, leaves every customer in a terminal state without breaking
  the first property.

`explore(Protocol.CURRENT)` is the reactor's protocol: claims and expiry judged by the
database's clock, an owner that fences itself by its monotonic clock, pending marks that any
existing row refuses, outcomes only on the writer's own pending row. `Protocol.OLD` is the one it
replaced — expiry judged by each replica's clock, and ledger writes fenced by `epoch <= mine`
from a snapshot of the ledger read at the claim — and the explorer finds its duplicate.

Time is in ticks. `python -m reactor.domain.protocol_model` explores a larger configuration.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

PENDING, SENT, UNCERTAIN = "pending", "sent", "uncertain"
TERMINAL = frozenset({SENT, UNCERTAIN})


class Protocol(Enum):
    CURRENT = "current"
    OLD = "old"


@dataclass(frozen=True)
class Config:
    replicas: int = 2
    customers: int = 2
    lease: int = 3  # ticks a lease lasts from its renewal
    margin: int = 1  # the owner fences itself this long before its lease could lapse
    max_time: int = 7
    max_epoch: int = 3
    max_crashes: int = 1
    skews: tuple[int, ...] = (2, -2)  # each replica's wall clock minus the database's


@dataclass(frozen=True)
class Replica:
    up: bool = True
    epoch: int = 0  # the epoch it believes it owns (0: none)
    fence: int = 0  # by its monotonic clock: no new send from this tick on
    marked: frozenset[int] = frozenset()  # marked pending, not yet handed to the provider
    inflight: frozenset[int] = frozenset()  # handed over, outcome not yet written
    handled: frozenset[int] = frozenset()  # marked in this epoch already (a run marks once)
    snapshot: tuple[str | None, ...] = ()  # OLD only: the ledger as read at its claim


@dataclass(frozen=True)
class State:
    time: int
    epoch: int
    owner: int  # -1: none
    lease_until: int
    ledger: tuple[tuple[str, int] | None, ...]  # per customer: (state, epoch that marked it)
    provider: tuple[int, ...]  # per customer: how many times it was handed to the provider
    replicas: tuple[Replica, ...]
    crashes: int = 0


def initial(cfg: Config) -> State:
    return State(
        time=0,
        epoch=0,
        owner=-1,
        lease_until=0,
        ledger=(None,) * cfg.customers,
        provider=(0,) * cfg.customers,
        replicas=(Replica(),) * cfg.replicas,
    )


def _with(state: State, i: int, replica: Replica, **fields: object) -> State:
    replicas = list(state.replicas)
    replicas[i] = replica
    return dataclasses.replace(state, replicas=tuple(replicas), **fields)  # type: ignore[arg-type]


def _set(values: tuple[object, ...], index: int, value: object) -> tuple[object, ...]:
    out = list(values)
    out[index] = value
    return tuple(out)


def steps(state: State, cfg: Config, protocol: Protocol) -> Iterator[tuple[str, State]]:
    """Every step any replica (or time) can take from `state`."""
    if state.time < cfg.max_time:
        yield "tick", dataclasses.replace(state, time=state.time + 1)
    for i, r in enumerate(state.replicas):
        yield from _replica_steps(state, cfg, protocol, i, r)


def _replica_steps(
    state: State, cfg: Config, protocol: Protocol, i: int, r: Replica
) -> Iterator[tuple[str, State]]:
    now = state.time
    if not r.up:
        yield f"r{i} restarts", _with(state, i, Replica())
        return
    if state.crashes < cfg.max_crashes:
        yield f"r{i} crashes", _with(state, i, Replica(up=False), crashes=state.crashes + 1)
    # Claim (a start or a takeover): the lease must have run out.
    judged_now = now if protocol is Protocol.CURRENT else now + cfg.skews[i % len(cfg.skews)]
    holds_current = r.epoch > 0 and r.epoch == state.epoch
    if not holds_current and state.lease_until <= judged_now and state.epoch < cfg.max_epoch:
        epoch = state.epoch + 1
        snapshot = tuple(row[0] if row else None for row in state.ledger)
        mine = Replica(epoch=epoch, fence=now + cfg.lease - cfg.margin, snapshot=snapshot)
        # A lease is granted for `lease` ticks of the database's clock (OLD: of the claimer's).
        until = now + cfg.lease if protocol is Protocol.CURRENT else judged_now + cfg.lease
        yield (
            f"r{i} claims e{epoch}",
            _with(state, i, mine, epoch=epoch, owner=i, lease_until=until),
        )
    if r.epoch == 0:
        return
    owns = state.epoch == r.epoch and state.owner == i
    if owns:
        renewed = dataclasses.replace(r, fence=now + cfg.lease - cfg.margin)
        until = now + cfg.lease if protocol is Protocol.CURRENT else judged_now + cfg.lease
        yield f"r{i} renews", _with(state, i, renewed, lease_until=until)
    elif r.epoch < state.epoch:
        # Its renewal fails: it learns it lost the run and drops what it had not sent.
        yield (
            f"r{i} learns it lost e{r.epoch}",
            _with(state, i, dataclasses.replace(r, epoch=0, marked=frozenset())),
        )
    fenced = protocol is Protocol.CURRENT and now >= r.fence
    for c in range(cfg.customers):
        row = state.ledger[c]
        if not fenced and c not in r.handled and _may_mark(protocol, row, r, c):
            yield (
                f"r{i} marks c{c}",
                _with(
                    state,
                    i,
                    dataclasses.replace(r, marked=r.marked | {c}, handled=r.handled | {c}),
                    ledger=_set(state.ledger, c, (PENDING, r.epoch)),
                ),
            )
        if c in r.marked and not fenced:
            yield (
                f"r{i} sends c{c}",
                _with(
                    state,
                    i,
                    dataclasses.replace(r, marked=r.marked - {c}, inflight=r.inflight | {c}),
                    provider=_set(state.provider, c, state.provider[c] + 1),
                ),
            )
        if c in r.inflight:
            applies = (
                row == (PENDING, r.epoch)
                if protocol is Protocol.CURRENT
                else row is None or row[1] <= r.epoch
            )
            ledger = _set(state.ledger, c, (SENT, r.epoch)) if applies else state.ledger
            yield (
                f"r{i} records c{c} sent",
                _with(state, i, dataclasses.replace(r, inflight=r.inflight - {c}), ledger=ledger),
            )
        if row is not None and row[0] == PENDING and row[1] < r.epoch and owns:
            yield (
                f"r{i} settles c{c}",
                _with(state, i, r, ledger=_set(state.ledger, c, (UNCERTAIN, row[1]))),
            )


def _may_mark(protocol: Protocol, row: tuple[str, int] | None, r: Replica, c: int) -> bool:
    if protocol is Protocol.CURRENT:
        return row is None  # an insert: any existing row refuses it
    # OLD: an upsert fenced by `epoch <= mine`, for rows its snapshot said were not final.
    seen = r.snapshot[c] if r.snapshot else None
    return seen not in TERMINAL and (row is None or row[1] <= r.epoch)


def finish(state: State, cfg: Config, protocol: Protocol) -> State | None:
    """Let the lease run out, have a fresh replica take over, settle and send what is left.
    None if the configuration's bounds leave no room for that (it is then not checked)."""
    if state.epoch >= cfg.max_epoch + 1:
        return None
    # Every other replica is stopped for good (the worst case: nobody else helps).
    time = max(state.time, state.lease_until)
    epoch = state.epoch + 1
    ledger = list(state.ledger)
    provider = list(state.provider)
    for c, row in enumerate(ledger):
        if row is not None and row[0] == PENDING:
            ledger[c] = (UNCERTAIN, row[1])
        elif row is None:
            ledger[c] = (SENT, epoch)
            provider[c] += 1
    return dataclasses.replace(
        state,
        time=time,
        epoch=epoch,
        ledger=tuple(ledger),
        provider=tuple(provider),
        replicas=tuple(Replica(up=False) for _ in state.replicas),
    )


@dataclass
class Result:
    states: int
    violation: list[str] | None  # the steps that lead to a duplicate, if any
    unfinished: list[str] | None  # steps to a state finish() leaves non-final, if any


def explore(protocol: Protocol, cfg: Config | None = None, limit: int = 5_000_000) -> Result:
    cfg = cfg or Config()
    start = initial(cfg)
    parents: dict[State, tuple[State, str] | None] = {start: None}
    queue: deque[State] = deque([start])

    def path(state: State) -> list[str]:
        out: list[str] = []
        node = parents[state]
        while node is not None:
            out.append(node[1])
            node = parents[node[0]]
        return out[::-1]

    while queue:
        state = queue.popleft()
        if any(n > 1 for n in state.provider):
            return Result(len(parents), path(state), None)
        done = finish(state, cfg, protocol)
        if done is not None and (
            any(n > 1 for n in done.provider)
            or any(row is None or row[0] not in TERMINAL for row in done.ledger)
        ):
            return Result(len(parents), None, path(state))
        for label, nxt in steps(state, cfg, protocol):
            if nxt not in parents:
                if len(parents) >= limit:
                    raise RuntimeError(f"more than {limit} states: tighten the bounds")
                parents[nxt] = (state, label)
                queue.append(nxt)
    return Result(len(parents), None, None)


def main(argv: list[str]) -> int:
    replicas = int(argv[0]) if argv else 3
    cfg = Config(replicas=replicas, skews=(2, -2, 0)[:replicas] or (0,))
    for protocol in Protocol:
        result = explore(protocol, cfg)
        verdict = "holds" if result.violation is None and result.unfinished is None else "BROKEN"
        print(f"{protocol.value:8} {replicas} replicas: {result.states:>9,} states, {verdict}")  # noqa: T201
        if result.violation:
            print("  duplicate after: " + " → ".join(result.violation))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
