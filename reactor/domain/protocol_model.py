"""A model of the claim / lease / fence / ledger protocol, explored exhaustively.

The model follows what the code does (execution/, adapters/mongo/ledger.py): a replica claims
the run (a start or a takeover) once the lease has run out, renews it, fences itself by its
monotonic clock, marks a customer `pending` (an insert any existing row refuses), hands the
message to the provider, and writes the outcome only on its own epoch's pending row. The
provider may accept, refuse for now ("try later": the send is deferred, its pending row is
forgotten — deleted — and marked again later) or answer ambiguously (delivered or not, nobody
knows: the row is `uncertain`). An owner may hand the run off (SIGTERM: in-flight sends finish,
unsent marks are forgotten, the lease is released); a new owner settles earlier epochs' pending
rows `uncertain`. Every interleaving is tried, with a crash, a refusal and an ambiguous answer
somewhere, and wall clocks that are off where the protocol would let a replica use its own.

Four properties are checked; each can fail (see `MECHANISMS` and `table()`):

- **at most once**: no customer is delivered twice, in any reachable state or in the recovery;
- **one sender**: no replica hands a message to the provider once a later epoch has claimed the
  run (a superseded owner sends nothing the new owner cannot account for);
- **ends final** (liveness): from every reachable state, once the replicas finish what they
  hold and one takes over, every customer's row is terminal;
- **uncertain only in doubt**: a customer ends `uncertain` only if its outcome really could not
  be known (an ambiguous answer, or a sender that crashed or lost its lease while holding it) —
  not, say, a send the provider refused and nobody retried.

Each mechanism can be switched off (`Config.off`); `table()` explores every single-mechanism
ablation and reports, for each property, the length of the shortest counterexample (the
exploration is breadth-first). `python -m reactor.bench model` prints that table.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TypeVar

T = TypeVar("T")

PENDING, SENT, UNCERTAIN = "pending", "sent", "uncertain"
TERMINAL = frozenset({SENT, UNCERTAIN})


class Mechanism(StrEnum):
    """A part of the protocol that can be switched off in the model."""

    LEASE = "lease"  # a claim needs the lease to have run out
    DB_CLOCK = "db_clock"  # expiry judged (and leases granted) by the database's clock
    SELF_FENCE = "self_fence"  # an owner stops marking and sending when its lease may lapse
    INSERT_ONLY_MARK = "insert_only_mark"  # a mark is refused by any existing row
    CONDITIONAL_OUTCOME = "conditional_outcome"  # outcomes only on the writer's own pending row
    SETTLE = "settle"  # a new owner turns earlier epochs' pending rows uncertain
    FORGET = "forget"  # a deferred/abandoned send's pending row is deleted (then re-marked)
    CONDITIONAL_FORGET = "conditional_forget"  # ... only if it is still this epoch's pending row
    FORGET_ONLY_UNSENT = "forget_only_unsent"  # a hand-off forgets only what was never sent


MECHANISMS = tuple(Mechanism)


class Property(StrEnum):
    AT_MOST_ONCE = "at most once"
    ONE_SENDER = "one sender"
    ENDS_FINAL = "ends final"
    UNCERTAIN_ONLY_IN_DOUBT = "uncertain only in doubt"


@dataclass(frozen=True)
class Config:
    replicas: int = 2
    customers: int = 1
    lease: int = 3  # ticks a lease lasts from its renewal
    margin: int = 1  # the owner fences itself this long before its lease could lapse
    max_time: int = 6
    max_epoch: int = 3
    max_crashes: int = 1
    max_refusals: int = 1  # provider "try later" answers
    max_ambiguous: int = 1  # provider answers whose outcome cannot be known
    skews: tuple[int, ...] = (2, -2)  # each replica's wall clock minus the database's
    off: frozenset[Mechanism] = frozenset()

    def on(self, mechanism: Mechanism) -> bool:
        return mechanism not in self.off


@dataclass(frozen=True)
class Replica:
    up: bool = True
    epoch: int = 0  # the epoch it believes it owns (0: none)
    fence: int = 0  # by its monotonic clock: no new mark or send from this tick on
    marked: frozenset[int] = frozenset()  # marked pending, not yet handed to the provider
    inflight: frozenset[tuple[int, str]] = frozenset()  # handed over: (customer, outcome known)
    refused: frozenset[int] = frozenset()  # the provider said "try later": to forget
    deferred: frozenset[int] = frozenset()  # forgotten, to be marked again
    handled: frozenset[int] = frozenset()  # taken from the audience in this epoch

    def holds(self) -> frozenset[int]:
        return self.marked | self.refused | frozenset(c for c, _ in self.inflight)


Row = tuple[str, int] | None  # (state, epoch that marked it)


@dataclass(frozen=True)
class State:
    time: int
    epoch: int
    owner: int  # -1: none
    lease_until: int
    ledger: tuple[Row, ...]
    delivered: tuple[int, ...]  # per customer: how many times the provider delivered it
    doubt: tuple[bool, ...]  # per customer: its outcome could not be known at some point
    replicas: tuple[Replica, ...]
    crashes: int = 0
    refusals: int = 0
    ambiguous: int = 0


def initial(cfg: Config) -> State:
    n = cfg.customers
    return State(0, 0, -1, 0, (None,) * n, (0,) * n, (False,) * n, (Replica(),) * cfg.replicas)


def _with(state: State, i: int, replica: Replica, **fields: object) -> State:
    replicas = list(state.replicas)
    replicas[i] = replica
    return dataclasses.replace(state, replicas=tuple(replicas), **fields)  # type: ignore[arg-type]


def _set(values: tuple[T, ...], index: int, value: T) -> tuple[T, ...]:
    out = list(values)
    out[index] = value
    return tuple(out)


def _doubt(doubt: tuple[bool, ...], customers: frozenset[int]) -> tuple[bool, ...]:
    return tuple(d or c in customers for c, d in enumerate(doubt))


Step = tuple[str, State, Property | None]  # label, next state, the property the step breaks


def steps(state: State, cfg: Config) -> Iterator[Step]:
    """Every step any replica (or time) can take from `state`."""
    if state.time < cfg.max_time:
        yield "tick", dataclasses.replace(state, time=state.time + 1), None
    for i, r in enumerate(state.replicas):
        if not r.up:
            yield f"r{i} restarts", _with(state, i, Replica()), None
            continue
        if state.crashes < cfg.max_crashes:
            lost = _doubt(state.doubt, r.holds())
            crashed = _with(state, i, Replica(up=False), crashes=state.crashes + 1, doubt=lost)
            yield f"r{i} crashes", crashed, None
        yield from _claims(state, cfg, i, r)
        if r.epoch:
            yield from _owner_steps(state, cfg, i, r)
            for c in range(cfg.customers):
                yield from _customer_steps(state, cfg, i, r, c)


def _claims(state: State, cfg: Config, i: int, r: Replica) -> Iterator[Step]:
    """A start or a takeover: a conditional update on the campaign, won by one replica."""
    now = state.time
    skew = 0 if cfg.on(Mechanism.DB_CLOCK) else cfg.skews[i % len(cfg.skews)]
    holds_current = r.epoch > 0 and r.epoch == state.epoch
    expired = state.lease_until <= now + skew or not cfg.on(Mechanism.LEASE)
    if holds_current or not expired or state.epoch >= cfg.max_epoch:
        return
    epoch = state.epoch + 1
    mine = Replica(epoch=epoch, fence=now + cfg.lease - cfg.margin)
    # Without the database's clock the claimer writes the lease's end by its own.
    until = now + skew + cfg.lease
    # Whatever another replica still holds, the new owner cannot know the outcome of.
    held = frozenset().union(*(o.holds() for j, o in enumerate(state.replicas) if j != i))
    claimed = _with(
        state, i, mine, epoch=epoch, owner=i, lease_until=until, doubt=_doubt(state.doubt, held)
    )
    yield f"r{i} claims e{epoch}", claimed, None


def _owner_steps(state: State, cfg: Config, i: int, r: Replica) -> Iterator[Step]:
    now = state.time
    owns = state.epoch == r.epoch and state.owner == i
    if not owns:
        # Its renewal fails: it learns it lost the run and drops what it held (rows stay).
        lost = _doubt(state.doubt, r.holds())
        yield f"r{i} learns it lost e{r.epoch}", _with(state, i, Replica(), doubt=lost), None
        return
    skew = 0 if cfg.on(Mechanism.DB_CLOCK) else cfg.skews[i % len(cfg.skews)]
    renewed = dataclasses.replace(r, fence=now + cfg.lease - cfg.margin)
    yield f"r{i} renews", _with(state, i, renewed, lease_until=now + skew + cfg.lease), None
    yield from _hand_off(state, cfg, i, r)
    if cfg.on(Mechanism.SETTLE):
        for c, row in enumerate(state.ledger):
            if row is not None and row[0] == PENDING and row[1] < r.epoch:
                settled = _set(state.ledger, c, (UNCERTAIN, row[1]))
                yield f"r{i} settles c{c}", _with(state, i, r, ledger=settled), None


def _hand_off(state: State, cfg: Config, i: int, r: Replica) -> Iterator[Step]:
    """SIGTERM: in-flight sends finish first (FORGET_ONLY_UNSENT), unsent marks and refused
    sends are forgotten, the lease is released so another replica takes over at once."""
    drained = not r.inflight
    if not drained and cfg.on(Mechanism.FORGET_ONLY_UNSENT):
        return
    ledger = state.ledger
    for c in r.holds():
        ledger = _forget(ledger, cfg, c, r.epoch)
    yield (
        f"r{i} hands off e{r.epoch}",
        _with(state, i, Replica(), ledger=ledger, owner=-1, lease_until=state.time),
        None,
    )


def _forget(ledger: tuple[Row, ...], cfg: Config, c: int, epoch: int) -> tuple[Row, ...]:
    """forget_pending: delete this epoch's pending row (any row, without its condition)."""
    if not cfg.on(Mechanism.FORGET):
        return ledger
    if cfg.on(Mechanism.CONDITIONAL_FORGET) and ledger[c] != (PENDING, epoch):
        return ledger
    return _set(ledger, c, None)


