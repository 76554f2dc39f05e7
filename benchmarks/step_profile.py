"""Where a training step's time goes: torch.profiler over a few optimizer steps, summed by kind of GPU kernel.

    from benchmarks.step_profile import StepProfiler
    trainer.add_callback(StepProfiler(first=warmup + timed, count=2, lora_r=16))   # profile the 2 steps after the timed ones
    ...train...
    summary = callback.summary(step_s=median_step_s)    # ms per step by kind, GPU busy against the unprofiled step

The profiled steps run after the timed ones, so the profiler's own overhead never reaches the timed rate; the
GPU's idle share compares the kernels' time per step (which the profiler does not slow) with the median of the
unprofiled steps. Matrix products are split into the LoRA adapters' (a dimension equal to the rank) and the
rest, from the input shapes of each `aten::mm` / `aten::addmm` / `aten::bmm` call, compiled graphs included
(inductor calls the same operators for its matmuls).
"""

from __future__ import annotations

import re

from transformers import TrainerCallback

# first match wins: attention before the generic matmul names (flash kernels are SM90 kernels too)
KINDS = (
    ("attention", re.compile(r"flash|fmha|attn|attention|varlen", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|splitk|sm90_|sm80_", re.I)),
    ("compiled fusions", re.compile(r"^triton", re.I)),
    ("copies", re.compile(r"memcpy|memset|copy", re.I)),
)
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")


def kind_of(kernel: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(kernel):
            return kind
    return "other eager kernels"


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals: time with at least one kernel running."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


class StepProfiler(TrainerCallback):
    """Profiles optimizer steps [first, first + count) of a transformers Trainer run."""

    def __init__(self, first: int, count: int, lora_r: int) -> None:
        self.first, self.count, self.lora_r = first, count, lora_r
        self.step, self.prof = 0, None

    def on_step_begin(self, args, state, control, **kw):
        import torch
        from torch.profiler import ProfilerActivity, profile

        if self.step == self.first and self.prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=activities, record_shapes=True)
            self.prof.__enter__()

    def on_step_end(self, args, state, control, **kw):
        import torch

        self.step += 1
        if self.prof is not None and self.step == self.first + self.count:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)

    def summary(self, step_s: float | None, scale: float = 1.0) -> dict:
        """Milliseconds per step by kernel kind, the LoRA matmuls apart, and the GPU's idle share. `scale` = real
        tokens of a timed step over those of a profiled one (a profiled step at an epoch's end is shorter): the
        figures are per timed step's tokens, so they compare with `step_s`."""
        if self.prof is None:
            return {"error": "the profiled steps never ran"}
        from torch.autograd import DeviceType

        events = self.prof.events()
        # "## Call CompiledFxGraph ... ##" spans are annotations around a compiled graph's kernels, not kernels
        kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith("## ")]
        n = self.count / scale
        by_kind: dict[str, float] = {}
        names: dict[str, list] = {}
        for k in kernels:
            us = k.time_range.end - k.time_range.start
            kind = kind_of(k.name)
            by_kind[kind] = by_kind.get(kind, 0.0) + us
            entry = names.setdefault(k.name, [0.0, 0, kind])
            entry[0] += us
            entry[1] += 1
        busy = busy_us([(k.time_range.start, k.time_range.end) for k in kernels])
        lora = base = 0.0
        for op in self.prof.key_averages(group_by_input_shape=True):
            if op.key in MATMUL_OPS:
                dims = [d for shape in (op.input_shapes or []) for d in (shape or [])]
                us = op.self_device_time_total if kernels else op.self_cpu_time_total  # on CPU the op's own time
                if self.lora_r in dims:
                    lora += us
                else:
                    base += us
        result = {
            "steps": self.count,
            "scaled_by": round(scale, 4),
            "device": "cuda" if kernels else "cpu (no kernels: the matmul split is CPU time)",
            "kernel_ms_per_step": {kind: round(us / n / 1e3, 2) for kind, us in sorted(by_kind.items(), key=lambda x: -x[1])},
            "gpu_busy_ms_per_step": round(busy / n / 1e3, 2),
            "matmul_ms_per_step": {"lora adapters": round(lora / n / 1e3, 2), "base weights": round(base / n / 1e3, 2)},
            "kernels_per_step": round(len(kernels) / self.count),
            "top_kernels": [
                {"kernel": name[:100], "kind": kind, "ms_per_step": round(us / n / 1e3, 2), "calls_per_step": round(calls / self.count)}
                for name, (us, calls, kind) in sorted(names.items(), key=lambda x: -x[1][0])[:15]
            ],
        }
        if step_s and kernels:
            result["step_ms_unprofiled"] = round(step_s * 1e3, 1)
            result["gpu_idle_share"] = round(max(0.0, 1 - busy / n / 1e3 / (step_s * 1e3)), 3)
        return result


def table(summary: dict) -> str:
    """The summary as markdown rows: kind, ms per step, share of the GPU's busy time."""
    busy = summary.get("gpu_busy_ms_per_step") or 0
    rows = ["| kernels | ms per step | share of kernel time |", "|---|---|---|"]
    total = sum(summary["kernel_ms_per_step"].values()) or 1
    for kind, ms in summary["kernel_ms_per_step"].items():
        rows.append(f"| {kind} | {ms} | {ms / total:.1%} |")
    mm = summary["matmul_ms_per_step"]
    rows.append(f"| of the matmuls: LoRA adapters / base weights | {mm['lora adapters']} / {mm['base weights']} | |")
    if "gpu_idle_share" in summary:
        rows.append(f"| GPU busy / unprofiled step | {busy} / {summary['step_ms_unprofiled']} | idle {summary['gpu_idle_share']:.1%} |")
    return "\n".join(rows)
