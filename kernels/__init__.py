"""Compiled Adam kernels and the plain-torch oracle; no optimizer logic lives here.

Every backend implements one launcher with the same contract, over the flat arena that
`fused_adam.flat.Arena` owns for one (device, dtype):

    adam_step(arena, grad_addresses, group_table, *, inv_grad_scale=None, found_inf=None)

`arena` carries flat 1-D buffers of one dtype on one device: `params`, `exp_avg`, `exp_avg_sq`,
`max_exp_avg_sq` (None until a group asks for amsgrad), and per-segment tables (one segment per
parameter): `segment_starts` and `segment_lengths` (int64 elements), `segment_groups` (int64 rows
of `group_table`), `steps` (float32, torch's dtype for `state["step"]`). `arena.kernel_cache` is a
dict a launcher may fill with tables it derives from the segments (chunk tables, numpy views); the
arena clears it whenever its layout changes.

`grad_addresses` (int64, one per segment) holds the address of each parameter's gradient, which
is contiguous, of the arena's dtype, and lives wherever autograd (or the user, or DDP) left it;
0 means "no gradient this step": that segment neither moves nor advances its step.

`group_table` (float64, one row per param group) has the columns below.

Each backend module also says what it needs of gradients: `GRAD_ADDRESS_ALIGNMENT` (bytes; the
arena copies, and counts, a gradient whose address is not a multiple) and `READS_GRAD_TENSORS`
(True: the launcher reads the gradients as tensors from `arena.grads_by_segment`, None where a
segment has none, instead of by address).

For every segment with a gradient, unless `found_inf` is nonzero, a launcher adds 1 to `steps`
and applies the update of DESIGN.md's kernel contract with that segment's step and group.
"""

# Columns of the per-group hyperparameter table every kernel reads.
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, MAXIMIZE, AMSGRAD, DECOUPLED_WD = range(8)
GROUP_COLUMNS = 8

# Every segment starts on a multiple of this many elements (64 B for fp32), so that every
# load and store of a kernel can be 128-bit.
SEGMENT_ALIGNMENT = 16