def _may_mark(cfg: Config, row: Row, epoch: int) -> bool:
    if cfg.on(Mechanism.INSERT_ONLY_MARK):
        return row is None  # an insert: any existing row refuses it
    # Without it: an upsert fenced by the epoch, refused only by a final or a later row.
    return row is None or (row[0] not in TERMINAL and row[1] <= epoch)


def _customer_steps(state: State, cfg: Config, i: int, r: Replica, c: int) -> Iterator[Step]:
    fenced = cfg.on(Mechanism.SELF_FENCE) and state.time >= r.fence
    row = state.ledger[c]
    wants = c not in r.handled or c in r.deferred
    if not fenced and wants and _may_mark(cfg, row, r.epoch):
        mine = dataclasses.replace(
            r, marked=r.marked | {c}, handled=r.handled | {c}, deferred=r.deferred - {c}
        )
        yield (
            f"r{i} marks c{c}",
            _with(state, i, mine, ledger=_set(state.ledger, c, (PENDING, r.epoch))),
            None,
        )
    if c in r.marked and not fenced:
        yield from _sends(state, cfg, i, r, c)
    for known in (SENT, UNCERTAIN):
        if (c, known) in r.inflight:
            yield _record(state, cfg, i, r, c, known)
    if c in r.refused:
        mine = dataclasses.replace(r, refused=r.refused - {c}, deferred=r.deferred | {c})
        ledger = _forget(state.ledger, cfg, c, r.epoch)
        yield f"r{i} defers c{c}", _with(state, i, mine, ledger=ledger), None


