"""torch's per-parameter state entries (`optimizer.state[p]`) over an arena: which segments have
one, and the import, checking and writing of entries (a checkpoint's, or one a user edited).

An entry holds tensors over the arena (`Arena.view`) under torch's keys, created at a
parameter's first gradient as torch creates its state. Users and libraries edit `state` directly
(`state.clear()`, a new tensor in `state[p]["exp_avg"]`); the optimizer's `TrackedState` notes
which entries were edited and `follow_edits` imports those. Every entry is checked (`plan`)
before any is written, so an edit or checkpoint that is refused leaves everything as it was.
This module and the Arena are the only writers of an arena's state.
"""
import numpy as np
import torch

from fused_adam.arena import (
    ABSMAX_KEYS, MASTER_KEY, MAX_KEY, MOMENT_KEYS, REMAINDER_KEY, flat_real,
)
from fused_adam.distributed import as_local_value, is_dtensor, is_sharded, local_shard
from fused_adam.kernels import codecs
from fused_adam.kernels.contract import MASTER_DTYPES, QUANT_BLOCK

# What a parameter's state must hold once it has any (torch's Adam raises KeyError without it).
_REQUIRED_KEYS = ("step", *MOMENT_KEYS)


def _carried_by_torch(name, value):
    """Whether `value`, a checkpoint's `master_param` or `master_remainder`, came through
    torch's Adam, which casts every state tensor to its param's dtype and carries what it does
    not use unchanged through its steps: a bf16/fp16 `master_param` or a floating-point
    `master_remainder` (ours are fp32, and int16 or int8), stale since torch stepped."""
    if not torch.is_tensor(value):
        return False
    return value.dtype in MASTER_DTYPES if name == MASTER_KEY else value.is_floating_point()


