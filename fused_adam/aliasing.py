"""Parameters that are not one tensor each: one listed twice, or two over the same memory.

torch's Adam steps such a parameter once per listing and memory shared by two Parameters once
per Parameter (`b = nn.Parameter(a.data)`, weights tied by `.data` assignment); an arena gives
each parameter a segment of its own, which would step each once and silently break the tie. So
both are refused, naming the two, before anything moves. Parameters over disjoint elements of one
storage (a flat buffer cut into params, ZeRO's bucket views, interleaved strided views) share no
element: they are ordinary parameters, stepped as torch steps them.

The check sorts the memory spans of all parameters by address (one sort per construction or
layout change); only spans that intersect are compared element by element, over a byte mask of
their union.
"""
import torch

from fused_adam.distributed import local_shard


def describe(group_index, position, name=None):
    """A parameter as a user knows it: its place in the param groups, and its name if given."""
    label = f"parameter {position} of param group {group_index}"
    return f"{label} ({name!r})" if name is not None else label


def labelled_params(param_groups):
    """[(label, param)] of every listing in `param_groups`, in order."""
    return [entry for group_index, group in enumerate(param_groups)
            for entry in labelled_group(group, group_index)]


def labelled_group(group, group_index):
    """[(label, param)] of the listings in `group`, param group `group_index`."""
    names = group.get("param_names") or ()
    return [(describe(group_index, position, names[position] if position < len(names) else None),
             p) for position, p in enumerate(group["params"])]


def check_listed_once(listed):
    """ValueError for a parameter listed twice in `listed` ([(label, param)])."""
    first = {}
    for label, p in listed:
        earlier = first.setdefault(id(p), label)
        if earlier is not label:
            raise ValueError(
                f"FusedAdam: {label} is {earlier} listed again. torch.optim.Adam steps such a "
                "parameter once per listing (and warns that this will become an error); "
                "FusedAdam refuses it: list each parameter once")


def check_no_shared_memory(listed, former=()):
    """ValueError for two of `listed` ([(label, param)], each param once) that share an element
    of memory. `former` is [(label, tensor)]: memory parameters held before an arena took them,
    which another Parameter may still alias."""
    entries = [(label, local_shard(p), True) for label, p in listed]
    entries += [(label, tensor, False) for label, tensor in former]
    pair = first_shared([tensor for _, tensor, _ in entries],
                        owners=[label for label, _, _ in entries])
    if pair is None:
        return
    order = {label: index for index, (label, _) in enumerate(listed)}
    (first, _, is_param), (second, _, other_is_param) = sorted(
        (entries[i] for i in pair), key=lambda entry: order.get(entry[0], len(order)))
    formerly = ("" if is_param and other_is_param else
                " (through the memory one of them had before the optimizer took it)")
    raise ValueError(
        f"FusedAdam: {first} and {second} share memory{formerly}. torch.optim.Adam steps "
        "shared memory once per Parameter; FusedAdam gives each parameter memory of its own, "
        "which would untie them: tie weights by using one Parameter in both places, or clone() "
        "one of them")


def first_shared(tensors, owners=None):
    """(i, j), i < j, of two of `tensors` that share an element of memory, or None; two with
    the same `owners` entry may. Memory spans sorted by address: only intersecting ones are
    compared element by element."""
    spans = {}
    for index, tensor in enumerate(tensors):
        span = _span(tensor)
        if span is not None:
            spans.setdefault(tensor.device, []).append((*span, index))
    for device_spans in spans.values():
        device_spans.sort()
        open_spans = []
        for start, end, index in device_spans:
            open_spans = [span for span in open_spans if span[1] > start]
            for other_start, other_end, other in open_spans:
                if owners is not None and owners[index] == owners[other]:
                    continue
                if tensors[index] is tensors[other] or _share_elements(
                        tensors[index], tensors[other], other_start, max(end, other_end)):
                    return tuple(sorted((index, other)))
            open_spans.append((start, end, index))
    return None


def _span(tensor):
    """(first byte address, one past the last) of the memory `tensor`'s elements cover, or None
    for a tensor without memory of its own to share (empty, or on the meta device)."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    extent = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())) + 1
    start = tensor.data_ptr()
    return start, start + extent * tensor.element_size()


def _share_elements(a, b, low, high):
    """Whether `a` and `b`, whose spans intersect inside low..high, have a byte in common."""
    mask = torch.zeros(high - low, dtype=torch.bool)
    _bytes_of(mask, a, low).fill_(True)
    return bool(_bytes_of(mask, b, low).any())


def _bytes_of(mask, tensor, low):
    """The bytes of `mask` (a byte map of memory from address `low`) that `tensor` covers."""
    size = tensor.element_size()
    return mask.as_strided((*tensor.shape, size),
                           (*(stride * size for stride in tensor.stride()), 1),
                           tensor.data_ptr() - low)
