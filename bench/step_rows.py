"""The step benchmark's rows, made from the samples of one config's pairs (`bench.results` is
the schema): each subject's times, bandwidth and ratio to torch-fused in its own pair's rounds;
torch-fused's own rows, its samples pooled over every pair; clip+step's where a pair timed it;
and each optimizer's share of the roofline, chained through torch-fused.
"""
from bench import memory, results, roofline, timing
from bench.providers import ANCHOR, MAX_NORM, parse


def kind(name):
    return roofline.SUBJECTS[name].kind if name in roofline.SUBJECTS else "optimizer"


def bytes_per_step(name, n_params, device_type):
    """The bytes `name` must move per step, for a config of `n_params`."""
    if name in roofline.SUBJECTS:
        n = roofline.elements(n_params, device_type)
        per = (roofline.ADAM_BYTES_PER_ELEMENT if name == roofline.NoMathRoofline.name
               else roofline.COPY_BYTES_PER_ELEMENT)
        return per * n
    return parse(name)[3] * n_params


class ConfigRows:
    """Rows of one config: `meta` (the run's), `where` (the config's fields) and `extra` (fields
    every row of the config carries) go into each."""

    def __init__(self, meta, where, extra, device_type):
        self.meta, self.where, self.extra, self.device_type = meta, where, extra, device_type

    def row(self, name, metric, value, unit, **fields):
        return results.row(self.meta, self.where, name, metric, value, unit, kind=kind(name),
                           **self.extra, **fields)

    def time_rows(self, name, metric, seconds):
        return results.time_rows(self.meta, self.where, name, metric, seconds, kind=kind(name),
                                 **self.extra)

    def measured(self, samples, measured, peaks, huge):
        """Every row of the pairs measured so far: `samples[name]` the subject's, `samples[(ANCHOR,
        name)]` torch-fused's in the same rounds; `peaks` and `huge` by subject."""
        rows = []
        for name in measured:
            rows += self.subject(name, samples[name], samples[(ANCHOR, name)], peaks, huge)
        if not measured:
            return rows
        anchor = [samples[(ANCHOR, name)] for name in measured]
        pooled = {m: [s for a in anchor for s in a[m]] for m in ("step", "iter")}
        clipped = {m: [s for a in anchor if a.get("clip_step") for s in a[m]]
                   for m in ("step", "clip_step", "clip_iter", "grad_norm")}
        rows += self.subject(ANCHOR, pooled, None, peaks, huge, clipped)
        return rows + self.roofline_fractions(rows, measured)

    def subject(self, name, samples, anchor, peaks, huge, clipped=None):
        """`name`'s rows; `anchor` is torch-fused's samples in the same rounds, None for
        torch-fused itself (its samples pooled over every pair; `clipped`, over the pairs that
        timed clip+step)."""
        step = timing.summarize(samples["step"])
        nbytes = bytes_per_step(name, self.where["n_params"], self.device_type)
        rows = self.time_rows(name, "step", samples["step"])
        if kind(name) == "optimizer":
            rows += self.time_rows(name, "iter", samples["iter"])
        rows.append(self.row(name, "GBps", nbytes / step["median"] / 1e6, "GB/s",
                             bytes_per_step=nbytes))
        if anchor is None:
            rows.append(self.row(name, "speedup_vs_torch_fused", 1.0, "x"))
        else:
            pair = timing.summarize(anchor["step"])
            rows += [self.row(name, "speedup_vs_torch_fused", pair["median"] / step["median"], "x",
                              samples=step["n"]),
                     self.row(name, "torch_fused_step_ms_in_pair", pair["median"], "ms",
                              samples=pair["n"])]
        rows += self.clip(name, samples if clipped is None else clipped, anchor)
        if peaks.get(name):
            rows.append(self.row(name, "peak_memory_GB", peaks[name] / memory.GB, "GB"))
        if huge.get(name) is not None:
            rows.append(self.row(name, "huge_page_fraction", huge[name], "fraction"))
        return rows

    def clip(self, name, samples, anchor):
        """clip+step's rows, where `name` timed it: its times (`clip_step_ms_*`, and the whole
        iteration's, `clip_iter_ms_*`), its ratio to torch-fused's clip+step in the same rounds
        (and torch-fused's median there), the clip's own cost (`clip_cost_fraction`: its
        clip+step median over its step median, minus 1, from its own rounds) and the gradients'
        norm the clip found (`grad_norm`, with the max norm it clipped to)."""
        if not samples.get("clip_step"):
            return []
        clip_step = timing.summarize(samples["clip_step"])
        step = timing.summarize(samples["step"])
        rows = self.time_rows(name, "clip_step", samples["clip_step"])
        rows += self.time_rows(name, "clip_iter", samples["clip_iter"])
        if anchor is None:
            rows.append(self.row(name, "clip_step_speedup_vs_torch_fused", 1.0, "x",
                                 samples=clip_step["n"]))
        else:
            pair = timing.summarize(anchor["clip_step"])
            rows += [self.row(name, "clip_step_speedup_vs_torch_fused",
                              pair["median"] / clip_step["median"], "x", samples=clip_step["n"]),
                     self.row(name, "torch_fused_clip_step_ms_in_pair", pair["median"], "ms",
                              samples=pair["n"])]
        return rows + [
            self.row(name, "clip_cost_fraction", clip_step["median"] / step["median"] - 1.0,
                     "fraction", samples=clip_step["n"]),
            self.row(name, "grad_norm", samples["grad_norm"][-1], None, max_norm=MAX_NORM)]

    def roofline_fractions(self, rows, measured):
        """Each optimizer's share of the roofline's bandwidth: (bytes_S / t_S) / (bytes_R / t_R),
        with t_R / t_S chained through the anchor (each link from one pair's shared rounds)."""
        table = results.Table(rows)
        config, roof = self.where["config"], roofline.NoMathRoofline.name
        roof_speedup = table.get(config, roof, "speedup_vs_torch_fused")
        if roof_speedup is None:
            return []
        roof_bytes = table.row(config, roof, "GBps")["bytes_per_step"]
        out = []
        for name in [ANCHOR] + measured:
            if kind(name) == "copy":
                continue
            speedup = table.get(config, name, "speedup_vs_torch_fused")
            fraction = (table.row(config, name, "GBps")["bytes_per_step"] * speedup
                        / (roof_bytes * roof_speedup))
            out.append(self.row(name, "roofline_fraction", fraction, "fraction"))
        return out