def _sends(state: State, cfg: Config, i: int, r: Replica, c: int) -> Iterator[Step]:
    """The provider call: accepted, refused for now, or ambiguous (delivered or not)."""
    stale = Property.ONE_SENDER if r.epoch < state.epoch else None
    marked = r.marked - {c}
    once = _set(state.delivered, c, state.delivered[c] + 1)
    accepted = dataclasses.replace(r, marked=marked, inflight=r.inflight | {(c, SENT)})
    yield f"r{i} sends c{c}", _with(state, i, accepted, delivered=once), stale
    if state.refusals < cfg.max_refusals:
        refused = dataclasses.replace(r, marked=marked, refused=r.refused | {c})
        yield (
            f"r{i} sends c{c}: try later",
            _with(state, i, refused, refusals=state.refusals + 1),
            stale,
        )
    if state.ambiguous < cfg.max_ambiguous:
        unknown = dataclasses.replace(r, marked=marked, inflight=r.inflight | {(c, UNCERTAIN)})
        doubt = _set(state.doubt, c, True)
        for delivered, how in ((once, "delivered"), (state.delivered, "lost")):
            yield (
                f"r{i} sends c{c}: no answer ({how})",
                _with(
                    state,
                    i,
                    unknown,
                    delivered=delivered,
                    doubt=doubt,
                    ambiguous=state.ambiguous + 1,
                ),
                stale,
            )


