"""The optimizer's arenas, one per (device, real dtype), each with its state entries, its
gradient reader and its backend: built from `param_groups`, and rebuilt when those change.

Checking that nothing changed costs one identity test per parameter a step; a rebuild (a group
added, a parameter appended to or removed from a group's list) packs every parameter again and
leaves the state to the optimizer, which imports it into the new arenas.
"""
import operator
from collections import defaultdict

from fused_adam import aliasing, dispatch
from fused_adam.arena import Arena, real_dtype
from fused_adam.grads import GradientReader
from fused_adam.state_entries import StateEntries


def members_of(param_groups):
    """{(device, real dtype): [(param, group index, position in group)]}, each param once."""
    members, seen = defaultdict(list), set()
    for group_index, group in enumerate(param_groups):
        for position, p in enumerate(group["params"]):
            if p not in seen:
                seen.add(p)
                members[(p.device, real_dtype(p.dtype))].append((p, group_index, position))
    return members


class Arenas:
    """{(device, real dtype): Arena}, with state entries, a gradient reader and a backend (the
    module of kernels that steps it) per arena."""

    def __init__(self, *, backend, state_dtype, master_weights):
        self._requested_backend, self._state_dtype = backend, state_dtype
        self._master_weights = master_weights
        self._arenas, self._entries, self._readers, self._backends = {}, {}, {}, {}
        # What the arenas were built from: [(group, list of its params)], None before the first.
        self._built_from = None
        self._copies_before = 0  # gradient copies counted by the readers of earlier layouts

    def __len__(self):
        return len(self._arenas)

    def items(self):
        return self._arenas.items()

    def values(self):
        return self._arenas.values()

    def entries_of(self, key):
        """Arena `key`'s `StateEntries`."""
        return self._entries[key]

    def all_entries(self):
        return self._entries.values()

    def reader(self, key):
        return self._readers[key]

    def backend(self, key):
        """The backend stepping arena `key`: its module (`adam_step`, `grad_power_sum`)."""
        return self._backends[key][1]

    @property
    def backend_names(self):
        return {key: name for key, (name, _) in self._backends.items()}

    @property
    def grad_copies(self):
        return self._copies_before + sum(reader.copies for reader in self._readers.values())

    def unchanged(self, param_groups):
        """Whether `param_groups` holds the groups and params the arenas were built from."""
        built = self._built_from
        if built is None or len(built) != len(param_groups):
            return False
        for group, (built_group, built_params) in zip(param_groups, built):
            params = group["params"]
            if (group is not built_group or len(params) != len(built_params)
                    or not all(map(operator.is_, params, built_params))):
                return False
        return True

    def check_no_shared_memory(self, param_groups):
        """ValueError, naming both, for two params of `param_groups` that share memory, or one
        that shares the memory a param had before an arena took it (`b = nn.Parameter(a.data)`
        made before the optimizer, added after)."""
        listed = aliasing.labelled_params(param_groups)
        label_of = {id(p): label for label, p in listed}
        former = [(label_of[id(p)], tensor) for arena in self._arenas.values()
                  for p, tensor in arena.former_memory.items() if id(p) in label_of]
        aliasing.check_no_shared_memory(listed, former)

    def follow(self, param_groups):
        """Make the arenas match `param_groups`, after refusing a parameter listed twice or two
        that share memory: None if they already did (new group dicts over the same params
        included), else the params that left every group, given memory of their own."""
        aliasing.check_listed_once(aliasing.labelled_params(param_groups))
        self.check_no_shared_memory(param_groups)
        members = members_of(param_groups)
        if self._built_from is not None and members == {
                key: arena.members for key, arena in self._arenas.items()}:
            self._built_from = [(group, list(group["params"])) for group in param_groups]
            return None
        arenas, entries, readers, backends = {}, {}, {}, {}
        for key, arena_members in members.items():
            name = dispatch.backend_name(self._requested_backend, *key)
            backend = dispatch.load_backend(name)
            backends[key] = (name, backend)
            if key in self._arenas:
                self._arenas[key].forget_views()
            arenas[key] = Arena(*key, arena_members, state_dtype=self._state_dtype,
                                master_weights=self._master_weights)
            entries[key] = StateEntries(arenas[key])
            readers[key] = GradientReader(arenas[key], form=backend.GRADS,
                                          alignment=backend.GRAD_ADDRESS_ALIGNMENT)
        replaced = self._arenas
        self._copies_before = self.grad_copies
        self._arenas, self._entries = arenas, entries
        self._readers, self._backends = readers, backends
        self._built_from = [(group, list(group["params"])) for group in param_groups]
        kept = self.params()
        removed = []
        for arena in replaced.values():
            for index, p in enumerate(arena.params_in_order):
                if p not in kept:
                    arena.release(index)
                    removed.append(p)
        return removed

    def params(self):
        """The set of every arena's params."""
        return {p for arena in self._arenas.values() for p in arena.params_in_order}
