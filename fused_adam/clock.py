"""How a step's phases are timed: `FusedAdam._step(..., clock)` runs each phase under
`clock(phase)`, a context manager. An ordinary step passes `NO_CLOCK`, which does nothing (one
shared object, no allocation); `bench breakdown` passes one that times each phase.
"""


class _NoClock:
    """The clock of an ordinary step: phases go untimed."""

    def __call__(self, phase):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        return False


NO_CLOCK = _NoClock()
