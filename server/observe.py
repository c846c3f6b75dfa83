"""What the runner and the registry tell observers (metrics, traces) about the work.

Each point where something is observed makes one call on one `Observer`: none at all costs a
call that does nothing, several share the call through `Observers`. Observers are called on
the event loop and must not block it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from server.records import RequestRecord, TaskRecord


class Observer(Protocol):
    """The moments worth observing, each with what is known at that moment."""

    def accepted(self, request: RequestRecord) -> None:
        """The request's intents are committed: its tasks are this process's to finish."""

    def adopted(self, tasks: Sequence[TaskRecord]) -> None:
        """Unclaimed tasks of a stopped server were taken over, to be run again here."""

    def attempt_failed(self, task: TaskRecord) -> None:
        """An attempt of the task failed and it will be tried again (its `last_error` set)."""

    def ended(self, task: TaskRecord) -> None:
        """A task of this process ended (its status and finished time are set)."""

    def committed(self, seconds: float, size: int) -> None:
        """One group commit's transaction took `seconds` and carried `size` changes."""

    def recovered(self, finished: Sequence[TaskRecord], adopted: Sequence[TaskRecord]) -> None:
        """A stopped server's claimed lines were finished here (`finished`, each recovered or
        failed) and its other unfinished tasks adopted (`adopted`, run again later)."""


class Nobody:
    """The observer when nothing observes."""

    def accepted(self, request: RequestRecord) -> None:
        pass

    def adopted(self, tasks: Sequence[TaskRecord]) -> None:
        pass

    def attempt_failed(self, task: TaskRecord) -> None:
        pass

    def ended(self, task: TaskRecord) -> None:
        pass

    def committed(self, seconds: float, size: int) -> None:
        pass

    def recovered(self, finished: Sequence[TaskRecord], adopted: Sequence[TaskRecord]) -> None:
        pass


NOBODY = Nobody()


class Observers:
    """Several observers, told in turn."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self.observers = tuple(observers)

    def accepted(self, request: RequestRecord) -> None:
        for observer in self.observers:
            observer.accepted(request)

    def adopted(self, tasks: Sequence[TaskRecord]) -> None:
        for observer in self.observers:
            observer.adopted(tasks)

    def attempt_failed(self, task: TaskRecord) -> None:
        for observer in self.observers:
            observer.attempt_failed(task)

    def ended(self, task: TaskRecord) -> None:
        for observer in self.observers:
            observer.ended(task)

    def committed(self, seconds: float, size: int) -> None:
        for observer in self.observers:
            observer.committed(seconds, size)

    def recovered(self, finished: Sequence[TaskRecord], adopted: Sequence[TaskRecord]) -> None:
        for observer in self.observers:
            observer.recovered(finished, adopted)


def combine(*observers: Observer | None) -> Observer:
    """One observer for those that are on (None is off): NOBODY, the one, or all in turn."""
    on = [observer for observer in observers if observer is not None]
    if not on:
        return NOBODY
    return on[0] if len(on) == 1 else Observers(on)
