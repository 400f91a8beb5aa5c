"""Progress bars whose rate and ETA are the work's own, not what came before its first step.

A loop's first step waits for its agents (Ray actors starting, compiled kernels loading), and
the first result of jobs on Ray waits for its workers (processes starting, importing twinloop,
loading compiled kernels: ~6 s of a 11 s smoke campaign here): tqdm would count those seconds
in its rate and show an ETA many times too long at the start (4 min 24 s for that campaign).
:func:`start_rate_at` restarts the bar's clock at the first update instead;
:func:`counting_from_first` makes an ``update`` that does so. Bars over jobs that finish in
parallel batches use ``smoothing=0`` (the average since the clock started), which the bursts
do not throw about as tqdm's moving average of each update's rate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: What a bar's label says until its first update (workers or agents starting).
STARTING = " — starting…"


def start_rate_at(bar: Any, n: int, desc: str = "closed loop") -> None:
    """Count ``n`` as done before ``bar``'s clock started, and start it now (as ``desc``).

    What came before the first update (Ray actors starting, compiled kernels loading) then does
    not enter the rate, so the ETA is the loop's own from the first update on.
    """
    if bar.disable:
        bar.update(n)
        return
    bar.reset(total=bar.total)
    bar.set_description_str(desc, refresh=False)
    bar.n = bar.last_print_n = bar.initial = n
    bar.refresh()


def counting_from_first(bar: Any, desc: str) -> Callable[[int], None]:
    """An ``update(n)`` for ``bar``: the first call counts ``n`` before the clock starts.

    The bar's label is ``desc`` from then on (until then, what ``bar`` was created with, e.g.
    ``desc + STARTING``).
    """
    started = False

    def update(n: int = 1) -> None:
        nonlocal started
        if started:
            bar.update(n)
        else:
            started = True
            start_rate_at(bar, n, desc)

    return update