def _record(state: State, cfg: Config, i: int, r: Replica, c: int, known: str) -> Step:
    """The outcome write. Refused (the row is no longer this epoch's pending one): the run has
    lost its lease (LeaseLost) and drops what it held."""
    mine = dataclasses.replace(r, inflight=r.inflight - {(c, known)})
    applies = state.ledger[c] == (PENDING, r.epoch) or not cfg.on(Mechanism.CONDITIONAL_OUTCOME)
    if applies:
        return (
            f"r{i} records c{c} {known}",
            _with(state, i, mine, ledger=_set(state.ledger, c, (known, r.epoch))),
            None,
        )
    lost = _doubt(state.doubt, mine.holds())
    return f"r{i} records c{c} {known}: refused", _with(state, i, Replica(), doubt=lost), None


def _drain(state: State, cfg: Config, i: int) -> State:
    """Replica i finishes what it holds and stops: outcomes written, refused sends and unsent
    marks forgotten (unless an outcome was refused: then it has lost the run and just stops)."""
    r = state.replicas[i]
    for c, known in sorted(r.inflight):
        one = dataclasses.replace(r, inflight=frozenset({(c, known)}))
        state = _record(state, cfg, i, one, c, known)[1]
        if not state.replicas[i].epoch:
            return _with(state, i, Replica(up=False))
    ledger = state.ledger
    for c in r.marked | r.refused:
        ledger = _forget(ledger, cfg, c, r.epoch)
    return _with(state, i, Replica(up=False), ledger=ledger)


def recover(state: State, cfg: Config) -> State:
    """What a fair continuation does: every replica finishes what it holds, then the lease
    runs out and a fresh replica takes over, settles what is left pending and sends every
    customer without a row (the provider now accepting)."""
    for i, r in enumerate(state.replicas):
        if r.up and r.epoch:
            state = _drain(state, cfg, i)
    epoch = state.epoch + 1
    rows = list(state.ledger)
    delivered = list(state.delivered)
    for c, row in enumerate(rows):
        if row is not None and row[0] == PENDING and row[1] < epoch and cfg.on(Mechanism.SETTLE):
            rows[c] = (UNCERTAIN, row[1])
        elif row is None:
            rows[c] = (SENT, epoch)
            delivered[c] += 1
    return dataclasses.replace(state, epoch=epoch, ledger=tuple(rows), delivered=tuple(delivered))


