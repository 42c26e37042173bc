"""The optimizer's arenas, one per (device, real dtype), each with the gradient reader and the
kernel launcher of its backend: built from `param_groups`, and rebuilt when those change.

Checking that nothing changed costs one identity test per parameter a step; a rebuild (a group
added, a parameter appended to or removed from a group's list) packs every parameter again and
leaves the state to the optimizer, which imports it into the new arenas.
"""
import operator
from collections import defaultdict

from fused_adam import dispatch
from fused_adam.flat import Arena, real_dtype
from fused_adam.grads import GradientReader


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
    """{(device, real dtype): Arena}, with a reader and a launcher per arena."""

    def __init__(self, *, backend, state_dtype, master_weights):
        self._backend, self._state_dtype = backend, state_dtype
        self._master_weights = master_weights
        self._arenas, self._readers, self._launchers = {}, {}, {}
        # What the arenas were built from: [(group, list of its params)], None before the first.
        self._built_from = None
        self._copies_before = 0  # gradient copies counted by the readers of earlier layouts

    def __len__(self):
        return len(self._arenas)

    def items(self):
        return self._arenas.items()

    def values(self):
        return self._arenas.values()

    def reader(self, key):
        return self._readers[key]

    def launcher(self, key):
        """The backend module stepping arena `key` (its `adam_step`, `grad_power_sum`)."""
        return self._launchers[key][1]

    @property
    def backends(self):
        return {key: name for key, (name, _) in self._launchers.items()}

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

    def follow(self, param_groups):
        """Make the arenas match `param_groups`: None if they already did (new group dicts
        over the same params included), else the arenas they replace (whose params that are
        no longer in any group the caller releases)."""
        members = members_of(param_groups)
        if self._built_from is not None and members == {
                key: arena.members for key, arena in self._arenas.items()}:
            self._built_from = [(group, list(group["params"])) for group in param_groups]
            return None
        arenas, readers, launchers = {}, {}, {}
        for key, arena_members in members.items():
            name = dispatch.backend_name(self._backend, *key)
            kernels = dispatch.kernel_module(name)
            launchers[key] = (name, kernels)
            if key in self._arenas:
                self._arenas[key].forget_views()
            arenas[key] = Arena(*key, arena_members, state_dtype=self._state_dtype,
                                master_weights=self._master_weights)
            readers[key] = GradientReader(arenas[key], form=kernels.GRADS,
                                          alignment=kernels.GRAD_ADDRESS_ALIGNMENT)
        replaced = self._arenas
        self._copies_before = self.grad_copies
        self._arenas, self._readers, self._launchers = arenas, readers, launchers
        self._built_from = [(group, list(group["params"])) for group in param_groups]
        return replaced