class StateEntries:
    """Which segments of one arena have torch's state entry (`has_state`; `has_max`: with
    max_exp_avg_sq), and the import, checking and writing of their entries."""

    def __init__(self, arena):
        self._arena = arena
        self.params = arena.params_in_order
        self.has_state = np.zeros(len(arena), dtype=bool)
        self.has_max = np.zeros(len(arena), dtype=bool)

    def create(self, has_grad, amsgrad, put):
        """torch creates a parameter's state at its first gradient; so does this (as arena
        views), calling `put(param, entry)` for each segment of `has_grad` without state,
        `amsgrad` per param group. Done before the kernel runs: a step interrupted after it
        leaves state at step 0 with zero moments, which is where torch's own state starts."""
        arena = self._arena
        if amsgrad[arena.groups].any():
            arena.ensure_max_buffer()
        new = has_grad & ~self.has_state
        for index in np.flatnonzero(new):
            with_max = bool(amsgrad[arena.host_groups[index]])
            put(arena.params_in_order[index], self.views(index, with_max))
            self.has_max[index] = with_max
        self.has_state |= new

    def check_amsgrad(self, has_grad, amsgrad):
        """Refuse a step of the segments of `has_grad` in groups that switched amsgrad on
        (`amsgrad`, per param group) after their first step, which finds no max_exp_avg_sq in
        their state (torch's Adam raises KeyError there), and amsgrad with 8-bit moments."""
        arena = self._arena
        if (has_grad & self.has_state & ~self.has_max & amsgrad[arena.host_groups]).any():
            raise KeyError(MAX_KEY)
        if arena.quantized and amsgrad[arena.groups].any():
            raise ValueError("FusedAdam: amsgrad is not offered with 8-bit moments "
                             "(state_dtype=torch.int8); a param group switched it on")

    def views(self, index, amsgrad):
        """`state[p]` for segment `index`, with torch's keys (and `master_param` when there is a
        master copy): tensors over the arena, DTensors over it for a DTensor parameter."""
        arena = self._arena
        names = ["step", *MOMENT_KEYS]
        if arena.quantized:
            names.extend(ABSMAX_KEYS.values())
        if amsgrad:
            arena.ensure_max_buffer()
            names.append(MAX_KEY)
        if arena.has_master:
            names.append(MASTER_KEY if arena.remainder_dtype is None else REMAINDER_KEY)
        return {name: arena.view(name, index) for name in names}

    def plan(self, index, entry):
        """[(name, value)] to write into segment `index` for torch's state entry `entry` (a
        checkpoint's, or one a user edited), or None for no state (torch's empty entry
        included); raises, naming the parameter, for an entry torch's Adam could not step
        from or that does not fit."""
        if not entry:
            return None
        arena = self._arena
        missing = [name for name in _REQUIRED_KEYS if name not in entry]
        if missing:
            raise KeyError(f"FusedAdam: the state of {arena.describe(index)} has no "
                           f"{missing[0]!r} (torch's Adam needs it to step)")
        planned = []
        for name in (*_REQUIRED_KEYS, MAX_KEY, MASTER_KEY, REMAINDER_KEY,
                     *ABSMAX_KEYS.values()):
            if name not in entry or arena.owns(index, name, entry[name]):
                continue
            if name == MASTER_KEY and not arena.has_master:
                continue
            if name in (MASTER_KEY, REMAINDER_KEY) and _carried_by_torch(name, entry[name]):
                continue  # stale: the master comes from the params (`_lacks_master`)
            if name == REMAINDER_KEY and arena.remainder_dtype is None:
                continue  # a compact master's, for an optimizer that keeps another kind
            if name in ABSMAX_KEYS.values() and not self._takes_codes(entry, name):
                continue  # beside float moments (torch's), or in an arena of float moments
            problem = self._value_problem(index, name, entry[name])
            if problem is not None:
                raise ValueError(f"FusedAdam: the state of {arena.describe(index)} does not "
                                 f"fit it: {problem}")
            planned.append((name, entry[name]))
        for moment, absmax in ABSMAX_KEYS.items():
            if self._takes_codes(entry, absmax) and absmax not in entry:
                raise ValueError(f"FusedAdam: the state of {arena.describe(index)} holds 8-bit "
                                 f"codes in {moment!r} without their {absmax!r}")
        return planned

    def take(self, index, entry, planned):
        """Write `planned` (what `plan` made of `entry`) into segment `index`, the master from
        the params where `entry` has none; returns the entry's views of the arena."""
        arena = self._arena
        for name, value in planned:
            self._write(index, name, value)
        if self._lacks_master(entry):
            self._write(index, MASTER_KEY, arena.params_in_order[index].detach())
        with_max = MAX_KEY in entry
        views = self.views(index, amsgrad=with_max)
        self.has_state[index] = True
        self.has_max[index] = with_max
        return views

    def reset(self, index):
        """Segment `index` back to torch's state before its first step."""
        arena = self._arena
        for name in (*MOMENT_KEYS, MAX_KEY):
            if arena.holds(name):
                arena.segment(name, index).zero_()
        for name in ABSMAX_KEYS.values():
            if arena.holds(name):
                arena.segment(name, index, padded=True).zero_()
        arena.view("step", index).zero_()
        arena.master_from_params(index)
        self.has_state[index] = False
        self.has_max[index] = False

    def _lacks_master(self, entry):
        """Whether a state entry leaves this arena's master to be taken from the params
        (torch's, one of a FusedAdam without this kind of master, or one whose master torch
        carried: see `_carried_by_torch`)."""
        arena = self._arena

        def holds(name):
            return name in entry and not _carried_by_torch(name, entry[name])

        return arena.has_master and not holds(MASTER_KEY) and not (
            arena.remainder_dtype is not None and holds(REMAINDER_KEY))

    def _takes_codes(self, entry, absmax_name):
        """Whether the moment of `absmax_name` in `entry` is 8-bit codes this arena copies
        as they are (else a float moment, which it quantizes, or which it holds as floats)."""
        moment = next(key for key, value in ABSMAX_KEYS.items() if value == absmax_name)
        value = entry.get(moment)
        return (self._arena.quantized and torch.is_tensor(value)
                and not (value.is_floating_point() or value.is_complex()))

    def _value_problem(self, index, name, value):
        """Why `value` cannot be segment `index`'s `name`, or None."""
        arena = self._arena
        if name == "step":
            if isinstance(value, (int, float)) or (torch.is_tensor(value) and value.numel() == 1):
                return None
            return f"state['step'] is {value!r}, not a number"
        if not torch.is_tensor(value):
            return f"state[{name!r}] is a {type(value).__name__}, not a tensor"
        if name == REMAINDER_KEY and value.dtype != arena.remainder_dtype:
            return f"state[{name!r}] is {value.dtype}, not {arena.remainder_dtype}"
        if name in ABSMAX_KEYS.values():
            return self._blocks_problem(index, name, value)
        if name in ABSMAX_KEYS and not (value.is_floating_point() or value.is_complex()):
            if not arena.quantized:
                return (f"state[{name!r}] holds 8-bit codes ({value.dtype}); this optimizer "
                        "keeps float moments (convert the checkpoint with "
                        "fused_adam.dequantized_state_dict)")
            codes = getattr(arena.record, name).dtype
            if value.dtype != codes:
                return f"state[{name!r}] is {value.dtype}, not {codes} codes"
        p = arena.params_in_order[index]
        # A DTensor value is redistributed to the parameter's placements; a plain one is this
        # rank's shard (the whole tensor for a plain parameter).
        expected = p if is_dtensor(value) else local_shard(p)
        if value.numel() != expected.numel():
            return (f"state[{name!r}] has shape {tuple(value.shape)}, but the parameter has "
                    f"shape {tuple(expected.shape)}")
        return None

    def _blocks_problem(self, index, name, value):
        """Why `value` cannot be segment `index`'s per-block absmax `name`, or None. Blocks
        start at each shard's start, so a sharded checkpoint's absmax fits only the sharding it
        was saved from: a DTensor value must have our DTensor's shape (as many shards, as many
        blocks each), a plain one this shard's blocks (padded or not)."""
        blocks = -(-int(self._arena.lengths[index]) // QUANT_BLOCK)
        ours = self._arena.view(name, index)
        if is_sharded(value) and not is_dtensor(ours):
            return (f"state[{name!r}] holds the per-shard blocks of a sharded parameter "
                    f"({value.placements}); this parameter is whole")
        if is_dtensor(value):
            if value.shape != ours.shape:
                return (f"state[{name!r}] has {value.numel()} blocks over its shards, this "
                        f"parameter's sharding {ours.numel()} ({ours.placements}): 8-bit "
                        "moments load only into the sharding they were saved from")
            return None
        if value.numel() not in (blocks, local_shard(ours).numel()):
            return f"state[{name!r}] has {value.numel()} blocks, the parameter {blocks}"
        return None

    def _write(self, index, name, value):
        """Copy `value` (a checkpoint's or a user's) into segment `index`'s `name`."""
        arena = self._arena
        if name == MAX_KEY:
            arena.ensure_max_buffer()
        if name == MASTER_KEY and arena.remainder_dtype is not None:
            # An fp32 master (ours, or the params): the params become its rounding.
            flat = as_local_value(value, arena.view("param", index)).detach().reshape(-1)
            high, remainder = codecs.split_master(flat.to(arena.device, torch.float32),
                                                  arena.remainder_dtype)
            arena.segment("param", index).copy_(high)
            arena.segment(REMAINDER_KEY, index).copy_(remainder)
            return
        view = arena.view(name, index)
        if name == "step":
            view.fill_(float(value))
            return
        if arena.quantized and name in ABSMAX_KEYS and value.is_floating_point():
            # A float moment (torch's checkpoint, a user's edit): quantized on the way in.
            flat = flat_real(as_local_value(value, view).detach()).to(arena.device)
            codes, absmax = codecs.quantize(flat, signed=name == "exp_avg")
            arena.segment(name, index).copy_(codes)
            arena.segment(ABSMAX_KEYS[name], index).copy_(absmax)
            return
        target = local_shard(view)
        if name in ABSMAX_KEYS.values():  # this shard's blocks, or as many padded
            local = as_local_value(value, view).detach().reshape(-1)
            target[:local.numel()].copy_(local)
            target[local.numel():].zero_()
            return
        target.copy_(as_local_value(value, view).reshape(target.shape))


def follow_edits(state, arenas, *, everything=False):
    """Import what was edited in `state` (a `TrackedState`) since it was last followed into
    `arenas` (`Arenas`): a cleared or deleted entry restarts that parameter's Adam, a tensor put
    into an entry becomes its value; with `everything`, every entry. All is checked before
    anything is written; an edit that is refused stays pending, so the next step refuses it
    again."""
    log = state.log
    if not everything and log.empty:
        return
    everything = everything or log.everything
    targets = [(entries, index, p, dict.get(state, p))
               for entries in arenas.all_entries()
               for index, p in enumerate(entries.params)
               if everything or p in log.params]
    plans = [entries.plan(index, entry) for entries, index, _, entry in targets]
    for (entries, index, p, entry), planned in zip(targets, plans):
        if planned is None:  # no state (an empty entry is torch's "no state" too)
            if entries.has_state[index]:
                entries.reset(index)
            continue
        state.put(p, {**entry, **entries.take(index, entry, planned)})
    log.take()
