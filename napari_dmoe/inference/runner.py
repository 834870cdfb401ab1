"""Runs window batches through the network: device placement, AMP, channels-last, torch.compile, OOM retry.

Speed options, off by default because only a GPU can show whether they pay (bench/bench_gpu.py measures them):
- ``channels_last``: conv weights and inputs in NHWC / NDHWC order, which cuDNN's tensor-core kernels prefer.
  On a CPU it was slower (BENCHMARKS.md). Restored to the default layout when the run ends.
- ``compile``: ``torch.compile`` of the network, built once per network object and kept for later runs (the
  first call compiles: tens of seconds). Batches are padded to a constant size so the compiled graph is not
  rebuilt for a short last batch. The first compiled batch is checked against the eager network; a compile
  error or a mismatch gives a warning and the run continues eagerly, never a failed segmentation.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import torch

from napari_dmoe.inference.plan import InferenceError

COMPILE_TOLERANCE = 1e-3  # max |p_compiled - p_eager| over softmax probabilities (fp32); AMP allows 1e-2
# The compiled form lives on the network object (state belongs to the model, not the process). Set with
# object.__setattr__ so nn.Module does not register it as a submodule (no state_dict keys, no recursion); a
# module-level WeakKeyDictionary would leak, because the compiled module holds its network strongly.
_ATTR = "_dmoe_compiled"
_BROKEN = "broken"  # the compiled form failed or disagreed: not tried again for this network


def memory_format(network: torch.nn.Module) -> torch.memory_format:
    """channels_last for 2D convolutions, channels_last_3d for 3D."""
    conv3d = any(isinstance(m, torch.nn.Conv3d) for m in network.modules())
    return torch.channels_last_3d if conv3d else torch.channels_last


class Runner:
    """Moves the network to the device, runs window batches (AMP on CUDA), halves the batch on CUDA OOM."""

    def __init__(self, network: torch.nn.Module, device: torch.device, amp: bool, batch: int, warns: list,
                 channels_last: bool = False, compile: bool = False) -> None:
        self.network, self.device, self.batch, self.warns = network, device, batch, warns
        self.amp = amp and device.type == "cuda"
        self.channels_last, self.compile = channels_last, compile
        self.format = memory_format(network) if channels_last else torch.contiguous_format
        first = next(network.parameters(), None)
        self.home = first.device if first is not None else torch.device("cpu")
        self.was_training = network.training
        self.verified = False

    def start(self) -> None:
        self.network.eval()
        self.network.to(self.device)
        if self.channels_last:
            self.network.to(memory_format=self.format)

    def stop(self) -> None:
        """Always called (also on close or error): the network goes home and the CUDA cache is emptied."""
        if self.channels_last:
            self.network.to(memory_format=torch.contiguous_format)
        self.network.to(self.home)
        self.network.train(self.was_training)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def predict(
        self, x: torch.Tensor, router: int | Sequence[int], want_routing: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Softmax probabilities ``[B, classes, *roi]`` and gate weights per position, both on the CPU.
        ``router``: one router for the batch or one per window."""
        while True:
            try:
                return self._chunks(x, router, want_routing)
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                if self.batch == 1:
                    raise InferenceError(
                        f"ran out of GPU memory on {self.device} even with one window at a time; use "
                        "device='cpu' or a smaller roi_size"
                    ) from None
                self.batch = max(1, self.batch // 2)
                self.warns.append(f"GPU out of memory: retried with sw_batch_size={self.batch}")

    def _chunks(
        self, x: torch.Tensor, router: int | Sequence[int], want_routing: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        probs, routes = [], {}
        per_window = torch.as_tensor(router, dtype=torch.long).expand(x.shape[0])
        for i in range(0, x.shape[0], self.batch):
            chunk = x[i : i + self.batch].to(self.device).contiguous(memory_format=self.format)
            attr = per_window[i : i + self.batch].to(self.device)
            p, records = self._forward(chunk, attr, want_routing)
            probs.append(p)
            for position, w in records:  # a shared dMoE is called once per block: positions are already distinct
                routes.setdefault(position, []).append(w)
        return torch.cat(probs), {k: torch.cat(v) for k, v in routes.items()}

    def _forward(self, chunk: torch.Tensor, attr: torch.Tensor, want_routing: bool
                 ) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
        net, n = self._network(), chunk.shape[0]
        if net is not self.network and n < self.batch:  # constant batch: no recompile for a short last batch
            pad = self.batch - n
            chunk = torch.cat([chunk, chunk[-1:].expand(pad, *chunk.shape[1:])])
            attr = torch.cat([attr, attr[-1:].expand(pad)])
        try:
            probs, records = self._run(net, chunk, attr, want_routing)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 (compilation happens on the first call; any failure: run eagerly)
            if net is self.network:
                raise
            self._give_up(f"torch.compile failed ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]})")
            net = self.network
            probs, records = self._run(net, chunk, attr, want_routing)
        if net is not self.network and not self.verified:
            probs, records = self._verify(probs, records, chunk, attr, want_routing)
        return probs[:n], [(pos, w[:n]) for pos, w in records]

    def _run(self, net: Any, chunk: torch.Tensor, attr: torch.Tensor, want_routing: bool
             ) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
        autocast = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
        with torch.inference_mode(), autocast:
            if want_routing:
                from napari_dmoe.model.moe import capture_routing

                with capture_routing(self.network) as records:
                    logits = net(chunk, attr)
            else:
                records, logits = [], net(chunk, attr)
        probs = torch.softmax(logits.float(), dim=1).cpu()
        return probs, [(rec.position, rec.weights.float().cpu()) for rec in records]

    def _network(self) -> Any:
        """The compiled network when asked for and usable, else the network itself."""
        if not self.compile:
            return self.network
        compiled = getattr(self.network, _ATTR, None)
        if compiled is None:
            try:
                from napari_dmoe.model.moe import keep_eager_under_compile

                keep_eager_under_compile()
                compiled = torch.compile(self.network)
            except Exception as err:  # noqa: BLE001 (any compile failure means: run eagerly)
                return self._give_up(f"torch.compile is not available here ({type(err).__name__}: {err})")
            object.__setattr__(self.network, _ATTR, compiled)
        return self.network if isinstance(compiled, str) else compiled

    def _verify(self, probs: torch.Tensor, records: list, chunk: torch.Tensor, attr: torch.Tensor,
                want_routing: bool) -> tuple[torch.Tensor, list]:
        """Compare the first compiled batch with the eager network; on a mismatch keep the eager result."""
        eager, eager_records = self._run(self.network, chunk, attr, want_routing)
        diff = (probs - eager).abs().max().item()
        tolerance = 10 * COMPILE_TOLERANCE if self.amp else COMPILE_TOLERANCE
        self.verified = True
        if diff > tolerance:
            self._give_up(f"the compiled network differs from the eager one by {diff:.2g} (> {tolerance:g})")
            return eager, eager_records
        return probs, records

    def _give_up(self, reason: str) -> torch.nn.Module:
        object.__setattr__(self.network, _ATTR, _BROKEN)
        self.warns.append(f"{reason}: ran without torch.compile")
        return self.network
