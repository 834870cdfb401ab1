"""Generators that yield progress and return a result (``iter_segment``, ``iter_folder_usage``, jobs): run them.

``drain`` runs one to the end and returns its result; ``relay`` passes its steps on, converted, from inside
another generator. Both close the inner generator however they end, so a cancelled consumer (GeneratorExit)
or an error stops it between two steps and it cleans up (the engine puts the network back).
"""
from __future__ import annotations

from typing import Any, Callable, Generator, TypeVar

S = TypeVar("S")
R = TypeVar("R")


def drain(gen: Generator[S, Any, R], on_step: Callable[[S], Any] | None = None) -> R:
    """Run ``gen`` to the end, calling ``on_step`` with each step; return what it returns."""
    try:
        while True:
            try:
                step = next(gen)
            except StopIteration as stop:
                return stop.value
            if on_step is not None:
                on_step(step)
    finally:
        gen.close()


def relay(gen: Generator[S, Any, R], convert: Callable[[S], Any] = lambda step: step) -> Generator[Any, None, R]:
    """``yield from gen`` with each step converted by ``convert``; returns what ``gen`` returns."""
    try:
        while True:
            try:
                step = next(gen)
            except StopIteration as stop:
                return stop.value
            yield convert(step)
    finally:
        gen.close()
