"""Memory a parameter had before its arena took it, which another owner still holds, and the
write-back that keeps it current.

torch's Adam steps a parameter in place, so whoever else holds the parameter's memory reads the
new values after a step. Examples: ZeroRedundancyOptimizer(parameters_as_bucket_view=True), which
moves params into its buckets and broadcasts those; a module whose own Parameter shares the memory
of a tensor given to the optimizer. An arena moves each parameter into a segment of its own, so
the new values are copied back there after each step (8 bytes per fp32 element: read the arena,
write the owner's copy) for as long as the other owner holds it. FSDP2's shard buffer needs none:
the arena re-points it.
"""
from fused_adam.torch_internals import held_by_others


class FormerMemory:
    """For one arena: {segment index: the memory its parameter had before the arena took it,
    which another owner still holds}."""

    def __init__(self, arena):
        self._arena = arena
        self._still_held = {}

    def __len__(self):
        """How many parameters are also written back to another owner's memory each step."""
        return len(self._still_held)

    def remember(self, indices, locals_):
        """Keep the memory of each parameter in `indices` (as `locals_` has it, before the
        arena takes it over) that something else also holds."""
        arena = self._arena
        for index, local, held in zip(indices, locals_, held_by_others(locals_)):
            fsdp_managed = arena.is_distributed and arena.fsdp_params[index] is not None
            if held and not fsdp_managed:
                self._still_held[index] = local.detach()
            else:
                self._still_held.pop(index, None)

    def write_back(self):
        """After a step, copy each parameter back to the memory another owner still holds; one
        whose other owner let go is dropped."""
        if not self._still_held:
            return
        held = list(self._still_held.items())
        for (index, memory), still in zip(held, held_by_others([memory for _, memory in held])):
            if still:
                memory.copy_(self._arena.view("param", index))
            else:
                del self._still_held[index]

    def items(self):
        """[(param, tensor)]: each parameter's former memory that another owner still holds."""
        params = self._arena.params_in_order
        return [(params[index], memory) for index, memory in self._still_held.items()]
