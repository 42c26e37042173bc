"""Loading a checkpoint (`FusedAdam.load_state_dict`): torch's loader, hooks included, with every
entry checked against the arenas before anything changes and the values kept at their own
precision.

torch's loader casts every state value to its param's dtype (which would round an fp32 master
copy to bf16) and would fail half-way for an entry that does not fit. So a pre-hook, run after
every pre-hook of the user's, checks the final checkpoint and keeps it (`Loading`); when torch's
loader hands the optimizer its cast state (`__setstate__`), the checkpoint's own values replace
the cast ones (`with_own_values`) before the arenas import them.
"""
import itertools

from fused_adam.tracked_state import TrackedState


def checkpoint_params(state_dict, param_groups):
    """{saved id: param} as torch's loader pairs them, or None where the groups differ (its
    own ValueError follows)."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(param_groups) or any(
            len(saved["params"]) != len(group["params"])
            for saved, group in zip(saved_groups, param_groups)):
        return None
    return dict(zip(itertools.chain.from_iterable(g["params"] for g in saved_groups),
                    itertools.chain.from_iterable(g["params"] for g in param_groups)))


class Loading:
    """One `load_state_dict` of an optimizer whose arenas are `arenas` (its `Arenas`, following
    its param groups): `check_and_keep` is its last pre-hook, `state_dict` what it kept."""

    def __init__(self, arenas):
        self._arenas = arenas
        self.state_dict = None

    def check_and_keep(self, optimizer, state_dict):
        """Refuse, naming the parameter, a checkpoint entry the arenas cannot take, before
        torch's loader changes anything; keep the checkpoint."""
        by_id = checkpoint_params(state_dict, optimizer.param_groups)
        if by_id is not None:
            where = {p: (entries, index) for entries in self._arenas.all_entries()
                     for index, p in enumerate(entries.params)}
            for saved_id, entry in state_dict["state"].items():
                p = by_id.get(saved_id)
                if p is not None and p in where:
                    entries, index = where[p]
                    entries.plan(index, entry)
        self.state_dict = state_dict


def with_own_values(state, loading, param_groups):
    """`state` as torch's loader left it (every value cast to its param's dtype), as a
    `TrackedState` holding the checkpoint's own values where `loading` (a `Loading`, or None)
    kept one."""
    state = TrackedState(state)
    loaded = loading.state_dict if loading is not None else None
    if loaded is not None:
        by_id = checkpoint_params(loaded, param_groups) or {}
        for saved_id, entry in loaded["state"].items():
            p = by_id.get(saved_id)
            if p is not None and p in state:
                state[p] = {**state[p], **entry}
    return state
