"""What each mode of FusedAdam costs per parameter: the bytes one step moves (read and written)
and the memory it keeps (params and states), the latter measured, not computed.

    python -m bench.studies.state_bytes [--numel N]

Each mode is measured in a fresh process, as the no-second-copy test measures the fp32 arena:
the resident memory before the optimizer exists (the model's params only) and after its
construction and one step, less the gradients' bytes. The params become segments of the arena
and the model's own storage is freed, so what remains is the states (and master) per parameter;
the params' own bytes are added back for the table's "params + states".
"""
import argparse
import json
import subprocess
import sys

import torch

# mode: (param dtype, FusedAdam options, bytes a step moves per parameter, what it moves)
MODES = {
    "fp32 (torch's layout)": (torch.float32, {}, 28, "r p g m v 4+4+4+4, w p m v 4+4+4"),
    "fp32 params, bf16 moments": (torch.float32, dict(state_dtype=torch.bfloat16), 20,
                                  "r 4+4+2+2, w 4+2+2"),
    "fp32 params, 8-bit moments": (torch.float32, dict(state_dtype=torch.int8), 16 + 16 / 256,
                                   "r 4+4+1+1, w 4+1+1, absmax 4+4 r+w per 256"),
    "bf16 params, fp32 master, fp32 moments": (
        torch.bfloat16, dict(master_weights=True), 28, "r master 4, g 2, m v 4+4; w master 4, "
                                                       "p 2, m v 4+4"),
    "bf16 params, bf16+16 master, fp32 moments": (
        torch.bfloat16, dict(master_weights="bf16+16"), 26,
        "r p 2, remainder 2, g 2, m v 4+4; w p 2, remainder 2, m v 4+4"),
    "bf16 params, bf16+16 master, 8-bit moments": (
        torch.bfloat16, dict(master_weights="bf16+16", state_dtype=torch.int8), 14 + 16 / 256,
        "r 2+2+2+1+1, w 2+2+1+1, absmax"),
    "bf16 params, bf16+8 master, 8-bit moments": (
        torch.bfloat16, dict(master_weights="bf16+8", state_dtype=torch.int8), 12 + 16 / 256,
        "r 2+1+2+1+1, w 2+1+1+1, absmax"),
    "bf16 params, bf16+8 master, bf16 moments": (
        torch.bfloat16, dict(master_weights="bf16+8", state_dtype=torch.bfloat16), 16,
        "r 2+1+2+2+2, w 2+1+2+2"),
}

_PROBE = """
import gc, sys, torch
from fused_adam import FusedAdam

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

dtype, options, numel = {dtype}, {options}, {numel}
# Compile the kernel and start its threads (a step this size runs on all) before measuring.
warm = torch.nn.Parameter(torch.zeros(2 ** 20, dtype=dtype))
warm.grad = torch.ones_like(warm)
warm_optimizer = FusedAdam([warm], **options)  # kept: its memory freed would be reused below
warm_optimizer.step()
model = torch.nn.ParameterList(
    [torch.nn.Parameter(torch.empty(numel // 4, dtype=dtype).normal_()) for _ in range(4)])
gc.collect()
before = resident()
optimizer = FusedAdam(model.parameters(), **options)
optimizer.zero_grad()
sum(p.sum() for p in model).backward()
optimizer.step()
gc.collect()
grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model)
print((resident() - before - grad_bytes) / numel)
"""


def state_bytes_per_param(mode, numel=16 * 2 ** 20):
    """The resident bytes per parameter FusedAdam adds in `mode` (states and master: the
    params' own bytes are not counted), measured in a fresh process."""
    dtype, options, _, _ = MODES[mode]
    options_source = "{" + ", ".join(
        f"{key!r}: {value!r}".replace("torch.", "torch.") for key, value in options.items()) + "}"
    code = _PROBE.format(dtype=f"torch.{str(dtype).split('.')[1]}", options=options_source,
                         numel=numel)
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True)
    return float(probe.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.studies.state_bytes",
                                     description=__doc__)
    parser.add_argument("--numel", type=int, default=16 * 2 ** 20)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    rows = []
    print("| mode | step moves (B/param) | memory: params + states, measured (B/param) |")
    print("|---|---:|---:|")
    for mode, (dtype, _, traffic, _) in MODES.items():
        extra = state_bytes_per_param(mode, args.numel)
        param_bytes = torch.empty(0, dtype=dtype).element_size()
        rows.append(dict(mode=mode, step_bytes=traffic, memory_bytes=param_bytes + extra))
        print(f"| {mode} | {traffic:.2f} | {param_bytes + extra:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(dict(numel=args.numel, rows=rows), out, indent=1)


if __name__ == "__main__":
    main()