def broken_after_recovery(state: State, cfg: Config) -> Property | None:
    done = recover(state, cfg)
    if any(n > 1 for n in done.delivered):
        return Property.AT_MOST_ONCE
    if any(row is None or row[0] not in TERMINAL for row in done.ledger):
        return Property.ENDS_FINAL
    for row, doubt in zip(done.ledger, done.doubt, strict=True):
        if row is not None and row[0] == UNCERTAIN and not doubt:
            return Property.UNCERTAIN_ONLY_IN_DOUBT
    return None


@dataclass
class Result:
    states: int
    # The shortest counterexample found for each property that breaks: its steps (a liveness
    # counterexample's last state is the one from which recovery fails).
    broken: dict[Property, list[str]] = field(default_factory=dict)

    @property
    def holds(self) -> bool:
        return not self.broken


def explore(
    cfg: Config | None = None, *, stop_at: Property | None = None, limit: int = 3_000_000
) -> Result:
    """Breadth-first over every reachable state; the first counterexample found for each
    property is a shortest one. Stops early once `stop_at` (if given) is broken."""
    cfg = cfg or Config()
    start = initial(cfg)
    parents: dict[State, tuple[State, str] | None] = {start: None}
    queue: deque[State] = deque([start])
    result = Result(0)

    def path(state: State) -> list[str]:
        out: list[str] = []
        node = parents[state]
        while node is not None:
            out.append(node[1])
            node = parents[node[0]]
        return out[::-1]

    def note(prop: Property, steps_: list[str]) -> bool:
        result.broken.setdefault(prop, steps_)
        return prop is stop_at or len(result.broken) == len(Property)

    while queue:
        state = queue.popleft()
        if (prop := broken_after_recovery(state, cfg)) is not None and note(prop, path(state)):
            break
        if any(n > 1 for n in state.delivered):
            continue  # already a duplicate: its successors say nothing new
        for label, nxt, broke in steps(state, cfg):
            if broke is not None and note(broke, [*path(state), label]):
                queue.clear()
                break
            if nxt not in parents:
                if len(parents) >= limit:
                    raise RuntimeError(f"more than {limit} states: tighten the bounds")
                parents[nxt] = (state, label)
                if any(n > 1 for n in nxt.delivered) and note(Property.AT_MOST_ONCE, path(nxt)):
                    queue.clear()
                    break
                queue.append(nxt)
    result.states = len(parents)
    return result


# The protocol the reactor replaced: expiry judged by each replica's clock and marks that an
# epoch-fenced upsert lets overwrite an earlier epoch's pending row.
OLD = frozenset({Mechanism.DB_CLOCK, Mechanism.INSERT_ONLY_MARK})


@dataclass(frozen=True)
class AblationRow:
    switched_off: str
    states: int
    broken: dict[Property, list[str]]


def table(cfg: Config | None = None) -> list[AblationRow]:
    """All mechanisms on, then each one off alone, then the old protocol."""
    cfg = cfg or Config()
    variants: list[tuple[str, frozenset[Mechanism]]] = [("(none)", frozenset())]
    variants += [(m.value, frozenset({m})) for m in MECHANISMS]
    variants.append(("old protocol (" + ", ".join(sorted(m.value for m in OLD)) + ")", OLD))
    rows = []
    for name, off in variants:
        result = explore(dataclasses.replace(cfg, off=off))
        rows.append(AblationRow(name, result.states, result.broken))
    return rows


def render(rows: list[AblationRow]) -> str:
    lines = [
        "| switched off | states | " + " | ".join(p.value for p in Property) + " |",
        "|---|---:|" + "---|" * len(Property),
    ]
    for row in rows:
        cells = [
            f"BROKEN in {len(row.broken[p])} steps" if p in row.broken else "holds"
            for p in Property
        ]
        lines.append(f"| {row.switched_off} | {row.states:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    rows = table()
    print(render(rows))  # noqa: T201
    for row in rows:
        for prop, path in row.broken.items():
            print(f"\n{row.switched_off} / {prop.value}: " + " → ".join(path))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
