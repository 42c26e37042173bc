"""`optimizer.state` as torch keeps it, a dict of per-parameter dicts, that notes its edits.
Entries that are not dicts (torch's own test suite keeps `state["test"] = 1` there) are kept
as they are, as torch keeps them.

Users and libraries edit an optimizer's state directly: `state.clear()` to restart Adam,
`del state[p]`, a new tensor in `state[p]["exp_avg"]`. torch's Adam reads `state` afresh every
step, so such edits take effect; FusedAdam's moments live in its arenas, so it must notice them.
Comparing every entry every step would cost a pass over all parameters; instead these containers
record which parameters were edited, and the step imports just those (see
`state_entries.follow_edits`).
"""
from collections import defaultdict


class EditLog:
    """Which parameters' state entries were edited since the optimizer last looked."""

    def __init__(self):
        self.params = set()
        self.everything = False

    def note(self, param):
        self.params.add(param)

    def note_everything(self):
        self.everything = True

    @property
    def empty(self):
        return not self.everything and not self.params

    def take(self):
        """(everything edited?, the edited params), and start afresh."""
        edited = (self.everything, self.params)
        self.params, self.everything = set(), False
        return edited


class ParamState(dict):
    """One parameter's state entry: a dict that notes its edits in the log."""

    def __init__(self, values, log, param):
        super().__init__(values)
        self._log, self._param = log, param

    def _edited(self):
        self._log.note(self._param)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._edited()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._edited()

    def __ior__(self, other):
        result = super().__ior__(other)
        self._edited()
        return result

    def clear(self):
        super().clear()
        self._edited()

    def pop(self, *args):
        self._edited()
        return super().pop(*args)

    def popitem(self):
        self._edited()
        return super().popitem()

    def setdefault(self, key, default=None):
        self._edited()
        return super().setdefault(key, default)

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._edited()

    def __reduce__(self):
        return dict, (dict(self),)  # pickles, copies and saves as the plain dict torch has


class TrackedState(defaultdict):
    """`optimizer.state`: {param: ParamState}, noting every edit in `log`. Entries the optimizer
    itself writes go through `put`, which notes nothing."""

    def __init__(self, entries=()):
        super().__init__(dict)
        self.log = EditLog()
        for param, values in dict(entries).items():
            self[param] = values

    def put(self, param, values):
        """Set `param`'s entry without noting an edit (the optimizer's own bookkeeping)."""
        dict.__setitem__(self, param, ParamState(values, self.log, param))

    def __missing__(self, param):
        # torch's `state[p]` of a parameter without state makes an empty entry; so does this.
        self[param] = {}
        return dict.__getitem__(self, param)

    def __setitem__(self, param, values):
        if isinstance(values, dict) and not (isinstance(values, ParamState)
                                             and values._log is self.log):
            values = ParamState(values, self.log, param)
        super().__setitem__(param, values)
        self.log.note(param)

    def __delitem__(self, param):
        super().__delitem__(param)
        self.log.note(param)

    def __ior__(self, other):
        for param, values in dict(other).items():
            self[param] = values
        return self

    def clear(self):
        super().clear()
        self.log.note_everything()

    def pop(self, *args):
        self.log.note_everything()
        return super().pop(*args)

    def popitem(self):
        self.log.note_everything()
        return super().popitem()

    def setdefault(self, param, default=None):
        if param not in self:
            self[param] = {} if default is None else default
        return dict.__getitem__(self, param)

    def update(self, *args, **kwargs):
        for param, values in dict(*args, **kwargs).items():
            self[param] = values

    def __reduce__(self):
        # Pickles, copies and saves as the plain defaultdict torch has.
        return defaultdict, (dict,), None, None, ((p, plain(v)) for p, v in self.items())


def plain(values):
    """A state entry as torch holds it: a plain dict for a parameter's, anything else as is."""
    return dict(values) if isinstance(values, dict) else values
